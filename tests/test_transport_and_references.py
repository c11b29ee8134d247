"""Tests from a mutant audit of the transport tooling (ckpt_transport.py, gpu_bundle.py, theta_zero_check.py) and of
the kernels' PyTorch references (reference.py, gpu/fallback.py): each pins a behaviour that a plausible bug broke
while every existing test still passed. The references are checked against cwic_exp's own layers (the model's
maths, written independently of them), so a bug shared by a reference and a kernel cannot hide."""
from __future__ import annotations

import importlib.util
import json
import os
import types
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from kernel_checks import DEV, unit_flip_case  # before triton: the interpreter where no GPU is
from test_io import _trained_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ct = _script("ckpt_transport")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A saved tiny trained-like CWIC checkpoint (θ, φ and statistics non-trivial)."""
    d = tmp_path_factory.mktemp("ck") / "ckpt"
    model, _, _ = _trained_like("llama")
    model.save_pretrained(d)
    return d


def _same_state(a: Path, b: Path, cast: bool):
    from safetensors.torch import load_file
    src, got = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert src.keys() == got.keys()
    for k, t in src.items():
        want = t.to(torch.bfloat16) if cast and k.endswith("weight") and t.dim() == 2 else t
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


# ------------------------------------------------------------------------------------------- ckpt_transport.py

def test_unpack_refuses_an_archive_that_does_not_match_the_manifests_checksum(ckpt, tmp_path):
    """The tar's SHA-256 in the manifest is checked: a manifest edited (or from another pack of parts that all
    verify) is refused by name and nothing is written. A mutant that ignored `tar_sha256` unpacked silently."""
    ct.pack(ckpt, tmp_path / "pack", part_mib=0.01, jobs=1)
    m = json.loads((tmp_path / "pack" / "manifest.json").read_text())
    m["tar_sha256"] = "0" * 64
    (tmp_path / "pack" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SystemExit, match="does not match its checksum"):
        ct.unpack([tmp_path / "pack"], tmp_path / "back")
    assert not (tmp_path / "back").exists() and not (tmp_path / "back.tmp").exists()


def test_take_copies_count_parts_from_first(ckpt, tmp_path):
    """`take PACK OUT first count` copies parts [first, first + count) (and the manifest), whatever first is: the
    round-trip test only takes (0, 2) and (2, n), where [first, count) reads the same."""
    man = ct.pack(ckpt, tmp_path / "pack", part_mib=0.01, jobs=1)
    n = len(man["parts"])
    assert n >= 6
    assert ct.take(tmp_path / "pack", tmp_path / "c", 2, 2) == ["part002.bin", "part003.bin"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["manifest.json", "part002.bin", "part003.bin"]
    assert ct.take(tmp_path / "pack", tmp_path / "d", n - 1, 4) == [f"part{n - 1:03d}.bin"]


def test_unpack_takes_the_call_folders_in_any_order(ckpt, tmp_path):
    """The parts are joined in the manifest's order, not in the order of the folders given on the command line
    (`unpack call3 call1 call2 dest` by shell glob or by hand): the same checkpoint comes back."""
    man = ct.pack(ckpt, tmp_path / "pack", part_mib=0.01, jobs=1)
    n = len(man["parts"])
    calls = [tmp_path / f"call{j}" for j in range(3)]
    for j, c in enumerate(calls):
        ct.take(tmp_path / "pack", c, j * 2, 2 if j < 2 else n)
    out = ct.unpack(calls[::-1], tmp_path / "back")
    _same_state(ckpt, out, cast=True)


def test_weights_keep_stores_every_tensor_bit_for_bit(ckpt, tmp_path):
    """--weights keep: nothing is cast, the matrices come back in fp32 bit for bit and the manifest says no tensor
    was cast. A mutant that cast to bf16 whatever the option passed every existing test."""
    man = ct.pack(ckpt, tmp_path / "pack", part_mib=0.05, weights="keep", jobs=1)
    assert man["weights"] == "keep" and man["safetensors"]["model.safetensors"]["cast_to_bf16"] == 0
    out = ct.unpack([tmp_path / "pack"], tmp_path / "back")
    _same_state(ckpt, out, cast=False)


def test_several_zlib_chunks_in_one_and_in_parallel_workers(ckpt, tmp_path, monkeypatch):
    """A real checkpoint is hundreds of MiB: many 24 MiB chunks, compressed by a process pool. With a 4 KiB chunk
    the tiny checkpoint has several: with one worker and with two (chunk order kept) it unpacks to the same
    checkpoint. Every existing test had a single chunk and one worker."""
    monkeypatch.setattr(ct, "CHUNK", 4096)
    for jobs in (1, 2):
        man = ct.pack(ckpt, tmp_path / f"p{jobs}", part_mib=0.05, jobs=jobs)
        assert len(man["chunks"]) >= 4 and sum(man["chunks"]) == man["compressed_bytes"]
        _same_state(ckpt, ct.unpack([tmp_path / f"p{jobs}"], tmp_path / f"back{jobs}"), cast=True)


def test_unpack_leaves_a_sibling_folder_it_did_not_make(ckpt, tmp_path):
    """unpack stages under its own process's name: a user's `back.tmp` next to the destination `back` is left as it
    was (it staged in `<dest>.tmp` and deleted that first, whatever it held)."""
    ct.pack(ckpt, tmp_path / "pack", part_mib=0.05, jobs=1)
    mine = tmp_path / "back.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    ct.unpack([tmp_path / "pack"], tmp_path / "back")
    assert (mine / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------- theta_zero_check.py

class _Tok:
    """Stands in for the chat tokenizer: the template is the text, a token a character."""

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        return msgs[0]["content"]

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([[ord(c) % 96 for c in text]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


_PROMPTS = ["a much longer prompt than the others, so it differs most", "hi", "ok!"]


def _theta_zero(monkeypatch, capsys, theta=0.0):
    """Run theta_zero_check.main on a tiny random Llama; returns (its JSON, the converted model)."""
    import cwic_exp
    tz = _script("theta_zero_check")
    seen = {}
    to_cwic = cwic_exp.to_cwic

    def convert(model, **kw):
        out = to_cwic(model, **kw)
        seen["model"] = model
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            for mod in cwic_exp.iter_cwic_modules(model):
                p = mod.theta if isinstance(mod, cwic_exp.CwicLinear) else mod.phi
                p.copy_(torch.rand(p.shape, generator=g) * theta)
        return out

    monkeypatch.setattr(cwic_exp, "load_teacher", lambda name, dtype=None: (tiny_model("llama"), _Tok()))
    monkeypatch.setattr(cwic_exp, "to_cwic", convert)
    monkeypatch.setattr(tz, "PROMPTS", _PROMPTS)
    assert tz.main(["--stripe", "16"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1]), seen["model"]


def test_theta_zero_check_is_exact_after_a_statistics_pass(monkeypatch, capsys):
    """θ = 0: the check reports 0 difference, and it is measured after a statistics pass (every CWIC module's
    statistics moved once a prompt, so x̄ and σ are not the trivial 0 and 1, as the docstring promises)."""
    import cwic_exp
    res, model = _theta_zero(monkeypatch, capsys)
    assert res["max_abs_logit_diff"] < 1e-4 and len(res["per_prompt"]) == 3
    mods = list(cwic_exp.iter_cwic_modules(model))
    assert mods and all(float(m.stat_steps if hasattr(m, "stat_steps") else m.act_stat_steps) == 3 for m in mods)


def test_theta_zero_check_sees_a_conversion_that_is_not_dense(monkeypatch, capsys):
    """The check can fail: with θ > 0 slipped into the conversion it reports the largest per-prompt difference,
    well above 0, each prompt's being the converted model's (after the statistics pass) against the teacher's. A
    mutant that took the references from the converted model (before its statistics pass) or reported one prompt's
    difference instead of the maximum passed, since nothing ran the script."""
    res, model = _theta_zero(monkeypatch, capsys, theta=1.0)
    per = res["per_prompt"]
    assert min(per) > 1e-3
    assert res["max_abs_logit_diff"] == max(per) and per.index(max(per)) != len(per) - 1
    dense = tiny_model("llama")                   # the teacher as loaded: its logits against the converted model's
    with torch.no_grad():
        for q, d in zip(_PROMPTS, per):
            e = _Tok()(q)
            want = (model(**e).logits - dense(**e).logits).abs().max().item()
            assert d == pytest.approx(want, rel=1e-5, abs=1e-6), (q, d, want)


# ------------------------------------------------------------------------------------------- gpu_bundle.py

def _bundle(monkeypatch, tmp_path, argv, out=None):
    """gpu_bundle.main with the network, the data build and the evaluation bundle faked; returns (out, commands)."""
    import cwic_exp.data as D
    import cwic_exp.teacher as T
    gb = _script("gpu_bundle")
    calls = []

    def run(cmd, check=True, **kw):
        calls.append([str(c) for c in cmd])
        return types.SimpleNamespace(returncode=0)

    def save_packed(path, train, val, tok):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"packed")
        return Path(path)

    monkeypatch.setattr(gb.subprocess, "run", run)
    monkeypatch.setattr(T, "load_teacher", lambda name: (None, None))
    monkeypatch.setattr(D, "build_packed", lambda tok, source, seq_len: ("train", "val"))
    monkeypatch.setattr(D, "save_packed", save_packed)
    monkeypatch.setattr(gb, "ROOT", tmp_path)              # tmp_path stands for the repository
    out = out or tmp_path / ".gpu"
    assert gb.main(["--out", str(out), "--skip-teacher", *argv]) == 0
    return gb, out, calls


def test_gpu_bundle_run_env_points_at_what_the_bundle_holds(monkeypatch, tmp_path):
    """run_env.sh, sourced from the folder above .gpu/ on the box, exports CWIC_DATA naming the packed data file the
    bundle wrote and installs the wheels from .gpu/whl/; the evaluation bundle is prepared unless --skip-eval."""
    gb, out, calls = _bundle(monkeypatch, tmp_path, ["--skip-wheels"])
    env = (out / "run_env.sh").read_text()
    data = [l.split("=", 1)[1] for l in env.splitlines() if l.startswith("export CWIC_DATA=")]
    assert len(data) == 1 and data[0].startswith("$PWD/")
    assert (tmp_path / data[0][len("$PWD/"):]).is_file()
    assert ".gpu/whl/*.whl" in env
    assert [c[2:4] for c in calls if "eval_table.py" in c[1]] == [["prepare", "--out"]]
    assert not any("pip" in c for c in calls)
    _, _, calls = _bundle(monkeypatch, tmp_path, ["--skip-wheels", "--skip-eval"])
    assert not any("eval_table.py" in " ".join(c) for c in calls)


def test_gpu_bundle_downloads_binary_wheels_for_the_box(monkeypatch, tmp_path):
    """The wheels are binary (the box has no compiler and no network), for CPython 3.12 on manylinux x86_64, every
    pinned package; antlr4's runtime, an sdist on PyPI, is built here as a pure wheel."""
    gb, out, calls = _bundle(monkeypatch, tmp_path, ["--skip-eval"])
    dl = [c for c in calls if c[1:4] == ["-m", "pip", "download"]]
    assert len(dl) == 1
    c = dl[0]
    assert "--only-binary=:all:" in c and "--no-deps" in c
    assert c[c.index("--python-version") + 1] == "3.12" and c[c.index("--implementation") + 1] == "cp"
    assert "manylinux2014_x86_64" in c and c[c.index("-d") + 1] == str(out / "whl")
    assert all(w in c for w in gb.WHEELS)
    assert any(c[1:4] == ["-m", "pip", "wheel"] and "antlr4-python3-runtime==4.9.3" in c for c in calls)


def test_gpu_bundle_run_env_follows_seq_len_and_out(monkeypatch, tmp_path):
    """run_env.sh names the data file and the wheels the bundle wrote: `--seq-len 2048` gives sharegpt-2048.pt (it
    hard-coded sharegpt-1024.pt: the box trained on a missing or stale file), and a bundle outside the repository
    is named by its absolute paths."""
    _, out, _ = _bundle(monkeypatch, tmp_path, ["--skip-wheels", "--skip-eval", "--seq-len", "2048"])
    env = (out / "run_env.sh").read_text()
    assert "export CWIC_DATA=$PWD/.gpu/data/sharegpt-2048.pt" in env and "1024" not in env
    elsewhere = tmp_path.parent / (tmp_path.name + "_bundle")
    _, out, _ = _bundle(monkeypatch, tmp_path, ["--skip-wheels", "--skip-eval"], out=elsewhere)
    env = (out / "run_env.sh").read_text()
    assert f"export CWIC_DATA={elsewhere.resolve()}/data/sharegpt-1024.pt" in env
    assert f"--target /tmp/site {elsewhere.resolve()}/whl/*.whl" in env


# ------------------------------------------------------------------------------------------- reference.py

def _cwic_linear(n, m, stripe, bias=False, seed=0, theta=0.9):
    """A cwic_exp CwicLinear with statistics from one statistics-mode pass and random θ (a partial last stripe
    when stripe does not divide m)."""
    from cwic_exp.modeling.layers import CwicLinear
    g = torch.Generator().manual_seed(seed)
    lin = CwicLinear(n, m, bias=bias, stripe_size=stripe)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=g) / n ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(m, generator=g))
        lin.runtime.update_stats = True
        lin(torch.randn(64, n, generator=g) * 1.5 + torch.randn(n, generator=g))
        lin.runtime.update_stats = False
        lin.theta.copy_(torch.rand(lin.theta.shape, generator=g) * theta)
    return lin


def _x(B, n, seed=1, shift=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n, generator=g) * 1.5 + (0 if shift is None else shift)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,m,stripe", [(40, 52, 16), (24, 13, 5), (32, 20, 20)])
def test_gemv_reference_is_the_cwic_layer(n, m, stripe, bias):
    """gemv_reference, every kernel's oracle, against cwic_exp's CwicLinear forward (METHOD.md §1-§2 written
    independently of it) on the layer's own tensors: wt = Wᵀ, x̄, thr = θ·σ, bias = W x̄ + b. Partial last
    stripes, a layer bias, means far from zero (|x| and |x - x̄| differ). Also the per-token counts against the
    layer's AP counts, and METHOD's APs = (m/k)·‖G‖₁ with each stripe's own rows. A bug shared by the reference and a
    kernel (mask from |x|, misassigned stripe columns, bias fold omitted, a partial stripe counted full) fails here."""
    from cwic_kernels import reference as R
    lin = _cwic_linear(n, m, stripe, bias=bias, seed=n + m)
    x = _x(6, n, shift=lin.running_stats()[0])
    lin.runtime.track_ap = True
    with torch.no_grad():
        want = lin(x)
    counts = lin.ap_tokens
    mean = lin.running_stats()[0]
    thr = lin.thresholds().detach()
    got = R.gemv_reference(x, lin.weight.detach().t().contiguous(), mean, thr, lin.folded_bias(), lin.stripe_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dense = x @ lin.weight.detach().t() + (0 if lin.bias is None else lin.bias.detach())
    assert (got - dense).abs().max() > 1e-2                       # the thresholds do something
    reads = R.gemv_active_params(x, mean, thr, m, lin.stripe_size)
    torch.testing.assert_close(reads, counts)
    on = (x - mean).abs()[:, None, :] >= thr[None]              # (B, k, n): METHOD's G per token
    rows = torch.tensor([min(lin.stripe_size, m - r * lin.stripe_size) for r in range(thr.shape[0])]).float()
    torch.testing.assert_close(reads, (on.float().sum(2) * rows).sum(1))
    assert 0 < float(reads.min()) and float(reads.max()) < n * m
    union = R.gemv_active_params(x, mean, thr, m, lin.stripe_size, union=True)
    assert float(union) == float((on.any(0).float().sum(1) * rows).sum())


def test_gemv_reference_rounds_once_in_fp32():
    """bf16 (and fp16) activations and weights: the reference upcasts, sums in fp32 and rounds the result once, so
    it equals the fp32 reference on the upcast values, rounded, bit for bit. The Triton tests bound a kernel's error
    by 3× the reference's own: a reference that summed in bf16 would loosen every such bound."""
    from cwic_kernels import reference as R
    lin = _cwic_linear(96, 80, 32, seed=4, theta=0.5)
    x = _x(5, 96, shift=lin.running_stats()[0])
    wt, mean, thr, b = lin.weight.detach().t().contiguous(), lin.running_stats()[0], lin.thresholds().detach(), \
        lin.folded_bias()
    for dt in (torch.bfloat16, torch.float16):
        xl, wl = x.to(dt), wt.to(dt)
        got = R.gemv_reference(xl, wl, mean, thr, b, 32)
        assert got.dtype == dt
        assert torch.equal(got, R.gemv_reference(xl.float(), wl.float(), mean, thr, b, 32).to(dt)), dt


def _cwic_mlp(d, F_, stripe, seed=0, theta=0.6, phi=0.8):
    from torch import nn

    from cwic_exp.modeling.layers import CwicGatedMLP, CwicLinear
    g = torch.Generator().manual_seed(seed)
    gate, up, down = nn.Linear(d, F_, bias=False), nn.Linear(d, F_, bias=False), nn.Linear(F_, d, bias=False)
    with torch.no_grad():
        for p in (gate.weight, up.weight, down.weight):
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    mlp = CwicGatedMLP(CwicLinear.from_linear(gate, stripe_size=stripe), up, down, nn.SiLU(), "silu")
    with torch.no_grad():
        mlp.runtime.update_stats = True
        mlp(torch.randn(64, d, generator=g) + torch.randn(d, generator=g))
        mlp.runtime.update_stats = False
        mlp.gate_proj.theta.copy_(torch.rand(mlp.gate_proj.theta.shape, generator=g) * theta)
        mlp.phi.copy_(torch.rand(F_, generator=g) * phi)
    return mlp


def _ffn_args(mlp):
    gp = mlp.gate_proj
    return (gp.weight.detach().t().contiguous(), gp.running_stats()[0], gp.thresholds().detach(), gp.folded_bias(),
            gp.stripe_size, mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach().t().contiguous(),
            mlp.unit_thresholds().detach())


def test_ffn_reference_is_the_cwic_gated_mlp():
    """ffn_reference against cwic_exp's CwicGatedMLP forward (METHOD.md §5) on the model's own tensors: the unit mask
    on |act(g)| against φ·scale (not on the gate before the activation), the gate's bias fold, up rows and down
    columns of the active units only. Units both on and off."""
    from cwic_kernels import reference as R
    mlp = _cwic_mlp(24, 40, 16, seed=2)                    # stripes 16, 16, 8
    x = _x(5, 24, seed=3, shift=mlp.gate_proj.running_stats()[0])
    with torch.no_grad():
        want = mlp(x)
    args = _ffn_args(mlp)
    got = R.ffn_reference(x, *args, act="silu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    a = torch.nn.functional.silu(R.gemv_reference(x, *args[:5]))
    on = a.abs() >= args[-1]
    assert 0 < int(on.sum()) < on.numel()


def test_ffn_reference_rounds_the_gate_the_activation_and_the_output_only():
    """bf16: the reference rounds the gate's sums to bf16 and act(g) to bf16 (as the model's gate projection and
    activation module return them, `act_in_dtype`), and the output once; the intermediate h = (W_up x) ⊙ a stays
    fp32. Bit for bit against that computation in fp32; a reference that rounded h to bf16 too (a second rounding of
    every product) survived every kernel test, whose error bounds grow with the reference's own."""
    from cwic_kernels import reference as R
    mlp = _cwic_mlp(64, 96, 32, seed=5, phi=0.3)
    x = _x(4, 64, seed=6, shift=mlp.gate_proj.running_stats()[0])
    gwt, gm, gt, gb, s, up, dn, ut = _ffn_args(mlp)
    xb, gwb, upb, dnb = (t.bfloat16() for t in (x, gwt, up, dn))
    got = R.ffn_reference(xb, gwb, gm, gt, gb, s, upb, dnb, ut)
    g = R.gemv_reference(xb.float(), gwb.float(), gm, gt, gb, s).bfloat16().float()
    a = torch.nn.functional.silu(g).bfloat16().float()
    a = torch.where(a.abs() >= ut, a, 0.0)
    h = (xb.float() @ upb.float().T) * a
    want = (h @ dnb.float()).bfloat16()
    assert 0 < int((a != 0).sum()) < a.numel()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_act_in_dtype_keeps_the_units_the_bf16_model_keeps():
    """The unit mask of every FFN path (reference, fallback, Triton, C++) is decided on `act_in_dtype(g)`; the bf16
    model decides it on its act_fn's bf16 output. On the model's own gate outputs, thresholds placed between the
    model's |a| and the two wrong readings (act in fp32 of g, of bf16(g)) give the model's units, and not the wrong
    readings' (the kernels kept the latter's until 2026-12-05: 0.1-0.5 % of the units flipped in bf16)."""
    from cwic_kernels import reference as R
    mlp = _cwic_mlp(64, 96, 32, seed=5, phi=0.0)
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):      # weights in bf16, θ, φ and statistics in fp32
        lin.weight.data = lin.weight.data.bfloat16()
    x = _x(6, 64, seed=7, shift=mlp.gate_proj.running_stats()[0]).bfloat16()
    seen = {}
    hooks = [mlp.gate_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("g", o.detach())),
             mlp.down_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("h", i[0].detach()))]
    with torch.no_grad():
        mlp(x)
        g = seen["g"].float()
        ut, cells = unit_flip_case(g, torch.bfloat16)
        mlp.phi.copy_(ut / mlp.running_stats()[1])
        assert torch.allclose(mlp.unit_thresholds(), ut, rtol=1e-6, atol=0)
        mlp(x)
    for hk in hooks:
        hk.remove()
    assert torch.equal(seen["g"].float(), g)                      # the same gate outputs as the thresholds saw
    model_on = seen["h"] != 0
    assert torch.equal(model_on, R.act_in_dtype(g, "silu", torch.bfloat16).abs() >= mlp.unit_thresholds())
    for b, j, on in cells:
        assert bool(model_on[b, j]) == on


def test_references_keep_a_nan_input_on_as_the_model_does():
    """A NaN input is on for every threshold, +inf included, in the model (cwic_exp's |xc| as +inf) and in the
    reference: the same outputs are NaN, the other tokens agree, and the NaN's (stripe, input) pairs are counted as
    read (every stripe's rows: 5 + 5 + 3), as the model's AP counts have them."""
    from cwic_kernels import reference as R
    lin = _cwic_linear(24, 13, 5, seed=9)
    x = _x(3, 24, shift=lin.running_stats()[0])
    x[1, 7] = float("nan")
    with torch.no_grad():
        lin.theta[:, 7] = float("inf")
        lin.runtime.track_ap = True
        want = lin(x)
    mean, thr = lin.running_stats()[0], lin.thresholds().detach()
    assert torch.isinf(thr[:, 7]).all()
    got = R.gemv_reference(x, lin.weight.detach().t().contiguous(), mean, thr, lin.folded_bias(), 5)
    assert torch.isnan(want[1]).all() and torch.equal(torch.isnan(got), torch.isnan(want))
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-5)
    reads = R.gemv_active_params(x, mean, thr, 13, 5)
    assert torch.equal(reads, lin.ap_tokens)
    off = x.clone()
    off[1, 7] = mean[7]
    assert float(reads[1] - R.gemv_active_params(off, mean, thr, 13, 5)[1]) == 13


# ------------------------------------------------------------------------------------------- gpu/fallback.py

@pytest.mark.triton
@pytest.mark.parametrize("mean2d", [False, True])
def test_fallback_count_weights_a_partial_last_stripe_by_its_rows(mean2d):
    """`gemv_ex_ref(count=)` (the CPU engine's per-token reads and the twin the Triton counters are checked against)
    adds each active pair × its stripe's rows, the last stripe's 8 rows (88 outputs in stripes of 16) included, as the
    model's AP counts (one mean) and METHOD's (m/k)·‖G‖₁ per stripe (one mean row a stripe, the fused q/k/v). The
    existing count tests' shapes (80 and 96 outputs in stripes of 16 and 32) have no partial stripe, so counting it as
    full passed. The Triton masked-load kernel counts the same."""
    from cwic_kernels.gpu import fallback as fb
    from cwic_kernels.gpu import gemv as G
    lin = _cwic_linear(64, 88, 16, seed=12)
    x = _x(3, 64, shift=lin.running_stats()[0])
    wt, mean, thr = lin.weight.detach().t().contiguous(), lin.running_stats()[0], lin.thresholds().detach()
    k = thr.shape[0]
    if mean2d:
        mean = mean[None] + 0.3 * torch.randn(k, 64, generator=torch.Generator().manual_seed(1))
    lin.runtime.track_ap = True
    with torch.no_grad():
        lin(x)
    rows = torch.tensor([16.0] * (k - 1) + [8.0])
    for b in range(3):
        c = torch.zeros(1, dtype=torch.int64)
        fb.gemv_ex_ref(x[b:b + 1], wt, mean, thr, torch.zeros(88), 16, count=c)
        mu = mean if mean2d else mean.expand(k, -1)
        want = int(((((x[b][None] - mu).abs() >= thr).float().sum(1)) * rows).sum())
        assert int(c) == want, (b, int(c), want)
        if not mean2d:
            assert int(c) == int(lin.ap_tokens[b])
        ck = torch.zeros(1, dtype=torch.int64, device=DEV)
        G.gemv_ex(*(t.to(DEV) for t in (x[b:b + 1], wt, mean, thr, torch.zeros(88))), 16, count=ck)
        assert int(ck) == want, ("triton", b, int(ck), want)


@pytest.mark.triton
def test_fallback_count_reads_a_nan_inputs_pairs():
    """A NaN input is on (reference.py): its pairs are read, so `gemv_ex_ref(count=)` counts them, as the model's AP
    count and `gemv_active_params` do, and as the Triton kernel's counter does. The twin compared |x - x̄| >= thr
    there in a mutant, which a NaN fails, and no test had a NaN with count=."""
    from cwic_kernels import reference as R
    from cwic_kernels.gpu import fallback as fb
    from cwic_kernels.gpu import gemv as G
    lin = _cwic_linear(64, 88, 16, seed=13)
    x = _x(1, 64, shift=lin.running_stats()[0])
    x[0, 9] = float("nan")
    wt, mean, thr = lin.weight.detach().t().contiguous(), lin.running_stats()[0], lin.thresholds().detach()
    thr[:, 9] = 1e30
    lin.runtime.track_ap = True
    with torch.no_grad():
        lin.theta[:, 9] = 1e30 / lin.running_stats()[1][9]
        lin(x)
    want = int(R.gemv_active_params(x, mean, thr, 88, 16)[0])
    assert want == int(lin.ap_tokens[0])
    off = x.clone()
    off[0, 9] = mean[9]
    assert want - int(R.gemv_active_params(off, mean, thr, 88, 16)[0]) == 88        # every stripe of input 9
    c = torch.zeros(1, dtype=torch.int64)
    fb.gemv_ex_ref(x, wt, mean, thr, torch.zeros(88), 16, count=c)
    assert int(c) == want
    ck = torch.zeros(1, dtype=torch.int64, device=DEV)
    G.gemv_ex(*(t.to(DEV) for t in (x, wt, mean, thr, torch.zeros(88))), 16, count=ck)
    assert int(ck) == want
