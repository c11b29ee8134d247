"""experiments/ckpt_transport.py: a checkpoint packed into parts on a GPU box comes back whole, or not at all."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from test_io import _trained_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("ckpt_transport", os.path.join(ROOT, "experiments", "ckpt_transport.py"))
ct = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ct)


def test_pack_take_unpack_roundtrip(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    model, ids, mask = _trained_like("llama")
    model.save_pretrained(tmp_path / "ckpt")
    man = ct.pack(tmp_path / "ckpt", tmp_path / "pack", part_mib=0.01, jobs=1)   # ~10 KiB parts: several
    n = len(man["parts"])
    assert n >= 3 and all(p["bytes"] <= int(0.01 * 2**20) for p in man["parts"])
    # the parts come back over several calls, into different folders
    a, b = tmp_path / "call1", tmp_path / "call2"
    assert ct.take(tmp_path / "pack", a, 0, 2) == ["part000.bin", "part001.bin"]
    ct.take(tmp_path / "pack", b, 2, n)
    out = ct.unpack([a, b], tmp_path / "back")
    src, got = load_file(tmp_path / "ckpt" / "model.safetensors"), load_file(out / "model.safetensors")
    assert src.keys() == got.keys()
    for k, t in src.items():
        if k.endswith("weight") and t.dim() == 2:       # matrices: bf16, the value rounded
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], t.to(torch.bfloat16)), k
        else:                                            # θ, φ, statistics, biases: bit for bit
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert (out / "config.json").read_text() == (tmp_path / "ckpt" / "config.json").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        for k, t in ref.state_dict().items():           # the same model with its matrices rounded to bf16
            if k.endswith("weight") and t.dim() == 2:
                t.copy_(t.to(torch.bfloat16))
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           ref(input_ids=ids, attention_mask=mask).logits)


def test_unpack_refuses_missing_or_corrupted_parts(tmp_path):
    model, _, _ = _trained_like("llama")
    model.save_pretrained(tmp_path / "ckpt")
    man = ct.pack(tmp_path / "ckpt", tmp_path / "pack", part_mib=0.01, weights="keep", jobs=1)
    last = man["parts"][-1]["name"]
    os.remove(tmp_path / "pack" / last)
    with pytest.raises(SystemExit, match=f"missing \\['{last}'\\]"):
        ct.unpack([tmp_path / "pack"], tmp_path / "back")
    ct.pack(tmp_path / "ckpt", tmp_path / "pack", part_mib=0.01, weights="keep", jobs=1)
    p = tmp_path / "pack" / "part001.bin"
    body = bytearray(p.read_bytes())
    body[5] ^= 1
    p.write_bytes(bytes(body))
    with pytest.raises(SystemExit, match="corrupted \\['part001.bin'\\]"):
        ct.unpack([tmp_path / "pack"], tmp_path / "back")
    assert not (tmp_path / "back").exists()
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        ct.pack(tmp_path / "pack", tmp_path / "p2")
    assert json.loads((tmp_path / "pack" / "manifest.json").read_text())["weights"] == "keep"


def test_pack_and_unpack_refuse_to_replace_what_is_not_theirs(tmp_path):
    model, _, _ = _trained_like("llama")
    ck = tmp_path / "ckpt"
    model.save_pretrained(ck)
    for out in (ck, ck / "parts", tmp_path):          # the checkpoint itself, inside it, above it
        with pytest.raises(SystemExit, match="outside the checkpoint"):
            ct.pack(ck, out, part_mib=0.01, jobs=1)
    assert (ck / "model.safetensors").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="no manifest.json"):
        ct.pack(ck, other, part_mib=0.01, jobs=1)
    ct.pack(ck, tmp_path / "pack", part_mib=0.01, jobs=1)
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        ct.unpack([tmp_path / "pack"], other)
    assert (other / "keep.txt").read_text() == "mine"
    ct.unpack([tmp_path / "pack"], tmp_path / "back")
    ct.unpack([tmp_path / "pack"], tmp_path / "back")   # an earlier unpack is replaced
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("back")) == ["back"]


def test_a_bad_part_size_leaves_an_existing_pack_alone(tmp_path):
    model, _, _ = _trained_like("llama")
    model.save_pretrained(tmp_path / "ckpt")
    man = ct.pack(tmp_path / "ckpt", tmp_path / "pack", part_mib=0.01, jobs=1)
    for bad in (0, -1, float("nan")):                  # 0 deleted the pack, then crashed; -1 wrote an empty one
        with pytest.raises(SystemExit, match="--part-mib"):
            ct.pack(tmp_path / "ckpt", tmp_path / "pack", part_mib=bad, jobs=1)
    assert sorted(p.name for p in (tmp_path / "pack").iterdir() if p.suffix == ".bin") == \
        [p["name"] for p in man["parts"]]
    # a manifest listing fewer parts than its chunks need (an old or edited one) is named, not a zlib error
    m = json.loads((tmp_path / "pack" / "manifest.json").read_text())
    m["parts"] = m["parts"][:-1]
    (tmp_path / "pack" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SystemExit, match="incomplete pack"):
        ct.unpack([tmp_path / "pack"], tmp_path / "back")
