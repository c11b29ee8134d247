"""Long-prompt CWIC products as per-stripe GEMMs (`cwic_kernels.gpu.prefill`) against the reference semantics."""
from __future__ import annotations

import torch
from kernel_checks import DEV, _check, _gen, _gold, _inputs, _rel, assert_ffn_follows_the_model, unit_flip_ffn

import pytest  # noqa: E402

from cwic_kernels import reference as ref  # noqa: E402
from cwic_kernels.gpu import fallback as fb  # noqa: E402
from cwic_kernels.gpu import prefill as P  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,n,m,stripe,mean2d", [(17, 64, 96, 32, False), (40, 48, 100, 32, True),
                                                 (5, 32, 20, 32, False), (33, 64, 64, 64, True)])
def test_masked_gemm_matches_reference(T, n, m, stripe, mean2d, dtype):
    """Whole and partial stripes, per-stripe means, one stripe wider than m; error within the same-dtype
    reference's (both against fp64 with the same fp32 masks)."""
    x, wt, mean, thr, bias = _inputs(T, n, m, stripe, dtype, seed=T + n + m, mean2d=mean2d)
    res = torch.randn(T, m, generator=_gen(3)).to(DEV, dtype)
    y = P.masked_gemm(x, wt, mean, thr, bias, stripe, residual=res)
    assert y.dtype == dtype and y.shape == (T, m)
    want = fb.gemv_ex_ref(x, wt, mean, thr, bias, stripe, residual=res)   # the kernels' reference (any mean)
    _check(y, _gold(x, wt, mean, thr, bias, stripe) + res.double(), want, f"{T}x{n}x{m}/{stripe}")
    # the thresholds bite: a zero threshold (every pair on) gives another product
    assert _rel(P.masked_gemm(x, wt, mean, torch.zeros_like(thr), bias, stripe, residual=res), y) > 1e-2


@pytest.mark.parametrize("mean2d", [False, True])
def test_masked_gemm_stripe_groups(monkeypatch, mean2d):
    """Stripes formed in groups (a small operand budget) give the same result as all at once, with per-stripe
    means too (each group takes its own stripes' rows)."""
    x, wt, mean, thr, bias = _inputs(20, 64, 250, 32, torch.float32, seed=5, mean2d=mean2d)
    whole = P.masked_gemm(x, wt, mean, thr, bias, 32)
    monkeypatch.setattr(P, "_MAX_ELEMS", 20 * 64 * 3)        # 3 stripes a group: 8 stripes, the last partial
    torch.testing.assert_close(P.masked_gemm(x, wt, mean, thr, bias, 32), whole, rtol=1e-6, atol=1e-6)


def test_masked_gemm_bad_input():
    x, wt, mean, thr, bias = _inputs(4, 32, 64, 32, torch.float32, seed=1)
    with pytest.raises(ValueError):
        P.masked_gemm(x, wt[:16], mean, thr, bias, 32)          # n mismatch
    with pytest.raises(ValueError):
        P.masked_gemm(x, wt, mean, thr[:1], bias, 32)           # k mismatch
    with pytest.raises(ValueError):
        P.masked_gemm(x, wt.t().contiguous().t(), mean, thr, bias, 32)   # not contiguous
    with pytest.raises(ValueError):
        P.ffn_gemm(x, wt, mean, thr, bias, 32, wt.t(), wt.t(), torch.zeros(64, device=DEV), act="mish")  # no such activation


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ffn_gemm_matches_reference(dtype):
    T, d, F, stripe = 24, 64, 160, 32
    x, gwt, gmean, gthr, gbias = _inputs(T, d, F, stripe, dtype, seed=11)
    g = _gen(12)
    up = (torch.randn(F, d, generator=g) / d ** 0.5).to(DEV, dtype)
    down = (torch.randn(F, d, generator=g) / F ** 0.5).to(DEV, dtype)
    uthr = (torch.rand(F, generator=g) * 0.3).to(DEV)
    res = torch.randn(T, d, generator=g).to(DEV, dtype)
    y = P.ffn_gemm(x, gwt, gmean, gthr, gbias, stripe, up, down, uthr, "silu", residual=res)
    args = (gwt.double(), gmean.double(), gthr.double(), gbias.double(), stripe, up.double(), down.double(),
            uthr.double())
    gold = ref.ffn_reference(x.double(), *args).double() + res.double()
    # the reference in x's dtype: in bf16 it rounds g and act(g) as the model does, which fp64 does not
    want = ref.ffn_reference(x, gwt, gmean, gthr, gbias, stripe, up, down, uthr).float() + res.float()
    tol = 1e-5 if dtype == torch.float32 else 3 * _rel(want.to(dtype), gold) + 1e-6
    assert _rel(y, gold) < tol
    dense_units = P.ffn_gemm(x, gwt, gmean, gthr, gbias, stripe, up, down, torch.zeros_like(uthr), "silu",
                             residual=res)
    assert _rel(dense_units, y) > 1e-3                          # the unit mask bites


def test_ffn_gemm_unit_mask_sees_act_in_x_dtype():
    """As in the decode kernels and the reference: the unit mask is decided on act(g) as the model computes it in
    x's dtype (g and act(g) rounded to bf16, `reference.act_in_dtype`). A unit whose threshold lies between that
    |a| and |act(g)|, or |act(bf16(g))|, follows the model."""
    args, cells = unit_flip_ffn(1)
    dev = [t.to(DEV) if torch.is_tensor(t) else t for t in args]
    assert_ffn_follows_the_model(P.ffn_gemm(*dev, "silu"), args, cells)


@pytest.mark.skipif(DEV != "cuda", reason="the bf16 operand split is a CUDA path (the CPU computes in fp32)")
def test_masked_gemm_split_is_more_exact_gpu():
    """bf16 operands: hi + lo keeps the error within the fp32 reference's; rounding once does not."""
    x, wt, mean, thr, bias = _inputs(64, 2048, 2048, 512, torch.bfloat16, density=0.34, seed=7)
    gold = _gold(x, wt, mean, thr, bias, 512)
    e_exact = _rel(P.masked_gemm(x, wt, mean, thr, bias, 512, out_dtype=torch.float32), gold)
    e_once = _rel(P.masked_gemm(x, wt, mean, thr, bias, 512, out_dtype=torch.float32, exact=False), gold)
    e_ref = _rel(ref.gemv_reference(x.float(), wt.float(), mean, thr, bias, 512), gold)
    assert e_exact <= 3 * e_ref + 1e-6 and e_once > 2 * e_exact, (e_exact, e_once, e_ref)


def test_operand_split_on_the_cpu(monkeypatch):
    """The CUDA path's operand handling, forced on the CPU (its GEMMs then run in fp32 on the rounded operands):
    hi + lo rows stacked and summed give the fp32 product to ~16 bits of the inputs; rounding once does not."""
    x, wt, mean, thr, bias = _inputs(24, 256, 300, 64, torch.bfloat16, seed=13)
    full = P.masked_gemm(x, wt, mean, thr, bias, 64, out_dtype=torch.float32)
    monkeypatch.setattr(P, "_low_precision", lambda t: True)
    split = P.masked_gemm(x, wt, mean, thr, bias, 64, out_dtype=torch.float32)
    once = P.masked_gemm(x, wt, mean, thr, bias, 64, out_dtype=torch.float32, exact=False)
    e_split, e_once = _rel(split, full), _rel(once, full)
    assert e_split < 2e-5 and e_once > 20 * e_split, (e_split, e_once)
    g = _gen(14)
    up = (torch.randn(300, 256, generator=g) / 16).to(DEV, torch.bfloat16)
    down = (torch.randn(300, 256, generator=g) / 17).to(DEV, torch.bfloat16)
    uthr = (torch.rand(300, generator=g) * 0.2).to(DEV)
    args = (x, wt, mean, thr, bias, 64, up, down, uthr, "silu")
    monkeypatch.setattr(P, "_low_precision", lambda t: False)
    f_full = P.ffn_gemm(*args, out_dtype=torch.float32)
    monkeypatch.setattr(P, "_low_precision", lambda t: True)
    # the gate's output is rounded to bf16 (as the model rounds it): a g within ~1e-6 of a rounding boundary takes
    # the other bf16 neighbour under the other sum, which moves that unit by one bf16 step (2^-8)
    assert _rel(P.ffn_gemm(*args, out_dtype=torch.float32), f_full) < 3e-4
