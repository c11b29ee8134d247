"""Triton kernels against their PyTorch references (CPU: TRITON_INTERPRET=1, small shapes; GPU: also
real Llama-3.2 decode shapes), and the decode engine against Hugging Face's forward.

Tolerance: the kernel's normalised error to an fp64 "gold" result (same masks) may be at most 3× the
error of the reference computed in the same dtype, plus 1e-6 (the CPU interpreter rounds fp32→bf16 by
truncation, which alone doubles the output rounding error).
"""
from __future__ import annotations

import os

import torch
from kernel_checks import (DEV, _check, _gen, _gold, _inputs, _rel, assert_ffn_follows_the_model,  # before triton
                           unit_flip_ffn)

import pytest  # noqa: E402

from cwic_kernels import reference as ref  # noqa: E402
from cwic_kernels.gpu import fallback as fb  # noqa: E402

triton = pytest.importorskip("triton")
from cwic_kernels.gpu import decode as D  # noqa: E402
from cwic_kernels.gpu import gemv as G  # noqa: E402

pytestmark = pytest.mark.triton
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------------------ granular GEMV

GEMV_SHAPES = [  # B, n, m, stripe: partial last stripe, widths not multiples of the blocks, batches
    (1, 96, 80, 16),
    (1, 200, 96, 32),
    (2, 130, 48, 16),
    (7, 64, 144, 48),
    (16, 100, 64, 64),
    (19, 72, 40, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,n,m,stripe", GEMV_SHAPES)
def test_gemv_matches_reference(B, n, m, stripe, dtype):
    x, wt, mean, thr, bias = _inputs(B, n, m, stripe, dtype, seed=B * 1000 + n)
    out = torch.full((B, m), float("nan"), dtype=dtype, device=DEV)       # poison: every element written
    y = G.gemv_ex(x, wt, mean, thr, bias, stripe, out=out)
    _check(y, _gold(x, wt, mean, thr, bias, stripe), ref.gemv_reference(x, wt, mean, thr, bias, stripe),
           f"B={B} n={n} m={m} s={stripe} {dtype}")


@pytest.mark.parametrize("B", [1, 3, 20])
@pytest.mark.parametrize("cfg", [dict(block_m=16, block_n=16, max_split=2), dict(block_m=32, block_n=32, pipe=True),
                                 dict(block_m=16, block_n=16, max_split=1, pipe=True), dict(block_n=64, waves=64),
                                 dict(block_m=32, block_n=32, pipe=True, dense_w=False),
                                 dict(block_m=16, block_n=16, num_stages=3, pipe=False, dense_w=True)],
                         ids=["multi-iter", "pipe", "pipe-nosplit", "one-shot", "pipe-union", "dense-stages3"])
def test_gemv_tile_configs(cfg, B):
    """Loops of several blocks per program, the pipelined loop (one token, and batch blocks: B = 20 is a full and a
    partial block of 16, read densely by default, or their union), one-shot tiles: same results."""
    n, m, stripe = 200, 96, 32
    x, wt, mean, thr, bias = _inputs(B, n, m, stripe, torch.bfloat16, seed=17 + B)
    c = G.gemv_config(B, n, m, stripe, x.device, **cfg)
    y = G.gemv_ex(x, wt, mean, thr, bias, stripe, config=c)
    _check(y, _gold(x, wt, mean, thr, bias, stripe), ref.gemv_reference(x, wt, mean, thr, bias, stripe), str(cfg))


@pytest.mark.parametrize("B", [3, 20])
@pytest.mark.parametrize("pipe", [True, False])
def test_gemv_batch_dense_weight_reads_give_the_same_product(pipe, B, monkeypatch):
    """dense_w (a batch block reads every weight row, the masks applied to x alone) gives the bits of the union-masked
    reads for finite weights, pipelined or not, in a full and a partial 16-token block, bf16 and fp32."""
    n, m, stripe = 200, 96, 32
    for dtype in (torch.bfloat16, torch.float32):
        x, wt, mean, thr, bias = _inputs(B, n, m, stripe, dtype, density=0.3, seed=23 + B)
        cfg = dict(block_m=32, block_n=32, max_split=2, pipe=pipe)
        u = G.gemv_config(B, n, m, stripe, x.device, dense_w=False, **cfg)
        assert not u["dense_w"]
        want = G.gemv_ex(x, wt, mean, thr, bias, stripe, config=u)
        c = G.gemv_config(B, n, m, stripe, x.device, dense_w=True, **cfg)
        assert c["dense_w"]
        y = G.gemv_ex(x, wt, mean, thr, bias, stripe, config=c)
        assert torch.equal(y, want), (dtype, pipe, B)
        _check(y, _gold(x, wt, mean, thr, bias, stripe), ref.gemv_reference(x, wt, mean, thr, bias, stripe),
               f"dense_w {dtype}")
    assert not G.gemv_config(1, n, m, stripe, x.device, dense_w=True)["dense_w"]   # one token: never
    # the default: union reads below DENSE_W_FROM tokens, dense reads from there on; 0: never
    monkeypatch.setattr(G, "DENSE_W_FROM", 4)
    sizes = (1, 2, 3, 4, 16, 40)
    assert [G.gemv_config(b, n, m, stripe, x.device)["dense_w"] for b in sizes] == [False] * 3 + [True] * 3
    monkeypatch.setattr(G, "DENSE_W_FROM", 0)
    assert not any(G.gemv_config(b, n, m, stripe, x.device)["dense_w"] for b in sizes)


@pytest.mark.parametrize("B,bb", [(2, 2), (3, 4), (4, 4), (7, 4), (5, 2)])
@pytest.mark.parametrize("pipe", [True, False])
def test_gemv_small_batch_blocks_equal_the_reference(B, bb, pipe, monkeypatch):
    """Batch blocks of 2 or 4 tokens (fp32 products instead of 16-token tensor-core dots): full and partial blocks,
    several blocks (7 tokens in blocks of 4, 5 in blocks of 2), pipelined or not, union or dense reads, bf16 and fp32,
    each token its own product; union and dense reads give the same bits. The default block by batch size and shape;
    naming a small block alone keeps its union reads; a block that is not 2, 4 or 16 tokens is refused."""
    n, m, stripe = 200, 96, 32
    for dtype in (torch.bfloat16, torch.float32):
        x, wt, mean, thr, bias = _inputs(B, n, m, stripe, dtype, density=0.3, seed=31 + B)
        outs = []
        for dense_w in (False, True):
            c = G.gemv_config(B, n, m, stripe, x.device, block_b=bb, block_m=32, block_n=32, max_split=2, pipe=pipe,
                              dense_w=dense_w)
            assert c["BLOCK_B"] == bb and c["grid"][2] == -(-B // bb) and c["dense_w"] == dense_w
            outs.append(G.gemv_ex(x, wt, mean, thr, bias, stripe, config=c))
            _check(outs[-1], _gold(x, wt, mean, thr, bias, stripe), ref.gemv_reference(x, wt, mean, thr, bias, stripe),
                   f"B={B} block {bb} {dtype} dense_w={dense_w}")
        assert torch.equal(outs[0], outs[1])
    # the defaults: 2 tokens in a block of 2, 3-4 tokens in blocks of 4 up to the shape's SMALL_B_UPTO, union reads;
    # CWIC_GEMV_SMALL_B=0: 16-token blocks; any override: 16-token blocks unless it names block_b
    monkeypatch.setattr(G, "SMALL_B_UPTO", {(n, m): 4})
    sizes = (1, 2, 3, 4, 5, 16)
    cs = [G.gemv_config(b, n, m, stripe, x.device) for b in sizes]
    assert [c["BLOCK_B"] for c in cs] == [1, 2, 4, 4, 16, 16] and [c["dense_w"] for c in cs[:4]] == [False] * 4
    assert [G.gemv_config(b, n, 64, stripe, x.device)["BLOCK_B"] for b in sizes] == [1, 2, 16, 16, 16, 16]
    assert G.gemv_config(2, n, m, stripe, x.device, block_n=32)["BLOCK_B"] == 16
    monkeypatch.setattr(G, "SMALL_B", False)
    assert [G.gemv_config(b, n, m, stripe, x.device)["BLOCK_B"] for b in sizes] == [1] + [16] * 5
    monkeypatch.setattr(G, "DENSE_W_FROM", 4)
    c = G.gemv_config(4, n, m, stripe, x.device, block_b=4)
    assert c["BLOCK_B"] == 4 and not c["dense_w"] and G.gemv_config(4, n, m, stripe, x.device)["dense_w"]
    for bad in (3, 8):
        with pytest.raises(ValueError, match="block_b"):
            G.gemv_config(3, n, m, stripe, x.device, block_b=bad)


@pytest.mark.parametrize("B", [1, 5])
def test_gemv_dense_and_empty_extremes(B):
    n, m, stripe = 80, 64, 32
    x, wt, mean, thr, bias = _inputs(B, n, m, stripe, torch.float32, seed=3)
    y0 = G.gemv_ex(x, wt, mean, torch.zeros_like(thr), bias, stripe)      # sparsity 0%: dense product
    dense = (x - mean) @ wt + bias
    torch.testing.assert_close(y0, dense, rtol=1e-5, atol=1e-5)
    y1 = G.gemv_ex(x, wt, mean, torch.full_like(thr, float("inf")), bias, stripe)   # 100%: bias alone
    assert torch.equal(y1, bias.expand(B, m))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemv_batch_equals_per_token(dtype):
    """The small-batch path (union of the tokens' masks) gives each token exactly its own product."""
    B, n, m, stripe = 6, 96, 64, 32
    x, wt, mean, thr, bias = _inputs(B, n, m, stripe, dtype, density=0.3, seed=7)
    yb = G.gemv_ex(x, wt, mean, thr, bias, stripe).float()
    ys = torch.cat([G.gemv_ex(x[i:i + 1], wt, mean, thr, bias, stripe) for i in range(B)]).float()
    gold = _gold(x, wt, mean, thr, bias, stripe)
    r = ref.gemv_reference(x, wt, mean, thr, bias, stripe)
    _check(yb, gold, r, "batched")
    _check(ys, gold, r, "per token")


def test_gemv_epilogues_and_modes():
    """Residual, activations with the unit mask, per-stripe means, and the non-threshold mask modes against the PyTorch
    twin: one token, 2 tokens (a small block) and 3 (a 16-token block)."""
    B, n, m, stripe = 3, 64, 96, 32
    for Bx in (1, 2, B):
        x, wt, mean, thr, bias = _inputs(Bx, n, m, stripe, torch.float32, seed=11, mean2d=True)
        res = torch.randn(Bx, m, device=DEV)
        uthr = torch.rand(m, device=DEV) * 0.5
        for kw in (dict(residual=res), dict(act="silu", unit_thr=uthr), dict(act="gelu_pytorch_tanh", unit_thr=uthr),
                   dict(act="gelu", unit_thr=uthr), dict(act="relu", unit_thr=uthr)):
            y = G.gemv_ex(x, wt, mean, thr, bias, stripe, **kw)
            yr = fb.gemv_ex_ref(x, wt, mean, thr, bias, stripe, **kw)
            torch.testing.assert_close(y, yr, rtol=2e-5, atol=2e-5, msg=str(kw))
        h = torch.where(torch.rand(Bx, n, device=DEV) < 0.3, torch.randn(Bx, n, device=DEV), 0.0)
        for mode in (G.MASK_NONZERO, G.MASK_NONE):
            y = G.gemv_ex(h, wt, None, None, None, m, mask_mode=mode)
            torch.testing.assert_close(y, h @ wt, rtol=2e-5, atol=2e-5)


def test_gemv_repeated_launches_are_deterministic():
    """The split-K arrival counters reset themselves: launch after launch gives the same bits."""
    x, wt, mean, thr, bias = _inputs(1, 256, 64, 32, torch.float32, seed=5)
    cfg = G.gemv_config(1, 256, 64, 32, x.device, block_n=32)
    assert cfg["SPLIT"] > 1
    ys = [G.gemv_ex(x, wt, mean, thr, bias, 32, config=cfg) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert int(G._counters(x.device).abs().sum()) == 0


# ------------------------------------------------------------------------------------ FFN

@pytest.mark.parametrize("fused", [False, None], ids=["three_launches", "default"])
@pytest.mark.parametrize("B", [1, 2, 3])
def test_ffn_unit_mask_sees_act_in_x_dtype(B, fused):
    """The unit mask is decided on act(g) as the model computes it in x's dtype (`reference.act_in_dtype`): g rounded
    to bf16, and act(g) rounded to bf16. A unit whose threshold lies between that |a| and |act(g)| (nothing rounded),
    or |act(bf16(g))| (the activation not rounded), follows the model in every path: the gate's epilogue, the twin,
    and the FFN. (The Triton kernels took g in fp32 once; until 2026-12-05 every path compared the activation before
    its rounding, and kept 0.1-0.5 % of the units the other way from the model in bf16.)"""
    args, cells = unit_flip_ffn(B)
    x, gw, mean, thr, gb, s, up, dn, ut = args = [t.to(DEV) if torch.is_tensor(t) else t for t in args]
    paths = {"epilogue": G.gemv_ex(x, gw, mean, thr, gb, s, act="silu", unit_thr=ut),
             "twin": fb.gemv_ex_ref(x, gw, mean, thr, gb, s, act="silu", unit_thr=ut)}
    if B == 1:   # the compacted GEMV's epilogue too
        paths["compact"] = G.gemv_ex(x, gw, mean, thr, gb, s, act="silu", unit_thr=ut, compact=True)
    for b, j, on in cells:
        for name, a in paths.items():
            assert bool(a[b, j] != 0) == on, (name, b, j)
    assert_ffn_follows_the_model(G.ffn(*args, "silu", fused=fused), args, cells)


@pytest.mark.parametrize("act", ["silu", "relu"])
@pytest.mark.parametrize("bits", [0x7FFFFFFF, 0x7FFF8000, -1], ids=["gpu_nan", "low_half_over_half", "negative"])
@pytest.mark.parametrize("B", [1, 3])
def test_a_gate_nan_with_any_payload_stays_nan_in_bf16(B, bits, act):
    """bf16: `_act` rounds g and act(g) to bf16 with integer ops, and the round-to-nearest add carried a NaN whose low
    payload half is 0x8000 or more (0x7FFFFFFF is the NaN a GPU's arithmetic produces) into the sign bit: ±0, a unit
    switched off and its NaN hidden. And relu was `tl.maximum(y, 0)`, which gives 0 for a NaN in every dtype. The
    reference (torch's rounding, F.relu) keeps it NaN. A gate bias of that NaN puts it in g (the interpreter's own NaNs
    have a clear low half, which the add leaves alone): the gate's epilogue (and the compacted GEMV's), the twin and
    the FFN in one and three launches report it as the reference does (found by the Triton and C++ audits)."""
    args, _ = unit_flip_ffn(B)
    x, gw, mean, thr, gb, s, up, dn, ut = args = [t.to(DEV) if torch.is_tensor(t) else t for t in args]
    nan = torch.tensor([bits], dtype=torch.int32).view(torch.float32).to(DEV)
    gb = gb.clone()
    gb[5] = nan[0]
    ut = torch.full_like(ut, 0.5)
    want = fb.gemv_ex_ref(x, gw, mean, thr, gb, s, act=act, unit_thr=ut)
    assert torch.isnan(want[:, 5]).all() and not torch.isnan(want[:, :5]).any()
    paths = {"epilogue": G.gemv_ex(x, gw, mean, thr, gb, s, act=act, unit_thr=ut)}
    if B == 1:
        paths["compact"] = G.gemv_ex(x, gw, mean, thr, gb, s, act=act, unit_thr=ut, compact=True)
    for name, a in paths.items():
        _nans_as_reference(a, want, name)
    yr = ref.ffn_reference(x, gw, mean, thr, gb, s, up, dn, ut, act)
    assert torch.isnan(yr.float()).all()
    for fused in (False, None):
        assert torch.isnan(G.ffn(x, gw, mean, thr, gb, s, up, dn, ut, act, fused=fused).float()).all(), fused


def _nans_as_reference(y, r, what):
    """NaN exactly where the reference has NaN, the rest as close as the kernels are."""
    y, r = y.float(), r.float()
    assert torch.equal(torch.isnan(y), torch.isnan(r)), f"{what}: NaN at {torch.isnan(y).nonzero().tolist()}"
    torch.testing.assert_close(y.nan_to_num(0.0), r.nan_to_num(0.0), rtol=2e-5, atol=2e-5, msg=what)


def test_a_nan_input_reaches_the_outputs_as_in_the_reference():
    """A NaN input counts as on: in the reference (as in the dense product) it reaches every output of its token.
    The kernels compared |x - mean| >= thr, which a NaN fails, so they skipped it: a model that overflowed (fp16,
    say) decoded plausible tokens from the biases instead of showing NaN. Each path: the one-token masked-load
    kernel, the small-batch kernel (the NaN token beside finite ones, which must stay exact), the compacting
    kernel, the epilogue's unit mask, the FFN (three launches, and one), and the prefill GEMMs; also at
    thresholds of +inf, where no finite input is on."""
    from cwic_kernels.gpu import ffn_fused as FF
    from cwic_kernels.gpu import gemv_compact as GC
    from cwic_kernels.gpu import prefill as P
    n, m, stripe = 80, 64, 32
    for B in (1, 5):
        x, wt, mean, thr, bias = _inputs(B, n, m, stripe, torch.float32, seed=41)
        x[B // 2, 37] = float("nan")
        for t in (thr, torch.full_like(thr, float("inf"))):
            r = ref.gemv_reference(x, wt, mean, t, bias, stripe)
            assert torch.isnan(r[B // 2]).all() and torch.isfinite(r[:B // 2]).all()
            _nans_as_reference(G.gemv_ex(x, wt, mean, t, bias, stripe), r, f"gemv_ex B={B}")
            _nans_as_reference(P.masked_gemm(x, wt, mean, t, bias, stripe), r, f"masked_gemm B={B}")
            if B == 1:
                for cfg in (None, GC.compact_config(n, m, stripe, torch.device(DEV), fused=True)):
                    _nans_as_reference(GC.gemv_compact(x, wt, mean, t, bias, stripe, config=cfg), r,
                                       f"gemv_compact {cfg}")
    # a unit whose gate is NaN (its bias here) is on, so its down row spreads the NaN to every output
    d, F_ = 64, 96
    for B in (1, 4):
        x, gwt, gmean, gthr, gbias = _inputs(B, d, F_, stripe, torch.float32, seed=43)
        gbias[5] = float("nan")
        g = _gen(43)
        up_w = (torch.randn(F_, d, generator=g) / d ** 0.5).to(DEV)
        down_wt = (torch.randn(F_, d, generator=g) / F_ ** 0.5).to(DEV)
        uthr = (torch.rand(F_, generator=g) * 0.3).to(DEV)
        args = (x, gwt, gmean, gthr, gbias, stripe, up_w, down_wt, uthr, "silu")
        r = ref.ffn_reference(*args)
        assert torch.isnan(r).all()
        a = G.gemv_ex(x, gwt, gmean, gthr, gbias, stripe, act="silu", unit_thr=uthr)
        assert torch.isnan(a[:, 5]).all() and torch.isfinite(a[:, :5]).all()            # the epilogue's unit mask
        assert torch.isnan(G.ffn(*args)).all() and torch.isnan(G.ffn(*args, fused=False)).all(), B
        assert torch.isnan(P.ffn_gemm(*args)).all()
        if B == 1:
            assert torch.isnan(FF.ffn_gate_updown(*args, residual=torch.zeros(1, d, device=DEV))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B", [1, 4, 17])
def test_ffn_matches_reference(B, dtype):
    d, F_, stripe = 64, 96, 32
    x, gwt, gmean, gthr, gbias = _inputs(B, d, F_, stripe, dtype, seed=B + 20)
    g = _gen(B)
    up_w = (torch.randn(F_, d, generator=g) / d ** 0.5).to(dtype).to(DEV)
    down_wt = (torch.randn(F_, d, generator=g) / F_ ** 0.5).to(dtype).to(DEV)
    uthr = (torch.rand(F_, generator=g) * 0.3).to(DEV)
    args = (x, gwt, gmean, gthr, gbias, stripe, up_w, down_wt, uthr, "silu")
    y = G.ffn(*args)
    r = ref.ffn_reference(*args)
    gold = ref.ffn_reference(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args])
    _check(y, gold, r, f"ffn B={B} {dtype}")
    # no active unit: only the residual remains
    res = torch.randn(B, d, device=DEV).to(dtype)
    y0 = G.ffn(*args[:8], torch.full_like(uthr, float("inf")), "silu", residual=res)
    assert torch.equal(y0, res)
    if B == 1:   # the default one-token path is the fused up+down kernel; the three-launch one agrees
        y3 = G.ffn(*args, fused=False)
        _check(y3, gold, r, f"ffn unfused {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["masked", "masked-pipe", "compact", "compact-fused", "batch"])
def test_gemv_fused_rmsnorm(path, dtype):
    """norm_w: the kernels normalise the raw residual stream themselves = rmsnorm first, then the GEMV
    (same masks, so the fp64 gold of the normalised input applies)."""
    from cwic_kernels.gpu import gemv_compact as C
    B = 3 if path == "batch" else 1
    n, m, stripe = 200, 96, 32
    x, wt, mean, thr, bias = _inputs(B, n, m, stripe, dtype, seed=31)
    x = (x * 0.7 + 0.2).to(dtype)                              # not already normalised
    g = _gen(32)
    nw = (1 + 0.3 * torch.randn(n, generator=g)).to(dtype).to(DEV)
    eps = 0.5                                                  # large enough to change rstd by ~10 %
    xn = D.rmsnorm(x, nw, eps)
    assert _rel(xn.float(), D.rmsnorm(x, nw, 1e-6).float()) > 0.03
    kw = dict(norm_w=nw, eps=eps)
    if path.startswith("masked"):
        c = G.gemv_config(B, n, m, stripe, x.device, block_n=32, max_split=4, pipe=path.endswith("pipe"))
        y = G.gemv_ex(x, wt, mean, thr, bias, stripe, config=c, **kw)
    elif path.startswith("compact"):
        c = C.compact_config(n, m, stripe, x.device, chunk=64, fused=path.endswith("fused"))
        y = C.gemv_compact(x, wt, mean, thr, bias, stripe, config=c, **kw)
    else:
        y = G.gemv_ex(x, wt, mean, thr, bias, stripe, **kw)
    _check(y, _gold(xn, wt, mean, thr, bias, stripe), ref.gemv_reference(xn, wt, mean, thr, bias, stripe),
           f"{path} {dtype}")
    yr = fb.gemv_ex_ref(x, wt, mean, thr, bias, stripe, **kw)    # the PyTorch twin takes the same arguments
    xr = fb.rmsnorm_ref(x, nw, eps)                              # (its rounding: the interpreter truncates)
    _check(yr, _gold(xr, wt, mean, thr, bias, stripe), ref.gemv_reference(xr, wt, mean, thr, bias, stripe),
           "twin")


@pytest.mark.parametrize("B,fused", [(1, True), (1, False), (4, None)])
def test_ffn_fused_rmsnorm(B, fused):
    d, F_, stripe = 80, 96, 32                                 # d not a power of two
    dtype = torch.bfloat16
    x, gwt, gmean, gthr, gbias = _inputs(B, d, F_, stripe, dtype, seed=B + 40)
    x = (x * 2.5 - 0.3).to(dtype)
    g = _gen(B + 41)
    up_w = (torch.randn(F_, d, generator=g) / d ** 0.5).to(dtype).to(DEV)
    down_wt = (torch.randn(F_, d, generator=g) / F_ ** 0.5).to(dtype).to(DEV)
    uthr = (torch.rand(F_, generator=g) * 0.3).to(DEV)
    nw = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype).to(DEV)
    res = torch.randn(B, d, generator=g).to(dtype).to(DEV)
    xn = D.rmsnorm(x, nw, 1e-6)
    args = (xn, gwt, gmean, gthr, gbias, stripe, up_w, down_wt, uthr, "silu")
    r = ref.ffn_reference(*args) + res
    gold = ref.ffn_reference(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args])
    gold = gold + res.double()
    y = G.ffn(x, *args[1:], residual=res, fused=fused, norm_w=nw, eps=1e-6)
    _check(y, gold, r, f"ffn+norm B={B} fused={fused}")
    xr = fb.rmsnorm_ref(x, nw, 1e-6)
    yr = fb.ffn_ref(x, *args[1:], residual=res, norm_w=nw, eps=1e-6)
    _check(yr, ref.ffn_reference(xr, *args[1:]).double() + res.double(), ref.ffn_reference(xr, *args[1:]) + res,
           "twin")


def _updown_inputs(d, F_, dtype, density, seed):
    g = _gen(seed)
    x = torch.randn(1, d, generator=g).to(dtype)
    up_w = (torch.randn(F_, d, generator=g) / d ** 0.5).to(dtype)
    down_wt = (torch.randn(F_, d, generator=g) / F_ ** 0.5).to(dtype)
    a = torch.randn(1, F_, generator=g) * (torch.rand(1, F_, generator=g) < density)
    res = torch.randn(1, d, generator=g).to(dtype)
    return [t.to(DEV) for t in (x, up_w, down_wt, a, res)]


def _updown_ref(x, up_w, down_wt, a, res, dt=None):
    """The two-kernel semantics: h = (W_up x) ⊙ a, y = hᵀ W_downᵀ + residual (in dt, fp32 by default)."""
    dt = dt or torch.float32
    h = (x.to(dt) @ up_w.to(dt).T) * a.to(dt)
    return h @ down_wt.to(dt) + res.to(dt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d,F_,density,cfg", [
    (64, 96, 0.3, {}),                                   # partial last unit block (96 = 3 × 32)
    (80, 100, 0.5, dict(block_u=16, block_s=4)),          # width not a power of two; several slot steps
    (128, 256, 1.0, dict(block_u=64, block_s=16)),        # every unit on: BLOCK_U / BLOCK_S steps each
    (48, 70, 0.05, dict(block_u=8, block_s=8)),           # most programs have no active unit
    (64, 200, 0.4, dict(block_u=16, block_s=4, copies=3, num_stages=2)),   # spread accumulators
    (80, 100, 0.6, dict(block_u=32, block_s=4, pipe=True)),                  # pipelined steps
    (64, 96, 0.3, dict(block_u=32, block_s=16, pipe=True)),                  # pipelined, one step
])
def test_ffn_updown_matches_two_kernel_path(d, F_, density, cfg, dtype):
    from cwic_kernels.gpu import ffn_fused as FF
    x, up_w, down_wt, a, res = _updown_inputs(d, F_, dtype, density, seed=d + F_)
    c = FF.ffn_updown_config(d, F_, **cfg)
    out = torch.full((1, d), float("nan"), dtype=dtype, device=DEV)       # poison: every element written
    y = FF.ffn_updown(x, up_w, down_wt, a, residual=res, out=out, config=c)
    gold = _updown_ref(x, up_w, down_wt, a, res, torch.float64)
    two = G.gemv_ex(G.ffn_up(x, up_w, a), down_wt, None, None, None, d, mask_mode=G.MASK_NONZERO,
                    residual=res, out_dtype=dtype, compact=False)
    _check(y, gold, two, f"updown d={d} F={F_} {dtype} {cfg}")
    # launch after launch: the same result (up to the order of fp32 additions), state left clean
    for _ in range(2):
        y2 = FF.ffn_updown(x, up_w, down_wt, a, residual=res, config=c)
        _check(y2, gold, two, "repeat")
    ws = FF._workspace(x.device, d, F_, c)
    assert int(ws["arr"]) == 0 and float(ws["acc"].abs().sum()) == 0.0
    # no residual; no active unit at all: exactly zero
    y0 = FF.ffn_updown(x, up_w, down_wt, torch.zeros_like(a), config=c)
    assert torch.equal(y0, torch.zeros_like(y0))
    yn = FF.ffn_updown(x, up_w, down_wt, a, config=c)
    _check(yn, gold - res.double(), two - res, "no residual")


def test_ffn_updown_config_refuses_unknown_keys():
    """A misspelt tile key is an error, not a silently ignored override (the tune and profile scripts pass user keys)."""
    from cwic_kernels.gpu import ffn_fused as FF
    with pytest.raises(ValueError, match="unknown tile keys.*num_warp"):
        FF.ffn_updown_config(64, 96, num_warp=8)
    assert FF.ffn_updown_config(64, 96, num_warps=8)["num_warps"] == 8


# ------------------------------------------------------------------------- decode kernels

@pytest.mark.parametrize("V,block", [(1000, 128), (4096, 1024), (77, 64), (3000, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_argmax_matches_torch(V, block, dtype):
    g = _gen(V)
    for trial in range(3):
        x = torch.randn(1, V, generator=g).to(dtype)
        if trial == 1:                                   # ties: the first index of the maximum wins
            i, j = sorted(torch.randperm(V, generator=g)[:2].tolist())
            x[0, i] = x[0, j] = x.max() + 1
        if trial == 2:                                   # the maximum in the last, partial block
            x[0, V - 1] = x.max() + 1
        x = x.to(DEV)
        assert D.argmax(x, block=block).tolist() == x.argmax(-1).tolist(), (V, block, trial)
    x[0, V // 5] = float("inf")
    assert D.argmax(x, block=block).tolist() == x.argmax(-1).tolist() == [V // 5]
    x[0, V // 3] = float("nan")                          # a NaN beats +inf, as in torch
    x[0, V - 1] = float("nan")
    assert D.argmax(x, block=block).tolist() == x.argmax(-1).tolist() == [V // 3]
    assert int(D._ARGMAX_WS[(x.device.type, x.device.index, -(-V // block))][2]) == 0


def test_decode_kernels_match_references():
    g = _gen(0)
    T, d, hq, hkv, hd, L = 3, 96, 4, 2, 16, 24
    x = torch.randn(T, d, generator=g).to(DEV)
    w = torch.randn(d, generator=g).to(DEV)
    torch.testing.assert_close(D.rmsnorm(x, w, 1e-5), D.rmsnorm_ref(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    gu = torch.randn(T, 2 * d, generator=g).to(DEV)
    torch.testing.assert_close(D.act_mul(gu, "silu"), D.act_mul_ref(gu, "silu"), rtol=1e-5, atol=1e-5)
    qkv = torch.randn(T, (hq + 2 * hkv) * hd, generator=g).to(DEV)
    cos, sin = torch.rand(L, hd // 2, generator=g).to(DEV), torch.rand(L, hd // 2, generator=g).to(DEV)
    pos = torch.tensor([5], device=DEV)
    caches = [torch.randn(L, hkv, hd, generator=_gen(1)).to(DEV) for _ in range(4)]
    q1 = D.rope_cache(qkv, pos, cos, sin, caches[0], caches[1], hq, hkv)
    q2 = D.rope_cache_ref(qkv, pos, cos, sin, caches[2], caches[3], hq, hkv)
    torch.testing.assert_close(q1, q2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0], caches[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1], caches[3], rtol=1e-5, atol=1e-5)
    # acc: qkv is an fp32 sum to be rounded to the cache dtype (bf16 here) and left zeroed
    c16 = [torch.randn(L, hkv, hd, generator=_gen(2)).to(DEV).bfloat16() for _ in range(4)]
    a1, a2 = qkv.clone(), qkv.clone()
    q3 = D.rope_cache(a1, pos, cos, sin, c16[0], c16[1], hq, hkv, acc=True)
    q4 = D.rope_cache_ref(a2, pos, cos, sin, c16[2], c16[3], hq, hkv, acc=True)
    q5 = D.rope_cache_ref(qkv.bfloat16(), pos, cos, sin, c16[2].clone(), c16[3].clone(), hq, hkv)
    assert q3.dtype == torch.bfloat16 and torch.equal(q4, q5)
    assert bool((a1 == 0).all()) and bool((a2 == 0).all())
    # (two bf16 roundings each side; the interpreter's fp32 → bf16 cast need not round as torch does)
    torch.testing.assert_close(q3.float(), q4.float(), rtol=2e-2, atol=4e-2)
    torch.testing.assert_close(c16[0].float(), c16[2].float(), rtol=2e-2, atol=4e-2)
    if DEV == "cuda":   # v: one rounding each side, the same one
        assert torch.equal(c16[1], c16[3])
    else:
        torch.testing.assert_close(c16[1].float(), c16[3].float(), rtol=8e-3, atol=1e-2)
    # clear: another fp32 buffer zeroed by the same launch (lengths not a multiple of the heads, and one over a
    # slice a head), the results unchanged
    for n_clr in (37, 2 * d, (hq + 2 * hkv) * 5 + 1):
        clr = torch.randn(1, n_clr, generator=g).to(DEV)
        c2 = [c.clone() for c in caches[:2]]
        q6 = D.rope_cache(qkv, pos, cos, sin, c2[0], c2[1], hq, hkv, clear=clr)
        assert bool((clr == 0).all()) and torch.equal(q6, q1) and torch.equal(c2[0], caches[0]), n_clr
    with pytest.raises(ValueError):
        D.rope_cache(qkv, pos, cos, sin, caches[0], caches[1], hq, hkv, clear=torch.zeros(4, 2, device=DEV).t())
    for block_t in (4, 16):   # several blocks and a partial one
        o1 = D.decode_attention(q1, caches[0], caches[1], pos, hq, 0.25, block_t=block_t)
        o2 = D.decode_attention_ref(q1, caches[0], caches[1], pos, hq, 0.25)
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0, 5, 130], ids=lambda p: f"pos{p}")
@pytest.mark.parametrize("dtype,acc", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "bf16-acc"])
def test_rope_attention_matches_rope_cache_then_attention(dtype, acc, p):
    """One token's RoPE + cache write + attention in one launch = rope_cache, then decode_attention (the first
    position, one inside the first key block, one in the second block of 128), grouped-query heads; the cache gets
    the same row; acc reads the fp32 sum without zeroing it; clear zeroes up to two other buffers."""
    g = _gen(20 + p)
    hq, hkv, hd, L = 6, 2, 16, 160
    qkv = (torch.randn(1, (hq + 2 * hkv) * hd, generator=g) * 2).to(DEV)
    qkv = qkv if acc else qkv.to(dtype)
    cos, sin = torch.rand(L, hd // 2, generator=g).to(DEV), torch.rand(L, hd // 2, generator=g).to(DEV)
    pos = torch.tensor([p], device=DEV)
    kc = torch.randn(L, hkv, hd, generator=g).to(DEV, dtype)
    vc = torch.randn(L, hkv, hd, generator=g).to(DEV, dtype)
    k2, v2 = kc.clone(), vc.clone()
    clr = [torch.randn(37, generator=g).to(DEV), torch.randn(3 * hq * 4 + 1, generator=g).to(DEV)]
    src = qkv.clone()
    o1 = D.rope_attention(src, pos, cos, sin, kc, vc, hq, hkv, 0.25, acc=acc, clear=clr)
    assert torch.equal(src, qkv) and all(bool((c == 0).all()) for c in clr)
    q = D.rope_cache_ref(qkv.to(dtype) if acc else qkv, pos, cos, sin, k2, v2, hq, hkv)
    o2 = D.decode_attention_ref(q, k2, v2, pos, hq, 0.25)
    o3 = D.rope_attention_ref(qkv, pos, cos, sin, k2.clone(), v2.clone(), hq, hkv, 0.25, acc=acc)
    assert o1.dtype == o2.dtype == dtype and torch.equal(o2, o3)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=4e-2)
    torch.testing.assert_close(o1.float(), o2.float(), **tol)
    torch.testing.assert_close(kc.float(), k2.float(), **tol)
    torch.testing.assert_close(vc.float(), v2.float(), **tol)
    assert torch.equal(kc[:p], k2[:p]) and torch.equal(kc[p + 1:], k2[p + 1:])   # only row p written
    with pytest.raises(ValueError):   # one token only
        D.rope_attention(torch.cat([qkv, qkv]), pos, cos, sin, kc, vc, hq, hkv, 0.25)
    a32 = qkv.float().contiguous()
    with pytest.raises(ValueError):   # clearing the buffer the programs read
        D.rope_attention(a32, pos, cos, sin, kc, vc, hq, hkv, 0.25, acc=True, clear=[a32[0, 8:]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p,m,stripe,split,block_m,mean2d,bias", [
    (0, 80, 16, 2, 16, False, True),      # first position; the last block of the second program is past m
    (5, 72, 32, 3, 16, True, True),       # a partial last stripe, per-stripe means
    (130, 96, 96, 1, 32, False, False),   # two key blocks of 128, one stripe, no bias
    (9, 64, 64, 4, 16, False, True),
])
def test_attn_o_matches_attention_then_gemv(dtype, p, m, stripe, split, block_m, mean2d, bias):
    """One token's attention and the CWIC o product of its output in one launch = decode_attention, then
    gemv_ex(acc_out=...): the product (+ bias) is added into acc_out; the masks come from the attention output
    rounded to q's dtype, as the two-kernel path stores it."""
    g = _gen(40 + p)
    hq, hkv, hd, L = 6, 2, 16, 160
    n = hq * hd
    q = (torch.randn(1, n, generator=g)).to(DEV, dtype)
    pos = torch.tensor([p], device=DEV)
    kc = torch.randn(L, hkv, hd, generator=g).to(DEV, dtype)
    vc = (torch.randn(L, hkv, hd, generator=g) * 3).to(DEV, dtype)
    k = -(-m // stripe)
    wt = (torch.randn(n, m, generator=g) / n ** 0.5).to(DEV, dtype)
    mean = (torch.randn(k if mean2d else 1, n + 8, generator=g) * 0.1).to(DEV)[:, :n]   # rows n + 8 apart
    mean = mean if mean2d else mean[0].contiguous()
    thr = (torch.rand(k, n, generator=g) * 0.8).to(DEV)
    b = torch.randn(m, generator=g).to(DEV) if bias else None
    start = torch.randn(1, m, generator=g).to(DEV)
    cfg = D.attn_o_config(m, stripe, hd, split=split, block_m=block_m)
    assert cfg is not None and cfg["split"] == split
    got = D.attn_o(q, kc, vc, pos, hq, 0.25, wt, mean, thr, b, stripe, start.clone(), config=cfg)
    want = fb.attn_o_ref(q, kc, vc, pos, hq, 0.25, wt, mean, thr, b, stripe, start.clone())
    att = D.decode_attention_ref(q, kc, vc, pos, hq, 0.25)
    assert got.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    assert not torch.allclose(want, start)                  # the product was added
    # every pair on (θ = 0) is the dense product of the attention output; every pair off leaves acc_out + bias
    dense = D.attn_o(q, kc, vc, pos, hq, 0.25, wt, mean, torch.zeros_like(thr), None, stripe,
                     torch.zeros(1, m, device=DEV), config=cfg)
    rows = [slice(r * stripe, min(m, (r + 1) * stripe)) for r in range(k)]
    xc = [att.float() - (mean[r] if mean2d else mean) for r in range(k)]
    torch.testing.assert_close(dense, torch.cat([xc[r] @ wt.float()[:, sl] for r, sl in enumerate(rows)], 1), **tol)
    off = D.attn_o(q, kc, vc, pos, hq, 0.25, wt, mean, torch.full_like(thr, float("inf")), b, stripe,
                   start.clone(), config=cfg)
    torch.testing.assert_close(off, start + (b if b is not None else 0), rtol=1e-6, atol=1e-6)
    # a NaN value at a position attended to makes its heads' outputs NaN: those inputs are on even at +inf
    vn = vc.clone()
    vn[p, 0, 3] = float("nan")
    for t in (thr, torch.full_like(thr, float("inf"))):
        for fn in (lambda *a: D.attn_o(*a, config=cfg), fb.attn_o_ref):
            assert torch.isnan(fn(q, kc, vn, pos, hq, 0.25, wt, mean, t, b, stripe, start.clone())).all()


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 1), (6, 2)])
def test_attn_o_any_group_size(hq, hkv):
    """Grouped-query heads: a kv head shared by 1, 8 or 3 query heads."""
    g = _gen(70 + hq)
    hd, L, m, stripe = 16, 40, 64, 32
    n = hq * hd
    q, kc, vc = torch.randn(1, n, generator=g), torch.randn(L, hkv, hd, generator=g), torch.randn(L, hkv, hd, generator=g)
    wt, mean = torch.randn(n, m, generator=g) / n ** 0.5, torch.randn(n, generator=g) * 0.1
    thr, b = torch.rand(2, n, generator=g) * 0.8, torch.randn(m, generator=g)
    args = [t.to(DEV) for t in (q, kc, vc)] + [torch.tensor([33], device=DEV), hq, 0.25] + \
        [t.to(DEV) for t in (wt, mean, thr, b)] + [stripe]
    cfg = D.attn_o_config(m, stripe, hd, split=2, block_m=16)
    got = D.attn_o(*args, torch.zeros(1, m, device=DEV), config=cfg)
    want = fb.attn_o_ref(*args, torch.zeros(1, m, device=DEV))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attn_o_config_refuses_what_it_cannot_tile():
    assert D.attn_o_config(2048, 512, 64, split=4, block_m=128) == dict(split=4, m_per=512, BLOCK_M=128, NBLK=4)
    assert D.attn_o_config(2048, 2048, 64, split=3, block_m=128)["split"] == 3
    assert D.attn_o_config(2048, 96, 64, split=4, block_m=128)["BLOCK_M"] == 32   # blocks inside one stripe
    assert D.attn_o_config(2048, 512, 64, split=4, block_m=96)["BLOCK_M"] == 64   # a power of two
    assert D.attn_o_config(2048, 512, 48, split=4, block_m=128) is None           # head dim not a power of two
    assert D.attn_o_config(2048, 520, 64, split=4, block_m=128) is None           # a stripe not a multiple of 16
    assert D.attn_o_config(2048, 512, 64, split=0, block_m=128) is None
    with pytest.raises(ValueError):
        D.attn_o(torch.zeros(1, 8 * 48), torch.zeros(4, 2, 48), torch.zeros(4, 2, 48), torch.zeros(1, dtype=torch.long),
                 8, 0.1, torch.zeros(8 * 48, 64), torch.zeros(8 * 48), torch.zeros(1, 8 * 48), None, 64,
                 torch.zeros(1, 64))


# ---------------------------------------------------------------- custom ops registration

def test_custom_ops_dispatch():
    from cwic_kernels import ops
    from cwic_kernels.gpu import register
    assert register()
    x, wt, mean, thr, bias = _inputs(2, 64, 64, 32, torch.float32, seed=9)
    y = torch.ops.cwic.gemv(x, wt, mean, thr, bias, 32)
    torch.testing.assert_close(y, ref.gemv_reference(x, wt, mean, thr, bias, 32), rtol=2e-5, atol=2e-5)
    assert ops.gemv is not None


# --------------------------------------------------------------------------- decode engine

def _calibrated_tiny(cwic: bool, seed=0, **kw):
    from conftest import tiny_model

    import cwic_exp
    model = tiny_model(hidden_size=64, intermediate_size=128, vocab_size=96, seed=seed, **kw)
    if cwic:
        cwic_exp.to_cwic(model, stripe_size=32)
        ids = torch.randint(0, 96, (1, 40), generator=_gen(seed))
        with cwic_exp.cwic_context(model, update_stats=True):
            model(ids)
        g = _gen(seed + 1)
        with torch.no_grad():
            for m in cwic_exp.iter_cwic_modules(model):
                p = m.theta if hasattr(m, "theta") else m.phi
                p.copy_(torch.rand(p.shape, generator=g) * 1.2)
    return model


def _hand_offs_cleared(eng) -> bool:
    """After a decode step every hand-off buffer is zero but the residual stream "h" and, with `fuse_attn`, the
    q/k/v sums no launch cleared after their layer read them (the last layer's, and with an odd number of layers
    the one before too): the next step's launch before their layer clears them."""
    dirty = set()
    if eng.fuse_attn:   # replay the step's order: layer li adds into its buffer, its launch clears the next one's
        n, m = len(eng.w.layers), eng.w.layers[0].qkv[0].out_features
        for li in range(n):
            buf, nxt = eng._qkv_buf(li, m), eng._qkv_buf(li + 1, m)
            dirty.add(buf.data_ptr())
            dirty.discard(nxt.data_ptr())   # (one layer: the engine zeroes its own buffer after the launch)
    return all(float(a.abs().sum()) == 0 for k, a in eng._acc.items() if k[0] != "h" and a.data_ptr() not in dirty)


@pytest.mark.parametrize("layers,dense_qkv", [(1, ()), (3, ()), (4, (1,))], ids=["1", "3", "4-dense1"])
def test_engine_fused_attention_any_layer_count(layers, dense_qkv):
    """The fused RoPE + attention launch with the summed q/k/v path: the buffers alternate by layer parity (a third
    for the last of an odd number of layers; one layer clears its own after the launch), so several decode steps
    give the model's greedy tokens and logits."""
    from cwic_exp.engine import DecodeEngine
    model = _calibrated_tiny(True, num_hidden_layers=layers).to(DEV)
    for li in dense_qkv:   # a layer whose q/k/v stay dense, between summing layers that share a buffer parity
        at = model.model.layers[li].self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            c = getattr(at, name)
            lin = torch.nn.Linear(c.in_features, c.out_features, bias=c.bias is not None).to(DEV)
            with torch.no_grad():
                lin.weight.copy_(c.weight)
                if c.bias is not None:
                    lin.bias.copy_(c.bias)
            setattr(at, name, lin)
    ids = torch.randint(0, 96, (9,), generator=_gen(8)).to(DEV)
    with torch.no_grad():
        want = model(ids[None]).logits[0].float()
    eng = DecodeEngine(model, max_len=32, triton=DEV == "cuda")
    assert not eng.fuse_attn          # off by default (slower for CWIC on the H200)
    eng.fuse_attn = True
    assert eng.acc_qkv and len(eng.w.layers) == layers
    eng.prefill(ids[:5])
    for i in range(5, 9):   # one-token steps fed the model's tokens
        eng.tok.fill_(int(ids[i]))
        eng.pos.fill_(i)
        assert _rel(eng.forward(eng.tok).float(), want[i:i + 1]) < 1e-5, i
        assert _hand_offs_cleared(eng)
    keys = sorted(k[0] for k in eng._acc if k[0].startswith("qkv"))
    assert keys == {1: ["qkv0"], 3: ["qkv0", "qkv1", "qkv2"], 4: ["qkv0", "qkv1"]}[layers]
    assert [L.qkv[0].kind for L in eng.w.layers] == ["dense" if i in dense_qkv else "cwic" for i in range(layers)]
    gen = eng.generate(ids[:4], 4)
    hf = model.generate(ids[:4][None], max_new_tokens=4, min_new_tokens=4, do_sample=False)[0]
    assert gen.tolist() == hf.tolist()


def test_engine_decode_refuses_to_pass_max_len():
    """decode(n) checks its positions on the host before it runs: a step at max_len would write its K/V into the
    next layer's cache rows (and read RoPE tables out of bounds); feed() and prefill() set where it stands."""
    from cwic_exp.engine import DecodeEngine
    model = _calibrated_tiny(False).to(DEV)
    eng = DecodeEngine(model, max_len=12, triton=False)
    eng.prefill(torch.arange(8, device=DEV))
    eng.decode(4)                                            # positions 8..11: the last rows
    with pytest.raises(ValueError, match="max_len"):
        eng.decode(1)
    eng.feed(3, 5)
    eng.decode(6)                                            # after feed at 5: 6..11
    with pytest.raises(ValueError, match="max_len"):
        eng.decode(1)


def test_engine_refuses_a_second_thread_while_it_runs_and_names_bad_lengths():
    """An engine holds one sequence: its cache, positions and buffers. A call from a second thread while one runs
    used to interleave the two threads' kernels on them (wrong tokens, no error); now it is refused by name, and the
    engine works again once the first call returns. Nested calls of one thread (generate -> capture, prefill,
    decode) still run. prefill/generate lengths outside the cache are ValueErrors, not asserts (gone under -O)."""
    import threading
    from cwic_exp.engine import DecodeEngine
    model = _calibrated_tiny(True).to(DEV)
    eng = DecodeEngine(model, max_len=12, triton=False)
    ids = torch.arange(1, 7, device=DEV)
    want = eng.generate(ids, 4).tolist()                     # nested calls of one thread
    inside, release, errors = threading.Event(), threading.Event(), []
    forward = eng.forward

    def slow_forward(*a, **kw):
        inside.set()
        assert release.wait(30)
        return forward(*a, **kw)

    def first():
        try:
            eng.prefill(ids)
        except Exception as e:                               # pragma: no cover - reported below
            errors.append(e)
    eng.forward = slow_forward
    th = threading.Thread(target=first)
    th.start()
    assert inside.wait(30)
    for call in (lambda: eng.decode(1), lambda: eng.feed(3, 2), lambda: eng.prefill(ids), eng.refresh,
                 lambda: eng.generate(ids, 2)):
        with pytest.raises(RuntimeError, match="in use by another thread"):
            call()
    release.set()
    th.join(30)
    assert not th.is_alive() and not errors
    eng.forward = forward
    assert eng.generate(ids, 4).tolist() == want             # the refusals changed nothing
    with pytest.raises(ValueError, match="max_len"):
        eng.prefill(torch.arange(12, device=DEV))
    with pytest.raises(ValueError, match="max_len"):
        eng.generate(ids, 7)
    with pytest.raises(ValueError, match="1 new token"):
        eng.generate(ids, 0)


@pytest.mark.parametrize("cwic", [False, True], ids=["dense", "cwic"])
@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_engine_matches_hf(cwic, use_triton):
    from cwic_exp.engine import DecodeEngine
    model = _calibrated_tiny(cwic).to(DEV)
    ids = torch.randint(0, 96, (10,), generator=_gen(4)).to(DEV)
    with torch.no_grad():
        want = model(ids[None]).logits[0].float()
    eng = DecodeEngine(model, max_len=32, triton=use_triton)
    eng.pos.zero_()
    got = eng.forward(ids, last_only=False).float()         # prefill path: 10 tokens at once
    assert _rel(got, want) < 1e-5
    first = 8 if use_triton else 6                           # (the interpreter is slow: fewer steps)
    eng.prefill(ids[:first])                                 # then the 1-token decode path
    steps = []
    for i in range(first, 10):
        eng.tok.fill_(int(ids[i]))
        eng.pos.fill_(i)
        steps.append(eng.forward(eng.tok).float())
    assert _rel(torch.cat(steps), want[first:]) < 1e-5
    if cwic:   # the one-token q/k/v and o products summed into fp32 buffers, which RoPE and the FFN consume: left
        # zeroed
        # (the PyTorch twin has no one-launch FFN: o keeps its own epilogue there), and the FFN's product handed to
        # the next layer's q/k/v kernel, which writes the residual stream to a static buffer ("h")
        assert len(eng.w.layers) > 1 and eng.acc_qkv and eng.acc_o and eng.acc_ffn and not eng.fuse_attn
        assert sorted(k[0] for k in eng._acc) == (["h", "o+ffn", "qkv"] if use_triton else ["qkv"])
        assert _hand_offs_cleared(eng)
        eng._acc[("qkv", eng.w.layers[0].qkv[0].out_features)].fill_(3.0)   # a step that stopped half-way ...
        eng.prefill(ids[:first])                                             # ... is cleared by the next prefill
        assert all(float(a.abs().sum()) == 0 for k, a in eng._acc.items() if k[0] != "h")
        eng.tok.fill_(int(ids[9]))                                          # back to the last step's state
        eng.pos.fill_(9)
    if use_triton:   # RMSNorm as a separate kernel, RoPE in the q/k/v kernel's epilogue, q/k/v with its own
        # epilogue: the same step
        if cwic:   # the attention and the o product in one launch (attn_o; off by default) applies here
            L0, h1 = eng.w.layers[0], torch.zeros(1, eng.w.layers[0].o.out_features, device=DEV)
            eng.attn_o = False
            assert not eng._o_fusable(L0, h1)
            eng.attn_o = True
            assert eng._o_fusable(L0, h1)
            eng.attn_o = False
        for flag, on in (("fuse_norm", False), ("fuse_rope", True), ("acc_qkv", False), ("acc_o", False),
                         ("acc_ffn", False), ("fuse_attn", True), ("attn_o", True)):
            old = getattr(eng, flag)
            setattr(eng, flag, on)
            assert _rel(eng.forward(eng.tok).float(), want[9:10]) < 1e-5, flag
            setattr(eng, flag, old)
    gen = eng.generate(ids[:4], 3 if use_triton else 5)
    hf = model.generate(ids[:4][None], max_new_tokens=gen.numel() - 4, min_new_tokens=gen.numel() - 4,
                        do_sample=False)[0]
    assert gen.tolist() == hf.tolist()
    if cwic and not use_triton:  # the thresholds bite: the CWIC model differs from its dense self
        dense = _calibrated_tiny(False).to(DEV)
        with torch.no_grad():
            assert _rel(dense(ids[None]).logits[0].float(), want) > 1e-3
        import cwic_exp
        with torch.no_grad():   # new thresholds reach the engine in place (graphs stay valid)
            for m in cwic_exp.iter_cwic_modules(model):
                (m.theta if hasattr(m, "theta") else m.phi).mul_(0.5)
            want2 = model(ids[None]).logits[0].float()
        eng.refresh()
        eng.pos.zero_()
        assert _rel(eng.forward(ids, last_only=False).float(), want2) < 1e-5


def test_engine_prefill_gemm(monkeypatch):
    """Prompts of at least `gemm_from` tokens run the CWIC products as per-stripe GEMMs: the same logits as the
    model, then the same greedy continuation; fewer tokens keep the kernel path."""
    import cwic_kernels.gpu.prefill as P
    from cwic_exp.engine import DecodeEngine
    model = _calibrated_tiny(True).to(DEV)
    ids = torch.randint(0, 96, (12,), generator=_gen(6)).to(DEV)
    with torch.no_grad():
        want = model(ids[None]).logits[0].float()
    eng = DecodeEngine(model, max_len=32, triton=DEV == "cuda", gemm_from=4)
    calls = []
    for name in ("masked_gemm", "ffn_gemm"):
        fn = getattr(P, name)
        monkeypatch.setattr(P, name, lambda *a, _f=fn, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    eng.pos.zero_()
    assert _rel(eng.forward(ids, last_only=False).float(), want) < 1e-5
    L = len(eng.w.layers)
    assert calls.count("ffn_gemm") == L and calls.count("masked_gemm") >= 2 * L + 1   # q/k/v, o; the head (T rows)
    calls.clear()
    eng.pos.zero_()
    assert _rel(eng.forward(ids[:3], last_only=False).float(), want[:3]) < 1e-5 and not calls
    gen = eng.generate(ids[:6], 4)
    hf = model.generate(ids[:6][None], max_new_tokens=4, min_new_tokens=4, do_sample=False)[0]
    assert gen.tolist() == hf.tolist()
    with pytest.raises(ValueError):
        DecodeEngine(model, max_len=32, triton=False, gemm_from=-1)
    eng1 = DecodeEngine(model, max_len=32, triton=DEV == "cuda", gemm_from=1)   # one-token steps keep the kernels
    assert eng1.generate(ids[:6], 4).tolist() == hf.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs")
def test_engine_prefill_then_decode_keeps_the_cache():
    """decode() after prefill() captures the graph first: its warm-up steps at position 0 must not leave their
    cache row or token slot behind (the same tokens as generate(), which captures before prefilling)."""
    from cwic_exp.engine import DecodeEngine
    model = _calibrated_tiny(True).to(DEV)
    ids = torch.randint(0, 96, (7,), generator=_gen(9)).to(DEV)
    want = DecodeEngine(model, max_len=32).generate(ids, 5)
    eng = DecodeEngine(model, max_len=32)
    eng.prefill(ids)
    eng.decode(4)
    assert eng.tokens[:12].tolist() == want.tolist()


# ------------------------------------------------------------------- real shapes (GPU only)

@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("n,m", [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048), (3072, 1024),
                                 (3072, 5120), (4096, 6144), (2048, 128256)])
@pytest.mark.parametrize("B", [1, 2, 16])
def test_gemv_real_shapes_gpu(n, m, B):
    x, wt, mean, thr, bias = _inputs(B, n, m, 512, torch.bfloat16, density=0.34, seed=n + m + B)
    y = G.gemv_ex(x, wt, mean, thr, bias, 512)
    _check(y, _gold(x, wt, mean, thr, bias, 512), ref.gemv_reference(x, wt, mean, thr, bias, 512),
           f"{B}x{n}x{m}")
    y2 = G.gemv_ex(x, wt, mean, thr, bias, 512)
    assert torch.equal(y, y2), "moving result: race in the split-K reduction"


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("n,m", [(2048, 8192), (8192, 2048), (2048, 128256)])
@pytest.mark.parametrize("cfg", [dict(pipe=True, waves=1), dict(waves=8, max_split=128), dict(num_warps=8)])
def test_gemv_real_shapes_configs_gpu(n, m, cfg):
    x, wt, mean, thr, bias = _inputs(1, n, m, 512, torch.bfloat16, density=0.34, seed=n + m)
    c = G.gemv_config(1, n, m, 512, x.device, **cfg)
    y = G.gemv_ex(x, wt, mean, thr, bias, 512, config=c)
    _check(y, _gold(x, wt, mean, thr, bias, 512), ref.gemv_reference(x, wt, mean, thr, bias, 512), str(cfg))


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("d,F_", [(2048, 8192), (3072, 8192), (4096, 14336)])   # 1B, 3B, 8B: their tuned tiles
def test_ffn_real_shape_and_cuda_graph_gpu(B, d, F_):
    from cwic_kernels.gpu import register
    register()
    x, gwt, gmean, gthr, gbias = _inputs(B, d, F_, 512, torch.bfloat16, density=0.34, seed=B)
    up_w = (torch.randn(F_, d, device=DEV) / d ** 0.5).bfloat16()
    down_wt = (torch.randn(F_, d, device=DEV) / F_ ** 0.5).bfloat16()
    uthr = torch.rand(F_, device=DEV) * 0.05
    args = (x, gwt, gmean, gthr, gbias, 512, up_w, down_wt, uthr, "silu")
    r = ref.ffn_reference(*args)
    gold = ref.ffn_reference(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args])
    y = torch.ops.cwic.ffn(*args)
    _check(y, gold, r, "ffn")
    g = torch.cuda.CUDAGraph()
    torch.ops.cwic.gemv(x, gwt, gmean, gthr, gbias, 512)       # compiled before capture
    with torch.cuda.graph(g):
        yg = torch.ops.cwic.ffn(*args)
        yv = torch.ops.cwic.gemv(x, gwt, gmean, gthr, gbias, 512)
    g.replay()
    g.replay()
    torch.cuda.synchronize()
    if B == 1:   # the fused up+down kernel adds fp32 partials atomically: the last bits may vary
        _check(yg, gold, r, "ffn in a CUDA graph")
    else:
        assert torch.equal(yg, y)
    assert torch.equal(yv, G.gemv_ex(x, gwt, gmean, gthr, gbias, 512))


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA device")
def test_pdl_chain_in_cuda_graph_equals_plain_launches_gpu(monkeypatch):
    """Programmatic dependent launch (Hopper+): every kernel of a long chain in which each one reads what the
    previous one wrote (and overwrites what it read) gives bit-for-bit the result of plain launches, eagerly
    and replayed from a CUDA graph. A kernel that touched memory before `gdc_wait` would read stale inputs."""
    from cwic_kernels.gpu import ffn_fused as FF
    from cwic_kernels.gpu import gemv_compact as GC
    if not G.use_pdl(torch.device(DEV)):
        pytest.skip("PDL needs compute capability 9.0+ and a Triton with gdc_wait")
    d, F_ = 2048, 8192
    x, wt, mean, thr, bias = _inputs(1, d, d, 512, torch.bfloat16, density=0.34, seed=7)
    _, gwt, gmean, gthr, gbias = _inputs(1, d, F_, 512, torch.bfloat16, density=0.34, seed=8)
    up_w = (torch.randn(F_, d, device=DEV) / d ** 0.5).bfloat16()
    down_wt = (torch.randn(F_, d, device=DEV) / F_ ** 0.5).bfloat16()
    uthr = torch.rand(F_, device=DEV) * 0.05
    nw = (1 + 0.1 * torch.randn(d, device=DEV)).bfloat16()
    buf = torch.empty_like(x)
    fbuf = torch.empty_like(x)     # the one-launch FFN at the end (atomics: compared within fp32-sum error)

    def chain(h):
        for _ in range(12):
            h = D.rmsnorm(h, nw, 1e-5)
            h = G.gemv_ex(h, wt, mean, thr, bias, 512, compact=False, out_dtype=torch.bfloat16)   # masked-load
            h = GC.gemv_compact(h, wt, mean, thr, bias, 512, out_dtype=torch.bfloat16, residual=h.float(),
                                norm_w=nw)
            a = G.gemv_ex(h, gwt, gmean, gthr, gbias, 512, act="silu", unit_thr=uthr, norm_w=nw)
            h = (G.ffn_up(h, up_w, a) @ down_wt.float()).bfloat16()     # a cuBLAS kernel in between
            h = G.gemv_ex(h, wt, mean, thr, bias, 512, compact=False, out_dtype=torch.bfloat16, residual=h)
        buf.copy_(h)
        fbuf.copy_(G.ffn(h, gwt, gmean, gthr, gbias, 512, up_w, down_wt, uthr, "silu", residual=h, norm_w=nw))
        return buf

    monkeypatch.setattr(G, "PDL", False)
    want = chain(x).clone()
    fwant = fbuf.clone()
    monkeypatch.setattr(G, "PDL", True)
    assert torch.equal(chain(x), want), "eager PDL launches differ from plain ones"
    assert _rel(fbuf, fwant) < 1e-2
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain(x)
    for _ in range(3):
        buf.fill_(float("nan"))
        fbuf.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(buf, want), "PDL launches replayed from a CUDA graph differ from plain ones"
        assert _rel(fbuf, fwant) < 1e-2, "the one-launch FFN under PDL in a CUDA graph"
    # the fused up/down kernel (atomics: compare within fp32-sum error) after a PDL gate kernel
    a = G.gemv_ex(x, gwt, gmean, gthr, gbias, 512, act="silu", unit_thr=uthr)
    y = FF.ffn_updown(x, up_w, down_wt, a, residual=x)
    monkeypatch.setattr(G, "PDL", False)
    a0 = G.gemv_ex(x, gwt, gmean, gthr, gbias, 512, act="silu", unit_thr=uthr)
    y0 = FF.ffn_updown(x, up_w, down_wt, a0, residual=x)
    assert torch.equal(a, a0)
    assert _rel(y.float(), y0.float()) < 1e-2


def _ffn_gold(xn, gwt, gmean, gthr, gbias, stripe, up_w, down_wt, uthr, res):
    """fp64 gated FFN with the kernels' fp32 masks (any means, per stripe too): gate → silu → unit mask → up, down."""
    a = ref.ACTIVATIONS["silu"](_gold(xn, gwt, gmean, gthr, gbias, stripe))
    a = torch.where(a.abs() >= uthr.double(), a, torch.zeros_like(a))
    return ((xn.double() @ up_w.double().T) * a) @ down_wt.double() + res.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d,F_,stripe,cfg,norm,mean2d", [
    (64, 80, 32, {}, False, False),                             # partial last unit block (80 = 2.5 × 32)
    (80, 128, 64, dict(block_u=16, block_s=4, pipe=True), True, False),   # width not a power of two, fused norm
    (64, 96, 32, {}, True, True),                               # per-stripe means over three stripes (padded rows)
    (64, 200, 200, dict(block_u=16, block_s=4, copies=3), False, False),  # one stripe (= F), spread accumulators
    (8, 64, 32, dict(block_u=16), False, False),                # d < 16: a gate step wider than the inputs
])
def test_ffn_gate_updown_matches_three_launches(d, F_, stripe, cfg, norm, mean2d, dtype):
    """The one-launch FFN (gate for each program's units, then their up/down rows) equals the gate GEMV followed
    by the up and down projections, and leaves the gate's a and a clean workspace behind."""
    from cwic_kernels.gpu import ffn_fused as FF
    x, gwt, gmean, gthr, gbias = _inputs(1, d, F_, stripe, dtype, seed=d + F_ + 7, mean2d=mean2d)
    if mean2d:   # rows further apart than d: the kernels must use the means' row stride
        padded = torch.zeros(gmean.shape[0], d + 5, device=DEV)
        padded[:, :d] = gmean
        gmean = padded[:, :d]
    g = _gen(d + F_)
    up_w = (torch.randn(F_, d, generator=g) / d ** 0.5).to(dtype).to(DEV)
    down_wt = (torch.randn(F_, d, generator=g) / F_ ** 0.5).to(dtype).to(DEV)
    uthr = (torch.rand(F_, generator=g) * 0.3).to(DEV)
    nw = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype).to(DEV) if norm else None
    res = torch.randn(1, d, generator=g).to(dtype).to(DEV)
    xn = D.rmsnorm(x, nw, 1e-6) if norm else x
    gold = _ffn_gold(xn, gwt, gmean, gthr, gbias, stripe, up_w, down_wt, uthr, res)
    y3 = G.ffn(x, gwt, gmean, gthr, gbias, stripe, up_w, down_wt, uthr, "silu", residual=res, fused=False,
               norm_w=nw, eps=1e-6)                                      # three launches: the same-dtype reference
    c = FF.ffn_updown_config(d, F_, **cfg)
    out = torch.full((1, d), float("nan"), dtype=dtype, device=DEV)        # poison: every element written
    for _ in range(2):                                                    # twice: the state is left clean
        y = FF.ffn_gate_updown(x, gwt, gmean, gthr, gbias, stripe, up_w, down_wt, uthr, "silu", residual=res,
                               out=out, config=c, norm_w=nw, eps=1e-6)
        _check(y, gold, y3, f"gate+updown d={d} F={F_} {dtype} {cfg}")
    ws = FF._workspace(x.device, d, F_, c)
    assert int(ws["arr"]) == 0 and float(ws["acc"].abs().sum()) == 0.0
    a = G.gemv_ex(x, gwt, gmean, gthr, gbias, stripe, act="silu", unit_thr=uthr, norm_w=nw, eps=1e-6)
    assert _rel(ws["a"], a) < 1e-5 and torch.equal(ws["a"] != 0, a != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,hd,hq,hkv,stripe,norm", [
    (64, 16, 4, 2, 32, False),      # two heads a stripe
    (80, 32, 2, 1, 32, True),       # one head a stripe, fused norm, width not a power of two
    (64, 32, 2, 2, 48, False),      # stripe 48 is no whole number of heads: two launches
])
def test_gemv_qkv_rope_matches_separate_kernels(n, hd, hq, hkv, stripe, norm, dtype):
    """q/k/v product with RoPE and the cache writes in its epilogue = gemv_ex, then decode.rope_cache."""
    m = (hq + 2 * hkv) * hd
    x, wt, mean, thr, bias = _inputs(1, n, m, stripe, dtype, seed=n + hd + stripe)
    g = _gen(hd)
    nw = (1 + 0.3 * torch.randn(n, generator=g)).to(dtype).to(DEV) if norm else None
    L = 12
    ang = torch.randn(L, hd // 2, generator=g)
    cos, sin = ang.cos().to(DEV), ang.sin().to(DEV)
    pos = torch.tensor([5], device=DEV)
    kc, vc = (torch.full((L, hkv, hd), 7.0, dtype=dtype, device=DEV) for _ in range(2))
    kc2, vc2 = kc.clone(), vc.clone()
    q = G.gemv_qkv_rope(x, wt, mean, thr, bias, stripe, pos, cos, sin, kc, vc, hq, hkv, norm_w=nw, eps=1e-6)
    y = G.gemv_ex(x, wt, mean, thr, bias, stripe, norm_w=nw, eps=1e-6, compact=False)
    q2 = D.rope_cache(y, pos, cos, sin, kc2, vc2, hq, hkv)
    # one rounding of the rotated value; v is not rotated, but the fused launch tiles the outputs one head a
    # block, the separate gemv_ex its own way, so on a GPU the fp32 sums (v too) differ in their last bits
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert _rel(q, q2) < tol and _rel(kc, kc2) < tol and _rel(vc, vc2) < tol
    assert torch.equal(kc[:5], kc2[:5]) and bool((kc[6:] == 7).all())   # only position 5 written
    qr = fb.gemv_qkv_rope_ref(x, wt, mean, thr, bias, stripe, pos, cos, sin, kc2.clone(), vc2.clone(), hq, hkv,
                              norm_w=nw, eps=1e-6)
    if dtype == torch.float32:   # (in bf16 the twin's separate norm may flip a threshold decision)
        assert _rel(qr, q2) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,m,stripe,split,norm", [(96, 80, 16, 3, True), (64, 64, 32, 1, False)])
def test_gemv_acc_out_equals_epilogue(n, m, stripe, split, norm, dtype):
    """acc_out: the split-K partials (+ bias once) added into an fp32 output = the arrival path's sum before its
    rounding (the residual, added by the consumer, included)."""
    x, wt, mean, thr, bias = _inputs(1, n, m, stripe, dtype, seed=n + m + split)
    nw = (1 + 0.3 * torch.randn(n, generator=_gen(n))).to(dtype).to(DEV) if norm else None
    res = torch.randn(1, m, generator=_gen(m)).to(dtype).to(DEV)
    cfg = G.gemv_config(1, n, m, stripe, x.device, block_n=16, max_split=split, waves=64)
    assert cfg["SPLIT"] == split
    y = G.gemv_ex(x, wt, mean, thr, bias, stripe, residual=res, norm_w=nw, config=cfg, out_dtype=torch.float32)
    acc = torch.zeros((1, m), device=DEV)
    out = G.gemv_ex(x, wt, mean, thr, bias, stripe, norm_w=nw, config=cfg, acc_out=acc)
    assert out is acc
    assert _rel(acc + res.float(), y) < 1e-5
    with pytest.raises(AssertionError):
        G.gemv_ex(x, wt, mean, thr, bias, stripe, residual=res, acc_out=acc)


def _rounded_alike(a, b) -> bool:
    """a == b, two roundings of the same fp32 values to a's dtype: exact on a GPU and in fp32; within one bf16
    step under the interpreter (whose fp32 → bf16 cast need not round as torch does)."""
    if DEV == "cuda" or a.dtype == torch.float32:
        return torch.equal(a, b)
    return torch.allclose(a.float(), b.float(), rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,m,stripe,split,norm,pipe", [(96, 80, 16, 3, True, False), (64, 64, 32, 1, False, False),
                                                        (96, 80, 16, 2, True, True)])
def test_gemv_x_acc_equals_materialised_input(n, m, stripe, split, norm, pipe, dtype):
    """x_acc / x_out (with acc_out): the product of (x + x_acc) rounded = the product of that input formed first;
    x_out receives that input, x_acc is left as it was; the PyTorch twin agrees; without acc_out: refused."""
    x, wt, mean, thr, bias = _inputs(1, n, m, stripe, dtype, seed=n + m + split + 7)
    nw = (1 + 0.3 * torch.randn(n, generator=_gen(n + 1))).to(dtype).to(DEV) if norm else None
    # the previous FFN's fp32 sum, chosen so that x + part is exact in x's dtype: no rounding mode can differ
    # (the interpreter's fp32 → bf16 cast truncates), so every threshold decision is the same on both sides
    h = (torch.randn(1, n, generator=_gen(n + 2)).to(DEV) * 0.5 + x.float()).to(dtype)
    part = h.float() - x.float()
    assert torch.equal((part + x.float()).to(dtype), h)
    cfg = G.gemv_config(1, n, m, stripe, x.device, block_n=16, max_split=split, waves=64, pipe=pipe)
    assert cfg["SPLIT"] == split and cfg["pipe"] == pipe
    want = G.gemv_ex(h, wt, mean, thr, bias, stripe, norm_w=nw, config=cfg, acc_out=torch.zeros((1, m), device=DEV))
    acc, xa, xo = torch.zeros((1, m), device=DEV), part.clone(), torch.full_like(x, 7.0)
    G.gemv_ex(x, wt, mean, thr, bias, stripe, norm_w=nw, config=cfg, acc_out=acc, x_acc=xa, x_out=xo)
    assert torch.equal(xo, h) and torch.equal(xa, part)
    assert _rel(acc, want) < 1e-6
    acc2, xo2 = torch.zeros((1, m), device=DEV), torch.zeros_like(x)
    fb.gemv_ex_ref(x, wt, mean, thr, bias, stripe, norm_w=nw, acc_out=acc2, x_acc=part.clone(), x_out=xo2)
    assert torch.equal(xo2, h)
    if dtype == torch.float32:   # (in bf16 the twin's separate norm may flip a threshold decision)
        assert _rel(acc2, want) < 1e-5
    with pytest.raises(ValueError):
        G.gemv_ex(x, wt, mean, thr, bias, stripe, norm_w=nw, x_acc=part)
    with pytest.raises(ValueError):   # x_out without x_acc, or written over the input
        G.gemv_ex(x, wt, mean, thr, bias, stripe, norm_w=nw, acc_out=acc, x_out=xo)
    with pytest.raises(ValueError):
        G.gemv_ex(x, wt, mean, thr, bias, stripe, norm_w=nw, acc_out=acc, x_acc=part, x_out=x)
    with pytest.raises(ValueError):   # a batch tile would not read x_acc
        G.gemv_ex(x, wt, mean, thr, bias, stripe, acc_out=acc, x_acc=part,
                  config=G.gemv_config(16, n, m, stripe, x.device))
    with pytest.raises(ValueError):
        G.gemv_ex(x, wt, mean, thr, bias, stripe, acc_out=acc, x_acc=part.to(dtype) if dtype != torch.float32
                  else part[:, :-1].contiguous())


def _ffn_case(dtype, norm: bool, seed: int):
    """A one-token FFN (d 64, F 128, stripe 32) for the hand-off tests: x, the ffn_gate_updown arguments after x,
    the norm weight (or None), an fp32 sum `part` handed to it, and h = x + part rounded."""
    d, F_, stripe = 64, 128, 32
    x, gwt, gmean, gthr, gbias = _inputs(1, d, F_, stripe, dtype, seed=seed)
    g = _gen(seed + 1)
    up_w = (torch.randn(F_, d, generator=g) / d ** 0.5).to(dtype).to(DEV)
    down_wt = (torch.randn(F_, d, generator=g) / F_ ** 0.5).to(dtype).to(DEV)
    uthr = (torch.rand(F_, generator=g) * 0.3).to(DEV)
    nw = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype).to(DEV) if norm else None
    part = (torch.randn(1, d, generator=g) * 0.5).to(DEV)
    h = (part + x.float()).to(dtype)
    return x, (gwt, gmean, gthr, gbias, stripe, up_w, down_wt, uthr, "silu"), nw, part, h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", [True, False])
def test_ffn_y_acc_hands_the_product_on(norm, dtype):
    """y_acc: the one-launch FFN adds its product into y_acc and returns its input (x + x_acc rounded), leaving
    x_acc as it was; input + y_acc rounded = the x_acc path's output. The twin agrees; other paths refuse it."""
    from cwic_kernels.gpu import ffn_fused as FF
    x, args, nw, part, h = _ffn_case(dtype, norm, seed=93)
    want = FF.ffn_gate_updown(x, *args, residual=x, norm_w=nw, eps=1e-6, x_acc=part.clone())
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    for fn in (FF.ffn_gate_updown, G.ffn, fb.ffn_ref):
        xa, ya = part.clone(), torch.zeros_like(part)
        got = fn(x, *args, residual=x, norm_w=nw, eps=1e-6, x_acc=xa, y_acc=ya)
        assert _rounded_alike(got, h) and torch.equal(xa, part), fn
        assert _rel((got.float() + ya).to(dtype), want) < tol, fn
        assert float(ya.abs().sum()) > 0, fn
    with pytest.raises(ValueError):
        G.ffn(x, *args, residual=x, norm_w=nw, eps=1e-6, x_acc=part.clone(), y_acc=ya, fused=False)
    with pytest.raises(ValueError):
        FF.ffn_gate_updown(x, *args, residual=None, norm_w=nw, y_acc=ya)
    with pytest.raises(ValueError):   # program 0 would write over the input the others read
        FF.ffn_gate_updown(x, *args, residual=x, norm_w=nw, x_acc=part.clone(), y_acc=ya, out=x)


def test_ffn_phase_clocks():
    """times= (the one-launch FFN's phase clocks, a diagnostic) reads PTX registers: off a GPU (the interpreter, the CPU)
    it is refused with a clear error. On a GPU a buffer of the wrong shape is refused; with the clocks the product is
    the one without them (to the atomics' rounding), every program's seven clocks rise in order, and the counts it
    stores are its stripe's active inputs and its active units."""
    from cwic_kernels.gpu import ffn_fused as FF
    x, args, nw, part, h = _ffn_case(torch.float32, True, seed=95)
    cfg = FF.ffn_updown_config(64, 128)
    grid = cfg["grid"][0]
    T = torch.zeros((grid, 16), dtype=torch.int64, device=x.device)
    if DEV != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(ValueError, match="CUDA device"):
            FF.ffn_gate_updown(x, *args, residual=x, norm_w=nw, times=T)
        return
    with pytest.raises(ValueError, match="int64"):
        FF.ffn_gate_updown(x, *args, residual=x, norm_w=nw, times=T[:, :8])
    want = FF.ffn_gate_updown(x, *args, residual=x, norm_w=nw)
    got = FF.ffn_gate_updown(x, *args, residual=x, norm_w=nw, times=T)
    assert _rel(got, want) < 1e-5
    t = T[:, :7]
    assert bool((t[:, 0] > 0).all()) and bool((t.diff(dim=1) >= 0).all())
    a = FF._workspace(x.device, 64, 128, cfg)["a"].reshape(grid, -1)
    assert torch.equal(T[:, 15].cpu(), (a != 0).sum(1).cpu())
    assert bool(((T[:, 7] % 65536) <= 64).all())


def test_engine_attn_o_steps_match_hf():
    """attn_o on: several one-token steps (each layer's attention and o product in one launch, the o sum handed to
    the FFN) give the model's logits, and every hand-off buffer is zero after each step."""
    from cwic_exp.engine import DecodeEngine
    model = _calibrated_tiny(True).to(DEV)
    ids = torch.randint(0, 96, (10,), generator=_gen(6)).to(DEV)
    with torch.no_grad():
        want = model(ids[None]).logits[0].float()
    eng = DecodeEngine(model, max_len=32, triton=True)
    eng.attn_o = True
    assert all(eng._o_fusable(L, ids[:1, None].float()) for L in eng.w.layers)
    eng.prefill(ids[:7])
    for i in range(7, 10):
        eng.tok.fill_(int(ids[i]))
        eng.pos.fill_(i)
        assert _rel(eng.forward(eng.tok).float(), want[i:i + 1]) < 1e-5, i
        assert _hand_offs_cleared(eng)
    for flags in (dict(fuse_rope=True), dict(acc_qkv=False), dict(acc_ffn=False)):   # with the other switches
        old = {f: getattr(eng, f) for f in flags}
        for f, v in flags.items():
            setattr(eng, f, v)
        assert _rel(eng.forward(eng.tok).float(), want[9:10]) < 1e-5, flags
        assert _hand_offs_cleared(eng)
        for f, v in old.items():
            setattr(eng, f, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_engine_ffn_hand_off_same_bits(dtype):
    """acc_ffn on and off give the same logits in bf16 and fp32: the residual stream is rounded the same way
    (exact under the interpreter, whose atomics add in a fixed order; on a GPU the order varies, so there only
    the buffers are checked). Every hand-off buffer is zero after a step."""
    from cwic_exp.engine import DecodeEngine
    model = _calibrated_tiny(True).to(DEV)
    ids = torch.randint(0, 96, (10,), generator=_gen(4)).to(DEV)
    outs = {}
    for on in (True, False):
        eng = DecodeEngine(model, max_len=32, triton=True, dtype=dtype)
        eng.acc_ffn = on
        eng.prefill(ids[:7])
        steps = []
        for i in range(7, 10):
            eng.tok.fill_(int(ids[i]))
            eng.pos.fill_(i)
            steps.append(eng.forward(eng.tok))
        outs[on] = torch.cat(steps)
        assert ("h" in {k[0] for k in eng._acc}) == on
        assert _hand_offs_cleared(eng)
    if DEV != "cuda":
        assert torch.equal(outs[True], outs[False])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", [True, False])
def test_ffn_x_acc_equals_materialised_input(norm, dtype):
    """x_acc: the one-launch FFN reads (x_acc + x) rounded, as its input and residual, and zeroes x_acc = the FFN of
    that sum formed first; the other paths (three launches, the PyTorch twin) form it first themselves."""
    from cwic_kernels.gpu import ffn_fused as FF
    x, args, nw, part, h = _ffn_case(dtype, norm, seed=91)
    want = FF.ffn_gate_updown(h, *args, residual=h, norm_w=nw, eps=1e-6)
    acc = part.clone()
    got = FF.ffn_gate_updown(x, *args, residual=x, norm_w=nw, eps=1e-6, x_acc=acc)
    assert _rel(got, want) < (1e-5 if dtype == torch.float32 else 8e-3) and bool((acc == 0).all())
    for fn, kw in ((G.ffn, dict(fused=False)), (fb.ffn_ref, {})):
        acc = part.clone()
        got = fn(x, *args, residual=x, norm_w=nw, eps=1e-6, x_acc=acc, **kw)
        assert _rel(got, want) < (1e-5 if dtype == torch.float32 else 8e-3) and bool((acc == 0).all()), fn


# ------------------------------------------------------------------------------ weights-read counters (count=)

def _want_reads(x, mean, thr, stripe, m):
    """Weights one token's granular product reads, from first principles: its active (stripe, input) pairs, each
    worth the stripe's rows (the last stripe may be partial)."""
    k = thr.shape[0]
    mu = mean if mean.dim() == 2 else mean.expand(k, -1)
    on = (x.float()[0][None, :] - mu.float()).abs() >= thr
    rows = [min(stripe, m - r * stripe) for r in range(k)]
    return sum(int(on[r].sum()) * rows[r] for r in range(k))


COUNT_PATHS = {   # gemv_ex keyword arguments: the masked-load kernel's loops, split-K, the hand-off; the compact one
    "masked": dict(compact=False),
    "masked-pipe-split": dict(compact=False, config="pipe"),
    "masked-loop": dict(compact=False, config="loop"),           # several blocks a program, not pipelined
    "masked-loop-split": dict(compact=False, config="loop2"),
    "masked-acc-out": dict(compact=False, acc_out=True),
    "compact": dict(compact=True),
    "compact-fused": dict(compact=True, config="fused"),
}


@pytest.mark.parametrize("path", list(COUNT_PATHS))
@pytest.mark.parametrize("n,m,stripe,mean2d", [(96, 80, 16, False), (200, 96, 32, True)])
def test_gemv_count_is_the_weights_read(path, n, m, stripe, mean2d):
    """count=: every one-token GEMV path adds exactly its active pairs × their stripes' rows (partial last stripe,
    per-stripe means), accumulating over calls; the PyTorch twin counts the same; the product is unchanged."""
    from cwic_kernels.gpu import gemv_compact as C
    x, wt, mean, thr, bias = _inputs(1, n, m, stripe, torch.float32, seed=n + m, mean2d=mean2d)
    want = _want_reads(x, mean, thr, stripe, m)
    assert 0 < want < n * m
    kw = dict(COUNT_PATHS[path])
    if kw.get("config") == "pipe":
        kw["config"] = G.gemv_config(1, n, m, stripe, x.device, block_m=16, block_n=32, max_split=2, pipe=True)
    elif kw.get("config") in ("loop", "loop2"):
        kw["config"] = G.gemv_config(1, n, m, stripe, x.device, block_m=16, block_n=32,
                                     max_split=1 if kw["config"] == "loop" else 2)
        assert kw["config"]["CHUNK_N"] > 32          # the loop runs
    elif kw.get("config") == "fused":
        kw["config"] = None
        kw.pop("compact")
        fn = lambda *a, **k: C.gemv_compact(*a, config=C.compact_config(n, m, stripe, x.device, fused=True,  # noqa
                                                                          chunk=64), **k)
    if kw.pop("acc_out", False):
        kw["acc_out"] = torch.zeros(1, m, device=DEV)
    fn = fn if path == "compact-fused" else G.gemv_ex
    kw = {k: v for k, v in kw.items() if v is not None}
    count = torch.zeros(1, dtype=torch.int64, device=DEV)
    y = fn(x, wt, mean, thr, bias, stripe, count=count, **kw)
    assert int(count) == want, (int(count), want)
    plain = fn(x, wt, mean, thr, bias, stripe, **{k: (torch.zeros_like(v) if k == "acc_out" else v)
                                                  for k, v in kw.items()})
    assert torch.equal(y, plain)
    fn(x, wt, mean, thr, bias, stripe, count=count, **{k: (torch.zeros_like(v) if k == "acc_out" else v)
                                                       for k, v in kw.items()})
    assert int(count) == 2 * want                       # added, not stored
    twin = torch.zeros(1, dtype=torch.int64, device=DEV)
    fb.gemv_ex_ref(x, wt, mean, thr, bias, stripe, count=twin)
    assert int(twin) == want


def test_count_refuses_batches_and_wrong_tensors():
    x, wt, mean, thr, bias = _inputs(2, 64, 32, 16, torch.float32, seed=5)
    c = torch.zeros(1, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="one token"):
        G.gemv_ex(x, wt, mean, thr, bias, 16, count=c)
    for bad in (torch.zeros(1, dtype=torch.int32, device=DEV), torch.zeros(2, dtype=torch.int64, device=DEV)):
        with pytest.raises(ValueError, match="int64"):
            G.gemv_ex(x[:1], wt, mean, thr, bias, 16, count=bad)
    with pytest.raises(ValueError, match="one token"):
        fb.gemv_ex_ref(x, wt, mean, thr, bias, 16, count=c)


@pytest.mark.parametrize("norm", [False, True])
def test_ffn_count_is_the_weights_read(norm):
    """count= on the FFN paths of one token (one launch, three launches, the twin): the gate's active pairs × rows
    plus 2·d for each active unit (its W_up row and W_downᵀ row)."""
    from cwic_kernels.gpu import ffn_fused as FF
    x, args, nw, part, h = _ffn_case(torch.float32, norm, seed=97)
    gwt, gmean, gthr, gbias, stripe, up_w, down_wt, uthr, act = args
    d, F_ = gwt.shape
    xn = fb.rmsnorm_ref(x, nw, 1e-6) if norm else x
    a = fb.gemv_ex_ref(xn, gwt, gmean, gthr, gbias, stripe, act=act, unit_thr=uthr)
    units = int((a != 0).sum())
    want = _want_reads(xn, gmean, gthr, stripe, F_) + 2 * d * units
    assert 0 < units < F_
    for fn, kw in ((FF.ffn_gate_updown, {}), (G.ffn, dict(fused=False)), (fb.ffn_ref, {})):
        count = torch.zeros(1, dtype=torch.int64, device=DEV)
        fn(x, *args, residual=x, norm_w=nw, eps=1e-6, count=count, **kw)
        assert int(count) == want, (fn, int(count), want)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_engine_counts_each_tokens_reads(use_triton):
    """DecodeEngine(count_reads=True): one-token steps (`feed`) add the weights their products read; each token's
    figure equals the Hugging Face accounting of the same tokens (fp32; exact where the sums are summed in a fixed
    order, as under the interpreter), also after moving back (truncation); the logits are the model's. A dense
    model counts every weight; without count_reads nothing is counted."""
    import cwic_exp
    from cwic_exp.cpu_decode import dense_counts
    from cwic_exp.engine import DecodeEngine
    model = _calibrated_tiny(True).to(DEV)
    ids = torch.randint(0, 96, (9,), generator=_gen(12)).tolist()
    want = cwic_exp.active_parameters(model, torch.tensor([ids], device=DEV), per_token=True)["per_token"][0]
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=DEV)).logits[0].float()
    eng = DecodeEngine(model, max_len=32, triton=use_triton, count_reads=True)
    got, total = [], 0
    for p, t in enumerate(ids[:6] + ids[4:6] + ids[6:]):       # positions 4 and 5 fed twice
        pos = p if p < 6 else p - 2
        out = eng.feed(t, pos).float()
        assert _rel(out, logits[pos:pos + 1]) < 1e-5, pos
        now = int(eng.reads.sum())
        got.append(now - total)
        total = now
    redo, got = got[6:8], got[:6] + got[8:]
    w = [int(v) for v in want.tolist()]
    if DEV == "cuda":   # atomics add in a varying order: a threshold may flip in the last bit
        assert sum(g == v for g, v in zip(got, w)) >= len(w) - 1 and sum(got) == pytest.approx(sum(w), rel=5e-3)
        assert sum(redo) == pytest.approx(sum(got[4:6]), rel=5e-3)
    else:
        assert got == w and redo == got[4:6]
    assert len(set(got)) > 2
    dense = _calibrated_tiny(False).to(DEV)
    eng = DecodeEngine(dense, max_len=32, triton=use_triton, count_reads=True)
    eng.feed(3, 0)
    assert int(eng.reads.sum()) == dense_counts(dense)["total"]
    eng = DecodeEngine(model, max_len=32, triton=use_triton)
    eng.feed(3, 0)
    assert int(eng.reads.sum()) == 0
    with pytest.raises(ValueError, match="position"):
        eng.feed(3, 32)


def test_engine_refresh_after_new_statistics_equals_a_fresh_engine():
    """refresh() after calibrate_apr moved the running statistics takes the new means and folded biases, not
    only θ (the existing refresh test scales θ alone: an engine that kept stale means passed)."""
    from cwic_exp.cpu_decode import calibrate_apr
    from cwic_exp.engine import DecodeEngine
    model = _calibrated_tiny(True, seed=4).to(DEV)
    eng = DecodeEngine(model, max_len=32, triton=False)
    g = _gen(9)
    calibrate_apr(model, (torch.randint(0, 96, (2, 24), generator=g) // 3).to(DEV), apr=3.0)   # other statistics
    eng.refresh()
    fresh = DecodeEngine(model, max_len=32, triton=False)
    ids = torch.randint(0, 96, (10,), generator=g).to(DEV)
    outs = []
    for e in (eng, fresh):
        e.pos.zero_()
        outs.append(e.forward(ids, last_only=False).float())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        want = model(ids[None]).logits[0].float()
    assert (outs[0] - want).abs().max() < 1e-3 * want.abs().max()


def test_engine_decode_after_feed_at_the_last_position_is_refused():
    """feed() at the last position leaves no room: decode(1) is a ValueError, not a cache write out of bounds."""
    from cwic_exp.engine import DecodeEngine
    eng = DecodeEngine(_calibrated_tiny(False).to(DEV), max_len=8, triton=False)
    eng.feed(3, 7)
    with pytest.raises(ValueError, match="max_len"):
        eng.decode(1)
