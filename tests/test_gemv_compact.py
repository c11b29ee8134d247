"""The compacted batch-1 GEMV (kernels/gpu/gemv_compact.py) against `reference.gemv_reference`, the
PyTorch twin `fallback.gemv_ex_ref` and the masked-load `gemv.gemv_ex` (CPU: TRITON_INTERPRET=1).

Tolerance as in test_triton_kernels.py: the kernel's normalised error to an fp64 "gold" result (same
fp32 masks) is at most 3× the error of the reference computed in the same dtype, plus 1e-6.
"""
from __future__ import annotations

import torch
import kernel_checks as kc  # before triton
from kernel_checks import DEV, _check, _gen, _gold

import pytest  # noqa: E402

from cwic_kernels import reference as ref  # noqa: E402
from cwic_kernels.gpu import fallback as fb  # noqa: E402

triton = pytest.importorskip("triton")
from cwic_kernels.gpu import gemv as G  # noqa: E402
from cwic_kernels.gpu import gemv_compact as C  # noqa: E402

pytestmark = pytest.mark.triton

# several chunks + one loop iteration (default), several iterations of the slot loop, one chunk (no
# split-K), and the fused variant (select inside the GEMV program) of the first two
CONFIGS = {
    "default": dict(),
    "multi-iter": dict(chunk=32, block_n=8, block_m=16),
    "one-chunk": dict(chunk=256, block_n=32),
    "fused": dict(fused=True),
    "fused-multi-iter": dict(chunk=32, block_n=8, block_m=16, fused=True),
}


def _inputs(n, m, stripe, dtype, **kw):
    """One token: kernel_checks' inputs with B = 1."""
    return kc._inputs(1, n, m, stripe, dtype, **kw)


def _cfg(name, n, m, stripe):
    return C.compact_config(n, m, stripe, torch.device(DEV), **CONFIGS[name]) if CONFIGS[name] else None


SHAPES = [  # n, m, stripe: widths not multiples of the blocks / chunks, partial last stripe
    (96, 80, 16),      # m = 5 stripes of 16
    (200, 96, 32),     # n not a multiple of any chunk
    (72, 40, 16),      # partial last stripe (8 of 16)
    (64, 144, 48),     # stripe 48: output blocks of 16
]


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,m,stripe", SHAPES)
def test_compact_matches_reference(n, m, stripe, dtype, cfg):
    x, wt, mean, thr, bias = _inputs(n, m, stripe, dtype, seed=n + m)
    out = torch.full((1, m), float("nan"), dtype=dtype, device=DEV)          # poison: every element written
    y = C.gemv_compact(x, wt, mean, thr, bias, stripe, out=out, config=_cfg(cfg, n, m, stripe))
    assert y.dtype == dtype and y.shape == (1, m)
    _check(y, _gold(x, wt, mean, thr, bias, stripe), ref.gemv_reference(x, wt, mean, thr, bias, stripe),
           f"n={n} m={m} s={stripe} {dtype} {cfg}")
    # same masks, same fp32 accumulation as the masked-load kernel (summation order differs)
    yg = G.gemv_ex(x, wt, mean, thr, bias, stripe)
    torch.testing.assert_close(y.float(), yg.float(), rtol=2e-5 if dtype == torch.float32 else 1.6e-2,
                               atol=2e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("cfg", ["default", "multi-iter", "fused"])
def test_compact_dense_and_empty_extremes(cfg):
    n, m, stripe = 80, 64, 32
    x, wt, mean, thr, bias = _inputs(n, m, stripe, torch.float32, seed=3)
    c = _cfg(cfg, n, m, stripe)
    y0 = C.gemv_compact(x, wt, mean, torch.zeros_like(thr), bias, stripe, config=c)   # 0%: dense product
    torch.testing.assert_close(y0, (x - mean) @ wt + bias, rtol=1e-5, atol=1e-5)
    y1 = C.gemv_compact(x, wt, mean, torch.full_like(thr, float("inf")), bias, stripe, config=c)  # 100%
    assert torch.equal(y1, bias[None])
    # and back to a dense call: slots left over from the denser call must not leak into a sparser one
    y2 = C.gemv_compact(x, wt, mean, thr, bias, stripe, config=c)
    _check(y2, _gold(x, wt, mean, thr, bias, stripe), ref.gemv_reference(x, wt, mean, thr, bias, stripe), cfg)


@pytest.mark.parametrize("cfg", ["default", "fused", "multi-iter", "fused-multi-iter"])   # the last two: split-K
def test_compact_per_stripe_mean_and_epilogues(cfg):
    n, m, stripe = 64, 96, 32
    x, wt, mean, thr, bias = _inputs(n, m, stripe, torch.float32, seed=11, mean2d=True)
    c = _cfg(cfg, n, m, stripe)
    res = torch.randn(1, m, device=DEV)
    uthr = torch.rand(m, device=DEV) * 0.5
    for kw in (dict(), dict(residual=res), dict(act="silu", unit_thr=uthr),
               dict(act="gelu_pytorch_tanh", unit_thr=uthr, residual=res), dict(act="gelu", unit_thr=uthr),
               dict(act="relu", unit_thr=uthr)):
        y = C.gemv_compact(x, wt, mean, thr, bias, stripe, config=c, **kw)
        yr = fb.gemv_ex_ref(x, wt, mean, thr, bias, stripe, **kw)
        assert y.dtype == yr.dtype, kw
        torch.testing.assert_close(y, yr, rtol=2e-5, atol=2e-5, msg=str(kw))
    # no bias
    y = C.gemv_compact(x, wt, mean, thr, None, stripe, config=c)
    torch.testing.assert_close(y, fb.gemv_ex_ref(x, wt, mean, thr, torch.zeros(m, device=DEV), stripe),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", ["default", "multi-iter", "fused"])
def test_compact_nonzero_and_dense_modes(cfg, dtype):
    """MASK_NONZERO (the FFN's down projection: row i used iff h_i ≠ 0) and MASK_NONE, one stripe."""
    n, m = 100, 72
    g = _gen(5)
    h = torch.where(torch.rand(1, n, generator=g) < 0.3, torch.randn(1, n, generator=g), 0.0).to(dtype).to(DEV)
    wt = (torch.randn(n, m, generator=g) / n ** 0.5).to(dtype).to(DEV)
    res = torch.randn(1, m, generator=g).to(dtype).to(DEV)
    c = _cfg(cfg, n, m, m)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    want = h.float() @ wt.float()
    for mode in (C.MASK_NONZERO, C.MASK_NONE):
        y = C.gemv_compact(h, wt, None, None, None, m, mask_mode=mode, config=c)
        torch.testing.assert_close(y.float(), want, **tol)
    y = C.gemv_compact(h, wt, None, None, None, m, mask_mode=C.MASK_NONZERO, residual=res,
                       out_dtype=torch.float32, config=c)
    torch.testing.assert_close(y, want + res.float(), **tol)


@pytest.mark.parametrize("cfg", ["default", "fused"])
def test_compact_repeated_calls_reuse_workspace(cfg):
    """Twice the same bits, no new workspace, arrival counters left zeroed."""
    n, m, stripe = 256, 64, 32
    x, wt, mean, thr, bias = _inputs(n, m, stripe, torch.float32, seed=5)
    c = C.compact_config(n, m, stripe, torch.device(DEV), chunk=64, **CONFIGS[cfg])
    assert c["SPLIT"] > 1
    y0 = C.gemv_compact(x, wt, mean, thr, bias, stripe, config=c)
    n_ws = len(C._WORKSPACES)
    ptrs = {key: {k: t.data_ptr() for k, t in w.items()} for key, w in C._WORKSPACES.items()}
    y1 = C.gemv_compact(x, wt, mean, thr, bias, stripe, config=c)
    assert torch.equal(y0, y1)
    assert len(C._WORKSPACES) == n_ws
    assert ptrs == {key: {k: t.data_ptr() for k, t in w.items()} for key, w in C._WORKSPACES.items()}
    assert all(int(w["arr"].abs().sum()) == 0 for w in C._WORKSPACES.values())


def test_compact_batch_falls_back_to_gemv_ex():
    n, m, stripe = 64, 64, 32
    g = _gen(9)
    x = torch.randn(3, n, generator=g).to(DEV)
    _, wt, mean, thr, bias = _inputs(n, m, stripe, torch.float32, seed=9)
    y = C.gemv_compact(x, wt, mean, thr, bias, stripe)
    torch.testing.assert_close(y, G.gemv_ex(x, wt, mean, thr, bias, stripe), rtol=0, atol=0)
    torch.testing.assert_close(y, ref.gemv_reference(x, wt, mean, thr, bias, stripe), rtol=2e-5, atol=2e-5)


def test_compact_config_defaults_h100(monkeypatch):
    """The H100 heuristic (132 SMs) on the Llama-3.2-1B decode shapes: power-of-two chunks, output
    blocks inside a stripe, ~4 programs per SM, slot blocks of half a chunk up to 128 (measured faster
    than 256 on both GPUs)."""
    monkeypatch.setitem(G._NUM_SMS, ("cuda", 0), 132)
    monkeypatch.setattr(C, "TUNED_COMPACT", {})        # the heuristic itself, not the measured table
    dev = torch.device("cuda", 0)
    for n, m in [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]:
        c = C.compact_config(n, m, 512, dev)
        assert c["CHUNK"] & (c["CHUNK"] - 1) == 0 and 512 % c["BLOCK_M"] == 0
        assert c["BLOCK_N"] <= c["CHUNK"] and c["SPLIT"] == -(-n // c["CHUNK"])
        programs = c["grid"][0] * c["grid"][1]
        assert 132 <= programs <= 8 * 132, (n, m, c)
        assert c["BLOCK_N"] == max(16, min(128, c["CHUNK"] // 2)), (n, m, c)


def test_gemv_ex_sends_one_token_of_a_tuned_shape_to_the_compact_kernel(monkeypatch):
    """`gemv_ex` dispatch: one token of a TUNED_COMPACT shape goes through `gemv_compact` (same result as
    the masked-load kernel); compact=False, a given masked-kernel config, B > 1 or an untuned shape do not."""
    n, m, stripe = 96, 64, 32
    x, wt, mean, thr, bias = _inputs(n, m, stripe, torch.float32, seed=5)
    monkeypatch.setattr(G, "AUTO_COMPACT", True)       # whatever CWIC_GEMV_COMPACT says in this shell
    calls = []
    real = C.gemv_compact
    monkeypatch.setattr(C, "gemv_compact", lambda *a, **k: calls.append(1) or real(*a, **k))
    masked = G.gemv_ex(x, wt, mean, thr, bias, stripe)                   # not tuned: masked-load kernel
    assert calls == []
    monkeypatch.setitem(C.TUNED_COMPACT, (n, m), dict(chunk=32))
    y = G.gemv_ex(x, wt, mean, thr, bias, stripe)
    assert calls == [1]
    torch.testing.assert_close(y, masked, rtol=1e-5, atol=1e-5)
    G.gemv_ex(x, wt, mean, thr, bias, stripe, compact=False)
    G.gemv_ex(x, wt, mean, thr, bias, stripe, config=G.gemv_config(1, n, m, stripe, x.device))
    G.gemv_ex(torch.cat([x, x]), wt, mean, thr, bias, stripe)
    assert calls == [1]
