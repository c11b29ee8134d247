"""Small Triton kernels of the decode engine (shared by the dense and the CWIC model).

Each has its PyTorch reference beside it (`*_ref`), used on the CPU and by the tests. Positions are read
from a device tensor inside the kernels, so a decode step has no host synchronisation and can be
captured once in a CUDA graph and replayed at every position.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .gemv import ACT_IDS, EVICT_W, MASK_THRESHOLD, _act, _overlap, _pdl_enter, check_args, pdl_args

# ------------------------------------------------------------------------------------ RMSNorm


@triton.jit
def _rmsnorm_kernel(X, W, Y, D, eps, stride_x, stride_y, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    _pdl_enter(USE_PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + offs, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    T, D = x.shape
    y = torch.empty_like(x)
    block = triton.next_power_of_2(D)
    _rmsnorm_kernel[(T,)](x, w, y, D, eps, x.stride(0), y.stride(0), BLOCK=block,
                          num_warps=4 if block <= 2048 else 8, **pdl_args(x.device))
    return y


def rmsnorm_ref(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


# ---------------------------------------------------------------- RoPE + KV-cache write


@triton.jit
def _rope_cache_kernel(QKV, Q, KC, VC, COS, SIN, POS, HQ, HKV, stride_qkv, stride_q, stride_c,
                       HALF: tl.constexpr, USE_PDL: tl.constexpr = False, ACC: tl.constexpr = False,
                       CLR=None, CLR_N=0, BLOCK_CLR: tl.constexpr = 0):
    _pdl_enter(USE_PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)                        # q heads, then k heads, then v heads
    if BLOCK_CLR > 0:   # zero CLR[:CLR_N], a slice a head (buffers whose readers have all finished)
        if t == 0:
            offs = h * BLOCK_CLR + tl.arange(0, BLOCK_CLR)
            tl.store(CLR + offs, tl.zeros((BLOCK_CLR,), dtype=tl.float32), mask=offs < CLR_N)
    pos = tl.load(POS) + t
    d = tl.arange(0, HALF)
    src = QKV + t * stride_qkv + h * (2 * HALF)
    x1 = tl.load(src + d)
    x2 = tl.load(src + HALF + d)
    if ACC:   # QKV is the fp32 sum of a `gemv_ex(acc_out=...)`: round it as its epilogue would, zero it for the next
        x1 = x1.to(KC.dtype.element_ty)
        x2 = x2.to(KC.dtype.element_ty)
        tl.store(src + d, tl.zeros((HALF,), dtype=tl.float32))
        tl.store(src + HALF + d, tl.zeros((HALF,), dtype=tl.float32))
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if h < HQ + HKV:
        c = tl.load(COS + pos * HALF + d)
        s = tl.load(SIN + pos * HALF + d)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        if h < HQ:
            dst = Q + t * stride_q + h * (2 * HALF)
        else:
            dst = KC + pos * stride_c + (h - HQ) * (2 * HALF)
    else:
        o1 = x1
        o2 = x2
        dst = VC + pos * stride_c + (h - HQ - HKV) * (2 * HALF)
    tl.store(dst + d, o1.to(KC.dtype.element_ty))
    tl.store(dst + HALF + d, o2.to(KC.dtype.element_ty))


def rope_cache(qkv: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               kc: torch.Tensor, vc: torch.Tensor, hq: int, hkv: int, acc: bool = False,
               clear: torch.Tensor | None = None) -> torch.Tensor:
    """qkv (T, (hq+2hkv)·hd) → rotated q (T, hq·hd); rotated k and v written to kc/vc (L, hkv, hd) at
    positions pos[0] + t. cos/sin (max_len, hd/2) fp32 tables (HF's rotary embedding, scaling included).
    acc: qkv is the fp32 sum left by `gemv.gemv_ex(acc_out=qkv)`; it is rounded to the cache dtype first (as
    that kernel's epilogue would round y when y has the cache's dtype, as in the decode engine), q comes out in
    the cache dtype, and qkv is left zeroed.
    clear: a contiguous fp32 tensor the kernel also zeroes (the decode engine's hand-off buffers whose readers,
    the kernels launched before this one, have all finished: the o product and the FFN's y_acc)."""
    T = qkv.shape[0]
    hd = kc.shape[-1]
    assert not acc or (qkv.dtype == torch.float32 and qkv.is_contiguous())
    if clear is not None and not (clear.dtype == torch.float32 and clear.is_contiguous()):
        raise ValueError(f"clear: a contiguous fp32 tensor, got {clear.dtype}")
    nprog = hq + 2 * hkv
    bc = triton.next_power_of_2(triton.cdiv(clear.numel(), nprog)) if clear is not None and clear.numel() else 0
    q = torch.empty((T, hq * hd), dtype=kc.dtype if acc else qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(T, hq + 2 * hkv)](qkv, q, kc, vc, cos, sin, pos, hq, hkv, qkv.stride(0),
                                          q.stride(0), kc.stride(0), HALF=hd // 2, ACC=acc, num_warps=1,
                                          **pdl_args(qkv.device), CLR=clear if bc else qkv,
                                          CLR_N=clear.numel() if bc else 0, BLOCK_CLR=bc)
    return q


def rope_cache_ref(qkv, pos, cos, sin, kc, vc, hq, hkv, acc: bool = False, clear=None):
    if clear is not None:
        clear.zero_()
    T = qkv.shape[0]
    hd = kc.shape[-1]
    half = hd // 2
    p = pos.reshape(-1)[:1].long() + torch.arange(T, device=qkv.device)
    if acc:
        src = qkv
        qkv = qkv.to(kc.dtype, copy=True)
        src.zero_()
    x = qkv.float().view(T, hq + 2 * hkv, hd)
    c, s = cos[p][:, None, :], sin[p][:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    rot = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    kc[p] = rot[:, hq:hq + hkv].to(kc.dtype)
    vc[p] = x[:, hq + hkv:].to(vc.dtype)
    return rot[:, :hq].reshape(T, hq * hd).to(qkv.dtype)


# ------------------------------------------------------------------------ decode attention


@triton.jit
def _attn_kernel(Q, KC, VC, O, POS, sm_scale, stride_q, stride_c, stride_o,
                 GROUP: tl.constexpr, HD: tl.constexpr, BLOCK_T: tl.constexpr, USE_PDL: tl.constexpr = False):
    _pdl_enter(USE_PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    last = tl.load(POS) + t                      # query t sees cache positions 0..last
    d = tl.arange(0, HD)
    q = tl.load(Q + t * stride_q + h * HD + d).to(tl.float32) * sm_scale
    m_i = tl.max(tl.full((BLOCK_T,), float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros((BLOCK_T,), tl.float32), axis=0)
    acc = tl.zeros((HD,), tl.float32)
    for s0 in range(0, last + 1, BLOCK_T):
        offs = s0 + tl.arange(0, BLOCK_T)
        valid = offs <= last
        kv_off = offs.to(tl.int64)[:, None] * stride_c + kvh * HD + d[None, :]
        k = tl.load(KC + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(VC + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)   # in flight with k
        sc = tl.sum(k * q[None, :], axis=1)
        sc = tl.where(valid, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        p = tl.exp(sc - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    tl.store(O + t * stride_o + h * HD + d, (acc / l_i).to(O.dtype.element_ty))


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor,
                     hq: int, sm_scale: float, block_t: int = 128) -> torch.Tensor:
    """Causal attention of T new queries (positions pos[0]+t) over the cache; GQA by head groups."""
    T = q.shape[0]
    hkv, hd = kc.shape[1], kc.shape[2]
    o = torch.empty_like(q)
    _attn_kernel[(T, hq)](q, kc, vc, o, pos, sm_scale, q.stride(0), kc.stride(0), o.stride(0),
                          GROUP=hq // hkv, HD=hd, BLOCK_T=block_t, num_warps=4, **pdl_args(q.device))
    return o


def decode_attention_ref(q, kc, vc, pos, hq, sm_scale, block_t=None):
    T = q.shape[0]
    hkv, hd = kc.shape[1], kc.shape[2]
    p0 = pos.reshape(-1)[:1].long()
    n = kc.shape[0]
    qf = q.float().view(T, hq, hd)
    k = kc.float().repeat_interleave(hq // hkv, dim=1)      # (L, hq, hd)
    v = vc.float().repeat_interleave(hq // hkv, dim=1)
    sc = torch.einsum("thd,lhd->thl", qf, k) * sm_scale
    allowed = torch.arange(n, device=q.device)[None, :] <= (p0 + torch.arange(T, device=q.device))[:, None]
    sc = sc.masked_fill(~allowed[:, None, :], float("-inf"))
    o = torch.einsum("thl,lhd->thd", sc.softmax(-1), v)
    return o.reshape(T, hq * hd).to(q.dtype)


# ---------------------------------------------------- one token: attention + the CWIC o product, one launch


@triton.jit
def _attn_o_kernel(Q, KC, VC, POS, sm_scale, stride_c, WT, MEAN, THR, BIAS, Y, N, M, STRIPE, stride_mk, M_PER,
                   GROUP: tl.constexpr, HD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
                   NBLK: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program (h, j): head h's attention output for one token (as `_attn_kernel`, rounded to q's dtype as that
    kernel stores it), then its share of the CWIC o product: the head's HD inputs h·HD + d against output columns
    [j·M_PER, (j+1)·M_PER), in NBLK blocks of BLOCK_M (each inside one stripe), masks from the rounded values, the
    mean and the stripe's thresholds as `gemv._mask_x`; the fp32 partials (+ the folded bias, head 0) are added
    into Y with atomics, as `gemv_ex(acc_out=...)` does. The attention output never goes to memory."""
    h = tl.program_id(0)
    j = tl.program_id(1)
    kvh = h // GROUP
    d = tl.arange(0, HD)
    rows = h * HD + d
    c_lo = j * M_PER
    # the first block's constant operands (mean, thresholds) load before the PDL wait
    r0 = c_lo // STRIPE
    mu = tl.load(MEAN + r0 * stride_mk + rows, eviction_policy="evict_last")
    t = tl.load(THR + r0 * N + rows, eviction_policy="evict_last")
    _pdl_enter(USE_PDL)
    last = tl.load(POS)
    q = tl.load(Q + h * HD + d).to(tl.float32) * sm_scale
    # the online-softmax loop of _attn_kernel, written out here too: 833588a shared it as one jit helper (and moved
    # where the engine takes the o hand-off buffer), and the decode measured 2 % slower on the H200 (1.742x against
    # 1.778x at 3x APR, alternated runs; experiments/results/gpu_h200/chat_engine_2026-12-03), so it was reverted
    # whole; which of its two parts cost the 2 % was not isolated
    m_i = tl.max(tl.full((BLOCK_T,), float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros((BLOCK_T,), tl.float32), axis=0)
    acc = tl.zeros((HD,), tl.float32)
    for s0 in range(0, last + 1, BLOCK_T):
        offs = s0 + tl.arange(0, BLOCK_T)
        valid = offs <= last
        kv_off = offs.to(tl.int64)[:, None] * stride_c + kvh * HD + d[None, :]
        k = tl.load(KC + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(VC + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        sc = tl.sum(k * q[None, :], axis=1)
        sc = tl.where(valid, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        p = tl.exp(sc - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    x = (acc / l_i).to(Q.dtype.element_ty).to(tl.float32)
    for b in tl.static_range(NBLK):
        c0 = c_lo + b * BLOCK_M
        cols = c0 + tl.arange(0, BLOCK_M)
        cmask = cols < M
        if b > 0:   # (a block wholly past m, in the last program: its stripe row clamped, nothing loaded or added)
            r = tl.minimum(c0, M - 1) // STRIPE
            mu = tl.load(MEAN + r * stride_mk + rows, eviction_policy="evict_last")
            t = tl.load(THR + r * N + rows, eviction_policy="evict_last")
        xc = x - mu
        on = (tl.abs(xc) >= t) | (xc != xc)
        xc = tl.where(on, xc, 0.0)
        w = tl.load(WT + rows.to(tl.int64)[:, None] * M + cols[None, :], mask=on[:, None] & cmask[None, :],
                    other=0.0, eviction_policy=EVICT_W)
        part = tl.sum(xc[:, None] * w.to(tl.float32), axis=0)
        if HAS_BIAS:
            part += tl.where(h == 0, tl.load(BIAS + cols, mask=cmask, other=0.0), 0.0)
        tl.atomic_add(Y + cols, part, mask=cmask, sem="relaxed", scope="gpu")


def attn_o_config(m: int, stripe: int, hd: int, split: int | None = None, block_m: int | None = None) -> dict | None:
    """Tiles of `attn_o` for an o product of m outputs in stripes of `stripe`: `split` programs a head over the
    outputs ($CWIC_ATTN_O_SPLIT, default 8: the fastest of 1, 2, 4, 8 on the H200), blocks of `block_m` outputs
    ($CWIC_ATTN_O_BLOCK, default 128; less where the stripe needs it: each block lies inside one stripe; rounded
    down to a power of two). None where the shape does not fit (a head dimension that is not a power of two, a
    stripe not a multiple of 16): the engine then keeps attention + gemv_ex."""
    split = int(os.environ.get("CWIC_ATTN_O_SPLIT", "8") if split is None else split)
    block_m = int(os.environ.get("CWIC_ATTN_O_BLOCK", "128") if block_m is None else block_m)
    if block_m < 1:
        return None
    block_m = min(1 << (block_m.bit_length() - 1), triton.next_power_of_2(m))   # a power of two
    if stripe < m:   # blocks inside one stripe: the largest power of two dividing it, at most block_m
        block_m = min(block_m, stripe & -stripe)
    if split < 1 or hd & (hd - 1) or block_m < 16:
        return None
    m_per = triton.cdiv(triton.cdiv(m, split), block_m) * block_m
    return dict(split=triton.cdiv(m, m_per), m_per=m_per, BLOCK_M=block_m, NBLK=m_per // block_m)


def attn_o(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor, hq: int, sm_scale: float,
           wt: torch.Tensor, mean: torch.Tensor, thr: torch.Tensor, bias: torch.Tensor | None, stripe: int,
           acc_out: torch.Tensor, block_t: int = 128, config: dict | None = None) -> torch.Tensor:
    """One token: attention (`decode_attention`) and the CWIC o product of its output (`gemv_ex(att, wt, mean, thr,
    bias, stripe, acc_out=acc_out)`) in one launch; the fp32 product (+ bias) is added into acc_out (1, m), which is
    returned. q (1, hq·hd) after RoPE; wt (hq·hd, m) input-major; mean (n,) or per stripe (k, n) fp32; thr (k, n)."""
    T = q.shape[0]
    hkv, hd = kc.shape[1], kc.shape[2]
    n, m = wt.shape
    assert T == 1 and n == hq * hd and q.is_contiguous() and wt.is_contiguous()
    assert acc_out.shape == (1, m) and acc_out.dtype == torch.float32 and acc_out.is_contiguous()
    cfg = config or attn_o_config(m, stripe, hd)
    if cfg is None:
        raise ValueError(f"attn_o: no tiles for m={m}, stripe={stripe}, head_dim={hd} (see attn_o_config)")
    _, stripe, stride_mk, _ = check_args(q, wt, mean, thr, stripe, MASK_THRESHOLD, None, torch.float32)
    _attn_o_kernel[(hq, cfg["split"])](q, kc, vc, pos, sm_scale, kc.stride(0), wt, mean, thr,
                                      bias if bias is not None else acc_out, acc_out, n, m, stripe, stride_mk,
                                      cfg["m_per"], GROUP=hq // hkv, HD=hd, BLOCK_T=block_t,
                                      BLOCK_M=cfg["BLOCK_M"], NBLK=cfg["NBLK"], HAS_BIAS=bias is not None,
                                      num_warps=4, **pdl_args(q.device))
    return acc_out


# ---------------------------------------------------- one token: RoPE + cache write + attention, one launch


@triton.jit
def _rope_attn_kernel(QKV, KC, VC, O, POS, COS, SIN, sm_scale, stride_c, HQ, HKV,
                      HALF: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr,
                      CLR1, N1, CLR2, N2, BLOCK_CLR: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program h (a query head) of one token at position pos: RoPE of its q head and of its kv head's k (v as
    is), k and v written to the cache at pos (the GROUP programs of a kv head write the same bits), then the
    online-softmax attention over positions 0 .. pos, position pos from registers (never read back: no race
    with the writes). Head vectors are handled as two halves (RoPE's layout). ACC: QKV is an fp32 sum, rounded
    to the cache dtype first (not zeroed: the caller clears it in a later launch, as CLR1 / CLR2 are here)."""
    _pdl_enter(USE_PDL)
    h = tl.program_id(0)
    kvh = h // GROUP
    if BLOCK_CLR > 0:   # zero CLR1[:N1] and CLR2[:N2], a slice a program (buffers whose readers have finished)
        co = h * BLOCK_CLR + tl.arange(0, BLOCK_CLR)   # (not `offs`: a name alive before the loop below would
        tl.store(CLR1 + co, tl.zeros((BLOCK_CLR,), dtype=tl.float32), mask=co < N1)   # be carried through it)
        tl.store(CLR2 + co, tl.zeros((BLOCK_CLR,), dtype=tl.float32), mask=co < N2)
    pos = tl.load(POS)
    d = tl.arange(0, HALF)
    qs = QKV + h * (2 * HALF)
    ks = QKV + (HQ + kvh) * (2 * HALF)
    vs = QKV + (HQ + HKV + kvh) * (2 * HALF)
    q1 = tl.load(qs + d)
    q2 = tl.load(qs + HALF + d)
    k1 = tl.load(ks + d)
    k2 = tl.load(ks + HALF + d)
    v1 = tl.load(vs + d)
    v2 = tl.load(vs + HALF + d)
    c = tl.load(COS + pos * HALF + d)
    s = tl.load(SIN + pos * HALF + d)
    if ACC:   # as rope_cache(acc=True): the sum rounded to the cache dtype
        q1 = q1.to(KC.dtype.element_ty)
        q2 = q2.to(KC.dtype.element_ty)
        k1 = k1.to(KC.dtype.element_ty)
        k2 = k2.to(KC.dtype.element_ty)
        v1 = v1.to(KC.dtype.element_ty)
        v2 = v2.to(KC.dtype.element_ty)
    q1 = q1.to(tl.float32)
    q2 = q2.to(tl.float32)
    k1 = k1.to(tl.float32)
    k2 = k2.to(tl.float32)
    # rotated q rounded as rope_cache stores it (the cache dtype), then scaled as the attention kernel does
    r1 = (q1 * c - q2 * s).to(KC.dtype.element_ty).to(tl.float32) * sm_scale
    r2 = (q2 * c + q1 * s).to(KC.dtype.element_ty).to(tl.float32) * sm_scale
    kr1 = (k1 * c - k2 * s).to(KC.dtype.element_ty)
    kr2 = (k2 * c + k1 * s).to(KC.dtype.element_ty)
    vr1 = v1.to(VC.dtype.element_ty)
    vr2 = v2.to(VC.dtype.element_ty)
    row = pos.to(tl.int64) * stride_c + kvh * (2 * HALF)
    tl.store(KC + row + d, kr1)
    tl.store(KC + row + HALF + d, kr2)
    tl.store(VC + row + d, vr1)
    tl.store(VC + row + HALF + d, vr2)
    kr1 = kr1.to(tl.float32)
    kr2 = kr2.to(tl.float32)
    vr1 = vr1.to(tl.float32)
    vr2 = vr2.to(tl.float32)
    m_i = tl.max(tl.full((BLOCK_T,), float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros((BLOCK_T,), tl.float32), axis=0)
    a1 = tl.zeros((HALF,), tl.float32)
    a2 = tl.zeros((HALF,), tl.float32)
    for s0 in range(0, pos + 1, BLOCK_T):
        offs = s0 + tl.arange(0, BLOCK_T)
        old = offs < pos
        cur = (offs == pos)[:, None]
        base = offs.to(tl.int64)[:, None] * stride_c + kvh * (2 * HALF) + d[None, :]
        kk1 = tl.load(KC + base, mask=old[:, None], other=0.0).to(tl.float32)
        kk2 = tl.load(KC + base + HALF, mask=old[:, None], other=0.0).to(tl.float32)
        vv1 = tl.load(VC + base, mask=old[:, None], other=0.0).to(tl.float32)   # in flight with k
        vv2 = tl.load(VC + base + HALF, mask=old[:, None], other=0.0).to(tl.float32)
        kk1 = tl.where(cur, kr1[None, :], kk1)
        kk2 = tl.where(cur, kr2[None, :], kk2)
        vv1 = tl.where(cur, vr1[None, :], vv1)
        vv2 = tl.where(cur, vr2[None, :], vv2)
        sc = tl.sum(kk1 * r1[None, :], axis=1) + tl.sum(kk2 * r2[None, :], axis=1)
        sc = tl.where(offs <= pos, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        p = tl.exp(sc - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        a1 = a1 * alpha + tl.sum(p[:, None] * vv1, axis=0)
        a2 = a2 * alpha + tl.sum(p[:, None] * vv2, axis=0)
        m_i = m_new
    tl.store(O + h * (2 * HALF) + d, (a1 / l_i).to(O.dtype.element_ty))
    tl.store(O + h * (2 * HALF) + HALF + d, (a2 / l_i).to(O.dtype.element_ty))


def _check_clear(clear, qkv: torch.Tensor) -> list:
    clear = [c for c in (clear or ()) if c is not None and c.numel()]
    if len(clear) > 2:
        raise ValueError("clear: at most two tensors")
    for c in clear:
        if not (c.dtype == torch.float32 and c.is_contiguous()):
            raise ValueError(f"clear: contiguous fp32 tensors, got {c.dtype}")
        if _overlap(c, qkv):
            raise ValueError("clear: must not share memory with qkv (the programs still read it)")
    return clear


def rope_attention(qkv: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor,
                   vc: torch.Tensor, hq: int, hkv: int, sm_scale: float, acc: bool = False, clear=(),
                   block_t: int = 128) -> torch.Tensor:
    """One token: `rope_cache` followed by `decode_attention`, in one launch (a program per query head).
    qkv (1, (hq+2hkv)·hd); kc/vc (L, hkv, hd) get the rotated k and v at position pos[0]; returns the attention
    output (1, hq·hd) in the dtype rope_cache's q has (the cache dtype with acc, else qkv's).
    acc: qkv is the fp32 sum of `gemv.gemv_ex(acc_out=qkv)`, rounded to the cache dtype first; unlike rope_cache it
    is NOT zeroed (every program of a kv head reads it): clear it in a later launch (the decode engine alternates
    two buffers and has the next layer's launch zero this one). clear: up to two contiguous fp32 tensors the
    kernel zeroes (buffers whose readers, the kernels launched before this one, have all finished)."""
    T = qkv.shape[0]
    hd = kc.shape[-1]
    if T != 1 or qkv.shape[1] != (hq + 2 * hkv) * hd or not qkv.is_contiguous():
        raise ValueError(f"rope_attention: one contiguous token of (hq + 2 hkv) * hd values, got {tuple(qkv.shape)}")
    if acc and qkv.dtype != torch.float32:
        raise ValueError("rope_attention(acc=True): qkv must be the fp32 sum")
    clear = _check_clear(clear, qkv)
    nmax = max([c.numel() for c in clear], default=0)
    bc = triton.next_power_of_2(triton.cdiv(nmax, hq)) if nmax else 0
    c1 = clear[0] if clear else qkv
    c2 = clear[1] if len(clear) > 1 else c1
    o = torch.empty((1, hq * hd), dtype=kc.dtype if acc else qkv.dtype, device=qkv.device)
    _rope_attn_kernel[(hq,)](qkv, kc, vc, o, pos, cos, sin, sm_scale, kc.stride(0), hq, hkv,
                             HALF=hd // 2, GROUP=hq // hkv, BLOCK_T=block_t, ACC=acc,
                             CLR1=c1, N1=clear[0].numel() if clear else 0, CLR2=c2,
                             N2=clear[1].numel() if len(clear) > 1 else 0, BLOCK_CLR=bc,
                             num_warps=4, **pdl_args(qkv.device))
    return o


def rope_attention_ref(qkv, pos, cos, sin, kc, vc, hq, hkv, sm_scale, acc: bool = False, clear=(), block_t=None):
    clear = _check_clear(clear, qkv)
    for c in clear:
        c.zero_()
    src = qkv.to(kc.dtype) if acc else qkv
    q = rope_cache_ref(src, pos, cos, sin, kc, vc, hq, hkv)
    return decode_attention_ref(q, kc, vc, pos, hq, sm_scale)


# ------------------------------------------------------------------ dense gated activation


@triton.jit
def _act_mul_kernel(GU, Y, F_, stride_gu, stride_y, ACT: tl.constexpr, BLOCK: tl.constexpr,
                    USE_PDL: tl.constexpr = False):
    _pdl_enter(USE_PDL)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F_
    g = tl.load(GU + t * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + t * stride_gu + F_ + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + t * stride_y + offs, (_act(g, ACT) * u).to(Y.dtype.element_ty), mask=mask)


def act_mul(gu: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """gu (T, 2F) = [gate | up] → act(gate) · up (T, F): the dense FFN's middle, one launch."""
    T, F2 = gu.shape
    F_ = F2 // 2
    y = torch.empty((T, F_), dtype=gu.dtype, device=gu.device)
    block = 1024
    _act_mul_kernel[(T, triton.cdiv(F_, block))](gu, y, F_, gu.stride(0), y.stride(0),
                                                 ACT=ACT_IDS[act], BLOCK=block, num_warps=4,
                                                 **pdl_args(gu.device))
    return y


def act_mul_ref(gu, act="silu"):
    from cwic_kernels.reference import ACTIVATIONS
    g, u = gu.float().chunk(2, dim=-1)
    return (ACTIVATIONS[act](g) * u).to(gu.dtype)


# ------------------------------------------------------------------------------- greedy argmax


@triton.jit
def _argmax_kernel(X, OUT, WV, WI, ARR, N, BLOCK: tl.constexpr, NP: tl.constexpr, USE_PDL: tl.constexpr = False):
    """One row: each program finds the max and its first index in BLOCK logits; the last program to
    arrive (acq_rel counter, reset by it) combines the partials. As torch.argmax: the first NaN wins."""
    _pdl_enter(USE_PDL)
    p = tl.program_id(0)
    offs = p * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    v = tl.load(X + offs, mask=inb, other=float("-inf")).to(tl.float32)
    nan_i = tl.min(tl.where((v != v) & inb, offs, N), axis=0)       # first NaN of the block, or N
    m = tl.max(tl.where(v != v, float("-inf"), v), axis=0)
    i = tl.min(tl.where((v == m) & inb, offs, N), axis=0)           # first index of the max
    has_nan = nan_i < N
    tl.store(WV + p, tl.where(has_nan, float("nan"), m))
    tl.store(WI + p, tl.where(has_nan, nan_i, i))
    tl.debug_barrier()
    done = tl.atomic_add(ARR, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        ps = tl.arange(0, NP)
        pm = ps < tl.num_programs(0)
        vv = tl.load(WV + ps, mask=pm, other=float("-inf"), cache_modifier=".cg")
        ii = tl.load(WI + ps, mask=pm, other=N, cache_modifier=".cg")
        first_nan = tl.min(tl.where((vv != vv) & pm, ii, N), axis=0)
        mm = tl.max(tl.where(vv != vv, float("-inf"), vv), axis=0)
        best = tl.min(tl.where((vv == mm) & pm, ii, N), axis=0)
        tl.store(OUT, tl.where(first_nan < N, first_nan, best).to(tl.int64))
        tl.atomic_xchg(ARR, 0)


_ARGMAX_WS: dict = {}


def argmax(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Greedy token of one row of logits (1, V) → (1,) int64: the first index of the maximum, or of the
    first NaN, as torch.argmax gives it; one launch, no host synchronisation."""
    assert logits.dim() == 2 and logits.shape[0] == 1 and logits.stride(1) == 1, logits.shape
    V = logits.shape[1]
    grid = triton.cdiv(V, block)
    key = (logits.device.type, logits.device.index, grid)
    ws = _ARGMAX_WS.get(key)
    if ws is None:   # partials, and an arrival counter of its own (left at zero by every launch)
        ws = _ARGMAX_WS[key] = (torch.empty(grid, dtype=torch.float32, device=logits.device),
                                torch.empty(grid, dtype=torch.int32, device=logits.device),
                                torch.zeros(1, dtype=torch.int32, device=logits.device))
    out = torch.empty(1, dtype=torch.int64, device=logits.device)
    _argmax_kernel[(grid,)](logits, out, ws[0], ws[1], ws[2], V, BLOCK=block,
                            NP=triton.next_power_of_2(grid), num_warps=4, **pdl_args(logits.device))
    return out


def argmax_ref(logits, block=None):
    return logits.argmax(-1)
