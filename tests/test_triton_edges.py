"""The Triton kernels' edge cases, from a mutant audit (2026-12-05): each test pins one rule of the kernels that the
other tests (test_triton_kernels.py, test_gemv_compact.py, test_prefill.py, test_engine_host.py) let a plausible
one-token edit break without failing. Small shapes, CPU interpreter (TRITON_INTERPRET=1), deterministic inputs.

The boundary cases are built so that the kernel and the reference see the same fp32 bits (a threshold equal to
|x - mean| as computed in fp32, a gate whose every input is off so that g is its bias exactly), so an exact
comparison of the mask decisions is meaningful and no tolerance hides a flipped decision.
"""
from __future__ import annotations

import torch
from kernel_checks import DEV, _gen, _inputs  # before triton

import pytest  # noqa: E402

from cwic_kernels import reference as ref  # noqa: E402

triton = pytest.importorskip("triton")
from cwic_kernels.gpu import decode as D  # noqa: E402
from cwic_kernels.gpu import ffn_fused as FF  # noqa: E402
from cwic_kernels.gpu import gemv as G  # noqa: E402
from cwic_kernels.gpu import gemv_compact as C  # noqa: E402

pytestmark = pytest.mark.triton


def _thr_at_the_boundary(x, mean, k):
    """(k, n) thresholds equal to |x - mean| as fp32 computes it (one token): every pair sits exactly on its
    threshold, which `reference.granular_mask` counts as on (not below)."""
    return (x[0].float() - mean.float()).abs().expand(k, -1).contiguous()


@pytest.mark.parametrize("path", ["masked", "compact", "compact-fused", "batch"])
def test_a_pair_exactly_at_its_threshold_is_on(path):
    """|x - mean| == thr is on (`>=`, as the reference's `~(|xc| < thr)`): every pair at its threshold gives the
    dense product, not the bias. No existing test puts an input exactly on its threshold, so `>` in `_mask_x`
    (one token, both compacting modes) or in the batch tile's mask passed them all."""
    n, m, stripe = 64, 48, 16
    x, wt, mean, _, bias = _inputs(1, n, m, stripe, torch.float32, seed=101)
    k = -(-m // stripe)
    thr = _thr_at_the_boundary(x, mean, k)
    if path == "batch":   # two tokens, the same row twice: a batch tile (a block of 2 by default)
        x = torch.cat([x, x])
    want = ref.gemv_reference(x, wt, mean, thr, bias, stripe)
    on = torch.ones(x.shape[0], k, n, dtype=torch.bool, device=x.device)   # on x's device (the GPU run: cuda)
    assert torch.equal(ref.granular_mask(x, mean, thr), on)
    if path.startswith("compact"):
        cfg = C.compact_config(n, m, stripe, torch.device(DEV), chunk=32, fused=path.endswith("fused"))
        y = C.gemv_compact(x, wt, mean, thr, bias, stripe, config=cfg)
    else:
        y = G.gemv_ex(x, wt, mean, thr, bias, stripe, compact=False)
    torch.testing.assert_close(y, want, rtol=2e-5, atol=2e-5)


def _off_gate(d, F_, stripe, dtype, bias, seed):
    """A gate whose every input is off (thresholds +inf): g is the folded bias exactly, in every kernel."""
    x, gwt, gmean, gthr, _ = _inputs(1, d, F_, stripe, dtype, seed=seed)
    return x, gwt, gmean, torch.full_like(gthr, float("inf")), bias.to(DEV)


def test_a_unit_exactly_at_its_threshold_is_on():
    """|a| == unit_thr keeps the unit (`reference.ffn_reference`: off only when |a| < unit_thr), in the GEMV's
    epilogue and in the one-launch FFN's gate. With relu and every gate input off, a = relu(bias) exactly, so
    unit_thr = |a| puts every positive unit on its threshold; `>` dropped them all, unseen by the existing tests
    (random thresholds never equal |a|)."""
    d, F_, stripe = 32, 64, 32
    g = _gen(102)
    gb = torch.randn(F_, generator=g)
    x, gwt, gmean, gthr, gb = _off_gate(d, F_, stripe, torch.float32, gb, seed=102)
    uthr = gb.clamp_min(0.0)                                            # = |relu(g)|
    a = G.gemv_ex(x, gwt, gmean, gthr, gb, stripe, act="relu", unit_thr=uthr, compact=False)
    assert torch.equal(a[0], gb.clamp_min(0.0))
    ac = G.gemv_ex(x, gwt, gmean, gthr, gb, stripe, act="relu", unit_thr=uthr, compact=True)
    assert torch.equal(ac[0], gb.clamp_min(0.0))
    up_w = (torch.randn(F_, d, generator=g) / d ** 0.5).to(DEV)
    down_wt = (torch.randn(F_, d, generator=g) / F_ ** 0.5).to(DEV)
    args = (x, gwt, gmean, gthr, gb, stripe, up_w, down_wt, uthr, "relu")
    want = ref.ffn_reference(*args)
    assert want.abs().max() > 0.1                                       # the units at their thresholds matter
    y = FF.ffn_gate_updown(*args, residual=torch.zeros(1, d, device=DEV))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_bf16_act_rounds_ties_to_even():
    """`_in_dtype` rounds fp32 to bf16 to nearest, ties to even, as torch does (the interpreter's own cast
    truncates). g = 1 + 3·2⁻⁸ lies halfway between the bf16 neighbours 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶ (even): the
    model's gate output is 1 + 2⁻⁶. Dropping the `(u >> 16) & 1` term (ties always down) kept every existing
    test passing: random sums are practically never exact ties."""
    d, F_, stripe = 32, 32, 32
    tie = 1.0 + 3 * 2.0 ** -8
    gb = torch.full((F_,), tie)
    gb[1::2] = -tie                                                     # relu: those units off
    x, gwt, gmean, gthr, gb = _off_gate(d, F_, stripe, torch.bfloat16, gb, seed=103)
    want = ref.act_in_dtype(gb[None], "relu", torch.bfloat16)
    assert float(want[0, 0]) == 1.0 + 2.0 ** -6
    uthr = torch.zeros(F_, device=DEV)
    for compact in (False, True):
        a = G.gemv_ex(x, gwt, gmean, gthr, gb, stripe, act="relu", unit_thr=uthr, compact=compact)
        assert torch.equal(a.float(), want), compact


@pytest.mark.parametrize("path", ["masked", "masked-split", "compact"])
def test_count_of_a_partial_last_stripe(path):
    """count=: a partial last stripe (m = 40, stripe 16: 8 columns) adds its active inputs × 8, not × BLOCK_M
    (`reference.gemv_active_params`). The existing count test's shapes (80 / 16, 96 / 32) have whole stripes only,
    so counting the last output block as full (`ncol = BLOCK_M`) passed it."""
    n, m, stripe = 64, 40, 16
    x, wt, mean, thr, bias = _inputs(1, n, m, stripe, torch.float32, seed=107)
    want = int(ref.gemv_active_params(x, mean, thr, m, stripe)[0])
    count = torch.zeros(1, dtype=torch.int64, device=DEV)
    if path == "compact":
        y = G.gemv_ex(x, wt, mean, thr, bias, stripe, compact=True, count=count)
    else:
        cfg = G.gemv_config(1, n, m, stripe, x.device, block_m=16, block_n=16,
                            max_split=2 if path.endswith("split") else 1)
        y = G.gemv_ex(x, wt, mean, thr, bias, stripe, config=cfg, compact=False, count=count)
    assert int(count) == want, (int(count), want)
    torch.testing.assert_close(y, ref.gemv_reference(x, wt, mean, thr, bias, stripe), rtol=1e-5, atol=1e-5)


def test_attention_keeps_a_running_max_over_key_blocks():
    """The online softmax subtracts the running maximum of the scores, not the current block's: a later key block
    whose scores are far below the first one's must not scale the sums by exp(m_old - m_block) (overflow to inf,
    then inf / inf = NaN). Scores ±100 in two blocks of 4 keys; the existing inputs (randn · 0.25) never exceed
    exp's range, so a kernel that forgot the running maximum matched them."""
    hd, L, p = 16, 8, 7
    g = _gen(106)
    q = torch.randn(1, hd, generator=g)
    q = q / q.norm() * 10
    kc = torch.empty(L, 1, hd)
    kc[:4, 0] = q * 1.0                                                  # scores +100
    kc[4:, 0] = -q * 1.0                                                 # scores -100
    vc = torch.randn(L, 1, hd, generator=g)
    q, kc, vc = q.to(DEV), kc.to(DEV), vc.to(DEV)
    pos = torch.tensor([p], device=DEV)
    want = D.decode_attention_ref(q, kc, vc, pos, 1, 1.0)
    assert torch.isfinite(want).all()
    o = D.decode_attention(q, kc, vc, pos, 1, 1.0, block_t=4)
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-5)


def test_relu_of_a_nan_gate_is_nan_in_fp32():
    """relu was `tl.maximum(y, 0)`, which gives 0 for a NaN: a NaN gate unit was switched off where F.relu (the
    reference) keeps the NaN. fp32 (bf16 with every NaN payload: test_triton_kernels'
    test_a_gate_nan_with_any_payload_stays_nan_in_bf16)."""
    d, F_, s = 32, 32, 32
    gb = torch.ones(F_)
    gb[3] = float("nan")
    x, gwt, gmean, gthr, gb = _off_gate(d, F_, s, torch.float32, gb, seed=1)
    a = G.gemv_ex(x, gwt, gmean, gthr, gb, s, act="relu", unit_thr=torch.zeros(F_, device=DEV), compact=False)
    assert torch.isnan(ref.act_in_dtype(gb[None], "relu", torch.float32)[0, 3])
    assert torch.isnan(a[0, 3]) and not torch.isnan(a[0, :3]).any(), a[0, :4]
