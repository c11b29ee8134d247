"""C++ CPU kernels (`cwic_kernels.cpu`) against the PyTorch references, the scalar twin against the SIMD
builds, the `cwic::` op registration, the no-compiler fallback, and the C++ decode path
(`cwic_exp.cpu_decode`) against Hugging Face's forward.

The extension is compiled once (first use, then cached under TORCH_EXTENSIONS_DIR); every test here is
small: the whole file runs in well under a minute once the extension is built.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cwic_kernels import cpu as C
from cwic_kernels import reference as R
from conftest import cpu_kernels_or_skip, rand_batch, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def ext():
    return cpu_kernels_or_skip()


def _inputs(B, n, m, stripe, dtype, density=0.4, seed=0, mean2d=False):
    g = torch.Generator().manual_seed(seed)
    k = -(-m // stripe)
    x = (torch.randn(B, n, generator=g) * (1 + torch.rand(n, generator=g))).to(dtype)
    wt = (torch.randn(n, m, generator=g) / n ** 0.5).to(dtype)
    mean = torch.randn(k if mean2d else 1, n, generator=g) * 0.2
    mean = mean if mean2d else mean[0]
    thr = torch.rand(k, n, generator=g) * 2.6 * (1 - density)
    bias = torch.randn(m, generator=g)
    return x, wt, mean, thr, bias


def _gemv_ref(x, wt, mean, thr, bias, stripe):
    """Reference with a (k, n) mean too (the kernel accepts one mean row per stripe)."""
    if mean.dim() == 1:
        return R.gemv_reference(x, wt, mean, thr, bias, stripe)
    n, m = wt.shape
    out = []
    for r in range(thr.shape[0]):
        cols = slice(r * stripe, min(m, (r + 1) * stripe))
        out.append(R.gemv_reference(x, wt[:, cols].contiguous(), mean[r], thr[r:r + 1], bias[cols],
                                    cols.stop - cols.start).float())
    return torch.cat(out, 1).to(x.dtype)


def _close(got, ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:  # both round an fp32 result to bf16: at most about one bf16 ulp apart
        torch.testing.assert_close(got.float(), ref.float(), rtol=1.6e-2, atol=1e-2)


SHAPES = [  # (n, m, stripe): whole stripes, a partial last stripe, one stripe, odd sizes, tails
    (64, 96, 32), (100, 77, 20), (576, 960, 192), (48, 40, 40), (37, 13, 5), (256, 1000, 512), (130, 33, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3, 8, 35])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_matches_reference(ext, dtype, B, shape):
    n, m, s = shape
    x, wt, mean, thr, bias = _inputs(B, n, m, s, dtype, seed=n + m + B)
    got = C.gemv(x, wt, mean, thr, bias, s)
    assert got.dtype == dtype and got.shape == (B, m)
    _close(got, R.gemv_reference(x, wt, mean, thr, bias, s), dtype)


@pytest.mark.parametrize("B", [1, 5])
def test_gemv_mean_per_stripe(ext, B):
    x, wt, mean, thr, bias = _inputs(B, 96, 160, 32, torch.float32, mean2d=True)
    _close(C.gemv(x, wt, mean, thr, bias, 32), _gemv_ref(x, wt, mean, thr, bias, 32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 4])
def test_gemv_zero_and_full_sparsity(ext, dtype, B):
    n, m, s = 200, 300, 64
    x, wt, mean, thr, bias = _inputs(B, n, m, s, dtype)
    k = thr.shape[0]
    # 0 % sparsity: the dense layer W x + b (mean folded: W (x - x̄) + W x̄ + b)
    dense = C.gemv(x, wt, mean, torch.zeros(k, n), bias, s)
    want = (F.linear(x.float() - mean, wt.float().t()) + bias).to(dtype)
    _close(dense, want, dtype)
    # no thresholds at all: the dense path
    _close(C.gemv(x, wt, mean, None, bias, s), want, dtype)
    # 100 % sparsity: only the bias
    full = C.gemv(x, wt, mean, torch.full((k, n), float("inf")), bias, s)
    assert torch.equal(full, bias.to(dtype).expand(B, m))


@pytest.mark.parametrize("B", [1, 3])
def test_gemv_stripe_major_layout(ext, B):
    """Weights as (k, n, stripe) blocks (last stripe zero-padded): the same result as (n, m)."""
    n, m, s = 96, 200, 64
    x, wt, mean, thr, bias = _inputs(B, n, m, s, torch.bfloat16)
    k = thr.shape[0]
    blocks = torch.nn.functional.pad(wt, (0, k * s - m)).view(n, k, s).permute(1, 0, 2).contiguous()
    got = ext.gemv_layout(x, blocks, m, mean, thr, bias, s, s, n * s, -1, 0)[0]
    want = ext.gemv(x, wt, mean, thr, bias, s, -1, 0)[0]
    assert torch.equal(got, want)


def test_gemv_reads_count(ext):
    x, wt, mean, thr, bias = _inputs(1, 300, 500, 128, torch.float32)
    _, reads = C.gemv(x, wt, mean, thr, bias, 128, return_reads=True)
    assert reads == int(R.gemv_active_params(x, mean, thr, 500, 128).item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 2, 3, 6, 19])
def test_scalar_twin_equals_simd(ext, dtype, B):
    isas = C.supported_isas()
    assert "scalar" in isas
    for (n, m, s) in [(576, 960, 192), (100, 77, 20), (256, 1024, 512)]:
        x, wt, mean, thr, bias = _inputs(B, n, m, s, dtype, seed=B)
        outs = {}
        for i in isas:   # and each ran the build it names (an ISA lost on the way compared SIMD with itself)
            runs = {j: ext.isa_runs(C.isa_id(j)) for j in isas}
            outs[i] = C.gemv(x, wt, mean, thr, bias, s, isa=i)
            assert {j: ext.isa_runs(C.isa_id(j)) - runs[j] for j in isas} == {j: int(j == i) for j in isas}
        for i in isas:   # same FMA sequence per output: bitwise equal
            assert torch.equal(outs[i], outs["scalar"]), (i, n, m, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_rows_equal_one_token_calls(ext, dtype):
    """A batch (here 37 tokens: vector blocks of 16 and a tail) walks the union of its tokens' active inputs, with
    zero values where a token's pair is off, which adds nothing: each row is bitwise the token's own B = 1 call, in
    every ISA; likewise the fused FFN's rows. Per-stripe means included."""
    B = 37
    for (n, m, s, mean2d) in [(576, 960, 192, False), (100, 77, 20, True)]:
        x, wt, mean, thr, bias = _inputs(B, n, m, s, dtype, seed=n, mean2d=mean2d)
        for isa in C.supported_isas():
            got = ext.gemv(x, wt, mean, thr, bias, s, C.isa_id(isa), 0)[0]
            for b in range(B):
                one = ext.gemv(x[b:b + 1], wt, mean, thr, bias, s, C.isa_id(isa), 0)[0]
                assert torch.equal(got[b:b + 1], one), (isa, n, b)
    d, F_, s = 96, 160, 32
    x, gwt, gmean, gthr, gbias = _inputs(B, d, F_, s, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    up = (torch.randn(F_, d, generator=g) / d ** 0.5).to(dtype)
    down = (torch.randn(F_, d, generator=g) / F_ ** 0.5).to(dtype)
    uthr = torch.rand(F_, generator=g) * 0.2
    for isa in C.supported_isas():
        got = ext.ffn(x, gwt, gmean, gthr, gbias, s, up, down, uthr, "silu", C.isa_id(isa), 0)[0]
        for b in (0, 16, 36):
            one = ext.ffn(x[b:b + 1], gwt, gmean, gthr, gbias, s, up, down, uthr, "silu", C.isa_id(isa), 0)[0]
            assert torch.equal(got[b:b + 1], one), (isa, b)


@pytest.mark.parametrize("B", [1, 3])
def test_gemv_any_thread_count_equals_one_thread(ext, B):
    """The threads split the outputs by cost, cutting stripes where a share ends: whatever the cuts, every
    output is computed once with the same sums. Before each call a call with a NaN bias leaves NaN in the
    memory the next output is likely to get, so an output no thread writes shows up."""
    for (n, m, s) in [(576, 960, 192), (100, 77, 20), (64, 1000, 96), (96, 576, 576)]:
        x, wt, mean, thr, bias = _inputs(B, n, m, s, torch.bfloat16, seed=n + m)
        thr[0] = 0.0          # one dense stripe, the rest sparse: the cuts fall inside stripes
        one = C.gemv(x, wt, mean, thr, bias, s, nthreads=1)
        assert torch.isfinite(one.float()).all()
        nan_bias = torch.full_like(bias, float("nan"))
        for P in (2, 3, 5, 8):
            C.gemv(x, wt, mean, thr, nan_bias, s, nthreads=P)    # freed at once: NaN-filled memory
            assert torch.equal(C.gemv(x, wt, mean, thr, bias, s, nthreads=P), one), (n, m, s, P)


def test_silu_same_bits_in_every_isa_and_close_to_torch(ext):
    """The kernels' SiLU (vector-wide, polynomial exp) gives the same bits in every ISA build, over ~1M float
    bit patterns and the edge values, and agrees with torch's: within 1e-6 where finite, -0 far below
    (not -x/e^88), NaN at -inf as torch gives."""
    import torch.nn.functional as F
    pats = torch.arange(0, 2 ** 32, 4099, dtype=torch.int64)
    pats = torch.where(pats >= 2 ** 31, pats - 2 ** 32, pats).to(torch.int32).view(torch.float32)
    edges = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 87.33654, -87.33654, 88.0, -88.0, 88.72, -88.72,
                          89.0, -89.0, 100.0, -100.0, 3.4e38, -3.4e38, -1e30, float("inf"), float("-inf"),
                          float("nan")])
    g = torch.cat([pats, edges, torch.randn(4097) * 8])      # 4097: vector tails in every build
    outs = {i: ext.act(g, "silu", C.isa_id(i)) for i in C.supported_isas()}
    for i, o in outs.items():
        assert torch.equal(o.view(torch.int32), outs["scalar"].view(torch.int32)), i
    # one value per call: the vector builds' one-lane remainder loop, against their full vectors
    few = torch.cat([edges, torch.randn(2000) * 8])
    for i in C.supported_isas():
        full = ext.act(few, "silu", C.isa_id(i))
        one = torch.cat([ext.act(few[j:j + 1], "silu", C.isa_id(i)) for j in range(len(few))])
        assert torch.equal(one.view(torch.int32), full.view(torch.int32)), i
    o, want = outs["scalar"], F.silu(g.double())
    fin = torch.isfinite(want) & (g.abs() < 80)
    torch.testing.assert_close(o[fin].double(), want[fin], rtol=1e-6, atol=1e-30)
    far = ext.act(torch.tensor([-1e38, -1e30, -200.0]), "silu", -1)
    assert torch.equal(far, torch.zeros(3).neg()) and torch.signbit(far).all()
    assert torch.isnan(ext.act(torch.tensor([float("-inf")]), "silu", -1)).all()


def test_ffn_unit_mask_is_the_same_in_every_isa(ext):
    """Unit thresholds set exactly at |act| of half the units, act computed by the kernels themselves from
    the gate outputs the fused FFN computes (its gate GEMV is the GEMV, bitwise the same in every ISA): any
    ISA whose activation differed by one ulp would keep another set of units (the weights read count them)."""
    for B in (1, 2):
        x, gw, gm, gt, gb, s, up, dn, ut = _ffn_inputs(B, 96, 203, 32, torch.float32, seed=7 + B)
        gt = torch.zeros_like(gt)                                   # the gate GEMV is dense: g is known
        g = C.gemv(x, gw, gm, gt, gb, s, isa="scalar")
        act = ext.act(g, "silu", C.isa_id("scalar")).abs().amax(0)
        ut = torch.where(torch.arange(203) % 2 == 0, act, act * 1.5)   # even units right at the edge
        reads = {i: C.ffn(x, gw, gm, gt, gb, s, up, dn, ut, act="silu", isa=i, return_reads=True)[1]
                 for i in C.supported_isas()}
        assert len(set(reads.values())) == 1, reads
        units = (reads["scalar"] - 96 * 203) // (2 * 96)
        assert units == 102, units                                  # exactly the even units


@pytest.mark.parametrize("B", [1, 3])
def test_ffn_unit_mask_sees_act_in_bf16_as_the_model(ext, B):
    """bf16: the unit mask is decided on act(g) as the bf16 model computes it (g rounded to bf16, act(g) rounded to
    bf16: `reference.act_in_dtype`). A unit whose threshold lies between that |a| and |act(g)|, or |act(bf16(g))| (the
    kernel's reading until 2026-12-05), follows the model in every ISA: its output is the reference's, not the one
    with that unit flipped, and its weights are read (or not) as the model's decision says."""
    from kernel_checks import assert_ffn_follows_the_model, unit_flip_ffn
    args, cells = unit_flip_ffn(B)
    x, gw, mean, thr, gb, s, up, dn, ut = args
    on_any = (R.act_in_dtype(R.gemv_reference(x, gw, mean, thr, gb, s), "silu", torch.bfloat16).abs() >= ut).any(0)
    for isa in C.supported_isas():
        got, reads = C.ffn(*args, act="silu", isa=isa, return_reads=True)
        assert reads - int(R.gemv_active_params(x, mean, thr, 64, s, union=True)) == 2 * 32 * int(on_any.sum()), isa
        assert_ffn_follows_the_model(got, args, cells, isa)


def _ffn_inputs(B, d, F_, s, dtype, seed=0, unit_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    k = -(-F_ // s)
    x = torch.randn(B, d, generator=g).to(dtype)
    gw = (torch.randn(d, F_, generator=g) / d ** 0.5).to(dtype)
    gm = torch.randn(d, generator=g) * 0.1
    gt = torch.rand(k, d, generator=g) * 1.5
    gb = torch.randn(F_, generator=g) * 0.1
    up = (torch.randn(F_, d, generator=g) / d ** 0.5).to(dtype)
    dn = (torch.randn(F_, d, generator=g) / F_ ** 0.5).to(dtype)
    ut = torch.rand(F_, generator=g) * unit_scale
    return x, gw, gm, gt, gb, s, up, dn, ut


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh", "relu"])
def test_ffn_matches_reference(ext, dtype, B, act):
    for (d, F_, s) in [(64, 160, 32), (100, 77, 20), (576, 1536, 192)]:
        args = _ffn_inputs(B, d, F_, s, dtype, seed=d + B)
        got = C.ffn(*args, act=act)
        ref = R.ffn_reference(*args, act=act)
        assert got.shape == (B, d) and got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("B", [1, 4])
def test_ffn_extremes_and_twin(ext, B):
    x, gw, gm, gt, gb, s, up, dn, ut = _ffn_inputs(B, 96, 200, 64, torch.float32)
    # everything on: the dense gated FFN
    dense = C.ffn(x, gw, gm, torch.zeros_like(gt), gb, s, up, dn, torch.zeros_like(ut), act="silu")
    g = F.linear(x - gm, gw.t()) + gb
    want = (F.silu(g) * (x @ up.t())) @ dn
    torch.testing.assert_close(dense, want, rtol=1e-4, atol=1e-5)
    # every unit off: zero
    off = C.ffn(x, gw, gm, gt, gb, s, up, dn, torch.full_like(ut, float("inf")), act="silu")
    assert torch.equal(off, torch.zeros_like(off))
    # twin: the same masks and sums up to the dot products' summation order
    ref = C.ffn(x, gw, gm, gt, gb, s, up, dn, ut, act="silu", isa="scalar")
    for i in C.supported_isas():
        torch.testing.assert_close(C.ffn(x, gw, gm, gt, gb, s, up, dn, ut, act="silu", isa=i), ref,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("B", [1, 3])
def test_ffn_any_thread_count(ext, B):
    """The down product runs by units: each thread sums its own active units over all the outputs, then the threads'
    sums are added in thread order. Any thread count (up to 8 threads for 77 units) gives the
    reference within fp32 rounding and reads the same weights."""
    x, gw, gm, gt, gb, s, up, dn, ut = _ffn_inputs(B, 100, 77, 20, torch.float32, seed=11)
    ref = R.ffn_reference(x, gw, gm, gt, gb, s, up, dn, ut, act="silu")
    outs = {}
    for nt in (1, 2, 3, 8):
        y, reads = ext.ffn(x, gw, gm, gt, gb, s, up, dn, ut, "silu", -1, nt)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
        outs[nt] = (y, reads)
    assert len({r for _, r in outs.values()}) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_ffn_up_down_side_by_side_same_bits(ext, dtype, B):
    """The decoder keeps unit j's up row and down row side by side in one (F, 2d) block and passes its halves (rows
    2d apart): in every ISA, the same bits and the same weights read as the separate contiguous matrices, without a
    copy. Rows that are not contiguous, or overlap, are refused with a clear error."""
    x, gw, gm, gt, gb, s, up, dn, ut = _ffn_inputs(B, 100, 203, 20, dtype, seed=5 + B)
    d = up.shape[1]
    block = torch.cat([up, dn], dim=1)
    up2, dn2 = block[:, :d], block[:, d:]
    assert not up2.is_contiguous() and C._rows(up2) is up2 and C._rows(dn2) is dn2
    for i in C.supported_isas():
        want = ext.ffn(x, gw, gm, gt, gb, s, up, dn, ut, "silu", C.isa_id(i), 0)
        got = ext.ffn(x, gw, gm, gt, gb, s, up2, dn2, ut, "silu", C.isa_id(i), 0)
        assert torch.equal(got[0], want[0]) and got[1] == want[1], i
    torch.testing.assert_close(C.ffn(x, gw, gm, gt, gb, s, up2, dn2, ut).float(),
                               R.ffn_reference(x, gw, gm, gt, gb, s, up, dn, ut).float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match="contiguous rows"):       # columns apart: not rows
        ext.ffn(x, gw, gm, gt, gb, s, up.t().contiguous().t(), dn, ut, "silu", -1, 0)
    with pytest.raises(RuntimeError, match="contiguous rows"):       # rows overlapping
        ext.ffn(x, gw, gm, gt, gb, s, block.as_strided((203, d), (d // 2, 1)), dn, ut, "silu", -1, 0)


def test_registered_ops_use_the_cpu_kernels(ext):
    from cwic_kernels import ops
    assert ops.load_backends().get("cpu") is True
    x, wt, mean, thr, bias = _inputs(2, 128, 256, 64, torch.bfloat16)
    assert torch.equal(torch.ops.cwic.gemv(x, wt, mean, thr, bias, 64), C.gemv(x, wt, mean, thr, bias, 64))
    args = _ffn_inputs(1, 64, 160, 32, torch.float32)
    assert torch.equal(torch.ops.cwic.ffn(*args, "silu"), C.ffn(*args, act="silu"))
    # dtypes the C++ kernels do not take still work (reference)
    xh, wth = x.half(), wt.half()
    torch.testing.assert_close(torch.ops.cwic.gemv(xh, wth, mean, thr, bias, 64).float(),
                               R.gemv_reference(xh, wth, mean, thr, bias, 64).float())


def test_bad_inputs_are_refused_or_empty_not_misread(ext):
    """An empty batch gives an empty result (it used to kill the process: a division by zero in the SIMD tiling);
    a transposed thr of the same size, a short mean or a 2-D bias are refused (they were read as if right); the
    ops take (B, n) only (the fake kernel said (B, m) for (B, T, n), the CPU kernel gave (B·T, m)); the fallback
    counts the weights read as the C++ does, once for the whole batch."""
    from cwic_kernels import ops
    x, wt, mean, thr, bias = _inputs(2, 64, 128, 32, torch.float32)
    args = _ffn_inputs(1, 64, 160, 32, torch.float32)
    for isa in C.supported_isas():
        y, reads = C.gemv(x[:0], wt, mean, thr, bias, 32, isa=isa, return_reads=True)
        assert y.shape == (0, 128) and reads == 0
        assert C.ffn(args[0][:0], *args[1:], act="silu", isa=isa).shape == (0, 64)
    with pytest.raises(RuntimeError, match="thr must be"):
        C.gemv(x, wt, mean, thr.t().contiguous(), bias, 32)
    with pytest.raises(RuntimeError, match="mean must be"):
        C.gemv(x, wt, mean[:32], thr, bias, 32)
    with pytest.raises(RuntimeError, match="bias must be"):
        C.gemv(x, wt, mean, thr, bias.view(2, 64), 32)
    assert ops.load_backends().get("cpu") is True
    with pytest.raises(ValueError, match="flatten"):
        torch.ops.cwic.gemv(x.view(1, 2, 64), wt, mean, thr, bias, 32)
    x3, wt3, mean3, thr3, bias3 = _inputs(3, 64, 128, 32, torch.float32)
    _, own = C.gemv(x3, wt3, mean3, thr3, bias3, 32, return_reads=True)
    _, ref = C.gemv(x3, wt3.half(), mean3, thr3, bias3, 32, return_reads=True)     # fp16: the reference path
    assert own == ref > 0


def test_stale_build_lock_is_removed_a_live_one_kept(tmp_path, monkeypatch):
    """A build killed part-way leaves torch's lock file, and the next load() would wait on it forever: one older than
    STALE_LOCK_S is removed (with a warning), a fresh one (a build running now) is left alone."""
    import os
    import time
    import torch.utils.cpp_extension as X
    monkeypatch.setattr(X, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    old, fresh = tmp_path / "a" / "lock", tmp_path / "b" / "lock"
    old.write_text("")
    fresh.write_text("")
    t = time.time() - C.STALE_LOCK_S - 60
    os.utime(old, (t, t))
    with pytest.warns(RuntimeWarning, match="interrupted build"):
        assert C._clear_stale_lock("a") is True
    assert not old.exists()
    assert C._clear_stale_lock("b") is False and fresh.exists()
    assert C._clear_stale_lock("missing") is False


def test_no_compiler_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(C, "_EXT", None)
    monkeypatch.setattr(C, "_ERR", None)
    monkeypatch.setattr(C, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ kernels unavailable .*using the PyTorch reference"):
        assert C.load() is None
    assert "no C++ compiler" in C.error()
    x, wt, mean, thr, bias = _inputs(2, 64, 96, 32, torch.float32)
    assert torch.equal(C.gemv(x, wt, mean, thr, bias, 32), R.gemv_reference(x, wt, mean, thr, bias, 32))
    args = _ffn_inputs(1, 64, 160, 32, torch.float32)
    assert torch.equal(C.ffn(*args, act="silu"), R.ffn_reference(*args, act="silu"))


# ----------------------------------------------------------------------------- decode path

def _tiny(**kw):
    from conftest import tiny_model
    return tiny_model(intermediate_size=96, **kw)


def _step_logits(dec, ids):
    dec.reset()
    out = []
    for t in torch.as_tensor(ids).reshape(-1).tolist():
        dec.step(t)
        out.append(dec.logits())
    return torch.stack(out)


def test_decode_dense_matches_hf(ext):
    from cwic_exp.cpu_decode import CpuDecoder
    m = _tiny()
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits[0]
    for dense in ("own", "fused", "torch"):
        dec = CpuDecoder(m, mode="dense", dense=dense, dtype=torch.float32, max_len=64)
        torch.testing.assert_close(_step_logits(dec, ids), ref, rtol=1e-4, atol=1e-4)
    # greedy generation: the same tokens as Hugging Face
    dec = CpuDecoder(m, mode="dense", dtype=torch.float32, max_len=64)
    with torch.no_grad():
        hf = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist()
    assert dec.generate(ids[0], max_new_tokens=8) == hf


def test_a_decoder_used_by_two_threads_refuses_the_second_and_never_mixes_them(ext):
    """step/prefill run without the GIL: two Python threads stepping one decoder overwrote each other's buffers
    mid-call (wrong answers). A decoder holds one sequence, so a call that would change it while another runs is
    refused by name; every call that runs returns what it returns alone."""
    import threading
    from cwic_exp.cpu_decode import CpuDecoder
    m = _tiny(hidden_size=256, num_hidden_layers=4)
    dec = CpuDecoder(m, mode="dense", dtype=torch.float32, max_len=64)
    ids = [torch.randint(0, m.config.vocab_size, (48,), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    alone = [(dec._dec.prefill(t, 0), dec._dec.logits()) for t in ids]
    assert alone[0][0] != alone[1][0]          # two different answers, so a call that read the other's state shows
    got, refused, start = [[], []], [0, 0], threading.Barrier(2)

    def run(i):
        start.wait()
        for _ in range(30):
            try:
                got[i].append(dec._dec.prefill(ids[i], 0))
            except RuntimeError as e:
                assert "in use by another thread" in str(e)
                refused[i] += 1
    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in (0, 1):
        assert got[i] == [alone[i][0]] * (30 - refused[i])
    dec._dec.prefill(ids[1], 0)
    assert torch.equal(dec._dec.logits(), alone[1][1])


def test_a_decoder_read_while_it_runs_under_a_dispatch_mode_does_not_deadlock(ext):
    """A reader (logits) waits for the running call with the GIL released: the running call may need the GIL (here
    a Python dispatch mode around the torch matrices), and a reader holding it while waiting hung both."""
    import threading
    from torch.utils._python_dispatch import TorchDispatchMode
    from cwic_exp.cpu_decode import CpuDecoder
    m = _tiny(hidden_size=128, num_hidden_layers=4)
    dec = CpuDecoder(m, mode="dense", dense="torch", dtype=torch.float32, max_len=160)
    ids = torch.randint(0, m.config.vocab_size, (128,), generator=torch.Generator().manual_seed(0))

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    done, stop = threading.Event(), threading.Event()

    def writer():
        with PassThrough():
            for _ in range(5):
                dec._dec.prefill(ids, 0)
        done.set()

    def reader():
        while not done.is_set() and not stop.is_set():
            dec._dec.logits()
    ts = [threading.Thread(target=f, daemon=True) for f in (writer, reader)]
    for t in ts:
        t.start()
    ts[0].join(60)
    stop.set()
    assert done.is_set(), "deadlock: prefill under a dispatch mode against a reader"


def test_decoder_refuses_bad_token_ids_and_widths(ext):
    """A token id outside the vocabulary is refused by step() (it read past the embedding, or crashed) as prefill()
    refuses it; a matrix whose input width is not the model's is refused when it is added (it was read out of
    bounds)."""
    from cwic_exp.cpu_decode import CpuDecoder
    m = _tiny()
    dec = CpuDecoder(m, mode="dense", dtype=torch.float32, max_len=16)
    V = m.config.vocab_size
    for bad in (V, -1, 10 ** 11):
        with pytest.raises(RuntimeError, match="token id"):
            dec._dec.step(bad, 0)
    dec._dec.step(V - 1, 0)
    lin = ext.Lin()
    lin.kind = 0
    lin.w = torch.zeros(4 * m.config.hidden_size, V)      # 4·d inputs where the head takes d
    with pytest.raises(RuntimeError, match="head must have"):
        dec._dec.set_head(lin)


def _attention_ref(q, kc, vc, scaling):
    """fp64 softmax attention of one position over grouped-query caches (T, n_kv, hd): (n_heads, hd)."""
    nh, nkv = q.shape[0], kc.shape[1]
    k = kc.double().repeat_interleave(nh // nkv, 1)
    p = torch.softmax(torch.einsum("hd,thd->ht", q.double(), k) * scaling, -1)
    return torch.einsum("ht,thd->hd", p, vc.double().repeat_interleave(nh // nkv, 1))


@pytest.mark.parametrize("T", [1, 7, 16, 37, 200])
@pytest.mark.parametrize("hd", [12, 64, 72, 80])
def test_attention_every_isa_matches_softmax(ext, T, hd):
    """The decode attention (vector max, polynomial exp, sum, value sum in registers) in every ISA build
    against fp64 softmax attention: peaked and flat scores, grouped-query heads, contexts with and
    without a tail, head dims with blocks of four vectors, single vectors and scalar tails (80 = 4·16 + 16
    reaches the single-vector loop on AVX-512)."""
    g = torch.Generator().manual_seed(T * 100 + hd)
    nh, nkv = 6, 2
    for scale, kv_dtype in ((0.3, torch.float32), (4.0, torch.float32), (4.0, torch.bfloat16)):
        # 4.0: scores spread over ~±60, a peaked softmax; bf16: the decoder's cache for bf16 weights
        q = torch.randn(nh, hd, generator=g) * scale
        kc = torch.randn(T, nkv, hd, generator=g).to(kv_dtype)
        vc = torch.randn(T, nkv, hd, generator=g).to(kv_dtype)
        ref = _attention_ref(q, kc, vc, hd ** -0.5)
        for isa in C.supported_isas():
            out = ext.attention(q, kc, vc, hd ** -0.5, C.isa_id(isa), 0)
            torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6,
                                       msg=f"{isa} T={T} hd={hd} {kv_dtype}")
            if kv_dtype == torch.float32:   # other dtypes are read as fp32
                assert torch.equal(ext.attention(q, kc.double(), vc.double(), hd ** -0.5, C.isa_id(isa), 0), out)


@pytest.mark.parametrize("nh,nkv", [(9, 3), (1, 1), (8, 1), (12, 2), (5, 5)])
def test_attention_parts_merge_to_softmax(ext, nh, nkv):
    """From 256 positions on (LONG_T) the attention takes the heads of a kv head together and, with several threads,
    cuts the positions into parts (so that 3 kv heads share 2 threads evenly), merging each part's max, sum and value
    sum; below, one head a unit. Every ISA and 1, 2 and 3 threads against fp64 softmax attention, on both sides of
    256 positions; chunks of 1, 2, 3, 4 and 6 heads a kv head (12 / 2: chunks of 6; 8 / 1: of 8). Peaked scores
    (q × 4), so each part's max differs."""
    g = torch.Generator().manual_seed(nh * 10 + nkv)
    hd = 64
    for T in (1, 33, 255, 256, 300):
        q = torch.randn(nh, hd, generator=g) * 4.0
        kc = torch.randn(T, nkv, hd, generator=g).to(torch.bfloat16)
        vc = torch.randn(T, nkv, hd, generator=g).to(torch.bfloat16)
        ref = _attention_ref(q, kc, vc, hd ** -0.5)
        for isa in C.supported_isas():
            for threads in (1, 2, 3):
                out = ext.attention(q, kc, vc, hd ** -0.5, C.isa_id(isa), threads)
                torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6,
                                           msg=f"{isa} T={T} threads={threads}")


def test_attention_nan_in_one_part_reaches_its_heads(ext):
    """A NaN key in the last part of a split context still makes its heads NaN after the merge (each part's
    rescale factor e^(max - max of all) is NaN there), in every ISA, and leaves the other kv head's heads finite."""
    T, hd = 300, 64
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, hd, generator=g)
    kc, vc = torch.randn(T, 2, hd, generator=g), torch.randn(T, 2, hd, generator=g)
    kc[290, 0, 7] = float("nan")                 # kv head 0, near the end: the last of 3 parts (3 threads), of 2 (4)
    for isa in C.supported_isas():
        for threads in (3, 4):
            out = ext.attention(q, kc, vc, hd ** -0.5, C.isa_id(isa), threads)
            assert torch.isnan(out[:2]).all() and torch.isfinite(out[2:]).all(), (isa, threads)


def test_attention_nan_score_gives_nan_in_every_isa(ext):
    """A NaN in the keys poisons its heads in every build (the vector exp's clamp must not turn it into a
    large finite weight); the heads that do not read that key stay finite."""
    T, hd = 40, 64
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, hd, generator=g)
    kc, vc = torch.randn(T, 2, hd, generator=g), torch.randn(T, 2, hd, generator=g)
    kc[5, 0, 3] = float("nan")                   # position 5 (a vector lane, not the tail), kv head 0
    for isa in C.supported_isas():
        out = ext.attention(q, kc, vc, hd ** -0.5, C.isa_id(isa), 0)
        assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all(), isa


def test_decode_attention_every_isa_matches_hf_on_a_long_context(ext):
    """The attention's vector softmax (max, polynomial exp, sum) and value sum, in every ISA build, over
    contexts longer than a vector (1..40 positions: full vectors and tails) and a grouped-query cache;
    head dims 12 (scalar tail only) and 72 (blocks of four vectors, single vectors and a tail)."""
    for kw in (dict(), dict(hidden_size=144, num_attention_heads=2, num_key_value_heads=1)):
        _attention_vs_hf(_tiny(**kw))


def _attention_vs_hf(m):
    from cwic_exp.cpu_decode import CpuDecoder
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids).logits[0]
    for isa in C.supported_isas():
        dec = CpuDecoder(m, mode="dense", dtype=torch.float32, max_len=64, isa=isa)
        torch.testing.assert_close(_step_logits(dec, ids), ref, rtol=1e-4, atol=1e-4, msg=isa)


@pytest.mark.parametrize("variant", ["norm weights", "qwen2 biases", "gelu"])
def test_decode_matches_hf_beyond_the_plain_tiny_llama(ext, variant):
    """What the plain tiny Llama leaves out: RMSNorm weights other than 1 (a dropped or swapped γ passed every test),
    Qwen2's q/k/v biases, a GELU FFN. Dense (each implementation) and CWIC at θ = 0 decode as HF in fp32; in bf16
    well within the change that unit norm weights would make."""
    import cwic_exp
    from cwic_exp.cpu_decode import CpuDecoder
    m = {"norm weights": lambda: _tiny(), "qwen2 biases": lambda: tiny_model("qwen2", intermediate_size=96),
         "gelu": lambda: _tiny(hidden_act="gelu_pytorch_tanh")}[variant]()
    norms = [m.model.norm.weight] + [w for L in m.model.layers
                                     for w in (L.input_layernorm.weight, L.post_attention_layernorm.weight)]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in norms:
            w.copy_(1 + 0.5 * torch.randn(w.shape, generator=g))
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits[0]
        saved = [w.clone() for w in norms]
        for w in norms:
            w.fill_(1.0)
        unit_gap = (m(ids).logits[0] - ref).abs().max()
        for w, v in zip(norms, saved):
            w.copy_(v)
    for dense in ("own", "fused", "torch"):
        dec = CpuDecoder(m, mode="dense", dense=dense, dtype=torch.float32, max_len=32)
        torch.testing.assert_close(_step_logits(dec, ids), ref, rtol=1e-4, atol=1e-4, msg=dense)
    err16 = (_step_logits(CpuDecoder(m, mode="dense", dtype=torch.bfloat16, max_len=32), ids) - ref).abs().max()
    assert err16 < 0.1 * unit_gap, (float(err16), float(unit_gap))
    cwic_exp.to_cwic(m, stripe_size=16)
    dec = CpuDecoder(m, mode="cwic", dtype=torch.float32, max_len=32)          # θ = 0: the dense model
    torch.testing.assert_close(_step_logits(dec, ids), ref, rtol=1e-4, atol=1e-4)


def test_decode_cwic_matches_model_and_counts(ext):
    import cwic_exp
    from cwic_exp.cpu_decode import CpuDecoder, calibrate_apr
    m = _tiny()
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_ref = m(ids).logits[0]
    cwic_exp.to_cwic(m, stripe_size=16)
    dec = CpuDecoder(m, mode="cwic", dtype=torch.float32, max_len=64)      # θ = 0: the dense model
    torch.testing.assert_close(_step_logits(dec, ids), dense_ref, rtol=1e-4, atol=1e-4)
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    stats = calibrate_apr(m, calib, apr=3.0)
    assert 2.6 < stats["apr"] < 3.4, stats["apr"]
    with torch.no_grad():
        ref = m(ids).logits[0]
    assert (ref - dense_ref).abs().max() > 1e-2          # the thresholds do something
    dec = CpuDecoder(m, mode="cwic", dtype=torch.float32, max_len=64)
    torch.testing.assert_close(_step_logits(dec, ids), ref, rtol=1e-4, atol=1e-4)
    # weights read by the kernels == the project's active-parameter accounting, token by token
    ap = cwic_exp.active_parameters(m, ids, per_token=True)
    reads = dec.reads_per_token()["total"] * ids.shape[1]
    assert abs(reads - float(ap["per_token"].sum())) < 1e-3 * reads
    # by matrix (cpu_cost_model's counters): q/k/v + o is the attention's count, and o's reads are o's density
    pr = dec._dec.part_reads()
    assert pr["qkv"] + pr["o"] == dec._dec.reads()[0] and pr["o"] > 0 and pr["qkv"] > 0
    _step_logits(dec, ids)                              # the same tokens again after a reset: the same counts
    assert dec._dec.part_reads() == pr
    dense_o = sum(mod.dense_params for mod in cwic_exp.iter_cwic_modules(m) if mod.kind == "o")
    o_ref = ap["density"]["o"] * dense_o * ids.shape[1]
    assert abs(pr["o"] - o_ref) < 1e-3 * o_ref
    # bf16 weights: dense decoding stays tight; with thresholds, rounding the weights flips some masks
    # (rounding this tiny model's weights to bf16 alone moves its fp32 logits by ~6 %)
    dd16 = CpuDecoder(m, mode="dense", dtype=torch.bfloat16, max_len=64)   # (and a bf16 KV cache)
    assert (_step_logits(dd16, ids) - dense_ref).abs().mean() < 0.01 * dense_ref.abs().mean()
    dec16 = CpuDecoder(m, mode="cwic", dtype=torch.bfloat16, max_len=64)
    assert (_step_logits(dec16, ids) - ref).abs().mean() < 0.15 * ref.abs().mean()
    # the same model decoded densely ignores the thresholds
    dd = CpuDecoder(m, mode="dense", dtype=torch.float32, max_len=64)
    torch.testing.assert_close(_step_logits(dd, ids), dense_ref, rtol=1e-4, atol=1e-4)


def test_decoder_keeps_up_and_down_side_by_side(ext, monkeypatch):
    """The CWIC decoder stores each FFN unit's up row and down row side by side (one contiguous span a unit, up and down
    in one pass) and decodes to the same bits as with the two matrices apart (up rows, then down rows), which is what
    it builds for longer rows and for a kernel build that predates row strides (cpu_ab's old side)."""
    import cwic_exp
    import cwic_exp.cpu_decode as CD
    m = _tiny()
    cwic_exp.to_cwic(m, stripe_size=16)
    CD.calibrate_apr(m, torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(4)), apr=2.5)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(5))
    mlp = m.model.layers[0].mlp
    d = mlp.up_proj.in_features
    f = CD._ffn(ext, mlp, "cwic", torch.bfloat16, "own", "silu")
    assert f.up_w.stride() == (2 * d, 1) and f.down_wt.stride() == (2 * d, 1)
    assert f.down_wt.data_ptr() - f.up_w.data_ptr() == d * 2                   # bf16: d elements on
    assert torch.equal(f.up_w, mlp.up_proj.weight.bfloat16())
    assert torch.equal(f.down_wt, mlp.down_proj.weight.t().bfloat16())
    side = _step_logits(CD.CpuDecoder(m, mode="cwic", dtype=torch.bfloat16, max_len=16), ids)

    class OlderBuild:
        def __getattr__(self, name):
            if name == "ffn_row_strides":
                raise AttributeError(name)
            return getattr(ext, name)
    monkeypatch.setattr(CD, "_ext", lambda: OlderBuild())
    f2 = CD._ffn(OlderBuild(), mlp, "cwic", torch.bfloat16, "own", "silu")
    assert f2.up_w.is_contiguous() and f2.down_wt.is_contiguous()
    apart = _step_logits(CD.CpuDecoder(m, mode="cwic", dtype=torch.bfloat16, max_len=16), ids)
    assert torch.equal(side, apart)
    monkeypatch.undo()
    monkeypatch.setattr(CD, "SIDE_BY_SIDE_MAX_ROW", 2 * d - 1)                   # bf16 rows of 2d bytes: too long
    f3 = CD._ffn(ext, mlp, "cwic", torch.bfloat16, "own", "silu")
    assert f3.up_w.is_contiguous() and f3.down_wt.is_contiguous()
    assert torch.equal(_step_logits(CD.CpuDecoder(m, mode="cwic", dtype=torch.bfloat16, max_len=16), ids), side)


@pytest.mark.parametrize("mode,dense,dtype", [("cwic", "own", torch.float32), ("cwic", "own", torch.bfloat16),
                                               ("dense", "own", torch.float32), ("dense", "torch", torch.float32)])
def test_batched_prefill_matches_token_by_token(ext, mode, dense, dtype):
    """prefill(chunk > 1) feeds the prompt through the small-batch kernels: the same last logits and next token as
    feeding it token by token (chunks of 5 over 23 tokens: whole chunks, a partial one, positions carried over),
    the cache equally filled (the decode steps after it agree), and the kernels' reads the union of the tokens'."""
    import cwic_exp
    from cwic_exp.cpu_decode import CpuDecoder, calibrate_apr
    m = _tiny()
    ids = torch.randint(0, 96, (23,), generator=torch.Generator().manual_seed(4))
    if mode == "cwic":
        cwic_exp.to_cwic(m, stripe_size=16)
        calibrate_apr(m, torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1)), apr=3.0)
    a = CpuDecoder(m, mode=mode, dense=dense, dtype=dtype, max_len=40)
    b = CpuDecoder(m, mode=mode, dense=dense, dtype=dtype, max_len=40)
    na = a.prefill(ids, chunk=1)
    la, ra = a.logits(), a.reads_per_token()["total"]
    nb = b.prefill(ids, chunk=5)
    lb, rb = b.logits(), b.reads_per_token()["total"]
    assert na == nb and a.pos == b.pos == 23
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    for t in (na, 7, 50):   # the caches hold the same keys and values
        torch.testing.assert_close(torch.tensor(float(b.step(t))), torch.tensor(float(a.step(t))))
        torch.testing.assert_close(b.logits(), a.logits(), rtol=1e-5, atol=1e-5)
    if mode == "cwic":   # the union over a chunk's tokens is read once: fewer reads than token by token
        assert rb < ra
    with pytest.raises(ValueError):
        b.prefill(ids[:0])
    with pytest.raises(RuntimeError):
        b.prefill(torch.zeros(41, dtype=torch.int64))
    with pytest.raises(RuntimeError):
        b._dec.prefill(torch.tensor([0, 96]), 0)          # token id out of range


def test_timed_decode_forced_feeds_the_given_text(ext):
    """timed_decode(forced=...) feeds the given tokens instead of its own greedy choices (bench_decode --forced: every
    config decodes the dense model's text): a CWIC decoder then reads exactly what stepping those tokens by hand reads
    (same counters, same last logits), not what its own greedy text reads; too short a text is refused."""
    import cwic_exp
    from cwic_exp.cpu_decode import CpuDecoder, calibrate_apr
    m = _tiny()
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 96, (6,), generator=g).tolist()
    text = torch.randint(0, 96, (8,), generator=g).tolist()
    cwic_exp.to_cwic(m, stripe_size=16)
    calibrate_apr(m, torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(8)), apr=3.0)
    a = CpuDecoder(m, mode="cwic", dtype=torch.float32, max_len=32)
    b = CpuDecoder(m, mode="cwic", dtype=torch.float32, max_len=32)
    st = a.timed_decode(prompt, 8, forced=text)
    b.prefill(prompt)
    b._dec.reset_reads()
    for t in text:
        b.step(t)
    assert st.tokens == 8 and a.pos == b.pos == len(prompt) + 8
    assert a.weights_read() == b.weights_read() > 0
    torch.testing.assert_close(a.logits(), b.logits(), rtol=0, atol=0)
    own = a.timed_decode(prompt, 8)                       # its own greedy text: other tokens, other reads
    assert own.tokens == 8 and a.generate(prompt, 8)[len(prompt):] != text
    assert own.reads_per_token["total"] != st.reads_per_token["total"]
    with pytest.raises(ValueError, match="forced"):
        a.timed_decode(prompt, 9, forced=text)


@pytest.mark.parametrize("forced", [False, True])
def test_decode_bench_forced_reaches_every_timed_decode(ext, monkeypatch, forced):
    """bench_decode --device cpu --forced: the dense timing, the APR correction and the CWIC timing all decode the
    dense model's greedy text (every timed_decode gets it); without --forced none does. The row records which."""
    from cwic_exp.cpu_decode import CpuDecoder
    from experiments.bench.cpu_decode import bench_model
    seen, real = [], CpuDecoder.timed_decode

    def spy(self, ids, new_tokens=32, forced=None):
        seen.append(None if forced is None else list(forced))
        return real(self, ids, new_tokens, forced=forced)

    monkeypatch.setattr(CpuDecoder, "timed_decode", spy)
    g = torch.Generator().manual_seed(9)
    calib = (torch.randint(0, 96, (2, 24), generator=g), torch.ones(2, 24, dtype=torch.long))
    prompt = torch.randint(0, 96, (6,), generator=g).tolist()
    res = bench_model("tiny", _tiny(), None, 16, [2.0], 5, 1, torch.float32, 0, lambda: True, lambda *a: None,
                      calib, prompt, hf_check=False, forced=forced)
    text = CpuDecoder(_tiny(), mode="dense", dtype=torch.float32, max_len=16).generate(prompt, 5)[len(prompt):]
    assert len(seen) >= 5   # dense-own, dense-torch, the correction's tries, dense-own and CWIC again
    assert all(f == (text if forced else None) for f in seen)
    row = res["configs"]["cwic-2x"]
    assert {"dense-own", "dense-fused", "dense-torch"} <= set(res["configs"])
    best = res["configs"][res["dense_best"]]["tokens_per_s_phases"][0]       # its median in the dense phase
    assert all(best >= res["configs"][k]["tokens_per_s"] for k in ("dense-own", "dense-fused", "dense-torch")
               if k != res["dense_best"])
    assert row["speedup"] == row["speedup_paired"] and row["dense_same_rounds"] == res["dense_best"]
    assert res["text"].startswith("forced" if forced else "generated")
    assert ("next_token_agreement_forced" in row) == forced
    if forced:
        assert 0.0 <= row["next_token_agreement_forced"] <= 1.0


def test_huge_page_arena_drops_reused_pages():
    """A block may reuse memory the allocator had handed out before (freed after a calibration): its 4 KiB
    pages would stay 4 KiB whatever the advice. So each block is advised MADV_HUGEPAGE and then MADV_DONTNEED
    (dropped, refaulted fresh on the copy), over the same 2 MiB-aligned range, and the copies keep their values."""
    import sys

    from cwic_exp import cpu_decode as CD
    if not sys.platform.startswith("linux"):
        pytest.skip("madvise: Linux only")
    a = CD.HugePageArena(block_bytes=2 << 20)
    real, calls = a._madvise, []

    def rec(p, n, advice):
        calls.append((p.value, n, advice))
        return real(p, n, advice)

    a._madvise = rec
    junk = torch.full((4 << 20,), 7, dtype=torch.uint8)   # touched memory, freed: the next block may reuse it
    del junk
    ts = [torch.randn(300, 1000), torch.randn(250, 1000)]   # 1.2 MB + 1.0 MB: two blocks
    vs = [a.put(t) for t in ts]
    assert all(torch.equal(t, v) for t, v in zip(ts, vs))
    assert [c[2] for c in calls] == [CD._MADV_HUGEPAGE, CD._MADV_DONTNEED] * 2
    for adv, drop in zip(calls[::2], calls[1::2]):
        assert adv[:2] == drop[:2] and adv[0] % (2 << 20) == 0
    assert [b[0] for b in a.blocks] == [c[0] for c in calls[::2]]
    assert 0 <= a.huge_bytes() <= a.bytes_advised == 2 * (2 << 20)


def test_huge_page_arena_copies_and_decoder_bits(ext):
    """Weights placed in the MADV_HUGEPAGE arena: same values (views of 2 MiB-aligned blocks, a new block
    when one is full), and a decoder built on it gives bit-identical logits."""
    import sys

    from cwic_exp.cpu_decode import CpuDecoder, HugePageArena
    a = HugePageArena(block_bytes=2 << 20)
    ts = [torch.randn(300, 1000), torch.randn(17).bfloat16(), torch.randn(250, 1000)]   # 1.2 MB, 34 B, 1.0 MB
    vs = [a.put(t) for t in ts]
    for t, v in zip(ts, vs):
        assert torch.equal(t, v) and v.dtype == t.dtype
    if sys.platform.startswith("linux"):
        assert a.bytes_advised == 2 * (2 << 20)                    # the third tensor needed a second block
        assert vs[0].data_ptr() % (2 << 20) == 0
        assert vs[2].untyped_storage().data_ptr() != vs[0].untyped_storage().data_ptr()
    m = _tiny()
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    for mode in ("dense", "cwic"):
        if mode == "cwic":
            import cwic_exp
            from cwic_exp.cpu_decode import calibrate_apr
            cwic_exp.to_cwic(m, stripe_size=16)
            calibrate_apr(m, torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(4)), apr=2.5)
        on = CpuDecoder(m, mode=mode, dtype=torch.bfloat16, max_len=32, huge_pages=True)
        off = CpuDecoder(m, mode=mode, dtype=torch.bfloat16, max_len=32, huge_pages=False)
        assert off.arena is None and (on.arena.bytes_advised > 0) == sys.platform.startswith("linux")
        assert torch.equal(_step_logits(on, ids), _step_logits(off, ids)), mode


def test_decode_bench_trained_checkpoint_rows(ext):
    """bench_decode --device cpu --checkpoint: the trained row decodes with the model's own thresholds; the calibrated
    row keeps the weights and running statistics, replaces θ and φ, and aims at the decode APR the trained row
    read."""
    import copy

    import cwic_exp
    from cwic_exp.cpu_decode import CpuDecoder
    from experiments.bench.cpu_decode import bench_model
    m = cwic_exp.to_cwic(_tiny(), stripe_size=16)
    g = torch.Generator().manual_seed(4)
    calib = (torch.randint(0, 96, (2, 24), generator=g), torch.ones(2, 24, dtype=torch.long))
    with torch.no_grad():
        with cwic_exp.cwic_context(m, token_mask=calib[1], update_stats=True):
            m(input_ids=calib[0], attention_mask=calib[1])
        for mod in cwic_exp.iter_cwic_modules(m):          # "trained": thresholds that differ per stripe and input
            p = mod.theta if isinstance(mod, cwic_exp.CwicLinear) else mod.phi
            p.copy_(torch.rand(p.shape, generator=g) * 1.5)
    own = copy.deepcopy(m)
    prompt = torch.randint(0, 96, (6,), generator=g).tolist()
    stats = {k: v.clone() for k, v in m.state_dict().items() if "ema" in k}
    assert stats
    res = bench_model("tiny", m, None, 16, [1.0], 5, 1, torch.float32, 0, lambda: True, lambda *a: None, calib,
                      prompt, hf_check=False, forced=True, trained=True)
    rows = res["configs"]
    text = CpuDecoder(own, mode="dense", dtype=torch.float32, max_len=16).generate(prompt, 5)[len(prompt):]
    expect = CpuDecoder(own, mode="cwic", dtype=torch.float32, max_len=16).timed_decode(prompt, 5, forced=text).apr
    assert rows["cwic-trained"]["apr_decode"] == pytest.approx(expect, rel=1e-12)
    assert rows["cwic-calibrated"]["apr_target"] == rows["cwic-trained"]["apr_decode"]   # not the 1.0 passed in
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in stats.items())            # statistics kept
    assert not torch.equal(m.model.layers[0].self_attn.q_proj.theta, own.model.layers[0].self_attn.q_proj.theta)
    assert {"dense-own", "dense-torch", "cwic-trained", "cwic-calibrated"} <= set(rows)
    assert all(rows[k]["speedup"] > 0 for k in ("cwic-trained", "cwic-calibrated"))
    none = bench_model("tiny", copy.deepcopy(own), None, 16, [], 5, 1, torch.float32, 0, lambda: True,
                       lambda *a: None, calib, prompt, hf_check=False, forced=True, trained=True)
    assert "cwic-calibrated" not in none["configs"] and "cwic-trained" in none["configs"]


def test_decode_bench_rounds_rotate_and_pair_by_round():
    """run_rounds: every configuration takes every position equally often; the headline speedup is the median of
    the per-round ratios (a drifting host moves both sides of a round together)."""
    import types

    from experiments.bench.cpu_decode import paired, run_rounds
    calls = []

    class Fake:
        def __init__(self, name, tps):
            self.name, self.tps, self.r = name, tps, 0

        def prefill(self, ids):
            pass

        def timed_decode(self, prompt, n, forced=None):
            calls.append(self.name)
            self.r += 1
            return types.SimpleNamespace(tokens_per_s=self.tps[self.r - 1], prefill_seconds=0.0)

        def profile(self):
            return {}

    drift = [100.0, 50.0, 80.0, 90.0, 40.0, 60.0]          # the host slows and speeds up between rounds
    decs = {"d": Fake("d", drift), "a": Fake("a", [2 * x for x in drift]), "b": Fake("b", [3 * x for x in drift])}
    runs = run_rounds(decs, [1, 2, 3, 4], 8, 6, lambda: True, lambda *a: None)
    rounds = [calls[3 * r:3 * r + 3] for r in range(6)]
    assert rounds[:3] == [["d", "a", "b"], ["a", "b", "d"], ["b", "d", "a"]] and rounds[3:] == rounds[:3]
    for name in decs:
        assert sorted(r.index(name) for r in rounds) == [0, 0, 1, 1, 2, 2]
    p = paired(runs, "b", "d")
    from experiments.bench.cpu_kernels import rotated
    assert [rotated([1, 2, 3, 4], r) for r in (0, 1, 5)] == [[1, 2, 3, 4], [2, 3, 4, 1], [2, 3, 4, 1]]
    assert rotated([], 3) == []
    assert p["speedup_paired"] == pytest.approx(3.0) and p["speedup_paired_range"] == pytest.approx([3.0, 3.0])


def _tiny_decoder(e, nh=2, nkv=2, hd=4, d=8, V=10, F=6, ML=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def lin(n, m):
        L = e.Lin()
        L.kind, L.w = 0, torch.randn(n, m, generator=g) * 0.1
        return L

    def ffn(Fu):
        f = e.Ffn()
        f.cwic, f.gate_up, f.down = False, lin(d, 2 * Fu), lin(Fu, d)
        return f
    cos, sin = torch.ones(ML, hd // 2), torch.zeros(ML, hd // 2)
    dec = e.Decoder(torch.randn(V, d, generator=g), torch.ones(d), 1e-6, nh, nkv, hd, hd ** -0.5, cos, sin, ML, -1, 1)
    layer = lambda Fu: (torch.ones(d), torch.ones(d), [lin(d, (nh + 2 * nkv) * hd)], lin(nh * hd, d), ffn(Fu))  # noqa: E731
    return dec, lin, layer


def test_binding_refuses_what_would_read_or_write_out_of_bounds(ext):
    """Found by an ASan/UBSan build of the kernels: these inputs divided by zero (SIGFPE killed the process),
    read past w, or read past the KV cache; each is now a RuntimeError that names it."""
    with pytest.raises(RuntimeError, match="no outputs"):                 # m = 0: k = m / stripe
        ext.gemv(torch.ones(2, 4), torch.ones(4, 0), None, None, None, 0, -1, 1)
    with pytest.raises(RuntimeError, match="n_kv"):                       # n_kv = 0
        ext.attention(torch.ones(2, 8), torch.ones(3, 0, 8), torch.ones(3, 0, 8), 1.0, -1, 1)
    with pytest.raises(RuntimeError, match="m >= 1"):
        ext.gemv_layout(torch.ones(1, 4), torch.ones(4), 0, None, None, None, 0, 1, 1, -1, 1)
    # stripe 0 of a 6-output, stripe-4 layout with block stride 1 spans w[0..3]: only the last stripe was checked
    with pytest.raises(RuntimeError, match="does not fit"):
        ext.gemv_layout(torch.ones(1, 1), torch.arange(3, dtype=torch.float32), 6, None, None, None, 4, 1, 1, -1, 1)
    with pytest.raises(RuntimeError, match="multiple of n_kv"):          # head 2 read kv head 2 of 2
        _tiny_decoder(ext, nh=3, nkv=2)


def test_decoder_resizes_its_buffers_for_a_head_or_layer_added_after_a_step(ext):
    """A larger head, or a layer with a wider FFN, set after the first step used to write past the buffers sized
    then (ASan: heap overflow). Now the next step sizes them again and equals a decoder built that way at once."""
    d, V = 8, 10
    dec, lin, layer = _tiny_decoder(ext, seed=1)
    dec.add_layer(*layer(6))
    dec.set_head(lin(d, V))
    dec.step(1, 0)
    head = lin(d, 4 * V)
    dec.set_head(head)
    wide = layer(48)
    dec.add_layer(*wide)
    got = dec.step(2, 0)
    ref, lin2, layer2 = _tiny_decoder(ext, seed=1)
    ref.add_layer(*layer2(6))
    lin2(d, V)                                      # the same draws, so the weights match
    ref.add_layer(*wide)
    ref.set_head(head)
    assert got == ref.step(2, 0)
    torch.testing.assert_close(dec.logits(), ref.logits())


def _calibrated_tiny_cwic(seed=4, apr=2.5):
    import cwic_exp
    from cwic_exp.cpu_decode import calibrate_apr
    m = tiny_model()
    cwic_exp.to_cwic(m, stripe_size=16)
    calibrate_apr(m, torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(seed)), apr=apr)
    return m


def test_dense_counts_equal_the_models_own_matrices_with_explicit_head_dim():
    """dense_counts must use config.head_dim when it differs from hidden/heads (Qwen3, Gemma shapes). A mutant that
    broke it passed every test before."""
    import cwic_exp
    from cwic_exp.cpu_decode import dense_counts
    for kw in (dict(), dict(head_dim=24)):        # 24 != 48 / 4
        m = tiny_model(**kw)
        dc = dense_counts(m)
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        want = sum(mod.weight.numel() for n, mod in m.named_modules() if n.endswith(names))
        assert dc["attn"] + dc["ffn"] == want, kw
        assert dc["total"] == want + m.lm_head.weight.numel()
        cwic_exp.to_cwic(m, stripe_size=16)
        assert dc["total"] == cwic_exp.active_parameters(m, torch.tensor([[1, 2, 3]]))["dense"]


def test_every_dense_impl_ignores_a_cwic_models_thresholds(ext):
    """dense="fused" on a CWIC model must ignore the thresholds like "own" and "torch". A mutant that broke it passed
    every test before."""
    from cwic_exp.cpu_decode import CpuDecoder
    m = _calibrated_tiny_cwic()
    ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(5))
    own = _step_logits(CpuDecoder(m, mode="dense", dense="own", dtype=torch.float32, max_len=16), ids)
    for impl in ("fused", "torch"):
        dec = CpuDecoder(m, mode="dense", dense=impl, dtype=torch.float32, max_len=16)
        torch.testing.assert_close(_step_logits(dec, ids), own, rtol=1e-4, atol=1e-4, msg=impl)
        assert dec.reads_per_token()["total"] == pytest.approx(dec.dense["total"]), impl


def test_calibrate_apr_ignores_padded_positions():
    """calibrate_apr must calibrate on the real tokens only: padding's ids change nothing. A mutant that broke it
    passed every test before."""
    import cwic_exp
    from cwic_exp.cpu_decode import calibrate_apr
    ids, mask = rand_batch(b=3, t=16, pad_last=8)
    other = ids.clone()
    other[~mask.bool()] = (other[~mask.bool()] + 37) % 96      # different garbage under the padding
    thetas = []
    for x in (ids, other):
        m = tiny_model()
        cwic_exp.to_cwic(m, stripe_size=16)
        calibrate_apr(m, x, apr=2.5, attention_mask=mask)
        thetas.append([(mod.theta if hasattr(mod, "theta") else mod.phi).clone()
                       for mod in cwic_exp.iter_cwic_modules(m)])
    for a, b in zip(*thetas):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_timed_decode_reads_per_token_are_the_mean_of_the_steps(ext):
    """timed_decode's reads per token / APR are the counters over exactly `new_tokens` steps. A mutant that broke it
    passed every test before."""
    from cwic_exp.cpu_decode import CpuDecoder
    m = _calibrated_tiny_cwic()
    prompt, text = [3, 14, 15, 9], [26, 5, 35, 8, 9]
    a = CpuDecoder(m, mode="cwic", dtype=torch.float32, max_len=16)
    st = a.timed_decode(prompt, 5, forced=text)
    b = CpuDecoder(m, mode="cwic", dtype=torch.float32, max_len=16)
    b.prefill(prompt)
    per = []
    for t in text:
        r0 = b.weights_read()
        b.step(t)
        per.append(b.weights_read() - r0)
    assert st.reads_per_token["total"] == pytest.approx(sum(per) / 5)
    assert st.apr == pytest.approx(a.dense["total"] * 5 / sum(per))
    d = CpuDecoder(m, mode="dense", dtype=torch.float32, max_len=16).timed_decode(prompt, 5, forced=text)
    assert d.apr == pytest.approx(1.0)


def test_extension_name_covers_the_headers(tmp_path, monkeypatch):
    """The extension's name (its build cache key) changes with the headers, not only the .cpp files. A mutant that
    broke it passed every test before."""
    import shutil
    from cwic_kernels import cpu
    names = []

    def fake_load(name, **kw):
        names.append(name)
        return object()
    import torch.utils.cpp_extension as ce
    monkeypatch.setattr(ce, "load", fake_load)
    for f in cpu.SOURCES + cpu.DEPENDS:
        shutil.copy(f"{cpu._HERE}/{f}", tmp_path / f)
    monkeypatch.setattr(cpu, "_HERE", str(tmp_path))
    for edit in (None, "cwic_cpu_impl.inc", "cwic_cpu.h"):
        if edit:
            with open(tmp_path / edit, "a") as fh:
                fh.write("\n// edited\n")
        monkeypatch.setattr(cpu, "_EXT", None)
        monkeypatch.setattr(cpu, "_ERR", None)
        assert cpu.load() is not None
    assert len(set(names)) == 3, names


def test_ffn_fake_kernel_shape_matches_the_real_op():
    """The fake (meta) kernels of cwic::ffn and cwic::gemv give the real ops' shapes, (B, d) with d != d_ff and
    (B, m) with m != n: torch.compile traces with them. Mutants that broke either passed every test before."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from cwic_kernels import ops  # noqa: F401  (defines the ops)
    B, d, Fd, s = 3, 8, 12, 4
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(B, d, generator=g), torch.randn(d, Fd, generator=g), torch.zeros(d),
            torch.zeros(Fd // s, d), torch.zeros(Fd), s, torch.randn(Fd, d, generator=g),
            torch.randn(Fd, d, generator=g), torch.zeros(Fd), "silu")
    real = torch.ops.cwic.ffn(*args)
    mode = FakeTensorMode()
    fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    with mode:
        fake = torch.ops.cwic.ffn(*fargs)
    assert tuple(fake.shape) == tuple(real.shape) == (B, d)
    # and cwic::gemv's: (B, m) for a non-square (n, m) layer
    args = (torch.randn(B, d, generator=g), torch.randn(d, Fd, generator=g), torch.zeros(d), torch.zeros(Fd // s, d),
            torch.zeros(Fd), s)
    real = torch.ops.cwic.gemv(*args)
    fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    with mode:
        fake = torch.ops.cwic.gemv(*fargs)
    assert tuple(fake.shape) == tuple(real.shape) == (B, Fd) and fake.dtype == real.dtype


def test_threshold_ties_are_on_everywhere(ext):
    """At |x - mean| == thr exactly, the pair is ON (>=) in the reference, the kernels and the model. A mutant that
    broke it passed every test before."""
    from cwic_kernels import cpu as C, reference as R
    x = torch.tensor([[1.5, -0.75, 0.25]])
    mean = torch.tensor([0.5, 0.25, 0.0])
    thr = torch.tensor([[1.0, 1.0, 0.5]])          # ties on inputs 0 and 1, input 2 off
    wt = torch.tensor([[1.0], [2.0], [4.0]])
    bias = torch.zeros(1)
    assert R.granular_mask(x, mean, thr).tolist() == [[[True, True, False]]]
    want = torch.tensor([[1.0 * 1.0 + (-1.0) * 2.0]])
    torch.testing.assert_close(R.gemv_reference(x, wt, mean, thr, bias, 1), want)
    torch.testing.assert_close(C.gemv(x, wt, mean, thr, bias, 1), want)
    # a batch of 16 tokens (one AVX-512 block of the batch mask), every ISA; the prefill GEMM
    for isa in C.supported_isas():
        torch.testing.assert_close(C.gemv(x.repeat(16, 1), wt, mean, thr, bias, 1, isa=isa), want.repeat(16, 1),
                                   msg=isa)
    from cwic_kernels.gpu import prefill as P
    torch.testing.assert_close(P.masked_gemm(x, wt, mean, thr, bias, 1), want)
    ext_act = lambda g, isa: ext.act(g, "silu", C.isa_id(isa))   # noqa: E731
    # an FFN unit whose |act(gate)| equals its threshold is on: the reference (every kernel's oracle) and the kernels
    g = torch.Generator().manual_seed(0)
    d, F_, s = 16, 8, 4
    xs = torch.randn(1, d, generator=g)
    gw, up, dn = torch.randn(d, F_, generator=g) / 4, torch.randn(F_, d, generator=g), torch.randn(F_, d, generator=g)
    gm, gt, gb = torch.zeros(d), torch.zeros(F_ // s, d), torch.zeros(F_)
    on_the_edge = torch.nn.functional.silu(R.gemv_reference(xs, gw, gm, gt, gb, s)).abs()[0]
    every_unit = R.ffn_reference(xs, gw, gm, gt, gb, s, up, dn, torch.zeros(F_))
    assert torch.equal(R.ffn_reference(xs, gw, gm, gt, gb, s, up, dn, on_the_edge), every_unit)
    for isa in C.supported_isas():     # the kernels' own |act(gate)|, to the bit, as the thresholds
        edge = ext_act(C.gemv(xs, gw, gm, gt, gb, s, isa=isa), isa).abs()[0]
        assert torch.equal(C.ffn(xs, gw, gm, gt, gb, s, up, dn, edge, isa=isa),
                           C.ffn(xs, gw, gm, gt, gb, s, up, dn, torch.zeros(F_), isa=isa)), isa


def test_a_nan_input_reaches_the_outputs_in_every_isa(ext):
    """A NaN input counts as on (the reference, as the dense product): every output of its token is NaN, and the
    batch's other tokens are exact. The kernels compared |x - mean| >= thr, which a NaN fails, so they skipped it
    and returned finite outputs. At a vector lane (input 5) and in the tail (input 37), batch 1, 3 and 16 (the
    AVX-512 batch mask), at thresholds of +inf too; an FFN unit whose gate is NaN is on (the NaN reaches y)."""
    from cwic_kernels import cpu as C, reference as R
    g = torch.Generator().manual_seed(5)
    n, m, s = 40, 24, 8
    wt, mean, bias = torch.randn(n, m, generator=g), torch.randn(n, generator=g) * 0.1, torch.randn(m, generator=g)
    thr = torch.rand(m // s, n, generator=g) * 1.5
    for B, tok, i in ((1, 0, 5), (1, 0, 37), (3, 1, 37), (16, 9, 5)):
        x = torch.randn(B, n, generator=g)
        x[tok, i] = float("nan")
        for t in (thr, torch.full_like(thr, float("inf"))):
            want = R.gemv_reference(x, wt, mean, t, bias, s)
            assert torch.isnan(want[tok]).all() and torch.isfinite(want[torch.arange(B) != tok]).all()
            for isa in C.supported_isas():
                got = C.gemv(x, wt, mean, t, bias, s, isa=isa)
                assert torch.equal(torch.isnan(got), torch.isnan(want)), (B, i, isa)
                torch.testing.assert_close(got.nan_to_num(0.0), want.nan_to_num(0.0), rtol=1e-5, atol=1e-5)
    d, F_ = 16, 8
    xs = torch.randn(2, d, generator=g)
    gw, up, dn = torch.randn(d, F_, generator=g) / 4, torch.randn(F_, d, generator=g), torch.randn(F_, d, generator=g)
    gm, gt, gb, ut = torch.zeros(d), torch.zeros(F_ // 4, d), torch.zeros(F_), torch.full((F_,), 10.0)
    gb[3] = float("nan")                  # unit 3's gate: NaN for both tokens; every other unit under its threshold
    assert torch.isnan(R.ffn_reference(xs, gw, gm, gt, gb, 4, up, dn, ut)).all()
    for isa in C.supported_isas():
        assert torch.isnan(C.ffn(xs, gw, gm, gt, gb, 4, up, dn, ut, isa=isa)).all(), isa
        assert torch.isnan(C.ffn(xs[:1], gw, gm, gt, gb, 4, up, dn, ut, isa=isa)).all(), isa


def test_thresholds_of_the_wrong_shape_are_refused(ext):
    """A 1-D thr with k > 1 stripes would be read as k·n floats, past its end: refused by name."""
    g = torch.Generator().manual_seed(0)
    x, wt, thr = torch.randn(2, 64, generator=g), torch.randn(64, 128, generator=g), torch.rand(4, 64, generator=g)
    with pytest.raises(RuntimeError, match="thr must be"):
        C.gemv(x, wt, torch.zeros(64), thr[0].contiguous(), torch.zeros(128), 32)
    with pytest.raises(RuntimeError, match="thr must be"):
        C.gemv(x, wt, torch.zeros(64), thr[:3].contiguous(), torch.zeros(128), 32)


def test_an_ffn_of_mixed_weight_dtypes_runs_the_reference(ext):
    """The kernels take one weight dtype; a gate in fp32 with bf16 up/down goes to the reference, as documented,
    instead of failing."""
    g = torch.Generator().manual_seed(1)
    d, F_, s = 32, 64, 32
    x = torch.randn(2, d, generator=g)
    gw, up, dn = torch.randn(d, F_, generator=g) / 4, torch.randn(F_, d, generator=g) / 4, torch.randn(F_, d, generator=g) / 4
    gm, gt, gb, ut = torch.zeros(d), torch.rand(F_ // s, d, generator=g) * 0.3, torch.zeros(F_), torch.rand(F_, generator=g) * 0.1
    got = C.ffn(x, gw, gm, gt, gb, s, up.bfloat16(), dn.bfloat16(), ut)
    want = R.ffn_reference(x, gw, gm, gt, gb, s, up.bfloat16(), dn.bfloat16(), ut)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


# Tests from a mutant audit of cpu_decode.py (helper)

def test_generate_takes_n_steps_keeps_its_eos_and_timed_decode_needs_a_token(ext):
    """generate(p, n) feeds n - 1 steps after the prefill (one more would pass a cache of exactly len(p) + n - 1
    positions), and stops after the EOS it was given, keeping it; timed_decode of 0 tokens is refused by name (it
    divided by zero)."""
    from cwic_exp.cpu_decode import CpuDecoder
    d = CpuDecoder(_tiny(), mode="dense", dtype=torch.float32, max_len=7)
    out = d.generate([5, 6, 7, 8], 4)
    assert len(out) == 8 and d.pos == 7
    d = CpuDecoder(_tiny(), mode="dense", dtype=torch.float32, max_len=32)
    p = [5, 6, 7, 8]
    text = d.generate(p, 5)
    eos = text[len(p) + 1]
    k = text.index(eos, len(p))
    assert d.generate(p, 5, eos=eos) == text[:k + 1]
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        d.timed_decode(p, 0)


def test_the_decoder_is_built_with_its_thread_count(ext, monkeypatch):
    import cwic_exp.cpu_decode as CD
    real, seen = CD._ext(), []

    class Proxy:
        def __getattr__(self, k):
            return getattr(real, k)

        def Decoder(self, *a):
            seen.append(a[-1])
            return real.Decoder(*a)
    monkeypatch.setattr(CD, "_ext", lambda: Proxy())
    CD.CpuDecoder(_tiny(), mode="dense", dtype=torch.float32, max_len=8, nthreads=3)
    assert seen == [3]


def test_walk_tunings_change_prefetches_not_bits(ext):
    """The walk tunables (rows prefetched ahead, the stripe prefetch and its budget, the stripe-group budget) move
    only prefetches: under every setting the GEMV and the FFN give the same bits as under the defaults. set_tuning
    sets what tuning() reads, a negative value keeps a setting, and the defaults come back."""
    default = ext.tuning()
    assert len(default) == 4 and default[0] > 0
    cases = [(576, 960, 192), (256, 1024, 512), (100, 77, 20)]
    want = {}
    for B in (1, 3):
        for (n, m, s) in cases:
            x, wt, mean, thr, bias = _inputs(B, n, m, s, torch.bfloat16, seed=n + B)
            want[("gemv", B, n)] = ((x, wt, mean, thr, bias, s), C.gemv(x, wt, mean, thr, bias, s))
        args = _ffn_inputs(B, 576, 1536, 192, torch.bfloat16, seed=B)
        want[("ffn", B)] = (args, C.ffn(*args))
    try:
        for t in [(1, 1, -1, -1), (64, -1, -1, -1), (-1, 0, -1, -1), (-1, 1, 0, 0), (-1, 1, 1 << 40, 1 << 40)]:
            ext.set_tuning(*default)
            ext.set_tuning(*t)
            assert ext.tuning() == [d if v < 0 else v for v, d in zip(t, default)]
            for key, (args, out) in want.items():
                got = C.ffn(*args) if key[0] == "ffn" else C.gemv(*args)
                assert torch.equal(got, out), (t, key)
    finally:
        ext.set_tuning(*default)
    assert ext.tuning() == default


# ------------------------------------------------------------------ from a mutant audit of the C++ kernels (2026-12-05)


def test_decode_at_a_width_that_is_not_a_multiple_of_the_vector_matches_hf(ext):
    """Every decoder test ran widths d that are multiples of 16 (48, 144, 128, 256), so the outputs past the last
    full vector (tail_cols, where the o projection and the dense down projection add the residual) and the RMSNorm's
    tail lanes (d % 16 inputs) were never compared with anything: dropping the residual there, or letting the tail
    overwrite its lanes' partial sums, passed. d = 36 (2 AVX-512 vectors + 4, 4 AVX2 vectors + 4), grouped-query
    heads of 18, every ISA, each dense implementation and CWIC at theta = 0, against Hugging Face. Token 0's
    embedding is all zeros: the RMSNorm of a zero state is 0 (eps keeps 0 / sqrt(0) away), as in HF, not NaN."""
    import cwic_exp
    from conftest import tiny_model
    from cwic_exp.cpu_decode import CpuDecoder
    m = tiny_model(hidden_size=36, num_attention_heads=2, num_key_value_heads=1, intermediate_size=40)
    with torch.no_grad():
        m.get_input_embeddings().weight[0].zero_()
    ids = [0] + torch.randint(1, 96, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0]
    assert torch.isfinite(ref).all()
    for isa in C.supported_isas():
        for dense in ("own", "fused", "torch"):
            dec = CpuDecoder(m, mode="dense", dense=dense, dtype=torch.float32, max_len=16, isa=isa)
            torch.testing.assert_close(_step_logits(dec, ids), ref, rtol=1e-4, atol=1e-4, msg=f"{isa} {dense}")
    cwic_exp.to_cwic(m, stripe_size=12)
    dec = CpuDecoder(m, mode="cwic", dtype=torch.float32, max_len=16)        # theta = 0: the dense model
    torch.testing.assert_close(_step_logits(dec, ids), ref, rtol=1e-4, atol=1e-4)


def _one_unit_ffn(bias_of_unit0, act, unit_thr0, d=16):
    """bf16 FFN of 2 units whose gate is its bias (gate weights 0, dense): unit 0's g is `bias_of_unit0` exactly;
    unit 1 (g = 2) is always on."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, d, generator=g).bfloat16()
    gw = torch.zeros(d, 2).bfloat16()
    gm, gt = torch.zeros(d), torch.zeros(2, d)
    gb = torch.tensor([bias_of_unit0, 2.0])
    up, dn = torch.randn(2, d, generator=g).bfloat16(), torch.randn(2, d, generator=g).bfloat16()
    ut = torch.tensor([unit_thr0, 0.0])
    return x, gw, gm, gt, gb, 1, up, dn, ut


def test_ffn_unit_mask_rounds_a_bf16_tie_to_even(ext):
    """bf16 model: g and act(g) are rounded to bf16 (round to nearest, ties to even, as torch's .to(bfloat16)) before
    the unit mask compares |a| with the threshold. g = 1 + 2^-8 lies halfway between the bf16 neighbours 1 and
    1 + 2^-7: to even it is 1, under a threshold of 1 + 2^-8, so the unit is off; rounding ties away (1 + 2^-7) turned
    it on, and no test saw it (random gates never hit a tie). Every ISA: the reference's output and its weights read."""
    g0 = 1.0 + 2.0 ** -8
    assert torch.tensor([g0]).bfloat16().item() == 1.0
    args = _one_unit_ffn(g0, "relu", g0)
    want = R.ffn_reference(*args, act="relu")
    d = args[0].shape[1]
    for isa in C.supported_isas():
        got, reads = C.ffn(*args, act="relu", isa=isa, return_reads=True)
        assert reads == 2 * d + 2 * d * 1, isa                     # the gate (2 stripes of 1 row) + unit 1 only
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2, msg=isa)


def test_ffn_gate_nan_with_any_payload_stays_nan_in_bf16(ext):
    """The bf16 rounding of a NaN gate keeps it NaN whatever its payload (torch's .to(bfloat16) does): the
    round-to-nearest add on the raw bits, applied to NaN 0x7fffffff, carried into the sign bit and gave -0, which
    switched the unit off and hid the NaN (the NaN tests used torch's default NaN 0x7fc00000, which survives the add).
    The reference's output is all NaN; so is every ISA's."""
    for bits in (0x7FFFFFFF, -1):                               # +NaN and -NaN, every payload bit set
        nan = torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()
        args = _one_unit_ffn(nan, "silu", 10.0)
        assert torch.isnan(R.ffn_reference(*args, act="silu")).all()
        for isa in C.supported_isas():
            assert torch.isnan(C.ffn(*args, act="silu", isa=isa)).all(), (hex(bits & 0xFFFFFFFF), isa)


def test_each_isa_runs_its_own_build_of_the_ffn(ext):
    """The isa counters tell which ISA was asked for, not which build ran: the GEMV is bitwise the same in every
    build, so a dispatch that ran the AVX-512 build for "avx2" (or the reverse) passed. The FFN's up-projection dot
    product tells them apart: d = 64 inputs 2^25, -2^25 and 1 at 0, 16 and 32 (up row of ones). AVX2 (8 lanes,
    4 accumulators of 8) adds the 1 to 2^25 in one lane (lost to rounding) and cancels it later: 0; AVX-512 (4
    accumulators of 16) cancels 2^25 first and keeps the 1, as the scalar twin does: 1. Unit 0's gate is 1 (relu: on),
    down row of ones, so every output is that dot product."""
    d = 64
    x = torch.zeros(1, d)
    x[0, 0], x[0, 16], x[0, 32] = 2.0 ** 25, -(2.0 ** 25), 1.0
    gw, gm, gt, gb = torch.zeros(d, 1), torch.zeros(d), torch.zeros(1, d), torch.ones(1)
    up, dn, ut = torch.ones(1, d), torch.ones(1, d), torch.zeros(1)
    expect = {"scalar": 1.0, "avx2": 0.0, "avx512": 1.0}
    for isa in C.supported_isas():
        y = C.ffn(x, gw, gm, gt, gb, 1, up, dn, ut, act="relu", isa=isa)
        assert torch.equal(y, torch.full((1, d), expect[isa])), (isa, y[0, 0].item())


_STRIPE_ZERO = """
import torch
from cwic_kernels import cpu as C, reference as R
ext = C.load()
g = torch.Generator().manual_seed(1)
n, m = 24, 40
x, wt = torch.randn(3, n, generator=g), torch.randn(n, m, generator=g)
mean, thr, bias = torch.randn(n, generator=g) * 0.1, torch.rand(1, n, generator=g), torch.randn(m, generator=g)
want = ext.gemv(x, wt, mean, thr, bias, m, -1, 0)
got = ext.gemv(x, wt, mean, thr, bias, 0, -1, 0)
assert torch.equal(got[0], want[0]) and got[1] == want[1]
torch.testing.assert_close(got[0], R.gemv_reference(x, wt, mean, thr, bias, m), rtol=1e-5, atol=1e-5)
up, dn, ut = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g), torch.rand(m, generator=g) * 0.2
a = ext.ffn(x, wt, mean, thr, bias, 0, up, dn, ut, "silu", -1, 0)
b = ext.ffn(x, wt, mean, thr, bias, m, up, dn, ut, "silu", -1, 0)
assert torch.equal(a[0], b[0]) and a[1] == b[1]
"""


def test_stripe_zero_is_one_stripe_of_every_output(ext):
    """The binding takes stripe <= 0 as one stripe of all m outputs (cwic_cpu.h: "<= 0: m"), thr then (1, n); a
    comparison that let 0 through divided by zero (k = ceil(m / stripe)): SIGFPE killed the process. GEMV and FFN,
    in a child process so that a crash fails this test alone."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", _STRIPE_ZERO], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


def test_gemv_layout_accepts_a_layout_that_fits_exactly(ext):
    """gemv_layout checks that each stripe's last weight lies inside w: a layout that ends exactly at w's end is
    valid (stripe-major blocks with m a multiple of the stripe; or the last stripe's rows not padded past its last
    row). An off-by-one bound (< instead of <=) refused them; the padded layout of the existing test ends earlier."""
    n, s = 24, 16
    g = torch.Generator().manual_seed(3)
    for m in (64, 56):                                           # whole stripes; a last stripe of 8
        k = -(-m // s)
        x, wt = torch.randn(2, n, generator=g).bfloat16(), torch.randn(n, m, generator=g).bfloat16()
        mean, thr, bias = torch.zeros(n), torch.rand(k, n, generator=g), torch.randn(m, generator=g)
        blocks = torch.nn.functional.pad(wt, (0, k * s - m)).view(n, k, s).permute(1, 0, 2).contiguous().flatten()
        need = (k - 1) * n * s + (n - 1) * s + (m - (k - 1) * s)   # one past the last weight read
        w = blocks[:need].clone()
        got = ext.gemv_layout(x, w, m, mean, thr, bias, s, s, n * s, -1, 0)
        want = ext.gemv(x, wt, mean, thr, bias, s, -1, 0)
        assert torch.equal(got[0], want[0]) and got[1] == want[1], m
        with pytest.raises(RuntimeError, match="does not fit"):
            ext.gemv_layout(x, w[:-1].clone(), m, mean, thr, bias, s, s, n * s, -1, 0)


def test_ffn_act_rounding_follows_x_dtype_not_the_weights(ext):
    """The reference rounds g and act(g) to x's dtype (act_in_dtype(g, act, x.dtype)): fp32 activations with bf16
    weights are not rounded. Keying the rounding on the weights' dtype passed, since every FFN test gave x the weights'
    dtype. Unit thresholds placed between the rounded and the unrounded |act(g)| (kernel_checks.unit_flip_case): the
    units on and the weights read are the fp32 reading's, in every ISA."""
    from kernel_checks import unit_flip_case
    d, F_, s, B = 32, 64, 32, 2
    g = torch.Generator().manual_seed(41)
    x = torch.randn(B, d, generator=g)                               # fp32
    gw = (torch.randn(d, F_, generator=g) / 4).bfloat16()
    mean, thr = torch.zeros(d), torch.rand(F_ // s, d, generator=g) * 0.5
    gb = torch.randn(F_, generator=g) * 0.1
    up, dn = (torch.randn(F_, d, generator=g) / 4).bfloat16(), (torch.randn(F_, d, generator=g) / 4).bfloat16()
    g32 = R.gemv_reference(x, gw, mean, thr, gb, s)
    ut, cells = unit_flip_case(g32, torch.bfloat16)
    on_any = (R.act_in_dtype(g32, "silu", torch.float32).abs() >= ut).any(0)
    assert not torch.equal(on_any, (R.act_in_dtype(g32, "silu", torch.bfloat16).abs() >= ut).any(0))
    want = R.ffn_reference(x, gw, mean, thr, gb, s, up, dn, ut)
    for isa in C.supported_isas():
        got, reads = C.ffn(x, gw, mean, thr, gb, s, up, dn, ut, act="silu", isa=isa, return_reads=True)
        assert reads - int(R.gemv_active_params(x, mean, thr, F_, s, union=True)) == 2 * d * int(on_any.sum()), isa
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=isa)


def _rms(h, w, eps):
    return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w


def test_decoder_reads_per_stripe_means_of_a_cwic_matrix_and_gate(ext):
    """A CWIC Lin's mean may be (k, n), one row per stripe (cpu_decode fuses q/k/v whose running means differ that
    way), in the q/k/v product and in the FFN's gate; the decoder passes mean_rows = k to the kernels. Reading only
    row 0 passed every test (the tiny models' fused modules share one mean). One layer, one head, position 0 (the
    attention returns v): the decoder's logits equal the same products composed from ext.gemv and ext.ffn."""
    g = torch.Generator().manual_seed(6)
    d, hd, Fu, V, s, eps = 32, 16, 64, 10, 16, 1e-6

    def lin(kind, n, m, per_stripe=False):
        L = ext.Lin()
        L.kind, L.stripe, L.w = kind, s if kind == 1 else 0, torch.randn(n, m, generator=g) / n ** 0.5
        if kind == 1:
            k = -(-m // s)
            L.mean = torch.randn(k, n, generator=g) * 0.8 if per_stripe else torch.randn(n, generator=g) * 0.8
            L.thr = torch.rand(k, n, generator=g) * 0.8
            L.bias = torch.randn(m, generator=g) * 0.1
        return L

    qkv, o, head = lin(1, d, 3 * hd, True), lin(0, hd, d), lin(0, d, V)
    f = ext.Ffn()
    f.cwic, f.act, f.gate = True, "silu", lin(1, d, Fu, True)
    f.up_w, f.down_wt = torch.randn(Fu, d, generator=g) / d ** 0.5, torch.randn(Fu, d, generator=g) / Fu ** 0.5
    f.unit_thr = torch.rand(Fu, generator=g) * 0.1
    embed = torch.randn(V, d, generator=g)
    ln1, ln2, norm = (1 + 0.3 * torch.randn(d, generator=g) for _ in range(3))
    dec = ext.Decoder(embed, norm, eps, 1, 1, hd, hd ** -0.5, torch.ones(4, hd // 2), torch.zeros(4, hd // 2), 4, -1, 1)
    dec.add_layer(ln1, ln2, [qkv], o, f)
    dec.set_head(head)

    def composed(qmean, gmean):
        h = embed[3:4].clone()
        v = ext.gemv(_rms(h, ln1, eps), qkv.w, qmean, qkv.thr, qkv.bias, s, -1, 1)[0][:, 2 * hd:]
        h = h + ext.gemv(v, o.w, None, None, None, d, -1, 1)[0]
        gt = f.gate
        h = h + ext.ffn(_rms(h, ln2, eps), gt.w, gmean, gt.thr, gt.bias, s, f.up_w, f.down_wt, f.unit_thr, "silu",
                        -1, 1)[0]
        return ext.gemv(_rms(h, norm, eps), head.w, None, None, None, V, -1, 1)[0][0]

    dec.step(3, 0)
    want = composed(qkv.mean, f.gate.mean)
    torch.testing.assert_close(dec.logits(), want, rtol=1e-4, atol=1e-4)
    for wrong in (composed(qkv.mean[0], f.gate.mean), composed(qkv.mean, f.gate.mean[0])):   # the test can tell
        assert (wrong - want).abs().max() > 1e-2


def test_decoder_argmax_takes_the_first_of_tied_logits(ext):
    """Greedy decoding returns the first index of the largest logit, as torch.argmax (and so HF's generate) does; a
    >= in the C++ argmax took the last one, which random logits never show. A head of zeros: every logit ties."""
    g = torch.Generator().manual_seed(0)
    d, nh, hd, V = 8, 2, 4, 10
    L = ext.Lin()
    L.kind, L.w = 0, torch.randn(d, (nh + 2 * nh) * hd, generator=g) * 0.1
    o = ext.Lin()
    o.kind, o.w = 0, torch.randn(nh * hd, d, generator=g) * 0.1
    f = ext.Ffn()
    f.cwic, f.gate_up, f.down = False, ext.Lin(), ext.Lin()
    f.gate_up.kind, f.gate_up.w = 0, torch.randn(d, 12, generator=g) * 0.1
    f.down.kind, f.down.w = 0, torch.randn(6, d, generator=g) * 0.1
    head = ext.Lin()
    head.kind, head.w = 0, torch.zeros(d, V)
    dec = ext.Decoder(torch.randn(V, d, generator=g), torch.ones(d), 1e-6, nh, nh, hd, hd ** -0.5,
                      torch.ones(4, hd // 2), torch.zeros(4, hd // 2), 4, -1, 1)
    dec.add_layer(torch.ones(d), torch.ones(d), [L], o, f)
    dec.set_head(head)
    assert dec.step(1, 0) == 0 == int(torch.argmax(dec.logits()))
    assert dec.prefill(torch.tensor([2, 3]), 1) == 0


def _scan_argmax(x: list) -> int:
    """The decoder's old scalar scan, the argmax's definition: NaNs never win, a NaN at 0 is never beaten."""
    best = 0
    for i in range(1, len(x)):
        if x[i] > x[best]:
            best = i
    return best


def test_argmax_is_the_scalar_scan_in_every_isa(ext):
    """The vector argmax of the decoder's logits (block maxima, then the first index holding the largest) returns the
    scan's index: ties to the first (within a block and across the 512-value blocks), NaN lanes skipped, a NaN at 0
    kept, -inf, +0 / -0 ties, lengths that leave vector and block tails, and a length of 1."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for n in (1, 2, 15, 16, 17, 511, 512, 513, 1040, 49152):
        x = torch.randn(n, generator=g)
        cases.append(x)
        t = x.clone()                               # ties: the maximum copied to later places, across blocks
        t[torch.randint(0, n, (3,), generator=g)] = t.max()
        cases.append(t)
        r = torch.randint(-2, 3, (n,), generator=g).float()   # many ties of small integers
        cases.append(r)
        nan = x.clone()
        nan[torch.rand(n, generator=g) < 0.3] = float("nan")
        cases.append(nan)
    z = torch.zeros(600)
    z[0], z[5], z[520] = -0.0, 0.0, -0.0            # every value 0: the first wins
    cases += [z, -z.abs() - 1.0]
    w = torch.full((700,), float("-inf"))
    cases.append(w)
    w2 = w.clone()
    w2[650] = -1e30
    cases.append(w2)
    lead = torch.randn(40, generator=g)
    lead[0] = float("nan")                          # a NaN at 0: nothing beats it
    cases.append(lead)
    big = torch.randn(2000, generator=g)
    big[1999] = float("nan")
    big[1500] = 100.0
    cases.append(big)
    for isa in C.supported_isas():
        for x in cases:
            assert ext.argmax(x, C.isa_id(isa)) == _scan_argmax(x.tolist()), (isa, x.numel())


def test_default_isa_runs_the_best_build_or_the_one_named_by_the_environment(ext, monkeypatch):
    """isa=None runs the best build this CPU has (the counters of ext.isa_runs), or the one $CWIC_CPU_ISA names.
    Mapping None to the scalar twin passed every test (its GEMV is bitwise the SIMD one) and would make every default
    call, the registered ops included, the slow path."""
    g = torch.Generator().manual_seed(0)
    x, wt = torch.randn(2, 32, generator=g), torch.randn(32, 48, generator=g)
    args = (x, wt, torch.zeros(32), torch.rand(3, 32, generator=g), torch.zeros(48), 16)
    monkeypatch.delenv("CWIC_CPU_ISA", raising=False)
    for env in (None,) + tuple(C.supported_isas()):
        if env is not None:
            monkeypatch.setenv("CWIC_CPU_ISA", env)
        want = env or ext.isa_name(ext.best_isa())
        before = {i: ext.isa_runs(C.isa_id(i)) for i in C.supported_isas()}
        C.gemv(*args)
        assert {i: ext.isa_runs(C.isa_id(i)) - before[i] for i in C.supported_isas()} == \
            {i: int(i == want) for i in C.supported_isas()}, env


def test_gemv_takes_a_transposed_view_of_the_weights(ext):
    """The wrapper makes wt contiguous before the binding (which takes contiguous weights only): W.t() of an
    (m, n) Linear weight, a view, gives the same result as its contiguous copy instead of an error."""
    g = torch.Generator().manual_seed(2)
    n, m, s = 40, 24, 8
    W = torch.randn(m, n, generator=g)
    x, mean, thr, bias = torch.randn(3, n, generator=g), torch.zeros(n), torch.rand(m // s, n, generator=g), torch.zeros(m)
    assert not W.t().is_contiguous()
    assert torch.equal(C.gemv(x, W.t(), mean, thr, bias, s), C.gemv(x, W.t().contiguous(), mean, thr, bias, s))


def test_ffn_with_fp16_activations_keeps_the_references_units(ext):
    """x in fp16 with fp32 weights: the reference rounds g and act(g) to fp16 (`act_in_dtype`), which the C++ kernel
    does for bf16 x only. The wrapper sent this input to C++ anyway (it checked the weights' dtype), and a unit whose
    threshold lies between the fp16-rounded |a| and the unrounded one went the other way (found by the C++ audit: 64
    weights fewer read, an output off by 0.5 of 4). Now such an input takes the reference path."""
    from kernel_checks import assert_ffn_follows_the_model
    d, F_, s, B = 32, 64, 32, 2
    g = torch.Generator().manual_seed(41)
    x = torch.randn(B, d, generator=g).half()
    gw = torch.randn(d, F_, generator=g) / 4
    mean, thr = torch.zeros(d), torch.rand(F_ // s, d, generator=g) * 0.5
    gb = torch.randn(F_, generator=g) * 0.1
    up, dn = torch.randn(F_, d, generator=g) / 4, torch.randn(F_, d, generator=g) / 4
    g32 = R.gemv_reference(x.float(), gw, mean, thr, gb, s)
    am, aw = R.act_in_dtype(g32, "silu", torch.float16).abs(), R.ACTIVATIONS["silu"](g32).abs()
    b, j = divmod(int((am - aw).abs().argmax()), F_)
    assert float((am - aw)[b, j].abs()) > 1e-4 * float(am[b, j])
    ut = torch.zeros(F_)
    ut[j] = (am[b, j] + aw[b, j]) / 2
    args = [x, gw, mean, thr, gb, s, up, dn, ut]
    assert_ffn_follows_the_model(C.ffn(*args), args, [(b, j, bool(am[b, j] >= ut[j]))])


@pytest.mark.parametrize("alias,name", [("swish", "silu"), ("gelu_new", "gelu_pytorch_tanh")])
def test_activation_aliases_work_with_and_without_the_extension(ext, monkeypatch, alias, name):
    """Hugging Face's aliases (hidden_act "swish", "gelu_new") are the activations they name in the C++ kernels, in
    the reference and in the Triton launchers' ids; without a compiler the wrapper's reference path raised KeyError
    on them (found by the C++ audit)."""
    from cwic_kernels.gpu.gemv import ACT_IDS
    args = _ffn_inputs(2, 64, 160, 32, torch.float32, seed=5)
    want = C.ffn(*args, act=name)
    assert torch.equal(C.ffn(*args, act=alias), want)
    assert torch.equal(R.ffn_reference(*args, act=alias), R.ffn_reference(*args, act=name))
    assert ACT_IDS[alias] == ACT_IDS[name]
    monkeypatch.setattr(C, "load", lambda: None)
    torch.testing.assert_close(C.ffn(*args, act=alias), want, rtol=1e-5, atol=1e-5)


def test_relu_keeps_a_nan(ext):
    """The kernels' relu was `v > 0 ? v : 0`, which gives 0 for a NaN: a NaN gate unit was switched off where F.relu
    (the reference) keeps it (found with the Triton audit's relu bug). Every ISA, the activation alone and the FFN."""
    for isa in C.supported_isas():
        assert torch.isnan(ext.act(torch.tensor([float("nan"), -1.0]), "relu", C.isa_id(isa))[0]), isa
    x, gw, gm, gt, gb, s, up, dn, ut = _ffn_inputs(1, 64, 160, 32, torch.float32, seed=9)
    gb = gb.clone()
    gb[7] = float("nan")
    assert torch.isnan(R.ffn_reference(x, gw, gm, gt, gb, s, up, dn, ut, act="relu")).all()
    for isa in C.supported_isas():
        assert torch.isnan(C.ffn(x, gw, gm, gt, gb, s, up, dn, ut, act="relu", isa=isa)).all(), isa


def test_missing_kernels_fail_where_they_are_required(monkeypatch):
    """CI sets CWIC_REQUIRE_CPU_KERNELS=1: without the extension every C++ test would otherwise be skipped, green."""
    monkeypatch.setattr(C, "load", lambda: None)
    monkeypatch.setenv("CWIC_REQUIRE_CPU_KERNELS", "1")
    with pytest.raises(pytest.fail.Exception, match="C\\+\\+ kernels unavailable"):
        cpu_kernels_or_skip()
    monkeypatch.delenv("CWIC_REQUIRE_CPU_KERNELS")
    with pytest.raises(pytest.skip.Exception):
        cpu_kernels_or_skip()
