"""Saving, loading (with and without cwic_exp) and teacher resolution."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cwic_exp
from cwic_exp import cwic_context, to_cwic
from cwic_exp.teacher import resolve_model_source
from conftest import rand_batch, tiny_model


def _trained_like(family="qwen2"):
    model = to_cwic(tiny_model(family), stripe_size=16, head_stripe_size=32)
    ids, mask = rand_batch()
    with torch.no_grad():
        with cwic_context(model, token_mask=mask, update_stats=True):
            model(input_ids=ids, attention_mask=mask)
        g = torch.Generator().manual_seed(5)
        for m in cwic_exp.iter_cwic_modules(model):
            p = m.theta if isinstance(m, cwic_exp.CwicLinear) else m.phi
            p.copy_(torch.rand(p.shape, generator=g) * 0.8)
    return model, ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_load_roundtrip_after_import(tmp_path, family):
    from transformers import AutoModelForCausalLM
    model, ids, mask = _trained_like(family)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "cwic" and "auto_map" in cfg
    from safetensors.torch import load_file
    state = load_file(tmp_path / "model.safetensors")
    # standard layout: HF names for the weights, plus θ, φ and statistics
    assert "model.layers.0.self_attn.q_proj.weight" in state
    assert "model.layers.0.mlp.gate_proj.weight" in state and "model.layers.0.mlp.up_proj.weight" in state
    assert "model.layers.0.self_attn.q_proj.theta" in state and "model.layers.0.mlp.phi" in state
    assert "model.layers.0.self_attn.q_proj.ema_std" in state
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert cwic_exp.is_cwic(loaded)
    with torch.no_grad():
        out = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref)
    assert cwic_exp.active_parameters(loaded, ids, mask)["apr"] == pytest.approx(
        cwic_exp.active_parameters(model, ids, mask)["apr"])


def test_load_in_fresh_process_without_cwic_exp(tmp_path):
    model, ids, mask = _trained_like("llama")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "ckpt")
    torch.save({"ids": ids, "mask": mask, "ref": ref}, tmp_path / "io.pt")
    script = f"""
import sys, torch
sys.modules["cwic_exp"] = None          # any import of cwic_exp now fails
from transformers import AutoModelForCausalLM
io = torch.load({str(tmp_path / 'io.pt')!r})
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True)
assert "cwic_exp" not in type(m).__module__
with torch.no_grad():
    out = m(input_ids=io["ids"], attention_mask=io["mask"]).logits
torch.testing.assert_close(out, io["ref"])
print("OK", type(m).__name__)
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout


def test_the_modeling_file_imports_every_code_file_it_needs_itself():
    """transformers 4.x (checked 4.56.2) copies into its remote-code cache only the relative imports that the modeling
    file itself names (its own regexes below), then resolves them recursively there: a file that only layers.py
    imported (functional.py) was missing, and a checkpoint did not load without cwic_exp. 5.x copies recursively."""
    import re
    from cwic_exp.modeling import modeling_cwic as mc
    here = Path(mc.__file__).parent

    def rel(name):
        text = (here / f"{name}.py").read_text()
        return set(re.findall(r"^\s*import\s+\.(\S+)\s*$", text, flags=re.MULTILINE)) | \
            set(re.findall(r"^\s*from\s+\.(\S+)\s+import", text, flags=re.MULTILINE))
    needed, todo = set(), ["modeling_cwic"]
    while todo:
        new = rel(todo.pop()) - needed
        needed |= new
        todo += sorted(new)
    assert needed <= rel("modeling_cwic"), sorted(needed - rel("modeling_cwic"))
    assert {f"{n}.py" for n in needed | {"modeling_cwic"}} <= set(mc._CODE_FILES)   # and the export ships them


# the special tokens SmolLM2-135M-Instruct's GGUF names
SMOL_SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                 "pad_token": "<|im_end|>"}


def test_a_gguf_teacher_loads_in_the_dtype_asked_for(monkeypatch):
    """The dequantised GGUF copy loads in the requested dtype (evaluation loads its dense and TEAL baselines in bf16
    through it); a GGUF load that always gave fp32 passed every test."""
    from types import SimpleNamespace
    from cwic_exp import teacher as T
    T._load_gguf_cache_only(resolve_model_source("smollm2-135m-instruct")["path"])   # the copy, made once
    seen = []
    monkeypatch.setattr(T, "_load_folder", lambda path, dtype: (seen.append(dtype), torch.nn.Linear(1, 1),
                                                                 SimpleNamespace(**SMOL_SPECIALS))[1:])
    T.load_teacher("smollm2-135m-instruct", dtype=torch.bfloat16)
    assert seen == [torch.bfloat16]


def test_a_gguf_tokenizer_gets_the_special_tokens_the_file_names(monkeypatch):
    """transformers 5.17 builds SmolLM2's tokenizer from the GGUF with eos <|im_start|> and no pad, which leaves
    <|im_end|>, the token that ends every chat turn, out of `all_special_ids` (the trained export's tokenizer on the
    GPU box), and the dequantised copy keeps what that version saved. Every GGUF load, fresh or from the copy, gives
    the tokenizer the bos/eos/unk/pad the file names, with a warning that says what it changed."""
    from types import SimpleNamespace
    from transformers import AutoTokenizer
    from cwic_exp import teacher as T
    path = resolve_model_source("smollm2-135m-instruct")["path"]
    assert T.gguf_special_tokens(path) == SMOL_SPECIALS
    T._load_gguf_cache_only(path)

    def as_517_built_it():
        t = AutoTokenizer.from_pretrained(str(T._gguf_cache_path(path)))
        t.eos_token, t.pad_token = "<|im_start|>", None
        return t
    tok = as_517_built_it()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end not in tok.all_special_ids
    monkeypatch.setattr(T, "_load_folder", lambda p, dtype: (torch.nn.Linear(1, 1), tok))
    with pytest.warns(UserWarning, match=r"eos_token '<\|im_start\|>', pad_token None where the file names "
                                         r"eos_token '<\|im_end\|>', pad_token '<\|im_end\|>'"):
        _, got = T.load_teacher("smollm2-135m-instruct")
    assert (got.bos_token, got.eos_token, got.pad_token, got.unk_token) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert end == got.eos_token_id == got.pad_token_id and end in got.all_special_ids
    wrong = as_517_built_it()                                              # the tiny random models' tokenizer too
    import transformers
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: wrong)
    with pytest.warns(UserWarning, match="eos_token"):
        model, got = T.load_teacher("tiny-random-llama")
    assert got.eos_token_id == model.config.eos_token_id == end
    named = SimpleNamespace(**SMOL_SPECIALS)
    monkeypatch.setattr(T, "_load_folder", lambda p, dtype: (torch.nn.Linear(1, 1), named))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                     # a right tokenizer: nothing to say
        assert T.load_teacher("smollm2-135m-instruct")[1] is named


def test_resolve_model_source_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        resolve_model_source(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError):
        resolve_model_source("not a model!!")
    assert resolve_model_source("meta-llama/Llama-3.2-1B-Instruct")["kind"] == "hub"
    assert resolve_model_source("smollm2-135m-instruct")["kind"] == "gguf"
    assert resolve_model_source("SmolLM2")["kind"] == "gguf"                  # names and aliases in any case
    # relative paths: an existing file that is not a model, and org/name whose org is a folder here (runs/x: a
    # mistyped run, not a hub id, as check_checkpoint has it)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.bin").write_bytes(b"")
    (tmp_path / "runs").mkdir()
    for name in ("ckpt/model.bin", "runs/x"):
        with pytest.raises(FileNotFoundError, match=f"model path not found: {name}"):
            resolve_model_source(name)


@pytest.mark.slow
def test_smollm2_theta_zero_equals_dense():
    model, tok = cwic_exp.load_teacher("smollm2-135m-instruct")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = tok([text, "Hello there, how are you doing today?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc).logits
    to_cwic(model, stripe_size=192)
    with torch.no_grad():
        with cwic_context(model, token_mask=enc["attention_mask"], update_stats=True):
            model(**enc)
        out = model(**enc).logits
    real = enc["attention_mask"].bool()
    assert (out - ref)[real].abs().max().item() <= 1e-4


def test_a_failed_write_leaves_the_old_file_and_the_old_folder(tmp_path, monkeypatch):
    """save_atomic: a write that dies half-way leaves the previous file readable. replace_folder: a kill while the
    new folder moves in leaves the old one whole (as itself or under its aside name), never nothing."""
    from cwic_exp import files
    p = files.save_atomic({"v": 1}, tmp_path / "x.pt")

    def dies(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("no space left on device")
    monkeypatch.setattr(files.torch, "save", dies)
    with pytest.raises(OSError):
        files.save_atomic({"v": 2}, p)
    monkeypatch.undo()
    assert torch.load(p) == {"v": 1}
    old, new = tmp_path / "f", tmp_path / "f.tmp"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "a").write_text(text)
    real = os.replace

    def killed_moving_the_new_one_in(a, b):
        if os.fspath(a) == os.fspath(new):
            raise OSError("killed")
        return real(a, b)
    monkeypatch.setattr(files.os, "replace", killed_moving_the_new_one_in)
    with pytest.raises(OSError):
        files.replace_folder(new, old)
    monkeypatch.undo()
    kept = old if old.exists() else old.with_name(f".f.old-{files._HOST}-{os.getpid()}")
    assert (kept / "a").read_text() == "old"


def test_replace_folder_leaves_a_users_old_folder_alone(tmp_path):
    """The old folder is moved aside under this process's own hidden name: a sibling NAME.old that the user keeps
    (an earlier run renamed by hand, say) survives, and nothing else is left beside the new folder."""
    from cwic_exp import files
    for name in ("f", "f.old", "new"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a").write_text(name)
    files.replace_folder(tmp_path / "new", tmp_path / "f")
    assert (tmp_path / "f" / "a").read_text() == "new"
    assert (tmp_path / "f.old" / "a").read_text() == "f.old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "f.old"]


def test_renames_are_fsynced_in_their_folder(tmp_path, monkeypatch):
    """A rename is durable only once its folder is fsynced: save_atomic, write_text_atomic and replace_folder fsync
    the file (every file of the new folder), then the folder that holds the new name, after the rename."""
    import stat
    from cwic_exp import files
    seen, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        seen.append(("dir", st.st_ino) if stat.S_ISDIR(st.st_mode) else ("file", None))
        return real_fsync(fd)

    def replace(a, b):
        seen.append(("rename", None))
        return real_replace(a, b)
    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    files.save_atomic({"v": 1}, tmp_path / "sub" / "x.pt")
    assert seen == [("file", None), ("rename", None), ("dir", os.stat(tmp_path / "sub").st_ino)]
    seen.clear()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "w.bin").write_bytes(b"weights")       # written by another writer, never fsynced
    new_ino = os.stat(tmp_path / "new").st_ino
    files.replace_folder(tmp_path / "new", tmp_path / "f")
    assert seen == [("file", None), ("dir", new_ino), ("rename", None), ("dir", os.stat(tmp_path).st_ino)]
    seen.clear()
    files.write_text_atomic(tmp_path / "sub" / "summary.json", "{}")
    assert seen == [("file", None), ("rename", None), ("dir", os.stat(tmp_path / "sub").st_ino)]


def test_temporary_files_of_other_hosts_are_left_alone(tmp_path):
    """Ranks on several nodes may share the file system and a PID: temporary names carry the host, and a write
    removes only its own host's dead writers' files (and the PID-only names of older versions)."""
    from cwic_exp import files
    other = tmp_path / ".x.pt.tmp-node7-99999999"
    mine = tmp_path / f".x.pt.tmp-{files._HOST}-99999999"
    older = tmp_path / ".x.pt.tmp-99999999"
    for f in (other, mine, older):
        f.write_bytes(b"left by a killed write")
    files.save_atomic({"v": 1}, tmp_path / "x.pt")
    assert other.exists() and not mine.exists() and not older.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "x.pt"]


def test_the_dequantised_gguf_cache_follows_the_file(tmp_path, monkeypatch):
    """A GGUF replaced in place by one of the same size is dequantised again (its cache was named by stem and size);
    the same bytes installed again (a new venv: a new time) keep their dequantised copy."""
    from cwic_exp.teacher import _gguf_cache_path
    monkeypatch.setenv("CWIC_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"1234")
    os.utime(f, ns=(10**18, 10**18))
    before = _gguf_cache_path(str(f))
    f.write_bytes(b"5678")
    os.utime(f, ns=(2 * 10**18, 2 * 10**18))
    after = _gguf_cache_path(str(f))
    assert before != after and before.parent == after.parent == tmp_path / "cache" / "gguf"
    os.utime(f, ns=(3 * 10**18, 3 * 10**18))
    assert _gguf_cache_path(str(f)) == after


# Tests from a mutant audit of files.py (helper)

def test_two_processes_of_one_host_get_distinct_tmp_paths(monkeypatch, tmp_path):
    """Two processes of one host writing the same file use distinct temporary names (the PID is in them)."""
    from cwic_exp import files
    monkeypatch.setattr(files.os, "getpid", lambda: 111)
    a = files.tmp_path(tmp_path / "x.pt")
    monkeypatch.setattr(files.os, "getpid", lambda: 222)
    assert files.tmp_path(tmp_path / "x.pt") != a


def test_a_live_writers_tmp_file_is_left_alone(tmp_path):
    """The stale-file cleanup leaves a live process's temporary file alone (here our parent's, on this host)."""
    from cwic_exp import files
    live = tmp_path / f".x.pt.tmp-{files._HOST}-{os.getppid()}"
    live.write_bytes(b"being written")
    files.save_atomic({"v": 1}, tmp_path / "x.pt")
    assert live.exists()


def test_fsync_dir_raises_io_errors(monkeypatch, tmp_path):
    """fsync_dir passes an I/O error on (EIO); only "not supported" on this file system (EINVAL) is ignored."""
    from cwic_exp import files

    def eio(fd):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(files.os, "fsync", eio)
    with pytest.raises(OSError):
        files.fsync_dir(tmp_path)

    def einval(fd):
        raise OSError(errno.EINVAL, "not supported")
    monkeypatch.setattr(files.os, "fsync", einval)
    files.fsync_dir(tmp_path)


def test_stale_files_of_a_name_with_glob_characters(tmp_path):
    """The stale-file cleanup matches the file's own name literally: `a[1].pt` removes its own dead writer's
    temporary file (an unescaped glob read [1] as a character class, missed it, and matched a1.pt's instead)."""
    from cwic_exp import files
    own = tmp_path / f".a[1].pt.tmp-{files._HOST}-99999999"
    other = tmp_path / f".a1.pt.tmp-{files._HOST}-99999999"
    for f in (own, other):
        f.write_bytes(b"left by a killed write")
    files.save_atomic({"v": 1}, tmp_path / "a[1].pt")
    assert not own.exists() and other.exists()


def test_json_dumps_is_strict(tmp_path):
    """files.dumps writes a missing figure as null (JSON has no NaN or infinity: JSON.parse refused chat's file),
    through dicts, lists and tuples and for numpy's floats; finite numbers, ints and bools pass unchanged, and a
    `default=` that yields NaN raises instead of writing it."""
    import numpy as np
    from cwic_exp import files
    doc = {"nan": float("nan"), "inf": [float("inf"), -float("inf")], "np": np.float32("nan"),
           "t": (1.5, np.float64(2.25)), "n": 3, "b": True, "s": "NaN"}
    text = files.dumps(doc)

    def refuse(tok):
        raise AssertionError(f"non-JSON token {tok}")
    assert json.loads(text, parse_constant=refuse) == {"nan": None, "inf": [None, None], "np": None,
                                                      "t": [1.5, 2.25], "n": 3, "b": True, "s": "NaN"}
    with pytest.raises(ValueError):
        files.dumps({"x": object()}, default=lambda o: float("nan"))
