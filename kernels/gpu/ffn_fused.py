"""The FFN's up and down projections in one launch, for one token (METHOD.md §10).

Semantics: exactly `gemv.ffn_up` followed by the down projection `gemv_ex(h, down_wt, mask_mode=
MASK_NONZERO, residual=…)`, i.e. y = Σ_j [(W_up[j] · x) · a_j] · W_downᵀ[j] (+ residual), fp32 sums,
over the units j whose gated activation a_j (the gate kernel's output: act + unit mask) is non-zero.

Why: the two-kernel path reads, per layer, the active rows of W_up (kernel 1: h = (W_up x) ⊙ a, written
to memory) and then the active rows of W_downᵀ (kernel 2: a compacted split-K GEMV over h). On an H100
both are latency-bound at the decode shapes (2048 → 8192 → 2048: ~8 µs + ~10 µs for ~20 MB of active rows
that the memory moves in ~7 µs). Here a program owns BLOCK_U units:

1. it loads a over its units, compacts the active ones (exclusive `tl.cumsum` → private scratch region,
   barrier, read back), and loads x once;
2. for each block of BLOCK_S active units it issues the loads of their W_up rows *and* their W_downᵀ
   rows at once (both depend only on the unit indices, so the down rows are in flight while the up
   dot products are reduced), computes h = (W_up x) · a and accumulates y += hᵀ W_downᵀ over the full
   output width (a (D,) fp32 register vector);
3. it adds y into an fp32 accumulator with relaxed atomics (coalesced: one L2 request per 32 floats;
   config `copies` spreads the programs over several accumulators) — a program without active units
   adds nothing — then arrives on a counter (acq_rel); the last program to arrive sums the
   accumulators, adds the residual, writes y in the output dtype, zeroes the accumulators and resets
   the counter for the next launch. Fixed grid, no memset, no host sync: CUDA-
   graph capturable. With `y_acc` (`ffn_gate_updown` only: the decode engine's hand-off) the programs add
   into the caller's fp32 buffer instead and stop there (no counter, no epilogue); program 0 writes the input
   (the residual stream) as the output, and the consumer adds the two.

Not bit-reproducible: the order of the fp32 atomic additions varies from launch to launch, so the last
bits of y do (the error stays that of an fp32 sum; the tests bound it against an fp64 reference). The
two-kernel path is deterministic; `gemv.ffn(..., fused=False)` keeps it.

The accumulator and the scratch are cached per (device, shape, tiling) and allocated on first use (call once
before capturing a CUDA graph, as the decode engine does); like the other kernels, one workspace must not be
used by two streams at once.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gemv import (EVICT_W, _act, act_code, _load_h, _overlap, _pdl_enter, _rstd_of, check_args, check_count,
                   pdl_args)
from .gemv_compact import _select_block, _select_pre, _select_x, _slot_products

__all__ = ["ffn_updown", "ffn_gate_updown", "gate_fusable", "ffn_updown_config", "TUNED_UPDOWN"]


@triton.jit
def _clk(TIMES, p, slot: tl.constexpr, TIMED: tl.constexpr):
    """Phase clock (diagnostic): program p's %globaltimer (ns) into TIMES[p, slot], %clock64 into slot + 8."""
    if TIMED:
        tl.store(TIMES + p * 16 + slot, tl.extra.cuda.globaltimer().to(tl.int64))
        tl.store(TIMES + p * 16 + 8 + slot, tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [],
                                                                        dtype=tl.int64, is_pure=False, pack=1))


@triton.jit
def _step_rows(IDX, A, UP, DOWNT, base, s0, slots, cnt, ds, dmask, D, EVEN_D: tl.constexpr):
    """Active units s0 .. s0 + BLOCK_S - 1 of the program: their a values and W_up / W_downᵀ rows."""
    sm = (s0 + slots) < cnt
    idx = tl.load(IDX + base + s0 + slots, mask=sm, other=0)
    av = tl.load(A + idx, mask=sm, other=0.0)
    roff = idx.to(tl.int64)[:, None] * D + ds[None, :]
    if EVEN_D:
        wm = sm[:, None]
    else:
        wm = sm[:, None] & dmask[None, :]
    wu = tl.load(UP + roff, mask=wm, other=0.0, eviction_policy=EVICT_W)
    wd = tl.load(DOWNT + roff, mask=wm, other=0.0, eviction_policy=EVICT_W)
    return av, wu, wd


@triton.jit
def _step_sum(av, wu, wd, x):
    """Σ over the step's units of h_j · W_downᵀ[j], h_j = (W_up[j] · x) a_j (= ffn_up's h)."""
    h = tl.sum(wu.to(tl.float32) * x[None, :], axis=1) * av
    return tl.sum(h[:, None] * wd.to(tl.float32), axis=0)


@triton.jit
def _ffn_updown_kernel(X, UP, DOWNT, A, RES, Y, IDX, YACC, ARR, NW, D, F, eps,
                       BLOCK_U: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                       COPIES: tl.constexpr, HAS_RES: tl.constexpr, EVEN_D: tl.constexpr, NORM: tl.constexpr,
                       PIPE: tl.constexpr, USE_PDL: tl.constexpr = False):
    _pdl_enter(USE_PDL)
    _updown_body(tl.program_id(0), X, UP, DOWNT, A, RES, Y, IDX, YACC, ARR, NW, D, F, eps, BLOCK_U, BLOCK_S,
                 BLOCK_D, COPIES, HAS_RES, EVEN_D, NORM, PIPE, X, False, X, False, 1.0, False, X, False, 0)


@triton.jit
def _ffn_gate_updown_kernel(X, GWT, GMEAN, GTHR, GBIAS, UTHR, UP, DOWNT, A, RES, Y, GIDX, GVAL, IDX, YACC, ARR, NW,
                            D, F, STRIPE, stride_mk, eps,
                            BLOCK_U: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_G: tl.constexpr, COPIES: tl.constexpr, HAS_RES: tl.constexpr,
                            EVEN_D: tl.constexpr, EVEN_U: tl.constexpr, NORM: tl.constexpr, PIPE: tl.constexpr,
                            ACT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr = False,
                            XACC=None, X_ACC: tl.constexpr = False, YOUT=None, Y_ACC: tl.constexpr = False,
                            NREAD=None, COUNT: tl.constexpr = False, TIMES=None, TIMED: tl.constexpr = False):
    """The whole gated FFN of one token, a program per BLOCK_U units: the gate's BLOCK_U columns over every
    input (the stripe's active inputs compacted into a private scratch region, then only their rows read:
    `gemv_compact`'s fused mode with one chunk, so no split-K round trip), + folded bias, act, unit mask → a
    (also stored to A), then `_updown_body` on the same units. X_ACC: the input is x + XACC (`_load_h`), which
    is also the residual; the last program zeroes XACC, except with Y_ACC (see `_updown_body`). COUNT: the weights
    read are added into NREAD (the gate's: the stripe's active inputs × this block's units)."""
    p = tl.program_id(0)
    _clk(TIMES, p, 0, TIMED)
    units = p * BLOCK_U + tl.arange(0, BLOCK_U)
    umask = units < F
    r = (p * BLOCK_U) // STRIPE                     # the units' stripe (BLOCK_U divides STRIPE)
    # constant operands before the PDL wait: the stripe's mean and thresholds, norm weights
    mu, t, w = _select_pre(GMEAN, GTHR, r, 0, D, stride_mk, NW, BLOCK_D, 0, NORM)
    _pdl_enter(USE_PDL)
    _clk(TIMES, p, 1, TIMED)
    u_thr = tl.load(UTHR + units, mask=umask, other=0.0)
    gb = tl.zeros((BLOCK_U,), dtype=tl.float32)
    if HAS_BIAS:
        gb = tl.load(GBIAS + units, mask=umask, other=0.0)
    rstd = 1.0
    if X_ACC:   # as _select_block, on x + XACC (loaded once for the norm and the mask)
        rows = tl.arange(0, BLOCK_D)
        xr = _load_h(X, XACC, rows, rows < D, True)
        if NORM:
            rstd = _rstd_of(xr, D, eps)
        rows, xc, on, pos, cnt = _select_x(xr, rows, D, mu, t, w, rstd, 0, NORM)
    else:
        rows, xc, on, pos, cnt = _select_block(X, mu, t, w, 0, D, eps, BLOCK_D, 0, NORM, BLOCK_D)
    gbase = p.to(tl.int64) * BLOCK_D
    tl.store(GIDX + gbase + pos, rows, mask=on)
    tl.store(GVAL + gbase + pos, xc, mask=on)
    tl.debug_barrier()                              # the compacted inputs are visible to all the block's threads
    _clk(TIMES, p, 2, TIMED)
    slots = tl.arange(0, BLOCK_G)
    acc2 = _slot_products(GIDX, GVAL, GWT, gbase, slots, cnt, units, umask, F, EVEN_U)
    for j0 in range(BLOCK_G, cnt, BLOCK_G):
        acc2 += _slot_products(GIDX, GVAL, GWT, gbase, j0 + slots, cnt, units, umask, F, EVEN_U)
    g = tl.sum(acc2, axis=0) + gb                   # as gemv._epi_finish: + bias, act, unit mask
    av = _act(g, ACT)
    av = tl.where((tl.abs(av) >= u_thr) | (av != av), av, 0.0)
    tl.store(A + units, av, mask=umask)
    tl.debug_barrier()                              # a is visible to all the block's threads
    _clk(TIMES, p, 3, TIMED)
    if TIMED:
        tl.store(TIMES + p * 16 + 7, cnt.to(tl.int64) + tl.extra.cuda.smid().to(tl.int64) * 65536)
    gate_reads = 0
    if COUNT:
        gate_reads = cnt.to(tl.int64) * tl.minimum(F - p * BLOCK_U, BLOCK_U)
    _updown_body(p, X, UP, DOWNT, A, RES, Y, IDX, YACC, ARR, NW, D, F, eps, BLOCK_U, BLOCK_S, BLOCK_D, COPIES,
                 HAS_RES, EVEN_D, NORM, PIPE, XACC, X_ACC, YOUT, Y_ACC, rstd, X_ACC, NREAD, COUNT, gate_reads,
                 TIMES, TIMED)


@triton.jit
def _updown_body(p, X, UP, DOWNT, A, RES, Y, IDX, YACC, ARR, NW, D, F, eps,
                 BLOCK_U: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                 COPIES: tl.constexpr, HAS_RES: tl.constexpr, EVEN_D: tl.constexpr, NORM: tl.constexpr,
                 PIPE: tl.constexpr, XACC, X_ACC: tl.constexpr, YOUT, Y_ACC: tl.constexpr, rstd_in,
                 RSTD_IN: tl.constexpr, NREAD, COUNT: tl.constexpr, gate_reads, TIMES=None,
                 TIMED: tl.constexpr = False):
    """Program p of the up/down projections: its units' a → active units → W_up and W_downᵀ rows → atomics.
    X_ACC: x is x + XACC (`_load_h`) and the residual is that x (RES = X); the last program zeroes XACC.
    Y_ACC (the hand-off to the next layer's q/k/v kernel): the programs add their sums into the caller's fp32
    YOUT and stop (no arrival, no epilogue, XACC left as it is); program 0 writes the input x (not normalised:
    the residual stream) to Y. RSTD_IN: rstd_in is the norm's scale of this x, already reduced by the caller (the
    same values in the same layout: the same bits), so the block-wide reduction is not repeated. COUNT: gate_reads
    plus the W_up and W_downᵀ rows of the active units (2·D each) are added into NREAD, one atomic a program."""
    units = p * BLOCK_U + tl.arange(0, BLOCK_U)
    umask = units < F
    a = tl.load(A + units, mask=umask, other=0.0)
    on = (a != 0.0) & umask
    on_i = on.to(tl.int32)
    pos = tl.cumsum(on_i, axis=0) - on_i            # exclusive: slot of each active unit
    cnt = tl.sum(on_i, axis=0)
    if COUNT:
        tl.atomic_add(NREAD, gate_reads + cnt.to(tl.int64) * (2 * D), sem="relaxed", scope="gpu")
    base = p.to(tl.int64) * BLOCK_U
    tl.store(IDX + base + pos, units, mask=on)
    ds = tl.arange(0, BLOCK_D)
    dmask = ds < D
    x = _load_h(X, XACC, ds, dmask, X_ACC)
    if Y_ACC:
        if p == 0:
            tl.store(Y + ds, x, mask=dmask)
    if NORM:   # x is the raw residual stream: RMSNorm it as decode.rmsnorm does (rounded to x's dtype)
        nw = tl.load(NW + ds, mask=dmask, other=0.0).to(tl.float32)
        if RSTD_IN:
            rstd = rstd_in
        else:
            rstd = _rstd_of(x, D, eps)
        x = (x.to(tl.float32) * rstd * nw).to(X.dtype.element_ty)
    x = x.to(tl.float32)
    tl.debug_barrier()                              # the block's slot stores are visible to all its threads
    _clk(TIMES, p, 4, TIMED)
    if TIMED:
        tl.store(TIMES + p * 16 + 15, cnt.to(tl.int64))
    y = tl.zeros((BLOCK_D,), dtype=tl.float32)
    slots = tl.arange(0, BLOCK_S)
    if PIPE:   # two-stage software pipeline: the next step's rows are in flight while this step's are reduced
        av, wu, wd = _step_rows(IDX, A, UP, DOWNT, base, 0, slots, cnt, ds, dmask, D, EVEN_D)
        for s0 in range(BLOCK_S, cnt, BLOCK_S):
            av2, wu2, wd2 = _step_rows(IDX, A, UP, DOWNT, base, s0, slots, cnt, ds, dmask, D, EVEN_D)
            y += _step_sum(av, wu, wd, x)
            av = av2
            wu = wu2
            wd = wd2
        y += _step_sum(av, wu, wd, x)
    else:
        for s0 in range(0, cnt, BLOCK_S):
            av, wu, wd = _step_rows(IDX, A, UP, DOWNT, base, s0, slots, cnt, ds, dmask, D, EVEN_D)
            y += _step_sum(av, wu, wd, x)
    _clk(TIMES, p, 5, TIMED)
    if Y_ACC:     # handed on: the consumer adds the residual stream and rounds
        if cnt > 0:
            tl.atomic_add(YOUT + ds, y, mask=dmask, sem="relaxed", scope="gpu")
        if TIMED:
            tl.debug_barrier()
            _clk(TIMES, p, 6, TIMED)
    else:
        if cnt > 0:   # into one of COPIES accumulators: 1/COPIES of the programs contend for each address
            tl.atomic_add(YACC + (p % COPIES) * BLOCK_D + ds, y, mask=dmask, sem="relaxed", scope="gpu")
        tl.debug_barrier()                              # every thread's additions are issued ...
        done = tl.atomic_add(ARR, 1, sem="acq_rel", scope="gpu")   # ... before we arrive
        _clk(TIMES, p, 6, TIMED)
        if done == tl.num_programs(0) - 1:              # last to arrive: finish
            tot = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for c in tl.static_range(COPIES):           # unrolled: all loads in flight
                tot += tl.load(YACC + c * BLOCK_D + ds, mask=dmask, other=0.0, cache_modifier=".cg")
            if HAS_RES:
                tot += _load_h(RES, XACC, ds, dmask, X_ACC).to(tl.float32)
            if X_ACC:   # every program has read XACC before arriving: clear it for its next producer
                tl.store(XACC + ds, tl.zeros((BLOCK_D,), dtype=tl.float32), mask=dmask)
            tl.store(Y + ds, tot.to(Y.dtype.element_ty), mask=dmask)
            for c in tl.static_range(COPIES):
                tl.store(YACC + c * BLOCK_D + ds, tl.zeros((BLOCK_D,), dtype=tl.float32), mask=dmask)
            tl.atomic_xchg(ARR, 0)                      # ready for the next launch


# (d, F) -> overrides: the fastest tiles of the H100 sweep (`bench_kernels.py --device cuda --compact
# --ffn-updown`, experiments/results/gpu_ffn_updown.md) at 66% zero units.
# block_g: the one-launch FFN's gate gathers 512 active inputs a step, not 256: +1.6 % decode tokens/s on the H200
# (experiments/bench/gpu_tune_decode.py, experiments/results/gpu_h200/tune_2026-12-02_1/; 128 and 64 were slower).
TUNED_UPDOWN: dict = {
    (2048, 8192): dict(block_s=4, pipe=True, block_g=512),   # 15.0 µs vs 16.8 unpipelined, 19.2 two kernels
    # Llama-3.2-3B: 64 units a program (+10.4 % on the whole decode step, H100), then 8 warps (+2.1 %)
    (3072, 8192): dict(block_u=64, num_warps=8),
    # Llama-3.1-8B (the paper's Fig. 3 FFN): 2 units a step, +15.2 % on the whole decode step (H100)
    (4096, 14336): dict(block_s=2),
}
_WORKSPACES: dict = {}


def ffn_updown_config(d: int, F: int, **overrides) -> dict:
    """Tiles: BLOCK_U units a program (default 32: 256 programs for F = 8192, about two an SM on an H100),
    BLOCK_S active units a step (their W_up and W_downᵀ rows, (BLOCK_S, d) each, are loaded together),
    num_warps (default: about 64 bf16 weights a thread a tile), num_stages (software pipelining of the
    step loop), copies (accumulators the programs' atomic additions are spread over; the last program
    sums them), pipe (the next step's rows loaded while this step's are reduced: twice the registers),
    block_g (`ffn_gate_updown` only: the gate's active inputs gathered a step)."""
    p = dict(block_u=32, block_s=8, num_warps=None, num_stages=1, copies=1, pipe=False, block_g=256)
    unknown = sorted(set(overrides) - set(p))
    if unknown:
        raise ValueError(f"ffn_updown_config: unknown tile keys {unknown}; known: {sorted(p)}")
    p.update(TUNED_UPDOWN.get((d, F), {}) if not overrides else {})
    p.update(overrides)
    bd = triton.next_power_of_2(d)
    bu = min(p["block_u"], triton.next_power_of_2(F))
    bs = min(p["block_s"], bu)
    nw = p["num_warps"] or max(1, min(16, bs * bd // (64 * 32)))
    return dict(BLOCK_U=bu, BLOCK_S=bs, BLOCK_D=bd, COPIES=int(p["copies"]), grid=(triton.cdiv(F, bu),),
                num_warps=nw, num_stages=int(p["num_stages"]), PIPE=bool(p["pipe"]),
                BLOCK_G=min(max(16, triton.next_power_of_2(int(p["block_g"]))), bd))


def _workspace(device: torch.device, d: int, F: int, cfg: dict) -> dict:
    key = (device.type, device.index, d, F, cfg["BLOCK_U"], cfg["COPIES"])
    ws = _WORKSPACES.get(key)
    if ws is None:   # zeroed once; every launch leaves the accumulator zeroed again
        ws = dict(idx=torch.zeros(cfg["grid"][0] * cfg["BLOCK_U"], dtype=torch.int32, device=device),
                  acc=torch.zeros(cfg["COPIES"] * cfg["BLOCK_D"], dtype=torch.float32, device=device),
                  arr=torch.zeros(1, dtype=torch.int32, device=device))   # its own arrival counter
        _WORKSPACES[key] = ws
    return ws


def ffn_updown(x: torch.Tensor, up_w: torch.Tensor, down_wt: torch.Tensor, a: torch.Tensor,
               residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None, config: dict | None = None,
               norm_w: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """y (1, d) = Σ_{j: a_j ≠ 0} ((up_w[j] · x) a_j) down_wt[j] (+ residual): one token.

    x (1, d); up_w (F, d) and down_wt (F, d) contiguous, same dtype; a (1, F) fp32 (the gated
    activation, zero for units that are off); residual (1, d) or None; output x's dtype by default.
    norm_w (d,): x is the raw residual stream; the kernel uses RMSNorm(x)·norm_w (eps) in its place."""
    B, d = x.shape
    F_, d2 = up_w.shape
    assert B == 1, "ffn_updown runs one token; use gemv.ffn_up + the down GEMV for a batch"
    assert d == d2 and up_w.is_contiguous() and down_wt.is_contiguous() and down_wt.shape == (F_, d)
    assert x.stride(1) == 1 and a.shape == (1, F_) and a.dtype == torch.float32 and a.stride(1) == 1
    if residual is not None:
        assert residual.shape == (1, d) and residual.stride(1) == 1
    y = out if out is not None else torch.empty((1, d), dtype=out_dtype or x.dtype, device=x.device)
    cfg = config or ffn_updown_config(d, F_)
    ws = _workspace(x.device, d, F_, cfg)
    arr = ws["arr"]
    if norm_w is not None:
        assert norm_w.shape == (d,) and norm_w.is_contiguous()
    _ffn_updown_kernel[cfg["grid"]](x, up_w, down_wt, a, residual if residual is not None else y, y,
                                    ws["idx"], ws["acc"], arr, norm_w if norm_w is not None else x,
                                    d, F_, float(eps),
                                    BLOCK_U=cfg["BLOCK_U"], BLOCK_S=cfg["BLOCK_S"], BLOCK_D=cfg["BLOCK_D"],
                                    COPIES=cfg["COPIES"], HAS_RES=residual is not None,
                                    EVEN_D=cfg["BLOCK_D"] == d, NORM=norm_w is not None, PIPE=cfg["PIPE"],
                                    num_warps=cfg["num_warps"],
                                    num_stages=cfg["num_stages"], **pdl_args(x.device))
    return y


def gate_fusable(stripe: int, F: int, block_u: int = 32) -> bool:
    """Whether `ffn_gate_updown` can take a gate of F units in stripes of `stripe`: its unit blocks must lie
    inside one stripe."""
    bu = min(block_u, triton.next_power_of_2(F))
    return stripe >= F or stripe % bu == 0


def ffn_gate_updown(x: torch.Tensor, gate_wt: torch.Tensor, gate_mean: torch.Tensor, gate_thr: torch.Tensor,
                    gate_bias: torch.Tensor | None, stripe: int, up_w: torch.Tensor, down_wt: torch.Tensor,
                    unit_thr: torch.Tensor, act: str = "silu", residual: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                    config: dict | None = None, norm_w: torch.Tensor | None = None, eps: float = 1e-6,
                    block_g: int | None = None, x_acc: torch.Tensor | None = None,
                    y_acc: torch.Tensor | None = None, count: torch.Tensor | None = None,
                    times: torch.Tensor | None = None) -> torch.Tensor:
    """The whole CWIC gated FFN of one token in one launch (`gemv.ffn` semantics, B = 1): the gate's granular
    GEMV (thresholds, act, unit mask) for each program's BLOCK_U units, then their up/down rows as
    `ffn_updown` does. gate_wt (d, F) input-major; gate_mean (d,) or per stripe (k, d) fp32; gate_thr (k, d);
    gate_bias (F,) fp32 or None; unit_thr (F,) fp32; norm_w: fused RMSNorm of x. The gated activation a of
    the launch stays in the workspace (`_workspace(...)["a"]`). Tiles: `ffn_updown_config`; block_g (default: the
    config's BLOCK_G): active inputs gathered a step in the gate part. x_acc (1, d) fp32: the input is
    (x_acc + x) rounded to x's dtype (x_acc: the sum of `gemv.gemv_ex(acc_out=...)`, e.g. the o product), residual
    must then be x and stands for that input too; x_acc is left zeroed.
    y_acc (1, d) fp32 (zero, or a sum to add to), with residual x: the FFN's product is added into y_acc with atomics
    and the returned tensor is the input (x + x_acc rounded, not normalised): the residual stream, to which the
    consumer adds y_acc (`gemv.gemv_ex(x_acc=...)`). No arrival counter, no epilogue; x_acc is then NOT zeroed
    (its programs may still read it when others finish): the caller clears it after the launch, as the decode
    engine's next RoPE kernel does (`decode.rope_cache(clear=...)`).
    count (1,) int64: the weights read (gate pairs × rows, 2·d an active unit) are added into it (`gemv.gemv_ex`).
    times (programs, 16) int64, CUDA only (a diagnostic: `experiments/bench/gpu_ffn_clock.py`): each program stores
    `%globaltimer` (ns) in columns 0-6 and `%clock64` in 8-14 at its entry, after the PDL wait, after the inputs'
    compaction, the gate, the units' compaction, the up/down loop and its atomics; column 7 = SM · 65536 + the stripe's
    active inputs, column 15 = its active units. Without it the kernel compiles as it does without the clocks."""
    B, d = x.shape
    F_ = gate_wt.shape[1]
    check_count(count, x)
    assert B == 1, "ffn_gate_updown runs one token"
    assert up_w.shape == (F_, d) and down_wt.shape == (F_, d) and up_w.is_contiguous() and down_wt.is_contiguous()
    assert unit_thr.shape == (F_,) and unit_thr.dtype == torch.float32
    k, stripe, stride_mk, _ = check_args(x, gate_wt, gate_mean, gate_thr, stripe, 0, act, torch.float32)
    cfg = config or ffn_updown_config(d, F_)
    assert stripe % cfg["BLOCK_U"] == 0 or stripe >= F_, (stripe, cfg["BLOCK_U"])
    if residual is not None:
        assert residual.shape == (1, d) and residual.stride(1) == 1
    if norm_w is not None:
        assert norm_w.shape == (d,) and norm_w.is_contiguous()
    if x_acc is not None:
        assert residual is x and x_acc.shape == (1, d) and x_acc.dtype == torch.float32 and x_acc.is_contiguous()
    if y_acc is not None:
        if residual is not x:
            raise ValueError("y_acc: the residual must be the input x itself")
        if not (y_acc.shape == (1, d) and y_acc.dtype == torch.float32 and y_acc.is_contiguous()):
            raise ValueError(f"y_acc: a contiguous (1, {d}) fp32 tensor, got {tuple(y_acc.shape)} {y_acc.dtype}")
        if (out_dtype or x.dtype) != x.dtype:
            raise ValueError("y_acc: the output is the input x, in x's dtype")
        if out is not None and (_overlap(out, x) or (x_acc is not None and _overlap(out, x_acc))):
            raise ValueError("y_acc: out must not share memory with x or x_acc (program 0 writes it while the "
                             "others still read them)")
    if times is not None:
        grid = cfg["grid"][0]
        if x.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            raise ValueError("times: the phase clocks read PTX registers; they need a CUDA device, not the interpreter")
        if not (times.shape == (grid, 16) and times.dtype == torch.int64 and times.is_contiguous()
                and times.device == x.device):
            raise ValueError(f"times: a contiguous ({grid}, 16) int64 tensor on {x.device}, got "
                             f"{tuple(times.shape)} {times.dtype} on {times.device}")
    y = out if out is not None else torch.empty((1, d), dtype=out_dtype or x.dtype, device=x.device)
    ws = _workspace(x.device, d, F_, cfg)
    if "a" not in ws:   # the gate part's scratch: each program's compacted inputs, and a
        grid = cfg["grid"][0]
        ws["gidx"] = torch.zeros(grid * cfg["BLOCK_D"], dtype=torch.int32, device=x.device)
        ws["gval"] = torch.zeros(grid * cfg["BLOCK_D"], dtype=torch.float32, device=x.device)
        ws["a"] = torch.zeros((1, F_), dtype=torch.float32, device=x.device)
    bg = cfg.get("BLOCK_G", 256) if block_g is None else block_g
    bg = min(max(16, triton.next_power_of_2(bg)), cfg["BLOCK_D"])   # never past a program's scratch region
    _ffn_gate_updown_kernel[cfg["grid"]](
        x, gate_wt, gate_mean, gate_thr, gate_bias if gate_bias is not None else unit_thr, unit_thr, up_w, down_wt,
        ws["a"], residual if residual is not None else y, y, ws["gidx"], ws["gval"], ws["idx"], ws["acc"], ws["arr"],
        norm_w if norm_w is not None else x, d, F_, stripe, stride_mk, float(eps),
        BLOCK_U=cfg["BLOCK_U"], BLOCK_S=cfg["BLOCK_S"], BLOCK_D=cfg["BLOCK_D"], BLOCK_G=bg, COPIES=cfg["COPIES"],
        HAS_RES=residual is not None, EVEN_D=cfg["BLOCK_D"] == d, EVEN_U=F_ % cfg["BLOCK_U"] == 0,
        NORM=norm_w is not None, PIPE=cfg["PIPE"], ACT=act_code(act, x.dtype), HAS_BIAS=gate_bias is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_args(x.device),
        XACC=x_acc if x_acc is not None else x, X_ACC=x_acc is not None,
        YOUT=y_acc if y_acc is not None else x, Y_ACC=y_acc is not None,
        NREAD=count if count is not None else x, COUNT=count is not None,
        TIMES=times if times is not None else x, TIMED=times is not None)
    return y
