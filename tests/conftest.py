"""Shared fixtures: tiny random Llama-family models built in code (no downloads)."""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def pytest_configure(config):
    """triton < 3.7's interpreter converts one-element arrays with int(), which numpy >= 2.4 refuses: with triton 3.6
    (the GPU box's, whose torch pins it) and numpy 2.4 every Triton test failed with "only 0-dimensional arrays can be
    converted to Python scalars". Say so once, before any test runs."""
    if os.environ.get("TRITON_INTERPRET", "1" if not torch.cuda.is_available() else "0") != "1":
        return
    import re
    from importlib.metadata import PackageNotFoundError, version   # not imported: triton reads TRITON_INTERPRET then
    try:
        tv, nv = version("triton"), version("numpy")
    except PackageNotFoundError:
        return
    ver = lambda s: tuple(int(p) for p in re.findall(r"\d+", s)[:2])   # noqa: E731
    if ver(tv) < (3, 7) and ver(nv) >= (2, 4):
        raise pytest.UsageError(f"triton {tv}'s interpreter (TRITON_INTERPRET=1, the Triton tests on a CPU) needs "
                                f"numpy < 2.4, found {nv}: pip install 'numpy<2.4', or triton >= 3.7")


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as JSON.parse and jq do (Python's json reads them)."""
    import json

    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def tiny_config(family: str = "llama", **kw):
    from transformers import LlamaConfig, Qwen2Config
    base = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=True)
    base.update(kw)
    if family == "llama":
        return LlamaConfig(**base)
    if family == "qwen2":
        return Qwen2Config(**base)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32)
    if family == "qwen2":  # make the q/k/v biases non-trivial
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.1)
    return model.eval()


class IdTok:
    """A tokenizer stand-in: conversation "q<N>" (its first message) renders to [1000 + N, 7, 8]."""
    pad_token_id, eos_token_id, chat_template = 0, 0, "ids"

    def __len__(self):
        return 5000

    def __call__(self, text):
        return {"input_ids": [len(text)]}

    def apply_chat_template(self, msgs, tokenize=True):
        return [1000 + int(msgs[0]["content"][1:]), 7, 8]


def rand_batch(vocab=96, b=2, t=12, seed=1, pad_last=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return ids, mask


@pytest.fixture
def tiny():
    return tiny_model


CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


def byte_tokenizer():
    """One token per byte (character offsets are exact), ChatML's special tokens and template: chat and the
    analyses run on it without a download."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def tiny_cwic_checkpoint(path):
    """A tiny CWIC Llama saved with the byte tokenizer at `path`: statistics gathered, random θ/φ (so the masks and
    the per-token counts vary), partial last stripes (k/v: 24 rows in stripes of 16; the head: 258 in stripes of
    64). Chat's and the analyses' tests load it as a user's checkpoint."""
    import cwic_exp
    tok = byte_tokenizer()
    model = tiny_model(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cwic_exp.to_cwic(model, stripe_size=16, head_stripe_size=64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (4, 64), generator=g)
    with torch.no_grad():
        for _ in range(3):
            with cwic_exp.cwic_context(model, update_stats=True):
                model(input_ids=ids)
        for m in cwic_exp.iter_cwic_modules(model):
            p = m.theta if isinstance(m, cwic_exp.CwicLinear) else m.phi
            p.copy_(torch.rand(p.shape, generator=g) * 1.6)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CWIC_RUN_SLOW") == "1":
        return
    if "slow" in (config.getoption("-m") or ""):   # `-m slow` asks for them; `-m "not gpu"` (make test) does not
        return
    skip = pytest.mark.skip(reason="slow: set CWIC_RUN_SLOW=1 or run `make test-slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def cpu_kernels_or_skip():
    """The C++ kernels' extension, else a skip; with CWIC_REQUIRE_CPU_KERNELS=1 (CI sets it) a failure, so that a
    build that broke cannot pass as some 200 skipped tests."""
    from cwic_kernels import cpu
    ext = cpu.load()
    if ext is None:
        why = f"C++ kernels unavailable: {cpu.error()}"
        if os.environ.get("CWIC_REQUIRE_CPU_KERNELS") == "1":
            pytest.fail(why + " (CWIC_REQUIRE_CPU_KERNELS=1)")
        pytest.skip(why)
    return ext
