"""Shared by the Triton kernel tests (test_triton_kernels.py, test_gemv_compact.py): the device the
kernels run on (the CPU interpreter without a GPU), inputs, the fp64 "gold" result with the kernels'
fp32 masks, and the error check against the same-dtype reference. Import it before triton."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def _gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def _inputs(B, n, m, stripe, dtype, density=0.4, seed=0, mean2d=False):
    g = _gen(seed)
    k = -(-m // stripe)
    x = (torch.randn(B, n, generator=g) * (1 + torch.rand(n, generator=g))).to(dtype)   # heavy-ish
    wt = (torch.randn(n, m, generator=g) / n ** 0.5).to(dtype)
    mean = torch.randn(k if mean2d else 1, n, generator=g) * 0.2
    mean = mean if mean2d else mean[0]
    # thresholds so that about `density` of the (token, stripe, input) triples are on
    thr = torch.rand(k, n, generator=g) * 2.6 * (1 - density)
    bias = torch.randn(m, generator=g)
    return [t.to(DEV) for t in (x, wt, mean, thr, bias)]


def _gold(x, wt, mean, thr, bias, stripe):
    """fp64 result with the fp32 masks the kernels use."""
    n, m = wt.shape
    mean2 = mean if mean.dim() == 2 else mean.expand(thr.shape[0], -1)
    cols = torch.arange(m, device=wt.device) // stripe
    xc32 = x.float()[:, None, :] - mean2.float()[None]                        # (B, k, n)
    g = xc32.abs() >= thr.float()[None]
    xc64 = (x.double()[:, None, :] - mean2.double()[None]) * g                # (B, k, n)
    y = torch.einsum("bon,no->bo", xc64[:, cols, :], wt.double())
    return y + bias.double()


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check(out, gold, ref_out, what=""):
    assert torch.isfinite(out).all(), what
    e_ref = _rel(ref_out, gold)
    e = _rel(out, gold)
    assert e <= 3 * e_ref + 1e-6, f"{what}: kernel error {e:.3g} vs reference {e_ref:.3g}"


def unit_flip_case(g32, dtype, act="silu"):
    """Unit thresholds (F,) fp32 that only the activation's roundings decide. g32 (B, F): the gate's fp32 sums. The
    model's |a| is |act_in_dtype(g)|: the gate's output rounded to `dtype`, the activation's too. Two wrong readings:
    |act(g)| (nothing rounded) and |act(dtype(g))| (the activation's result not rounded). For each, the (token, unit)
    where it differs most from the model's gets its unit's threshold halfway between the two (a different unit each);
    every other unit's threshold is 0. Returns (thresholds, cells): cells [(b, j, on)], on the model's decision."""
    from cwic_kernels import reference as ref
    am = ref.act_in_dtype(g32, act, dtype).abs()
    ut = torch.zeros(g32.shape[1])
    cells = []
    for aw in (ref.ACTIVATIONS[act](g32).abs(), ref.ACTIVATIONS[act](ref.in_dtype(g32, dtype)).abs()):
        diff = (am - aw).abs()
        diff[:, ut != 0] = 0
        b, j = divmod(int(diff.argmax()), g32.shape[1])
        assert float(diff[b, j]) > 5e-4 * float(am[b, j]), "no unit whose |a| this rounding moves"
        ut[j] = (am[b, j] + aw[b, j]) / 2
        cells.append((b, j, bool(am[b, j] >= ut[j])))
    return ut, cells


def unit_flip_ffn(B):
    """A small bf16 FFN (d 32, F 64, stripe 32; B tokens) with `unit_flip_case`'s unit thresholds, on the CPU:
    (args, cells), args as `ffn_reference` takes them (x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w,
    down_wt, unit_thr)."""
    from cwic_kernels import reference as ref
    d, F_, s = 32, 64, 32
    g = _gen(40 + B)
    x = torch.randn(B, d, generator=g).bfloat16()
    gw = (torch.randn(d, F_, generator=g) / 4).bfloat16()
    mean, thr = torch.zeros(d), torch.rand(F_ // s, d, generator=g) * 0.5
    gb = torch.randn(F_, generator=g) * 0.1
    up = (torch.randn(F_, d, generator=g) / 4).bfloat16()
    dn = (torch.randn(F_, d, generator=g) / 4).bfloat16()
    ut, cells = unit_flip_case(ref.gemv_reference(x.float(), gw.float(), mean, thr, gb, s), torch.bfloat16)
    return [x, gw, mean, thr, gb, s, up, dn, ut], cells


def assert_ffn_follows_the_model(got, args, cells, what=""):
    """got, an FFN's output on `unit_flip_ffn`'s args, is the reference's and not the output with one of the cells'
    units decided the other way (it sits 4 times closer to the former)."""
    from cwic_kernels import reference as ref
    args = [a.cpu() if torch.is_tensor(a) else a for a in args]
    want = ref.ffn_reference(*args).float()
    got = got.float().cpu()
    for _, j, on in cells:
        flipped = args[-1].clone()
        flipped[j] = float("inf") if on else 0.0
        other = ref.ffn_reference(*args[:-1], flipped).float()
        assert (got - want).norm() < 0.25 * (other - want).norm(), (what, j, float((got - want).norm()))
