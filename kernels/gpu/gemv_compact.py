"""Compacted granular sparse GEMV for one token: work ∝ density (METHOD.md §10).

Semantics: exactly `gemv.gemv_ex` (and `reference.gemv_reference`) for B == 1; B > 1 calls `gemv_ex`.

Why: `gemv._gmm_kernel` walks every input row of its split-K chunk and relies on masked loads; an
inactive (stripe, input) row never reaches memory, but the number of loop iterations, load
instructions and dependent memory round trips is the same at every density, so on an H100 the
decode shapes stay latency-bound (2048×2048: 7.35 µs dense → only 5.22 µs at 90% sparsity).

Here the active rows are listed first, then only they are walked:

1. `_select_kernel`, grid (chunks, stripes): for its (stripe r, chunk of CHUNK inputs) one program
   computes on = |x − x̄| ≥ thr[r, i] (MASK_THRESHOLD; x̄ per stripe when `mean` is 2-D), or x ≠ 0
   (MASK_NONZERO, value x; the FFN's down projection), or every row (MASK_NONE); it compacts the
   active input indices (int32) and values x − x̄ (fp32) with an exclusive `tl.cumsum` into the
   region (r, chunk) of the workspace, and writes the region's count. One load round trip, no atomics.
2. `_compact_gemv_kernel`, grid (output blocks of BLOCK_M inside one stripe, chunks): a program reads
   its region's count and, *in the same round trip*, the first BLOCK_N slots of indices and values
   (the region always exists, so these loads need no count), then the weight rows wt[idx, cols] of
   the slots < count (all useful bytes; masked tail), and loops over the remaining
   ceil(count / BLOCK_N) − 1 blocks only when the chunk is denser than BLOCK_N / CHUNK. The fp32
   products accumulate in a (BLOCK_N, BLOCK_M) register tile, reduced across rows once at the end.
   Split-K over chunks: partial → workspace, per-output-block arrival counter (acq_rel atomic); the
   last program to arrive sums the partials (unrolled: all loads in flight) and runs
   `gemv._epi_finish` (+ folded bias, optional activation + unit mask, optional residual), then
   resets the counter. No memset, no host synchronisation, fixed grids: CUDA-graph capturable.

Dependent latency chain of a program (typical density, count ≤ BLOCK_N):
    select:  x, x̄, thr loads → cumsum → scattered stores                            (1 round trip)
    [kernel boundary: with config pdl=True the GEMV grid is launched early (programmatic dependent
     launch) and waits in `gdc_wait`, hiding its launch latency behind the select kernel]
    GEMV:    count ∥ idx ∥ values → weight rows (HBM) → row reduction → partial store → arrival
             atomic → (last program) partial loads ∥ bias → epilogue store           (4 round trips)
versus the masked-load loop's x/thr → weights → … per iteration of a chunk, whatever the density.

config `fused=True` drops the select kernel: each GEMV program compacts its own (stripe, chunk) into a
private scratch region (store → barrier → load, in L1/L2) before the loop. It saves a launch and the
kernel boundary at the price of redundant mask work (stripe / BLOCK_M programs per region) and one
on-chip round trip; which of the two wins on a given GPU is an empirical question (bench `--compact`).

Workspaces are cached per (device, shape, tiling), zeroed once and reused, so repeated calls (and a
captured CUDA graph) allocate nothing but the output when no `out` is given. Like `gemv.py`, one
workspace must not be used by two streams at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gemv as G
from .gemv import (INTERPRET, MASK_NONE, MASK_NONZERO, MASK_THRESHOLD, _epi_finish, _epi_loads, _load_rows,
                   _mask_pre, _mask_x, _pdl_enter, _rstd, gdc_launch_dependents, gdc_wait, pdl_kw, use_pdl)

__all__ = ["gemv_compact", "compact_config", "TUNED_COMPACT", "MASK_THRESHOLD", "MASK_NONZERO", "MASK_NONE"]


@triton.jit
def _select_pre(MEAN, THR, r, c, N, stride_mk, NW, CHUNK: tl.constexpr, MASK_MODE: tl.constexpr, NORM: tl.constexpr):
    """The constant operands of `_select_block` (loaded before the PDL wait)."""
    rows = c * CHUNK + tl.arange(0, CHUNK)
    return _mask_pre(MEAN + r * stride_mk, THR + r * N, rows, N, MASK_MODE, NW, NORM)


@triton.jit
def _select_block(X, mu, t, w, c, N, eps, CHUNK: tl.constexpr, MASK_MODE: tl.constexpr, NORM: tl.constexpr,
                  NB: tl.constexpr):
    """Chunk c of stripe r (mu, t, w = `_select_pre(..., r, c, ...)`): (rows, values, on, exclusive prefix
    count of on, count). NORM: fused RMSNorm."""
    rows = c * CHUNK + tl.arange(0, CHUNK)
    xr = tl.load(X + rows, mask=rows < N, other=0.0)   # in flight together with the norm's loads
    rstd = 1.0
    if NORM:
        rstd = _rstd(X, N, eps, NB)
    return _select_x(xr, rows, N, mu, t, w, rstd, MASK_MODE, NORM)


@triton.jit
def _select_x(xr, rows, N, mu, t, w, rstd, MASK_MODE: tl.constexpr, NORM: tl.constexpr):
    """`_select_block` given x[rows] (xr, loaded) and the norm's rstd."""
    xc, on = _mask_x(xr, rows, N, mu, t, w, rstd, MASK_MODE, NORM)   # the masked-load kernel's mask
    on_i = on.to(tl.int32)
    pos = tl.cumsum(on_i, axis=0) - on_i            # exclusive: slot of each active row
    cnt = tl.sum(on_i, axis=0)
    return rows, xc, on, pos, cnt


@triton.jit
def _slot_products(IDX, VAL, WT, base, s, cnt, cols, cmask, M, EVEN_M: tl.constexpr):
    """(slots, BLOCK_M) fp32 products value × weight row segment of the compacted slots s < cnt; stale
    slots ≥ cnt are masked (no load)."""
    on = s < cnt
    idx = tl.load(IDX + base + s)
    v = tl.load(VAL + base + s)
    w = _load_rows(WT, idx, cols, M, on, cmask, EVEN_M)
    return tl.where(on, v, 0.0)[:, None] * w.to(tl.float32)


@triton.jit
def _select_kernel(X, MEAN, THR, IDX, VAL, CNT, NW, N, NCHUNK, stride_mk, eps,
                   CHUNK: tl.constexpr, MASK_MODE: tl.constexpr, USE_GDC: tl.constexpr,
                   NORM: tl.constexpr, NB: tl.constexpr, USE_PDL: tl.constexpr = False):
    c = tl.program_id(0)
    r = tl.program_id(1)
    mu, t, w = _select_pre(MEAN, THR, r, c, N, stride_mk, NW, CHUNK, MASK_MODE, NORM)
    _pdl_enter(USE_PDL)
    if USE_GDC:
        gdc_launch_dependents()                     # let the GEMV grid launch now; it waits in gdc_wait
    rows, xc, on, pos, cnt = _select_block(X, mu, t, w, c, N, eps, CHUNK, MASK_MODE, NORM, NB)
    region = r * NCHUNK + c
    base = region.to(tl.int64) * CHUNK
    tl.store(IDX + base + pos, rows, mask=on)
    tl.store(VAL + base + pos, xc, mask=on)
    tl.store(CNT + region, cnt)


@triton.jit
def _compact_gemv_kernel(X, MEAN, THR, IDX, VAL, CNT, WT, BIAS, RES, UTHR, Y, WS, ARR, NW,
                         N, M, STRIPE, NCHUNK, stride_mk, eps,
                         CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                         SPLIT: tl.constexpr, MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_RES: tl.constexpr, ACT: tl.constexpr, EVEN_M: tl.constexpr,
                         FUSED: tl.constexpr, USE_GDC: tl.constexpr, NORM: tl.constexpr, NB: tl.constexpr,
                         USE_PDL: tl.constexpr = False, NREAD=None, COUNT: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    col0 = pid_m * BLOCK_M
    cols = col0 + tl.arange(0, BLOCK_M)
    cmask = cols < M
    r = col0 // STRIPE                              # this block's stripe (BLOCK_M divides STRIPE)
    slots = tl.arange(0, BLOCK_N)
    if FUSED:   # the chunk's mean, thresholds, norm weights load before the PDL wait
        mu, t, w = _select_pre(MEAN, THR, r, pid_c, N, stride_mk, NW, CHUNK, MASK_MODE, NORM)
    _pdl_enter(USE_PDL)
    bs = tl.arange(0, 1)
    omask = cmask[None, :]
    # the epilogue's operands load now, not after the reduction (or the split-K arrival)
    eb, eu, er = _epi_loads(BIAS, RES, UTHR, bs, cols, cmask, omask, 0, HAS_BIAS, HAS_RES, ACT)
    if FUSED:   # compact this program's own (stripe, chunk) into its private scratch region
        rows, xc, on_s, pos, cnt = _select_block(X, mu, t, w, pid_c, N, eps, CHUNK, MASK_MODE, NORM, NB)
        base = (pid_c * tl.num_programs(0) + pid_m).to(tl.int64) * CHUNK
        tl.store(IDX + base + pos, rows, mask=on_s)
        tl.store(VAL + base + pos, xc, mask=on_s)
        tl.debug_barrier()                          # the block's stores are visible to all its threads
    else:
        if USE_GDC:
            gdc_wait()                              # the select kernel's writes are visible
        region = r * NCHUNK + pid_c
        base = region.to(tl.int64) * CHUNK
        cnt = tl.load(CNT + region)
    if COUNT:   # weights read: the chunk's active inputs x this block's columns (see gemv._gmm_kernel)
        tl.atomic_add(NREAD, cnt.to(tl.int64) * tl.minimum(M - col0, BLOCK_M), sem="relaxed", scope="gpu")
    # first block of slots: loaded with the count (a region is CHUNK ≥ BLOCK_N slots long), so the
    # weight loads are the second round trip; stale slots ≥ count are masked out
    acc2 = _slot_products(IDX, VAL, WT, base, slots, cnt, cols, cmask, M, EVEN_M)
    for j0 in range(BLOCK_N, cnt, BLOCK_N):         # only when the chunk is denser than BLOCK_N/CHUNK
        acc2 += _slot_products(IDX, VAL, WT, base, j0 + slots, cnt, cols, cmask, M, EVEN_M)
    acc = tl.sum(acc2, axis=0)[None, :]             # (1, BLOCK_M): one cross-thread reduction

    if SPLIT == 1:
        _epi_finish(acc, eb, eu, er, Y, bs, cols, omask, 0, HAS_BIAS, HAS_RES, ACT)
    else:
        tl.store(WS + pid_c.to(tl.int64) * M + cols[None, :], acc, mask=omask)
        tl.debug_barrier()                          # every thread's partial is written ...
        done = tl.atomic_add(ARR + pid_m, 1, sem="acq_rel", scope="gpu")   # ... before we arrive
        if done == SPLIT - 1:                       # last to arrive: reduce and finish
            tot = tl.zeros((1, BLOCK_M), dtype=tl.float32)
            for s in tl.static_range(SPLIT):        # unrolled: all partial loads in flight
                tot += tl.load(WS + s * M + cols[None, :], mask=omask, other=0.0, cache_modifier=".cg")
            _epi_finish(tot, eb, eu, er, Y, bs, cols, omask, 0, HAS_BIAS, HAS_RES, ACT)
            tl.atomic_xchg(ARR + pid_m, 0)          # ready for the next launch


# --------------------------------------------------------------------------------- launcher

# (n, m) -> compact_config overrides: the fastest tiles of the H100 sweep at 66% sparsity
# (`bench_kernels.py --device cuda --compact --quick`, experiments/results/gpu_kernels_compact.md), for the
# shapes where this kernel beat `gemv._gmm_kernel` there; `gemv.gemv_ex` sends one token of these shapes here.
# Not listed (q/o 2048², k/v 2048×512, fused q,k,v): the masked-load kernel was as fast or faster.
# Timed with thresholds at stripe 512. The engine's down projection runs in MASK_NONZERO mode with one
# stripe; there too the down tiles below were the fastest variant (experiments/results/gpu_down_nonzero.md).
# (2048, 8192) is the gate in the engine (its up projection has its own kernel), and any up run here.
TUNED_COMPACT: dict = {   # at 66 % sparsity: compact µs vs the masked-load kernel's (cuBLAS dense)
    # H100 (experiments/results/gpu_kernels_compact.md)
    (2048, 8192): dict(fused=True, chunk=1024, block_n=256),      # gate/up shape: 10.04 vs 11.58 (14.05)
    (8192, 2048): dict(fused=True, chunk=1024, block_n=256),      # down: 10.26 vs 11.78 (16.29)
    (2048, 128256): dict(chunk=2048, block_n=256),                # LM head: 73.0 vs 90.1 (188.8)
    # H200 (experiments/results/gpu_h200/kernels_2026-12-04/): Llama-3.2-3B, and the paper's 4096 × 14336
    (3072, 128256): dict(block_n=128),                            # 3B LM head: 85.6 vs 126.1 (180.1)
    (3072, 8192): dict(fused=True, chunk=2048, block_n=256),      # 3B gate/up: 10.75 vs 14.42 (14.79)
    (8192, 3072): dict(fused=True, chunk=2048, block_n=256),      # 3B down: 10.70 vs 15.55 (18.15)
    (4096, 14336): dict(block_n=128),                             # up: 18.79 vs 25.01 (30.38)
    (14336, 4096): dict(block_n=128),                             # down: 18.82 vs 33.46 (31.44)
}
_WORKSPACES: dict = {}


def compact_config(n: int, m: int, stripe: int, device: torch.device, **overrides) -> dict:
    """Tiles for `gemv_compact`. Overrides: block_m, chunk, block_n, waves, max_split, num_warps,
    num_stages, select_warps, fused, pdl; `TUNED_COMPACT[(n, m)]` supplies them when none are given.

    Default: output blocks of 64 (a 128-byte bf16 row segment per input), chunks sized so that about
    `waves` × SMs programs exist (4 × 132 on an H100: several resident programs per SM, every weight
    load of the layer in flight at once), CHUNK a power of two in [64, 1024] with at most `max_split`
    chunks, and BLOCK_N = CHUNK / 2 (≤ 128): slot blocks of at most 128 rows, pipelined. A cap of 256
    (one slot block for a chunk of 1024 up to 50 % density: every weight load of a program in one round
    trip) was 16-33 % slower wherever it applied, on the H100 and the H200 alike (the sweeps'
    `block_n` 128 rows); 8 warps when the (BLOCK_N, BLOCK_M) fp32 accumulator would exceed 64 registers
    a thread with 4."""
    p = dict(block_m=64, chunk=None, block_n=None, waves=4.0, max_split=64, num_warps=None, num_stages=3,
             select_warps=None, fused=False, pdl=False)
    p.update(TUNED_COMPACT.get((n, m), {}) if not overrides else {})
    p.update(overrides)
    if stripe >= m:
        stripe = m
    bm = G._block_m(stripe, m, p["block_m"])
    grid_m = triton.cdiv(m, bm)
    chunk = p["chunk"]
    if chunk is None:
        target = max(1, int(p["waves"] * G._num_sms(device)))
        chunk = min(1024, max(64, triton.next_power_of_2(triton.cdiv(n * grid_m, target))))
        while triton.cdiv(n, chunk) > p["max_split"]:
            chunk *= 2
        chunk = min(chunk, max(16, triton.next_power_of_2(n)))
    assert chunk & (chunk - 1) == 0, f"chunk {chunk} must be a power of two"
    bn = min(p["block_n"] or max(16, min(128, chunk // 2)), chunk)
    nw = p["num_warps"] or (4 if bn * bm <= 8192 else 8)     # ≤ 64 fp32 accumulator registers a thread
    split = triton.cdiv(n, chunk)
    sw = p["select_warps"] or max(1, min(4, chunk // 256))
    pdl = bool(p["pdl"]) and not p["fused"] and not INTERPRET and gdc_wait is not None
    return dict(BLOCK_M=bm, BLOCK_N=bn, CHUNK=chunk, SPLIT=split, grid=(grid_m, split),
                num_warps=nw, num_stages=p["num_stages"], select_warps=sw,
                fused=bool(p["fused"]), pdl=pdl)


def _workspace(device: torch.device, n: int, m: int, k: int, cfg: dict) -> dict:
    """Index/value/count regions, split-K partials and arrival counters; allocated (zeroed) once."""
    key = (device.type, device.index, n, m, k, cfg["CHUNK"], cfg["BLOCK_M"], cfg["fused"])
    ws = _WORKSPACES.get(key)
    if ws is None:
        grid_m, split = cfg["grid"]
        regions = grid_m * split if cfg["fused"] else k * split   # fused: one private region a program
        ws = dict(idx=torch.zeros(regions * cfg["CHUNK"], dtype=torch.int32, device=device),
                  val=torch.zeros(regions * cfg["CHUNK"], dtype=torch.float32, device=device),
                  cnt=torch.zeros(max(regions, 1), dtype=torch.int32, device=device),
                  part=torch.zeros(split * m, dtype=torch.float32, device=device),
                  arr=torch.zeros(grid_m, dtype=torch.int32, device=device))  # left zeroed by every launch
        _WORKSPACES[key] = ws
    return ws


def gemv_compact(x: torch.Tensor, wt: torch.Tensor, mean: torch.Tensor | None, thr: torch.Tensor | None,
                 bias: torch.Tensor | None, stripe: int, *, residual: torch.Tensor | None = None,
                 act: str | None = None, unit_thr: torch.Tensor | None = None,
                 mask_mode: int = MASK_THRESHOLD, out_dtype: torch.dtype | None = None,
                 out: torch.Tensor | None = None, config: dict | None = None,
                 norm_w: torch.Tensor | None = None, eps: float = 1e-6,
                 count: torch.Tensor | None = None) -> torch.Tensor:
    """`gemv.gemv_ex` with work ∝ density for one token (B > 1: `gemv_ex`, config ignored).

    x (1, n); wt (n, m) contiguous; mean (n,) or per stripe (k, n) fp32; thr (k, n) fp32; bias (m,)
    fp32 or None; residual (1, m); act + unit_thr: activation and unit mask in the epilogue (output
    fp32 unless out_dtype says otherwise). config: `compact_config(...)`. norm_w, eps: fused RMSNorm of x
    (`gemv.gemv_ex`). count: the weights read are added into it (`gemv.gemv_ex`)."""
    B, n = x.shape
    G.check_count(count, x)
    if B != 1:
        return G.gemv_ex(x, wt, mean, thr, bias, stripe, residual=residual, act=act, unit_thr=unit_thr,
                         mask_mode=mask_mode, out_dtype=out_dtype, out=out, compact=False, norm_w=norm_w, eps=eps)
    G.check_norm(x, norm_w)
    norm = dict(NORM=norm_w is not None, NB=triton.next_power_of_2(n))
    nw_ = norm_w if norm_w is not None else x
    m = wt.shape[1]
    k, stripe, stride_mk, out_dtype = G.check_args(x, wt, mean, thr, stripe, mask_mode, act, out_dtype, bias,
                                                   unit_thr)
    y = out if out is not None else torch.empty((1, m), dtype=out_dtype, device=x.device)
    if residual is not None:
        assert residual.shape == (1, m) and residual.stride(1) == 1
    if act is not None:
        assert unit_thr is not None and unit_thr.dtype == torch.float32
    cfg = config or compact_config(n, m, stripe, x.device)
    ws = _workspace(x.device, n, m, k, cfg)
    grid_m, split = cfg["grid"]
    dummy = y
    mean_ = mean if mean is not None else dummy
    thr_ = thr if thr is not None else dummy
    pdl = cfg["pdl"]                 # select -> GEMV only (launches the GEMV early, which waits for the lists)
    every = use_pdl(x.device)        # every kernel (gemv.use_pdl): waits for its predecessor first
    if not cfg["fused"]:
        _select_kernel[(split, k)](x, mean_, thr_, ws["idx"], ws["val"], ws["cnt"], nw_, n, split, stride_mk,
                                   float(eps), CHUNK=cfg["CHUNK"], MASK_MODE=mask_mode, USE_GDC=pdl, **norm,
                                   USE_PDL=every, num_warps=cfg["select_warps"], num_stages=1, **pdl_kw(every))
    extra = pdl_kw(pdl or every)
    _compact_gemv_kernel[(grid_m, split)](
        x, mean_, thr_, ws["idx"], ws["val"], ws["cnt"], wt,
        bias if bias is not None else dummy, residual if residual is not None else dummy,
        unit_thr if unit_thr is not None else dummy, y, ws["part"], ws["arr"], nw_,
        n, m, stripe, split, stride_mk, float(eps),
        CHUNK=cfg["CHUNK"], BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], SPLIT=split,
        MASK_MODE=mask_mode, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        ACT=G.act_code(act, x.dtype), EVEN_M=(m % cfg["BLOCK_M"] == 0), FUSED=cfg["fused"], USE_GDC=pdl,
        NORM=norm["NORM"] and cfg["fused"], NB=norm["NB"], USE_PDL=every,
        NREAD=count if count is not None else y, COUNT=count is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
    return y
