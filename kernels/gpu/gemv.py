"""Triton granular sparse GEMV (METHOD.md §10) and the fused FFN built from it.

Semantics: `cwic_kernels.reference` (gemv_reference, ffn_reference). Layout: weights input-major
(`wt` (n, m) = Wᵀ), so a (stripe, input) pair is one contiguous run of `stripe` outputs and an
inactive pair is a masked load that never reaches memory.

One program owns BLOCK_M outputs (inside one stripe: BLOCK_M divides the stripe) and a chunk of the
inputs (split-K). It computes the mask of each input from x, the running mean and the stripe's
threshold, takes the union over the tokens of its batch block (so a pair is skipped only when every
token skips it; masked tokens still get exactly their own product), loads only the active rows and
accumulates in fp32. Split-K partials go to a workspace; the last program of an output block (a
per-block arrival counter, reset by that program: no memset, CUDA-graph safe) sums them and runs the
epilogue: + folded bias, optional activation and unit mask (the FFN gate), optional residual.

Batches: BLOCK_B = 1 for one token (fp32 FMA reduction); 2 or 4 for the small blocks of `small_block` (2 tokens,
and 3-4 tokens of some shapes: fp32 products); 16 otherwise (tensor-core dot; x - x̄ is split into bf16 hi + lo
parts so the product keeps fp32-level accuracy). Any batch size is correct: the grid has one batch block per
BLOCK_B tokens and each block takes the union of its own tokens' masks. Both loops can
run software-pipelined (config `pipe`: the next block's masks and weight rows in flight while the current one is
reduced); a batch block's loop is by default. From `DENSE_W_FROM` tokens on (config `dense_w`), a batch block reads
every weight row instead and applies the masks to x alone: the same product, with weight loads that do not wait
for the masks, which the compiler pipelines; at 3x APR such a union reads most rows anyway, and the dense reads
were faster on an H100.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton
import triton.language as tl

from ..reference import ACT_KINDS

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTO_COMPACT = os.environ.get("CWIC_GEMV_COMPACT", "1") != "0"   # 0: gemv_ex never picks gemv_compact itself
FUSED_FFN = os.environ.get("CWIC_FFN_FUSED", "1") != "0"           # 0: ffn never uses ffn_fused.ffn_updown
FUSED_GATE = os.environ.get("CWIC_FFN_GATE_FUSED", "1") != "0"     # 0: the fused one-token FFN keeps its own gate launch
ACT_IDS = {None: -1, **{name: ("silu", "gelu", "gelu_tanh", "relu").index(kind) for name, kind in ACT_KINDS.items()}}
MASK_THRESHOLD, MASK_NONZERO, MASK_NONE = 0, 1, 2
PDL = os.environ.get("CWIC_PDL", "1") != "0"   # 0: no programmatic dependent launches (A/B runs)
# The L2 policy of the weight loads. "evict_first" costs instructions: ptxas rebuilds the cache-policy descriptor
# for every load (six uniform-datapath instructions each; 604 → 565 instructions a gate step of the one-launch FFN
# without it, sm_90 SASS of Triton 3.6), yet decode on the H200 was 5 % slower without it
# (experiments/results/gpu_h200/ffn_structure_2026-12-03/). CWIC_EVICT_FIRST=0: plain loads (A/B runs).
EVICT_W: tl.constexpr = tl.constexpr("evict_first" if os.environ.get("CWIC_EVICT_FIRST", "1") != "0" else "")

try:  # programmatic dependent launch (Hopper+)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None
_PDL_OK: dict = {}
_PDL_OFF = threading.local()


@contextlib.contextmanager
def plain_launches(on: bool = True):
    """Launch without PDL inside this block (when `on`): for a call whose constant operands (thresholds, means,
    norm weights, biases) were produced by the kernel just before, e.g. a dtype conversion, since PDL kernels
    read those before waiting for their predecessor."""
    prev = getattr(_PDL_OFF, "on", False)
    _PDL_OFF.on = prev or on
    try:
        yield
    finally:
        _PDL_OFF.on = prev


def use_pdl(device: torch.device) -> bool:
    """Whether kernels launched on `device` use programmatic dependent launch (PDL): a CUDA device of compute
    capability 9.0+ (Hopper), a Triton with `gdc_wait`, not the interpreter, and CWIC_PDL not 0.

    With PDL a kernel's grid is launched while the previous kernel still runs; its programs wait in
    `_pdl_enter` (griddepcontrol.wait: the previous grid has finished and its writes are visible) before
    touching memory, then let the next kernel launch. Each kernel waits before its first load or store,
    so the order of effects is that of plain stream order; what is saved is the launch latency and the
    grid ramp-up between two dependent kernels, which at batch 1 is a large part of a few-µs kernel. The one
    exception: the CWIC GEMVs load their constant operands (running mean, thresholds, norm weights: `_mask_pre`)
    before the wait, so those must not be written by the kernel launched just before (no kernel writes them;
    `DecodeEngine.refresh` updates them between steps, and a step starts with the embedding lookup; the
    `cwic::` custom ops launch without PDL when they had to convert them: `plain_launches`)."""
    if not PDL or INTERPRET or gdc_wait is None or device.type != "cuda" or getattr(_PDL_OFF, "on", False):
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL_OK:
        _PDL_OK[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL_OK[idx]


def pdl_kw(on: bool) -> dict:
    """Launch options of a kernel whose USE_PDL is `on`."""
    return {"launch_pdl": True} if on else {}


def pdl_args(device: torch.device) -> dict:
    """A kernel's USE_PDL argument and launch options on `device` (`use_pdl`), for `kernel[grid](..., **pdl_args)`."""
    on = use_pdl(device)
    return {"USE_PDL": on, **pdl_kw(on)}


@triton.jit
def _pdl_enter(USE_PDL: tl.constexpr):
    """First statement of every kernel that may be launched with PDL: wait for the previous grid (its
    writes visible), then allow the next grid to launch (its programs wait here in turn)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _in_dtype(y, ACT: tl.constexpr):
    """fp32 y rounded to bf16 (ACT + 16) or fp16 (ACT + 32) and back; unchanged for an fp32 model."""
    if ACT >= 32:
        y = y.to(tl.float16).to(tl.float32)
    elif ACT >= 16:   # to nearest even in integer ops: Triton's interpreter truncates an fp32 -> bf16 cast
        u = y.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        # a NaN stays NaN: the add carries a NaN with low payload bits set (the GPU's own NaN is 0x7FFFFFFF) into -0
        y = tl.where(y != y, y, u.to(tl.float32, bitcast=True))
    return y


@triton.jit
def _act(y, ACT: tl.constexpr):
    """act(y) for the codes of `act_code`, as `reference.act_in_dtype`: + 16 / + 32 round y to bf16 / fp16 first
    (the gate's output in the model's dtype) and the result after (the activation module's output, which the
    model's unit mask sees)."""
    y = _in_dtype(y, ACT)
    A: tl.constexpr = ACT % 16
    if A == 0:
        y = y * tl.sigmoid(y)
    elif A == 1:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif A == 2:
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y * tl.sigmoid(2.0 * inner)          # 0.5·(1 + tanh(u)) = sigmoid(2u)
    elif A == 3:
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)   # a NaN stays NaN, as F.relu has it
    return _in_dtype(y, ACT)


def act_code(act: str | None, x_dtype: torch.dtype) -> int:
    """The kernels' ACT constexpr: the activation's id, + 16 (bf16 x) or + 32 (fp16 x) so that the gate's fp32 sum
    and the activation are rounded to x's dtype (`_act`); -1 without an activation."""
    base = ACT_IDS[act]
    if base < 0:
        return base
    return base + {torch.bfloat16: 16, torch.float16: 32}.get(x_dtype, 0)


@triton.jit
def _rstd(XR, N, eps, NB: tl.constexpr):
    """1 / RMS of one token's row of N (≤ NB) values: the fused RMSNorm's scale. Same formula as
    decode.rmsnorm, but the sum of squares is reduced in the consuming kernel's thread layout, so the last
    bit of rstd (and, rarely, a threshold decision) can differ from the separate kernel's."""
    offs = tl.arange(0, NB)
    return _rstd_of(tl.load(XR + offs, mask=offs < N, other=0.0), N, eps)


@triton.jit
def _rstd_of(x, N, eps):
    """`_rstd` of a row already loaded (zeros past N), in any float dtype."""
    xf = x.to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)


@triton.jit
def _mask_pre(MEANR, THRR, rows, n_hi, MASK_MODE: tl.constexpr, NWR, NORM: tl.constexpr):
    """The constant operands of `_mask_post` for a block of inputs: running mean, threshold, norm weight. A
    kernel launched with PDL loads them before `_pdl_enter`, while the previous kernel still runs."""
    nmask = rows < n_hi
    zero = tl.zeros(rows.shape, dtype=tl.float32)
    w = zero
    mu = zero
    t = zero
    if NORM:
        w = tl.load(NWR + rows, mask=nmask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    if MASK_MODE == 0:
        mu = tl.load(MEANR + rows, mask=nmask, other=0.0, eviction_policy="evict_last")
        t = tl.load(THRR + rows, mask=nmask, other=0.0, eviction_policy="evict_last")
    return mu, t, w


@triton.jit
def _load_h(X, XACC, offs, mask, X_ACC: tl.constexpr):
    """x[offs] in x's dtype; X_ACC: plus the fp32 sum XACC left by a `gemv_ex(acc_out=...)` (or the one-launch
    FFN's `y_acc`), rounded to x's dtype as that kernel's epilogue would round (sum + residual)."""
    x = tl.load(X + offs, mask=mask, other=0.0)
    if X_ACC:
        x = (tl.load(XACC + offs, mask=mask, other=0.0) + x.to(tl.float32)).to(X.dtype.element_ty)
    return x


@triton.jit
def _mask1(XR, MEANR, THRR, rows, n_hi, MASK_MODE: tl.constexpr, NWR, rstd, NORM: tl.constexpr, XACCR,
           X_ACC: tl.constexpr):
    """One token: (x - x̄ where the (stripe, input) pair is on else 0, on) for a block of inputs.
    NORM: x is the raw residual stream, normalised here as decode.rmsnorm does (x · rstd · w, rounded
    to x's dtype). X_ACC: x is XR + XACCR rounded (`_load_h`)."""
    mu, t, w = _mask_pre(MEANR, THRR, rows, n_hi, MASK_MODE, NWR, NORM)
    return _mask_post(XR, rows, n_hi, mu, t, w, rstd, MASK_MODE, NORM, XACCR, X_ACC)


@triton.jit
def _mask_post(XR, rows, n_hi, mu, t, w, rstd, MASK_MODE: tl.constexpr, NORM: tl.constexpr, XACCR,
               X_ACC: tl.constexpr):
    """`_mask1` given its constant operands (`_mask_pre`)."""
    x = _load_h(XR, XACCR, rows, rows < n_hi, X_ACC)
    return _mask_x(x, rows, n_hi, mu, t, w, rstd, MASK_MODE, NORM)


@triton.jit
def _mask_x(x, rows, n_hi, mu, t, w, rstd, MASK_MODE: tl.constexpr, NORM: tl.constexpr):
    """`_mask_post` given x = XR[rows] already loaded (in XR's dtype): a kernel loads its first block of x
    together with the fused norm's loads, so the two round trips overlap."""
    nmask = rows < n_hi
    if NORM:
        x = (x.to(tl.float32) * rstd * w).to(x.dtype)
    x = x.to(tl.float32)
    if MASK_MODE == 0:
        xc = x - mu
        on = ((tl.abs(xc) >= t) | (xc != xc)) & nmask   # a NaN is on: it reaches the output (reference.py)
    elif MASK_MODE == 1:
        xc = x
        on = x != 0.0
    else:
        xc = x
        on = nmask
    return tl.where(on, xc, 0.0), on


@triton.jit
def _load_rows(WT, rows, cols, M, on, cmask, EVEN_M: tl.constexpr):
    """The weight rows of the active inputs; an inactive row is a masked load that never happens."""
    wmask = on[:, None]
    if not EVEN_M:
        wmask = wmask & cmask[None, :]
    return tl.load(WT + rows.to(tl.int64)[:, None] * M + cols[None, :], mask=wmask, other=0.0,
                   eviction_policy=EVICT_W)


@triton.jit
def _batch_block(X, WT, MEANR, THRR, bs, bmask, n0, n_hi, cols, cmask, M, stride_xb, BLOCK_N: tl.constexpr,
                 MASK_MODE: tl.constexpr, EVEN_M: tl.constexpr, DENSE_W: tl.constexpr = False):
    """One block of BLOCK_N inputs of a batch block: (the tokens' x - x̄ where their pair is on, else 0;
    the weight rows on for some token of the block, the union: a row no token uses is never loaded).
    DENSE_W: every row of the block is loaded, so the weight loads do not wait for the masks and the compiler can
    pipeline them; for batches whose union reads nearly every row anyway. The product is the same for finite
    weights (an off pair's x is 0); a non-finite weight in a row no token uses then reaches the output as NaN."""
    rows = n0 + tl.arange(0, BLOCK_N)
    nmask = rows < n_hi
    xm = bmask[:, None] & nmask[None, :]
    x = tl.load(X + bs[:, None] * stride_xb + rows[None, :], mask=xm, other=0.0).to(tl.float32)
    if MASK_MODE == 0:
        mu = tl.load(MEANR + rows, mask=nmask, other=0.0, eviction_policy="evict_last")
        t = tl.load(THRR + rows, mask=nmask, other=0.0, eviction_policy="evict_last")
        xc = x - mu[None, :]
        g = ((tl.abs(xc) >= t[None, :]) | (xc != xc)) & xm
    elif MASK_MODE == 1:
        xc = x
        g = x != 0.0
    else:
        xc = x
        g = xm
    xc = tl.where(g, xc, 0.0)
    if DENSE_W:
        wmask = nmask[:, None] & cmask[None, :]
    else:
        on = tl.max(g.to(tl.int32), axis=0) > 0      # union over this block's tokens
        wmask = on[:, None]
        if not EVEN_M:
            wmask = wmask & cmask[None, :]
    w = tl.load(WT + rows.to(tl.int64)[:, None] * M + cols[None, :], mask=wmask, other=0.0,
                eviction_policy=EVICT_W)
    return xc, w


@triton.jit
def _batch_dot(xc, w, acc, DOT_F32: tl.constexpr):
    """acc + xc @ w with fp32-level accuracy: x - x̄ split into hi + lo parts in w's dtype (tensor cores), or
    fp32 products (fp32 weights, or the CPU interpreter, whose bf16 dot is unusable)."""
    if DOT_F32:
        hi = xc.to(w.dtype).to(tl.float32)
        lo = (xc - hi).to(w.dtype).to(tl.float32)
        wf = w.to(tl.float32)
        acc += tl.dot(hi, wf, input_precision="ieee")
        acc += tl.dot(lo, wf, input_precision="ieee")
    else:
        hi = xc.to(w.dtype)
        lo = (xc - hi.to(tl.float32)).to(w.dtype)
        acc = tl.dot(hi, w, acc)
        acc = tl.dot(lo, w, acc)
    return acc


@triton.jit
def _batch_mac(xc, w, acc, DOT_F32: tl.constexpr, BLOCK_B: tl.constexpr):
    """acc + xc @ w for a batch block: tensor-core dots (`_batch_dot`) for blocks of 16 tokens; fp32 products
    summed over the block's inputs for the small blocks of 2 or 4 tokens (`gemv_config(block_b=...)`), which
    then need not pad to the 16 rows tl.dot takes. The product is a (BLOCK_B, BLOCK_N, BLOCK_M) tensor in registers:
    a block of 8 spilled on the H100, so 8 is not offered."""
    if BLOCK_B >= 16:
        acc = _batch_dot(xc, w, acc, DOT_F32)
    else:
        acc += tl.sum(xc[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _gmm_kernel(X, WT, MEAN, THR, BIAS, RES, UTHR, Y, WS, CNT, NW,
                B, N, M, STRIPE, CHUNK_N,
                stride_xb, stride_mk, stride_rb, stride_yb, eps,
                POS, COS, SIN, QO, KC, VC, HQ, HKV, stride_c,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                SPLIT: tl.constexpr, MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_RES: tl.constexpr, ACT: tl.constexpr, EVEN_M: tl.constexpr,
                DOT_F32: tl.constexpr, PIPE: tl.constexpr, NORM: tl.constexpr, NB: tl.constexpr,
                DENSE_W: tl.constexpr = False,
                USE_PDL: tl.constexpr = False, ROPE: tl.constexpr = False, ACC_OUT: tl.constexpr = False,
                XACC=None, XOUT=None, X_ACC: tl.constexpr = False, X_OUT: tl.constexpr = False,
                NREAD=None, COUNT: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    col0 = pid_m * BLOCK_M
    cols = col0 + tl.arange(0, BLOCK_M)
    cmask = cols < M
    r = col0 // STRIPE                                   # this block's stripe
    bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = bs < B
    n_lo = pid_k * CHUNK_N
    n_hi = tl.minimum(n_lo + CHUNK_N, N)
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    omask = bmask[:, None] & cmask[None, :]
    if BLOCK_B == 1:   # one token: the first block's mean, thresholds, norm weights load before the PDL wait
        rows = n_lo + tl.arange(0, BLOCK_N)
        mu, t, nw = _mask_pre(MEAN + r * stride_mk, THR + r * N, rows, n_hi, MASK_MODE, NW, NORM)
    _pdl_enter(USE_PDL)
    if BLOCK_B == 1:   # the first block of x, in flight together with the fused norm's loads of all of x, and the
        # epilogue's operands (bias, unit thresholds, residual), loaded now rather than after the split-K arrival
        # (X_ACC, one token: x is X + XACC rounded, `_load_h`; X_OUT: program (0, 0) writes that x to XOUT)
        x0 = _load_h(X + pid_b * stride_xb, XACC, rows, rows < n_hi, X_ACC)
        eb, eu, er = _epi_loads(BIAS, RES, UTHR, bs, cols, cmask, omask, stride_rb, HAS_BIAS, HAS_RES, ACT)
    rstd = 1.0
    if X_ACC:                                            # (one token only) all of x + XACC: the norm's scale, XOUT
        offs = tl.arange(0, NB)
        xf = _load_h(X, XACC, offs, offs < N, True)
        if NORM:
            rstd = _rstd_of(xf, N, eps)
        if X_OUT:
            if (pid_m == 0) & (pid_k == 0):
                tl.store(XOUT + offs, xf, mask=offs < N)
    elif NORM:                                           # (one token only) fused RMSNorm of x
        rstd = _rstd(X, N, eps, NB)
    if PIPE and BLOCK_B == 1:
        # two-stage software pipeline: the next block's mask and weight loads are in flight while the
        # current block is multiplied, so a program waits about one memory round trip per block, not two
        xc, on = _mask_x(x0, rows, n_hi, mu, t, nw, rstd, MASK_MODE, NORM)
        w = _load_rows(WT, rows, cols, M, on, cmask, EVEN_M)
        if COUNT:
            nact = tl.sum(on.to(tl.int32), axis=0)
        for n0 in range(n_lo + BLOCK_N, n_hi, BLOCK_N):
            rows2 = n0 + tl.arange(0, BLOCK_N)
            xc2, on2 = _mask1(X + pid_b * stride_xb, MEAN + r * stride_mk, THR + r * N, rows2, n_hi, MASK_MODE,
                              NW, rstd, NORM, XACC, X_ACC)
            w2 = _load_rows(WT, rows2, cols, M, on2, cmask, EVEN_M)
            if COUNT:
                nact += tl.sum(on2.to(tl.int32), axis=0)
            acc += tl.sum(xc[:, None] * w.to(tl.float32), axis=0)[None, :]
            xc = xc2
            w = w2
        acc += tl.sum(xc[:, None] * w.to(tl.float32), axis=0)[None, :]
    elif BLOCK_B == 1:
        xc, on = _mask_x(x0, rows, n_hi, mu, t, nw, rstd, MASK_MODE, NORM)
        w = _load_rows(WT, rows, cols, M, on, cmask, EVEN_M)
        if COUNT:
            nact = tl.sum(on.to(tl.int32), axis=0)
        mu, t, nw = _mask_pre(MEAN + r * stride_mk, THR + r * N, rows + BLOCK_N, n_hi, MASK_MODE, NW, NORM)
        acc += tl.sum(xc[:, None] * w.to(tl.float32), axis=0)[None, :]
        for n0 in range(n_lo + BLOCK_N, n_hi, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            xc, on = _mask_post(X + pid_b * stride_xb, rows, n_hi, mu, t, nw, rstd, MASK_MODE, NORM, XACC, X_ACC)
            w = _load_rows(WT, rows, cols, M, on, cmask, EVEN_M)
            if COUNT:
                nact += tl.sum(on.to(tl.int32), axis=0)
            mu, t, nw = _mask_pre(MEAN + r * stride_mk, THR + r * N, rows + BLOCK_N, n_hi, MASK_MODE, NW, NORM)
            acc += tl.sum(xc[:, None] * w.to(tl.float32), axis=0)[None, :]
    elif PIPE:   # a batch block, pipelined as above: the next block's x, masks and weight rows are in flight while
        # the current block goes through the tensor cores
        xc, w = _batch_block(X, WT, MEAN + r * stride_mk, THR + r * N, bs, bmask, n_lo, n_hi, cols, cmask, M,
                             stride_xb, BLOCK_N, MASK_MODE, EVEN_M, DENSE_W)
        for n0 in range(n_lo + BLOCK_N, n_hi, BLOCK_N):
            xc2, w2 = _batch_block(X, WT, MEAN + r * stride_mk, THR + r * N, bs, bmask, n0, n_hi, cols, cmask, M,
                                   stride_xb, BLOCK_N, MASK_MODE, EVEN_M, DENSE_W)
            acc = _batch_mac(xc, w, acc, DOT_F32, BLOCK_B)
            xc = xc2
            w = w2
        acc = _batch_mac(xc, w, acc, DOT_F32, BLOCK_B)
    else:
        for n0 in range(n_lo, n_hi, BLOCK_N):
            xc, w = _batch_block(X, WT, MEAN + r * stride_mk, THR + r * N, bs, bmask, n0, n_hi, cols, cmask, M,
                                 stride_xb, BLOCK_N, MASK_MODE, EVEN_M, DENSE_W)
            acc = _batch_mac(xc, w, acc, DOT_F32, BLOCK_B)

    if COUNT:   # (one token) weights read: this chunk's active inputs x this block's columns (every block of the
        # stripe has the same mask, so the blocks of a stripe add up to its rows)
        ncol = tl.minimum(M - col0, BLOCK_M)
        tl.atomic_add(NREAD, nact.to(tl.int64) * ncol, sem="relaxed", scope="gpu")
    if ACC_OUT:   # the partial sums (+ the folded bias, once) go straight into the fp32 Y: no split-K arrival
        if HAS_BIAS:
            acc = tl.where(pid_k == 0, acc + eb[None, :], acc)
        tl.atomic_add(Y + bs[:, None] * stride_yb + cols[None, :], acc, mask=omask, sem="relaxed", scope="gpu")
    elif SPLIT == 1:
        if BLOCK_B != 1:   # (a batch block keeps its (BLOCK_B, BLOCK_M) residual out of the registers of its loop)
            eb, eu, er = _epi_loads(BIAS, RES, UTHR, bs, cols, cmask, omask, stride_rb, HAS_BIAS, HAS_RES, ACT)
        _epi_finish(acc, eb, eu, er, Y, bs, cols, omask, stride_yb, HAS_BIAS, HAS_RES, ACT)
        if ROPE:
            _rope_epilogue(Y, col0, POS, COS, SIN, QO, KC, VC, HQ, HKV, stride_c, BLOCK_M // 2)
    else:
        ws_off = (pid_k * B + bs[:, None]).to(tl.int64) * M + cols[None, :]
        tl.store(WS + ws_off, acc, mask=omask)
        tl.debug_barrier()                               # every thread's partial is written ...
        cidx = pid_b * tl.num_programs(0) + pid_m
        done = tl.atomic_add(CNT + cidx, 1, sem="acq_rel", scope="gpu")   # ... before we arrive
        if done == SPLIT - 1:                            # last to arrive: reduce and finish
            tot = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
            for s in tl.static_range(SPLIT):               # unrolled: all partial loads in flight
                off = (s * B + bs[:, None]).to(tl.int64) * M + cols[None, :]
                tot += tl.load(WS + off, mask=omask, other=0.0, cache_modifier=".cg")
            if BLOCK_B != 1:
                eb, eu, er = _epi_loads(BIAS, RES, UTHR, bs, cols, cmask, omask, stride_rb, HAS_BIAS, HAS_RES, ACT)
            _epi_finish(tot, eb, eu, er, Y, bs, cols, omask, stride_yb, HAS_BIAS, HAS_RES, ACT)
            if ROPE:
                _rope_epilogue(Y, col0, POS, COS, SIN, QO, KC, VC, HQ, HKV, stride_c, BLOCK_M // 2)
            tl.atomic_xchg(CNT + cidx, 0)                # ready for the next launch


@triton.jit
def _rope_epilogue(Y, col0, POS, COS, SIN, QO, KC, VC, HQ, HKV, stride_c, HALF: tl.constexpr):
    """One head of one token's fused q/k/v row: the 2·HALF outputs at col0 this program has just written to Y
    (rounded to Y's dtype), rotated and written as `decode._rope_cache_kernel` does: q heads to QO, k heads
    (rotated) and v heads (as they are) to the caches at position POS[0]."""
    tl.debug_barrier()                                   # the block's y stores are visible to all its threads
    h = col0 // (2 * HALF)
    pos = tl.load(POS)
    d = tl.arange(0, 2 * HALF)
    x = tl.load(Y + col0 + d).to(tl.float32)
    o = x
    if h < HQ + HKV:
        xp = tl.load(Y + col0 + (d + HALF) % (2 * HALF)).to(tl.float32)   # the other half of the pair
        c = tl.load(COS + pos * HALF + d % HALF)
        s = tl.load(SIN + pos * HALF + d % HALF)
        o = tl.where(d < HALF, x * c - xp * s, x * c + xp * s)
        if h < HQ:
            dst = QO + h * (2 * HALF)
        else:
            dst = KC + pos * stride_c + (h - HQ) * (2 * HALF)
    else:
        dst = VC + pos * stride_c + (h - HQ - HKV) * (2 * HALF)
    tl.store(dst + d, o.to(KC.dtype.element_ty))


@triton.jit
def _epi_loads(BIAS, RES, UTHR, bs, cols, cmask, omask, stride_rb,
               HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr):
    """The epilogue's operands: folded bias (BLOCK_M,), unit thresholds (BLOCK_M,), residual (BLOCK_B, BLOCK_M),
    fp32 (zeros where absent). A kernel loads them early, so the epilogue after a split-K arrival waits for
    nothing but the partial sums."""
    eb = tl.zeros(cols.shape, dtype=tl.float32)
    eu = eb
    er = tl.zeros(omask.shape, dtype=tl.float32)
    if HAS_BIAS:
        eb = tl.load(BIAS + cols, mask=cmask, other=0.0)
    if ACT >= 0:
        eu = tl.load(UTHR + cols, mask=cmask, other=0.0)
    if HAS_RES:
        er = tl.load(RES + bs[:, None] * stride_rb + cols[None, :], mask=omask, other=0.0).to(tl.float32)
    return eb, eu, er


@triton.jit
def _epi_finish(acc, eb, eu, er, Y, bs, cols, omask, stride_yb,
                HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr):
    """The epilogue of an output block: acc (+ bias, act + unit mask, + residual; operands from `_epi_loads`) → Y."""
    if HAS_BIAS:
        acc += eb[None, :]
    if ACT >= 0:
        a = _act(acc, ACT)
        acc = tl.where((tl.abs(a) >= eu[None, :]) | (a != a), a, 0.0)
    if HAS_RES:
        acc += er
    tl.store(Y + bs[:, None] * stride_yb + cols[None, :], acc.to(Y.dtype.element_ty), mask=omask)


@triton.jit
def _ffn_up_kernel(X, UP, A, H, B, D, F, stride_xb, stride_ab, stride_hb,
                   BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_F32: tl.constexpr, USE_PDL: tl.constexpr = False):
    """h[b, j] = (W_up[j] · x[b]) · a[b, j]; the row of W_up is read only if some token's a[., j] ≠ 0."""
    _pdl_enter(USE_PDL)
    pid_u = tl.program_id(0)
    pid_b = tl.program_id(1)
    units = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    umask = units < F
    urow = units.to(tl.int64) * D
    if BLOCK_B == 1:
        a = tl.load(A + pid_b * stride_ab + units, mask=umask, other=0.0)
        on = a != 0.0
        acc = tl.zeros((BLOCK_U,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            w = tl.load(UP + urow[:, None] + ds[None, :], mask=on[:, None] & dmask[None, :], other=0.0)
            x = tl.load(X + pid_b * stride_xb + ds, mask=dmask, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(H + pid_b * stride_hb + units, acc * a, mask=umask)
    else:
        bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        bmask = bs < B
        am = bmask[:, None] & umask[None, :]
        a2 = tl.load(A + bs[:, None] * stride_ab + units[None, :], mask=am, other=0.0)
        on = tl.max((a2 != 0.0).to(tl.int32), axis=0) > 0
        acc2 = tl.zeros((BLOCK_B, BLOCK_U), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            w = tl.load(UP + urow[:, None] + ds[None, :], mask=on[:, None] & dmask[None, :], other=0.0)
            x = tl.load(X + bs[:, None] * stride_xb + ds[None, :], mask=bmask[:, None] & dmask[None, :],
                        other=0.0)
            if DOT_F32:
                acc2 += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc2 = tl.dot(x.to(w.dtype), tl.trans(w), acc2)
        tl.store(H + bs[:, None] * stride_hb + units[None, :], acc2 * a2, mask=am)


# --------------------------------------------------------------------------------- launchers

_COUNTERS: dict = {}
_NUM_SMS: dict = {}
COUNTER_SLOTS = 1 << 16


def _counters(device: torch.device) -> torch.Tensor:
    key = (device.type, device.index)
    if key not in _COUNTERS:  # zeroed once; every launch leaves it zeroed again
        _COUNTERS[key] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def _num_sms(device: torch.device) -> int:
    key = (device.type, device.index)
    if key not in _NUM_SMS:
        _NUM_SMS[key] = (torch.cuda.get_device_properties(device).multi_processor_count
                         if device.type == "cuda" else 8)
    return _NUM_SMS[key]


def supports_stripe(stripe: int, m: int) -> bool:
    """The fast path needs output blocks inside one stripe: stripe % 16 == 0, or one stripe (= m)."""
    return stripe % 16 == 0 or stripe >= m


def _block_m(stripe: int, m: int, cap: int) -> int:
    if stripe >= m:                        # one stripe: any block works (≥ 16 for tl.dot)
        return max(16, min(cap, triton.next_power_of_2(m)))
    bm = cap
    while stripe % bm:
        bm //= 2
    return bm


# (n, m, BLOCK_B) -> gemv_config overrides: the best tiles of the sweep at 66% sparsity on an H100
# (experiments/results/gpu_kernels.md); shapes not listed use the defaults below.
TUNED: dict = {
    (2048, 2048, 1): dict(waves=8, max_split=128),
    (2048, 512, 1): dict(block_n=128, waves=4),
    (8192, 2048, 1): dict(waves=8, max_split=128),
    (2048, 3072, 1): dict(waves=8, max_split=128),
    (3072, 5120, 1): dict(waves=4, max_split=128),   # Llama-3.2-3B q/k/v: decode step +2.7 % on an H100
    (4096, 6144, 1): dict(waves=4, max_split=128),   # Llama-3.1-8B q/k/v: +5.5 % (H100)
    # shapes off the decode engine's one-token paths (its FFNs run in one launch), from the kernel table's sweep
    # on an H100 (experiments/results/gpu_h100_2026-12-05_night/kernels/): at least 5 % faster than the defaults.
    # One token of these shapes runs the compacted kernel by default (gemv_compact.TUNED_COMPACT); the entries serve
    # this kernel where it runs instead (compact=False, CWIC_GEMV_COMPACT=0, the kernel table's rows)
    (2048, 8192, 1): dict(waves=8, max_split=128),   # 1B gate/up: -9.4 %
    (8192, 3072, 1): dict(waves=8, max_split=128),   # 3B down: -7.9 %
    (14336, 4096, 1): dict(waves=8, max_split=128),  # 8B down: -21.6 %
    # batch tiles of the union-skipping reads (BLOCK_B 16; by default 2-3 tokens, `DENSE_W_FROM`): the least total
    # time over 2/4/8/16 tokens in the H100 sweep of experiments/bench/gpu_batch_tiles.py
    # (experiments/results/gpu_h100_2026-12-05_night/batch_tiles/). Against the pipelined default tiles: 2048x2048
    # -11 to -12 %, 2048x3072 -17 to -22 %, 2048x8192 -10 to -19 %, 8192x2048 -24 to -31 %
    (2048, 2048, 16): dict(block_n=64),
    (2048, 3072, 16): dict(block_n=64, waves=4, max_split=128),
    (2048, 8192, 16): dict(block_m=128, waves=8, max_split=128),
    (8192, 2048, 16): dict(waves=8, max_split=128),
}


# From this many tokens on, a batch block reads every weight row (`dense_w`) instead of the union of its tokens' rows
# (CWIC_DENSE_W_FROM=T; 0: never). On an H100 (1B shapes, 66 % per-token sparsity, independent random tokens) the
# dense reads, pipelined by the compiler, took 0.61-0.94 of the union reads' time at 4-16 tokens, where that union
# reads 78-99 % of the rows (experiments/results/gpu_h100_2026-12-05_night/batch_dense/). Real tokens share more of
# their sparsity: on SmolLM2 at 3x APR, 4 consecutive tokens' union reads 64 % and 16 tokens' 87 %; at 6x APR 30 % and
# 48 % (experiments/analyses/union_density.py, experiments/results/union_density_smollm2_2026-12-05/). So the default
# suits about 3x APR; a sparser model gains from a larger value (or 0)
DENSE_W_FROM = int(os.environ.get("CWIC_DENSE_W_FROM", "4"))
# Small batch blocks: 2 tokens (and 3-4 tokens of the shapes below) run in blocks of 2 (4) tokens with fp32 products
# and union reads, instead of 16-token tensor-core blocks (CWIC_GEMV_SMALL_B=0: never). On an H100 (1B shapes, 66 %
# per-token sparsity, tokens sharing their sparsity as SmolLM2's do at 3x APR, union 0.49 of the rows at 2 tokens),
# 2 tokens took 0.76-0.87 of the 16-token union reads' time on every shape, and 0.80-1.15 of the dense reads'; 3-4
# tokens gained on the shapes listed (2048x512: 1.12-1.15x over cuBLAS, where every other mode trails it) and lost
# on the FFN shapes (experiments/results/gpu_h100_2026-12-05_eve2/small_blocks/)
SMALL_B = os.environ.get("CWIC_GEMV_SMALL_B", "1") != "0"
SMALL_B_UPTO = {(2048, 512): 4, (2048, 2048): 3, (2048, 3072): 3}   # (n, m) -> the largest batch in blocks of 4
SMALL_B_TILES = dict(block_n=64, num_warps=4)


def small_block(B: int, n: int, m: int) -> int | None:
    """The default small batch block for B tokens of an (n, m) matrix (2 or 4 tokens), or None (16-token blocks)."""
    if not SMALL_B or B < 2:
        return None
    if B == 2:
        return 2
    return 4 if B <= SMALL_B_UPTO.get((n, m), 2) else None


def gemv_config(B: int, n: int, m: int, stripe: int, device: torch.device, **overrides) -> dict:
    """Tile sizes and split-K: enough one-shot tiles to fill the GPU `waves` times (memory-bound),
    each program reading at most CHUNK_N inputs. Overrides: block_b (tokens a batch block: 2, 4 or 16; without
    overrides `small_block` picks it, else 16: any other override alone means a 16-token block), block_m, block_n,
    waves, max_split, num_warps, num_stages, pipe, dense_w (batch blocks: read every weight row, `_batch_block`;
    default: blocks of 16 from `DENSE_W_FROM` tokens on; small blocks read their union); `TUNED[(n, m, BLOCK_B)]`
    supplies them when the caller gives none (one token, or a batch that skips its union); small blocks take
    `SMALL_B_TILES` when the caller gives none."""
    small = None if overrides else small_block(B, n, m)
    bb = 1 if B == 1 else int(overrides.pop("block_b", None) or small or 16)
    if B > 1 and bb not in (2, 4, 16):
        raise ValueError(f"block_b: 2, 4 or 16 tokens a batch block, got {bb}")
    dense_w = bb != 1 and bool(overrides.get("dense_w", bb == 16 and 0 < DENSE_W_FROM <= B))
    if dense_w:   # the best tiles of the H100 sweep on every 1B shape but 2048x512 (there 1-2 % behind the best)
        p = dict(block_m=64, block_n=64, waves=2.0, max_split=64, num_warps=4, num_stages=3, pipe=False)
    else:
        # defaults: the best tiles of the H100 sweep (experiments/results/gpu_kernels.md); a batch block's loop is
        # pipelined (on every 1B shape of the batch sweep, 2-16 tokens, 5-19 % faster than without)
        p = dict(block_m=64, block_n=256 if bb == 1 else 32, waves=2.0, max_split=64, num_warps=4, num_stages=2,
                 pipe=bb != 1)
        if not overrides:   # small blocks (fp32 products, `_batch_mac`) have their own tiles
            p.update(SMALL_B_TILES if 1 < bb < 16 else TUNED.get((n, m, bb), {}))
    p.update(overrides)
    p["dense_w"] = dense_w
    bm = _block_m(stripe, m, p["block_m"])
    bn = p["block_n"]
    grid_m = triton.cdiv(m, bm)
    nb = triton.cdiv(B, bb)
    target = int(p["waves"] * _num_sms(device))
    split = max(1, min(triton.cdiv(target, grid_m * nb), triton.cdiv(n, bn), p["max_split"]))
    chunk = triton.cdiv(triton.cdiv(n, split), bn) * bn
    split = triton.cdiv(n, chunk)
    return dict(BLOCK_B=bb, BLOCK_M=bm, BLOCK_N=bn, SPLIT=split, CHUNK_N=chunk, grid=(grid_m, split, nb),
                num_warps=p["num_warps"], num_stages=p["num_stages"], pipe=bool(p["pipe"]), dense_w=dense_w)


def check_args(x, wt, mean, thr, stripe: int, mask_mode: int, act, out_dtype, bias=None, unit_thr=None):
    """Shapes, layouts and dtypes of a `gemv_ex` / `gemv_compact` call -> (stripes k, stripe, mean's
    stripe stride, output dtype); without thresholds (MASK_NONZERO, MASK_NONE) one stripe of width m.
    bias (m,) and unit_thr (m,) are read as contiguous vectors: a strided or short one is refused."""
    n, m = x.shape[1], wt.shape[1]
    assert wt.shape[0] == n, (x.shape, wt.shape)
    assert x.stride(1) == 1 and wt.is_contiguous()
    for name, v in (("bias", bias), ("unit_thr", unit_thr)):
        assert v is None or (v.dim() == 1 and v.shape[0] == m and v.stride(0) == 1), \
            f"{name} must be a contiguous ({m},) vector, got {tuple(v.shape)} strides {v.stride()}"
    if mask_mode == MASK_THRESHOLD:
        assert thr is not None and mean is not None
        k = thr.shape[0]
        assert k == triton.cdiv(m, stripe) and thr.shape[1] == n and thr.is_contiguous(), (thr.shape, m, stripe)
        assert mean.dtype == torch.float32 and thr.dtype == torch.float32
        assert mean.shape[-1] == n and (mean.dim() == 1 or (mean.dim() == 2 and mean.shape[0] == k)), \
            f"mean must be ({n},) or ({k}, {n}), got {tuple(mean.shape)}"
        stride_mk = 0 if mean.dim() == 1 else mean.stride(0)
        assert mean.stride(-1) == 1
    else:
        k, stripe, stride_mk = 1, m, 0
    assert supports_stripe(stripe, m), f"stripe {stripe} not a multiple of 16"
    if out_dtype is None:
        out_dtype = torch.float32 if act is not None else x.dtype
    return k, stripe, stride_mk, out_dtype


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' storage ranges overlap (the same allocation, intersecting byte ranges)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def gemv_ex(x: torch.Tensor, wt: torch.Tensor, mean: torch.Tensor | None, thr: torch.Tensor | None,
            bias: torch.Tensor | None, stripe: int, *, residual: torch.Tensor | None = None,
            act: str | None = None, unit_thr: torch.Tensor | None = None, mask_mode: int = MASK_THRESHOLD,
            out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
            config: dict | None = None, compact: bool | None = None,
            norm_w: torch.Tensor | None = None, eps: float = 1e-6, rope: tuple | None = None,
            acc_out: torch.Tensor | None = None, x_acc: torch.Tensor | None = None,
            x_out: torch.Tensor | None = None, count: torch.Tensor | None = None) -> torch.Tensor:
    """y = epilogue(GMM(x; wt, mean, thr) + bias): the Triton kernel behind `cwic::gemv`.

    x (B, n) any float dtype; wt (n, m); mean (n,) or per stripe (k, n) fp32; thr (k, n) fp32;
    bias (m,) fp32 or None. mask_mode: MASK_THRESHOLD (granular), MASK_NONZERO (row i used iff some
    x[b, i] ≠ 0: the FFN's down projection), MASK_NONE (dense). act: activation + unit mask
    |act(y)| ≥ unit_thr (output fp32 unless out_dtype says otherwise). residual (B, m) is added last.

    compact: one token through `gemv_compact` (work ∝ density: select the active rows, then read only
    them). None (default): for the shapes of `gemv_compact.TUNED_COMPACT`, where the H100 or H200 sweep found
    it faster than this kernel at 66% sparsity (experiments/results/gpu_kernels_compact.md,
    experiments/results/gpu_h200/kernels_2026-12-04/), unless a
    `config` for this kernel is given, or the environment sets CWIC_GEMV_COMPACT=0 (A/B runs); False:
    never; True: always (B == 1; a `config` for this kernel is then ignored).

    norm_w (n,): x is the raw residual stream and the product takes RMSNorm(x)·norm_w (eps) instead,
    as `decode.rmsnorm` computes it (rounded to x's dtype); for one token the kernels normalise x
    themselves (no separate launch), a batch is normalised first.

    rope = (pos, cos, sin, q_out, kc, vc, hq, hkv): one token of a fused q/k/v product; each output block (the
    config's BLOCK_M must be the head dimension) also applies RoPE and writes q_out and the caches as
    `decode.rope_cache` does (see `gemv_qkv_rope`). Only with this kernel (compact=False).

    acc_out (1, m) fp32: one token, no residual or act: the split-K partials (+ bias) are added into acc_out with
    atomics (no arrival counter, no epilogue; the order of the additions varies) and acc_out is returned. The
    caller zeroes it before and finishes the output (rounding, residual) itself.

    x_acc (1, n) fp32, with acc_out: the input is (x + x_acc) rounded to x's dtype (x_acc: the fp32 sum handed on
    by the previous product, e.g. the one-launch FFN's `y_acc`); x_acc is read, not cleared. x_out (1, n), x's
    dtype, with acc_out: one program also writes that input there (the residual stream, for the layer's FFN).

    count (1,) int64, one token: the weights this product reads (active (stripe, input) pairs × the stripe's
    rows; `check_count`) are added into it on the device, one atomic a program (the decode engine's per-token
    figures for the chat). No host synchronisation.
    """
    B, n = x.shape
    m = wt.shape[1]
    check_count(count, x)
    if x_acc is not None or x_out is not None:
        if acc_out is None:
            raise ValueError("x_acc / x_out: only with acc_out (one token, the masked-load kernel)")
        if x_out is not None and x_acc is None:
            raise ValueError("x_out: only with x_acc (without it the input is x itself)")
        if x_out is not None and (_overlap(x_out, x) or _overlap(x_out, x_acc)):
            raise ValueError("x_out must not share memory with x or x_acc: one program writes it while the "
                             "others still read them")
        if x_acc is not None and not (x_acc.shape == (1, n) and x_acc.dtype == torch.float32
                                      and x_acc.is_contiguous()):
            raise ValueError(f"x_acc: a contiguous (1, {n}) fp32 tensor, got {tuple(x_acc.shape)} {x_acc.dtype}")
        if x_out is not None and not (x_out.shape == (1, n) and x_out.dtype == x.dtype and x_out.is_contiguous()):
            raise ValueError(f"x_out: a contiguous (1, {n}) {x.dtype} tensor, got {tuple(x_out.shape)} {x_out.dtype}")
    if norm_w is not None and B != 1:
        x, norm_w = _norm(x, norm_w, eps), None
    if acc_out is not None:   # (the masked-load kernel: compact=True cannot be honoured)
        assert B == 1 and residual is None and act is None and rope is None and out is None and compact is not True, \
            "acc_out: one token, no epilogue, the masked-load kernel"
        assert acc_out.shape == (1, m) and acc_out.dtype == torch.float32 and acc_out.is_contiguous()
        compact, out, out_dtype = False, acc_out, torch.float32
    if B == 1 and compact is not False and (compact or config is None) and rope is None:
        if compact or (AUTO_COMPACT and (n, m) in _compact.TUNED_COMPACT):
            return _compact.gemv_compact(x, wt, mean, thr, bias, stripe, residual=residual, act=act, unit_thr=unit_thr,
                                  mask_mode=mask_mode, out_dtype=out_dtype, out=out, norm_w=norm_w, eps=eps,
                                  count=count)
    k, stripe, stride_mk, out_dtype = check_args(x, wt, mean, thr, stripe, mask_mode, act, out_dtype, bias,
                                                 unit_thr)
    check_norm(x, norm_w)
    y = out if out is not None else torch.empty((B, m), dtype=out_dtype, device=x.device)
    if B == 0:
        return y
    cfg = config or gemv_config(B, n, m, stripe, x.device)
    if count is not None and cfg["BLOCK_B"] != 1:
        raise ValueError(f"count: a one-token tile (BLOCK_B = 1) is needed; the given config has BLOCK_B = "
                         f"{cfg['BLOCK_B']}")
    if x_acc is not None and cfg["BLOCK_B"] != 1:
        raise ValueError("x_acc: a one-token tile (BLOCK_B = 1) is needed; the given config has "
                         f"BLOCK_B = {cfg['BLOCK_B']}")
    if norm_w is not None and cfg["BLOCK_B"] != 1:   # the batch tiles have no fused norm: normalise first
        x, norm_w = _norm(x, norm_w, eps), None
    grid = cfg["grid"]
    split = cfg["SPLIT"]
    if split > 1 and acc_out is None:
        ws = torch.empty((split, B, m), dtype=torch.float32, device=x.device)
        cnt = _counters(x.device)
        assert grid[0] * grid[2] <= COUNTER_SLOTS
    else:
        ws = cnt = y
    if residual is not None:
        assert residual.shape == (B, m) and residual.stride(1) == 1
    if act is not None:
        assert unit_thr is not None and unit_thr.dtype == torch.float32
    dummy = y
    if rope is not None:
        pos, cos, sin, q_out, kc, vc, hq, hkv = rope
        assert B == 1 and cfg["BLOCK_M"] == kc.shape[-1] and m == (hq + 2 * hkv) * kc.shape[-1], (cfg, m)
        rope_args = (pos, cos, sin, q_out, kc, vc, hq, hkv, kc.stride(0))
    else:
        rope_args = (dummy,) * 6 + (0, 0, 0)
    _gmm_kernel[grid](
        x, wt, mean if mean is not None else dummy, thr if thr is not None else dummy,
        bias if bias is not None else dummy, residual if residual is not None else dummy,
        unit_thr if unit_thr is not None else dummy, y, ws, cnt, norm_w if norm_w is not None else dummy,
        B, n, m, stripe, cfg["CHUNK_N"],
        x.stride(0), stride_mk, residual.stride(0) if residual is not None else 0, y.stride(0), float(eps),
        *rope_args, BLOCK_B=cfg["BLOCK_B"], BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], SPLIT=split,
        MASK_MODE=mask_mode, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        ACT=act_code(act, x.dtype), EVEN_M=(m % cfg["BLOCK_M"] == 0),
        DOT_F32=(INTERPRET or wt.dtype == torch.float32), PIPE=cfg.get("pipe", False),
        DENSE_W=cfg.get("dense_w", False),
        NORM=norm_w is not None, NB=triton.next_power_of_2(n), ROPE=rope is not None, ACC_OUT=acc_out is not None,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2), **pdl_args(x.device),
        XACC=x_acc if x_acc is not None else x, XOUT=x_out if x_out is not None else x,
        X_ACC=x_acc is not None, X_OUT=x_out is not None,
        NREAD=count if count is not None else y, COUNT=count is not None)
    return y


def check_count(count: torch.Tensor | None, x: torch.Tensor) -> None:
    """A `count=` argument: a (1,) int64 tensor on x's device, and one token (a batch's products read the union of
    its tokens' weights, not each token's own)."""
    if count is None:
        return
    if not (isinstance(count, torch.Tensor) and count.dtype == torch.int64 and count.numel() == 1
            and count.device == x.device):
        raise ValueError(f"count: a (1,) int64 tensor on {x.device}, got "
                         f"{getattr(count, 'dtype', type(count))} {tuple(getattr(count, 'shape', ()))} "
                         f"on {getattr(count, 'device', '?')}")
    if x.shape[0] != 1:
        raise ValueError(f"count: one token at a time (got {x.shape[0]}): a batch reads the union of its tokens' "
                         "weights, not each token's own")


def gemv_qkv_rope(x: torch.Tensor, wt: torch.Tensor, mean, thr, bias, stripe: int, pos: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, hq: int, hkv: int,
                  norm_w: torch.Tensor | None = None, eps: float = 1e-6,
                  count: torch.Tensor | None = None) -> torch.Tensor:
    """One token's fused q/k/v product (wt (n, (hq + 2·hkv)·hd)) followed by `decode.rope_cache`, in one launch:
    returns the rotated q (1, hq·hd) and writes k (rotated) and v into kc/vc (max_len, hkv, hd) at pos[0].
    The masked-load kernel with one head per output block does it in its epilogue; where a head is not a
    whole number of stripe blocks (stripe % hd ≠ 0), or for a batch, two launches. The decode engine uses it
    with CWIC_FUSE_ROPE=1 (on the H200 no faster than the separate RoPE kernel, and slower than the engine's
    default q/k/v sum handed to it, which CWIC_FUSE_ROPE=1 replaces)."""
    from .decode import rope_cache
    B, n = x.shape
    m = wt.shape[1]
    hd = kc.shape[-1]
    ov = dict(TUNED.get((n, m, 1), {}))
    ov["block_m"] = hd
    cfg = gemv_config(1, n, m, stripe, x.device, **ov) if B == 1 else None
    if cfg is None or cfg["BLOCK_M"] != hd or not supports_stripe(stripe, m) or thr is None:
        y = gemv_ex(x, wt, mean, thr, bias, stripe, norm_w=norm_w, eps=eps, count=count)
        return rope_cache(y, pos, cos, sin, kc, vc, hq, hkv)
    q = torch.empty((1, hq * hd), dtype=x.dtype, device=x.device)
    gemv_ex(x, wt, mean, thr, bias, stripe, norm_w=norm_w, eps=eps, config=cfg, compact=False,
            rope=(pos, cos, sin, q, kc, vc, hq, hkv), count=count)
    return q


def _norm(x, norm_w, eps):
    from .decode import rmsnorm
    return rmsnorm(x, norm_w, eps)


def check_norm(x, norm_w):
    if norm_w is not None:
        assert x.shape[0] == 1 and norm_w.shape == (x.shape[1],) and norm_w.is_contiguous(), \
            (x.shape, norm_w.shape)


def gemv(x, wt, mean, thr, bias, stripe: int) -> torch.Tensor:
    """`cwic::gemv` (reference.gemv_reference semantics) on any leading batch."""
    return gemv_ex(x, wt, mean, thr, bias, stripe)


def ffn_up(x: torch.Tensor, up_w: torch.Tensor, a: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """h = (x @ up_wᵀ) ⊙ a in fp32, reading only the rows of units with a ≠ 0 for some token.

    A compacted variant for one token (each program lists its active units, then walks only their rows)
    was slower on the H100 at every tile config tried: experiments/results/gpu_ffn_up_compact.md."""
    B, d = x.shape
    F_, d2 = up_w.shape
    assert d == d2 and up_w.is_contiguous() and a.shape == (B, F_) and a.dtype == torch.float32
    h = torch.empty((B, F_), dtype=torch.float32, device=x.device)
    if B == 0:
        return h
    bb = 1 if B == 1 else 16
    cfg = config or {}
    bu = cfg.get("BLOCK_U", 8 if bb == 1 else 16)
    bd = cfg.get("BLOCK_D", min(1024 if bb == 1 else 128, triton.next_power_of_2(d)))
    grid = (triton.cdiv(F_, bu), triton.cdiv(B, bb))
    _ffn_up_kernel[grid](x, up_w, a, h, B, d, F_, x.stride(0), a.stride(0), h.stride(0),
                         BLOCK_B=bb, BLOCK_U=bu, BLOCK_D=bd,
                         DOT_F32=(INTERPRET or up_w.dtype == torch.float32),
                         num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2), **pdl_args(x.device))
    return h


def ffn_one_launch(d: int, F: int, stripe: int, fused: bool | None = None) -> bool:
    """Whether `ffn(..., fused=fused)` runs one token of a thresholded d → F FFN in one launch
    (`ffn_fused.ffn_gate_updown`), the only FFN path that reads an `x_acc` itself (the others first form the input
    with three small kernels)."""
    return (FUSED_FFN if fused is None else fused) and FUSED_GATE and \
        _fused.gate_fusable(stripe, F, _fused.ffn_updown_config(d, F)["BLOCK_U"])


def ffn(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe: int, up_w, down_wt, unit_thr,
        act: str = "silu", residual: torch.Tensor | None = None, fused: bool | None = None,
        norm_w: torch.Tensor | None = None, eps: float = 1e-6, x_acc: torch.Tensor | None = None,
        y_acc: torch.Tensor | None = None, count: torch.Tensor | None = None) -> torch.Tensor:
    """`cwic::ffn`: gate GMM with act + unit mask in its epilogue → active rows of W_up → active rows of
    W_downᵀ (+ residual). No host synchronisation. One token: one launch (`ffn_fused.ffn_gate_updown`: each
    program computes the gate for its own units, then their up and down rows; fp32 atomics, so the last bits
    vary between launches), or two with CWIC_FFN_GATE_FUSED=0 (gate, then `ffn_fused.ffn_updown`), unless
    `fused=False` or the environment sets CWIC_FFN_FUSED=0; a batch, or unfused: three launches.
    norm_w: x is the raw residual stream, normalised inside the one-token kernels (see `gemv_ex`).
    x_acc (1, d) fp32, with residual x: the input (and residual) is (x_acc + x) rounded to x's dtype, x_acc the sum
    of a `gemv_ex(acc_out=...)` (the o product); the one-launch kernel reads it itself, other paths form it first.
    x_acc is left zeroed. y_acc: the one-launch kernel's hand-off (`ffn_fused.ffn_gate_updown`: the product
    added into y_acc, the input returned, x_acc not cleared); other paths refuse it.
    count (1,) int64, one token: the weights read (the gate's active pairs × rows, 2·d a active unit) are added
    into it (`gemv_ex`)."""
    check_count(count, x)
    one = x.shape[0] == 1 and (FUSED_FFN if fused is None else fused)
    one_launch = one and gate_thr is not None and ffn_one_launch(x.shape[1], gate_wt.shape[1], stripe, fused)
    if y_acc is not None and not one_launch:
        raise ValueError("y_acc: only the one-launch FFN of one token hands its product on (ffn_one_launch)")
    if x_acc is not None:
        assert residual is x, "x_acc: the residual is the input itself"
        if not one_launch:   # form the input first
            x = residual = (x_acc + x.float()).to(x.dtype)
            x_acc.zero_()
            x_acc = None
    if norm_w is not None and not one:
        x, norm_w = _norm(x, norm_w, eps), None
    if one_launch:
        return _fused.ffn_gate_updown(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt,
                                      unit_thr, act, residual=residual, out_dtype=x.dtype, norm_w=norm_w,
                                      eps=eps, x_acc=x_acc, y_acc=y_acc, count=count)
    a = gemv_ex(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, act=act, unit_thr=unit_thr,
                norm_w=norm_w, eps=eps, count=count)
    if count is not None:   # the up rows and down rows of the active units
        count += (a != 0).sum() * (2 * up_w.shape[1])
    if one:
        return _fused.ffn_updown(x, up_w, down_wt, a, residual=residual, out_dtype=x.dtype, norm_w=norm_w,
                                 eps=eps)
    h = ffn_up(x, up_w, a)
    return gemv_ex(h, down_wt, None, None, None, down_wt.shape[1], mask_mode=MASK_NONZERO,
                   residual=residual, out_dtype=x.dtype)


from . import ffn_fused as _fused  # noqa: E402  (these build on the kernels above; imported once, not per call)
from . import gemv_compact as _compact  # noqa: E402
