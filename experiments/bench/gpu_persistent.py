"""Does a persistent decode kernel shorten CWIC's fixed step? A probe on the Llama-3.2-1B shape.

The decode engine runs a layer as five kernels (q/k/v, RoPE, attention, o, FFN). With nothing to read its step still
takes about 20 µs a layer on an H100, which caps issue 5's decode speed-up (README, cost model). This probe runs the
same dependent chain of a CWIC layer, one token, as ONE kernel for all layers: each program (one an SM) takes work
items of four phases, separated by grid-wide hand-offs (arrive on a counter with release, poll with acquire):

1. r = residual + the previous FFN's sum; RMSNorm; the CWIC q/k/v GEMV (masks from |x − x̄| ≥ θ·σ per
   (stripe, input), a whole chunk's active rows loaded at once, fp32 atomics into a hand-off buffer);
2. RoPE, the cache write at `pos`, attention over the cache (one item a query head);
3. the CWIC o GEMV of the attention output;
4. the FFN: r' = r + o; RMSNorm; for a block of units the gate over all inputs (masked), SiLU and the unit mask,
   then the active units' up rows and down rows, the down sums added into the next layer's hand-off.

The same kernel also runs each phase of each layer as its own launch (`phased`: 4 × layers launches in one CUDA
graph, no hand-offs inside), which isolates what the hand-offs change from what the code does. Every hand-off
buffer is per layer, zeroed by one memset before each step, so no phase overwrites what another still reads.

This is a probe, not the engine's kernel: fp32 residual stream, one running mean a matrix, no bf16 rounding of the
hand-offs, `>=` masks. Its PyTorch reference (`reference`) checks the kernel's output before anything is timed.
Densities: each (stripe, input) pair and each FFN unit is on with probability d (thresholds 0 or +inf), so a
step reads d of the layer weights whatever the token; "off" reads none.

    python experiments/bench/gpu_persistent.py [--layers 16] [--pos 192] [--densities off,0.3333,1] [--out DIR]
    TRITON_INTERPRET=1 python experiments/bench/gpu_persistent.py --check-only --tiny   # CPU: correctness only

Each step (the memset and its launches) is timed as the other GPU benchmarks time their calls: one CUDA graph,
replayed about --target-ms a timing, the median of --rounds timings (`gpu_kernels.time_graph`). Prints a table and a
last-line JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.bench.gpu_kernels import time_graph  # noqa: E402
from experiments.cli import parse_list  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------------- device code

@triton.jit
def _grid_sync(BAR, target):
    """Grid-wide hand-off: this program's stores are done (block barrier), it arrives (release), and it waits until
    the counter reaches `target` (acquire); then every program's earlier writes are visible to it."""
    tl.debug_barrier()
    tl.atomic_add(BAR, 1, sem="release", scope="gpu")
    c = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    while c < target:
        c = tl.atomic_add(BAR, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _rstd(XA, XB, N, eps, NB: tl.constexpr):
    offs = tl.arange(0, NB)
    x = tl.load(XA + offs, mask=offs < N, other=0.0, cache_modifier=".cg") + \
        tl.load(XB + offs, mask=offs < N, other=0.0, cache_modifier=".cg")
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)


@triton.jit
def _gemv_phase(XA, XB, NW, rstd, MEAN, THR, WT, BIAS, ACC, N, M, STRIPE, pid, nprog,
                HAS_XB: tl.constexpr, NORM: tl.constexpr, CH: tl.constexpr, BM: tl.constexpr):
    """ACC[M] += CWIC product of x = (XA + XB) (· rstd · NW); items (column block, chunk of CH inputs)."""
    n_cb = M // BM
    for it in range(pid, n_cb * (N // CH), nprog):
        cb = it % n_cb
        c = it // n_cb
        rows = c * CH + tl.arange(0, CH)
        cols = cb * BM + tl.arange(0, BM)
        r = (cb * BM) // STRIPE
        mu = tl.load(MEAN + rows)
        t = tl.load(THR + r * N + rows)
        x = tl.load(XA + rows, cache_modifier=".cg")
        if HAS_XB:
            x += tl.load(XB + rows, cache_modifier=".cg")
        if NORM:
            x = x * rstd * tl.load(NW + rows).to(tl.float32)
        xc = x - mu
        on = tl.abs(xc) >= t
        w = tl.load(WT + rows.to(tl.int64)[:, None] * M + cols[None, :], mask=on[:, None], other=0.0)
        acc = tl.sum(tl.where(on, xc, 0.0)[:, None] * w.to(tl.float32), axis=0)
        if c == 0:
            acc += tl.load(BIAS + cols)
        tl.atomic_add(ACC + cols, acc, sem="relaxed")


@triton.jit
def _attn_phase(QKV, KC, VC, COS, SIN, pos, O, sm_scale, stride_c, HQ, HKV, pid, nprog,
                GROUP: tl.constexpr, HD: tl.constexpr, BLOCK_T: tl.constexpr):
    """RoPE of q, k at `pos`, k and v written to the cache (one program a kv head), attention over positions
    0..pos (the current one from registers); one item a query head."""
    HALF: tl.constexpr = HD // 2
    d = tl.arange(0, HALF)
    c = tl.load(COS + pos * HALF + d)
    s = tl.load(SIN + pos * HALF + d)
    for hh in range(pid, HQ, nprog):
        g = hh // GROUP
        q1 = tl.load(QKV + hh * HD + d, cache_modifier=".cg")
        q2 = tl.load(QKV + hh * HD + HALF + d, cache_modifier=".cg")
        kb = QKV + HQ * HD + g * HD
        k1 = tl.load(kb + d, cache_modifier=".cg")
        k2 = tl.load(kb + HALF + d, cache_modifier=".cg")
        vb = QKV + (HQ + HKV) * HD + g * HD
        v1 = tl.load(vb + d, cache_modifier=".cg")
        v2 = tl.load(vb + HALF + d, cache_modifier=".cg")
        qr1 = (q1 * c - q2 * s) * sm_scale
        qr2 = (q2 * c + q1 * s) * sm_scale
        kr1 = k1 * c - k2 * s
        kr2 = k2 * c + k1 * s
        if hh % GROUP == 0:
            dst = pos.to(tl.int64) * stride_c + g * HD
            tl.store(KC + dst + d, kr1.to(KC.dtype.element_ty))
            tl.store(KC + dst + HALF + d, kr2.to(KC.dtype.element_ty))
            tl.store(VC + dst + d, v1.to(VC.dtype.element_ty))
            tl.store(VC + dst + HALF + d, v2.to(VC.dtype.element_ty))
        m_i = tl.sum(qr1 * kr1, axis=0) + tl.sum(qr2 * kr2, axis=0)     # the current position's score
        l_i = m_i * 0.0 + 1.0
        a1 = v1
        a2 = v2
        for s0 in range(0, pos, BLOCK_T):
            offs = s0 + tl.arange(0, BLOCK_T)
            valid = offs < pos
            off = offs.to(tl.int64)[:, None] * stride_c + g * HD + d[None, :]
            ck1 = tl.load(KC + off, mask=valid[:, None], other=0.0).to(tl.float32)
            ck2 = tl.load(KC + off + HALF, mask=valid[:, None], other=0.0).to(tl.float32)
            cv1 = tl.load(VC + off, mask=valid[:, None], other=0.0).to(tl.float32)
            cv2 = tl.load(VC + off + HALF, mask=valid[:, None], other=0.0).to(tl.float32)
            sc = tl.sum(ck1 * qr1[None, :], axis=1) + tl.sum(ck2 * qr2[None, :], axis=1)
            sc = tl.where(valid, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=0))
            p = tl.exp(sc - m_new)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            a1 = a1 * alpha + tl.sum(p[:, None] * cv1, axis=0)
            a2 = a2 * alpha + tl.sum(p[:, None] * cv2, axis=0)
            m_i = m_new
        tl.store(O + hh * HD + d, a1 / l_i)
        tl.store(O + hh * HD + HALF + d, a2 / l_i)


@triton.jit
def _ffn_phase(XA, XB, NW, rstd, MEAN, THR, GT, GBIAS, UTHR, UP, DOWN, Y, N, F, STRIPE, pid, nprog,
               BU: tl.constexpr, BK: tl.constexpr):
    """Y[N] += down(h) for x = RMSNorm(XA + XB)·NW: items of BU units, each its gate over all inputs (masked by
    (stripe, input)), SiLU, the unit mask, then the active units' up and down rows."""
    for it in range(pid, F // BU, nprog):
        units = it * BU + tl.arange(0, BU)
        r = (it * BU) // STRIPE
        g = tl.zeros((BU,), tl.float32)
        for k0 in range(0, N, BK):
            rows = k0 + tl.arange(0, BK)
            x = (tl.load(XA + rows, cache_modifier=".cg") + tl.load(XB + rows, cache_modifier=".cg")) * rstd \
                * tl.load(NW + rows).to(tl.float32)
            xc = x - tl.load(MEAN + rows)
            on = tl.abs(xc) >= tl.load(THR + r * N + rows)
            w = tl.load(GT + rows.to(tl.int64)[:, None] * F + units[None, :], mask=on[:, None], other=0.0)
            g += tl.sum(tl.where(on, xc, 0.0)[:, None] * w.to(tl.float32), axis=0)
        g += tl.load(GBIAS + units)
        a = g * tl.sigmoid(g)
        uon = tl.abs(a) >= tl.load(UTHR + units)
        u = tl.zeros((BU,), tl.float32)
        for k0 in range(0, N, BK):
            rows = k0 + tl.arange(0, BK)
            x = (tl.load(XA + rows, cache_modifier=".cg") + tl.load(XB + rows, cache_modifier=".cg")) * rstd \
                * tl.load(NW + rows).to(tl.float32)
            w = tl.load(UP + units.to(tl.int64)[:, None] * N + rows[None, :], mask=uon[:, None], other=0.0)
            u += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        hu = tl.where(uon, u * a, 0.0)
        for k0 in range(0, N, BK):
            cols = k0 + tl.arange(0, BK)
            w = tl.load(DOWN + units.to(tl.int64)[:, None] * N + cols[None, :], mask=uon[:, None], other=0.0)
            tl.atomic_add(Y + cols, tl.sum(hu[:, None] * w.to(tl.float32), axis=0), sem="relaxed")


@triton.jit
def _step_kernel(RESM, YACC, RES, QKVA, ATT, OACC, BAR, ZERO,
                 LN1, WQKV, MQKV, TQKV, BQKV, WO, MO, TO, BO,
                 LN2, GT, MG, TG, BG, UTHR, UP, DOWN,
                 KC, VC, COS, SIN, POS, sm_scale, eps, stride_cl, stride_c,
                 L, D, QKV_M, F, HQ, HKV, STRIPE, LAYER,
                 PHASE: tl.constexpr, GROUP: tl.constexpr, HD: tl.constexpr, NB: tl.constexpr,
                 CH: tl.constexpr, BM: tl.constexpr, BU: tl.constexpr, BK: tl.constexpr, BLOCK_T: tl.constexpr):
    """PHASE -1: every phase of every layer, with grid-wide hand-offs (persistent). PHASE p in 0..3: phase p of
    layer LAYER only (one launch a phase). Buffers: RESM/YACC (L+1, D) (row 0: the input and zeros), RES (L, D),
    QKVA (L, QKV_M), ATT/OACC (L, D) fp32, all zeroed before the step but RESM[0]; BAR one int32 (zeroed)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pos = tl.load(POS)
    n_sync = 0
    lo = 0
    hi = L
    if PHASE >= 0:
        lo = LAYER
        hi = LAYER + 1
    for l32 in range(lo, hi):
        l = tl.full((), 0, tl.int64) + l32
        ld = l * D
        if PHASE < 0 or PHASE == 0:
            rstd = _rstd(RESM + ld, YACC + ld, D, eps, NB)
            if pid == 0:   # this layer's residual stream, for its FFN phase
                offs = tl.arange(0, NB)
                rr = tl.load(RESM + ld + offs, mask=offs < D, other=0.0, cache_modifier=".cg") + \
                    tl.load(YACC + ld + offs, mask=offs < D, other=0.0, cache_modifier=".cg")
                tl.store(RES + ld + offs, rr, mask=offs < D)
            _gemv_phase(RESM + ld, YACC + ld, LN1 + ld, rstd, MQKV + ld,
                        TQKV + l * (QKV_M // STRIPE) * D, WQKV + l * D * QKV_M,
                        BQKV + l * QKV_M, QKVA + l * QKV_M, D, QKV_M, STRIPE,
                        pid, nprog, True, True, CH, BM)
        if PHASE < 0:
            n_sync += 1
            _grid_sync(BAR, n_sync * nprog)
        if PHASE < 0 or PHASE == 1:
            _attn_phase(QKVA + l * QKV_M, KC + l * stride_cl,
                        VC + l * stride_cl, COS, SIN, pos, ATT + ld, sm_scale, stride_c, HQ, HKV,
                        pid, nprog, GROUP, HD, BLOCK_T)
        if PHASE < 0:
            n_sync += 1
            _grid_sync(BAR, n_sync * nprog)
        if PHASE < 0 or PHASE == 2:
            _gemv_phase(ATT + ld, ZERO, ZERO, 1.0, MO + ld, TO + l * (D // STRIPE) * D,
                        WO + l * D * D, BO + ld, OACC + ld, D, D, STRIPE, pid, nprog,
                        False, False, CH, BM)
        if PHASE < 0:
            n_sync += 1
            _grid_sync(BAR, n_sync * nprog)
        if PHASE < 0 or PHASE == 3:
            rstd2 = _rstd(RES + ld, OACC + ld, D, eps, NB)
            if pid == 0:   # the residual stream after attention: the next layer's input (with the FFN's sum)
                offs = tl.arange(0, NB)
                rr = tl.load(RES + ld + offs, mask=offs < D, other=0.0, cache_modifier=".cg") + \
                    tl.load(OACC + ld + offs, mask=offs < D, other=0.0, cache_modifier=".cg")
                tl.store(RESM + ld + D + offs, rr, mask=offs < D)
            _ffn_phase(RES + ld, OACC + ld, LN2 + ld, rstd2, MG + ld, TG + l * (F // STRIPE) * D,
                       GT + l * D * F, BG + l * F, UTHR + l * F,
                       UP + l * F * D, DOWN + l * F * D, YACC + ld + D, D, F, STRIPE,
                       pid, nprog, BU, BK)
        if PHASE < 0:
            n_sync += 1
            _grid_sync(BAR, n_sync * nprog)


# ------------------------------------------------------------------------------------------- host side

PHASES = ("qkv", "attention", "o", "ffn")
SHAPES = {   # d, F, hq, hkv, hd
    "1B": (2048, 8192, 32, 8, 64),
    "tiny": (256, 1024, 4, 2, 64),
}


def make_model(shape: str, L: int, max_len: int, device, seed: int = 0) -> dict:
    d, F, hq, hkv, hd = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*s, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*s, generator=g) * scale).to(dtype).to(device)

    qm = (hq + 2 * hkv) * hd
    m = dict(shape=shape, L=L, d=d, F=F, hq=hq, hkv=hkv, hd=hd, qkv_m=qm, stripe=512 if d >= 512 else 128,
             ln1=(1 + 0.1 * torch.randn(L, d, generator=g)).to(torch.bfloat16).to(device),
             ln2=(1 + 0.1 * torch.randn(L, d, generator=g)).to(torch.bfloat16).to(device),
             wqkv=rnd(L, d, qm, scale=d ** -0.5), wo=rnd(L, d, d, scale=d ** -0.5),
             gt=rnd(L, d, F, scale=d ** -0.5), up=rnd(L, F, d, scale=d ** -0.5), down=rnd(L, F, d, scale=F ** -0.5),
             mqkv=rnd(L, d, scale=0.05, dtype=torch.float32), mo=rnd(L, d, scale=0.05, dtype=torch.float32),
             mg=rnd(L, d, scale=0.05, dtype=torch.float32),
             bqkv=rnd(L, qm, scale=0.02, dtype=torch.float32), bo=rnd(L, d, scale=0.02, dtype=torch.float32),
             bg=rnd(L, F, scale=0.02, dtype=torch.float32),
             kc=rnd(L, max_len, hkv, hd, scale=1.0), vc=rnd(L, max_len, hkv, hd, scale=1.0))
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None]
    m["cos"], m["sin"] = ang.cos().to(device), ang.sin().to(device)
    set_density(m, 1.0, seed)
    return m


def set_density(m: dict, density: float | None, seed: int = 0) -> None:
    """Each (stripe, input) pair and FFN unit on with probability `density` (threshold 0, else +inf); None: off."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    L, d, F, s = m["L"], m["d"], m["F"], m["stripe"]

    def thr(*shape):
        if density is None:
            return torch.full(shape, float("inf")).to(m["wo"].device)
        on = torch.rand(*shape, generator=g) < density
        return torch.where(on, 0.0, float("inf")).to(m["wo"].device)

    m["tqkv"], m["to"], m["tg"] = thr(L, m["qkv_m"] // s, d), thr(L, d // s, d), thr(L, F // s, d)
    m["uthr"] = thr(L, F)
    m["density"] = density


def reference(m: dict, h: torch.Tensor, pos: int, eps: float = 1e-5) -> torch.Tensor:
    """The probe's maths in PyTorch (fp32): the residual stream after all layers; writes the caches at pos."""
    hq, hkv, hd, s = m["hq"], m["hkv"], m["hd"], m["stripe"]
    r = h.float().clone()
    scale = hd ** -0.5

    def cwic(x, mean, thr, wt, bias):
        xc = x - mean
        on = xc.abs()[None, :] >= thr                        # (k, n)
        k = thr.shape[0]
        w = wt.float().view(wt.shape[0], k, s)
        return torch.einsum("kn,nks->ks", torch.where(on, xc[None, :], 0.0), w).reshape(-1) + bias

    def rms(x, w):
        return x * torch.rsqrt((x * x).mean() + eps) * w.float()

    for li in range(m["L"]):
        x = rms(r, m["ln1"][li])
        qkv = cwic(x, m["mqkv"][li], m["tqkv"][li], m["wqkv"][li], m["bqkv"][li])
        c, sn = m["cos"][pos], m["sin"][pos]

        def rope(v):   # (heads, hd)
            v1, v2 = v[:, :hd // 2], v[:, hd // 2:]
            return torch.cat([v1 * c - v2 * sn, v2 * c + v1 * sn], 1)

        q = rope(qkv[:hq * hd].view(hq, hd))
        k = rope(qkv[hq * hd:(hq + hkv) * hd].view(hkv, hd))
        v = qkv[(hq + hkv) * hd:].view(hkv, hd)
        m["kc"][li, pos] = k.to(m["kc"].dtype)
        m["vc"][li, pos] = v.to(m["vc"].dtype)
        K = torch.cat([m["kc"][li, :pos].float(), k[None]], 0)       # the current one unrounded, as the kernel
        V = torch.cat([m["vc"][li, :pos].float(), v[None]], 0)
        grp = hq // hkv
        att = torch.empty(hq, hd, device=h.device)
        for hh in range(hq):
            p = torch.softmax((K[:, hh // grp] @ q[hh]) * scale, 0)
            att[hh] = p @ V[:, hh // grp]
        o = cwic(att.reshape(-1), m["mo"][li], m["to"][li], m["wo"][li], m["bo"][li])
        r = r + o
        x = rms(r, m["ln2"][li])
        gsum = cwic(x, m["mg"][li], m["tg"][li], m["gt"][li], m["bg"][li])
        a = gsum * torch.sigmoid(gsum)
        uon = a.abs() >= m["uthr"][li]
        u = m["up"][li].float() @ x
        hu = torch.where(uon, u * a, 0.0)
        r = r + hu @ m["down"][li].float()
    return r


class Step:
    """One decode step of the probe: buffers, and the persistent or phased launches (capturable in a CUDA graph)."""

    def __init__(self, m: dict, pos: int, nprog: int | None = None, phased: bool = False, eps: float = 1e-5,
                 only: int | None = None,
                 ch: int = 256, bm: int = 64, bu: int = 64, bk: int = 256, block_t: int = 64, num_warps: int = 8):
        dev = m["wo"].device
        L, d, qm = m["L"], m["d"], m["qkv_m"]
        self.m, self.phased, self.eps, self.only = m, phased, eps, only   # only: phase p's launches alone (timing)
        sizes = dict(yacc=(L + 1) * d, res=L * d, qkva=L * qm, att=L * d, oacc=L * d, zero=d)
        self.flat = torch.zeros(sum(sizes.values()), dtype=torch.float32, device=dev)   # zeroed each step
        off, self.b = 0, {}
        for k, n in sizes.items():
            self.b[k] = self.flat[off:off + n]
            off += n
        self.resm = torch.zeros((L + 1) * d, dtype=torch.float32, device=dev)
        self.bar = torch.zeros(1, dtype=torch.int32, device=dev)
        self.pos = torch.tensor([pos], dtype=torch.int64, device=dev)
        if nprog is None:
            nprog = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
        self.nprog = nprog
        ch, bk = min(ch, d), min(bk, d)
        self.kw = dict(GROUP=m["hq"] // m["hkv"], HD=m["hd"], NB=triton.next_power_of_2(d), CH=ch, BM=bm,
                       BU=bu, BK=bk, BLOCK_T=block_t, num_warps=num_warps)
        for n_, blk in (("d", ch), ("qkv_m", bm), ("d", bm), ("F", bu), ("d", bk), ("stripe", bm), ("stripe", bu)):
            assert m[n_] % blk == 0, (n_, blk)

    def set_input(self, h: torch.Tensor) -> None:
        self.resm[: self.m["d"]].copy_(h.float().reshape(-1))

    def _launch(self, phase: int, layer: int) -> None:
        m, b = self.m, self.b
        _step_kernel[(self.nprog,)](
            self.resm, b["yacc"], b["res"], b["qkva"], b["att"], b["oacc"], self.bar, b["zero"],
            m["ln1"], m["wqkv"], m["mqkv"], m["tqkv"], m["bqkv"], m["wo"], m["mo"], m["to"], m["bo"],
            m["ln2"], m["gt"], m["mg"], m["tg"], m["bg"], m["uthr"], m["up"], m["down"],
            m["kc"], m["vc"], m["cos"], m["sin"], self.pos, m["hd"] ** -0.5, self.eps,
            m["kc"].stride(0), m["kc"].stride(1),
            m["L"], m["d"], m["qkv_m"], m["F"], m["hq"], m["hkv"], m["stripe"], layer, PHASE=phase, **self.kw)

    def run(self) -> None:
        self.flat.zero_()
        self.bar.zero_()
        if self.phased or self.only is not None:
            for li in range(self.m["L"]):
                for p in range(4) if self.only is None else (self.only,):
                    self._launch(p, li)
        else:
            self._launch(-1, 0)

    def output(self) -> torch.Tensor:
        d, L = self.m["d"], self.m["L"]
        return self.resm[L * d:(L + 1) * d] + self.b["yacc"][L * d:(L + 1) * d]


def check(m: dict, pos: int, phased: bool, nprog: int | None = None, **kw) -> float:
    """Max |kernel − reference| over the output, relative to the output's largest magnitude."""
    h = torch.randn(m["d"], generator=torch.Generator().manual_seed(7)).to(m["wo"].device)
    kc, vc = m["kc"].clone(), m["vc"].clone()
    ref = reference(m, h, pos)
    rk, rv = m["kc"].clone(), m["vc"].clone()
    m["kc"].copy_(kc)
    m["vc"].copy_(vc)
    st = Step(m, pos, nprog=nprog, phased=phased, **kw)
    st.set_input(h)
    st.run()
    out = st.output()
    if out.is_cuda:
        torch.cuda.synchronize()
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    for mine, theirs in ((m["kc"], rk), (m["vc"], rv)):   # the cache writes at pos: one bf16 rounding apart at most
        if not (mine[:, pos].float() - theirs[:, pos].float()).abs().max() < 0.05:
            err = float("inf")
    return err


def density(tok: str) -> float | None:
    """One item of --densities: 'off' (None: nothing read) or a density in (0, 1]."""
    if tok.strip() == "off":
        return None
    v = float(tok)
    if not 0.0 < v <= 1.0:
        raise ValueError(f"density {v}: in (0, 1], or 'off'")
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--pos", type=int, default=192)
    ap.add_argument("--densities", default="off,0.3333,1", help="comma list of densities in (0, 1] or 'off'")
    ap.add_argument("--target-ms", type=float, default=50.0, help="replays a timing: about this many ms")
    ap.add_argument("--rounds", type=int, default=5, help="timings a figure (their median)")
    ap.add_argument("--tiny", action="store_true", help="a small model (CPU interpreter checks)")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--programs", type=int, default=None, help="persistent grid (default and at most: one a SM)")
    ap.add_argument("--tiles", default="", help="Step tile overrides, e.g. ch=128,bk=128,bu=32,num_warps=4")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each phase alone (its launches for every layer, one CUDA graph)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    a.densities = parse_list(a.densities, density, "--densities")
    if a.layers < 1 or a.pos < 0:
        ap.error("--layers >= 1 and --pos >= 0")
    dev = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
    if dev.type == "cpu" and not INTERPRET:
        ap.error("no GPU: run the checks under TRITON_INTERPRET=1 (with --tiny --check-only)")
    if a.programs is not None and not 1 <= a.programs <= (
            torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1):
        # the grid-wide hand-offs need every program resident at once: at most one a SM is sure to be
        ap.error(f"--programs: 1 to the number of SMs (1 on the CPU interpreter), got {a.programs}")
    shape = "tiny" if a.tiny else "1B"
    tiles = {}
    for kv in filter(None, a.tiles.split(",")):
        k, _, v = kv.partition("=")
        if k not in ("ch", "bm", "bu", "bk", "block_t", "num_warps") or not v.isdigit() or int(v) < 1:
            ap.error(f"--tiles: bad item {kv!r}")
        tiles[k] = int(v)
    t0 = time.time()
    m = make_model(shape, a.layers, max(a.pos + 1, 64), dev)
    res = {}
    # correctness first: a density where masks bite, both launch modes (one program on the CPU interpreter)
    nprog_check = 1 if dev.type == "cpu" else a.programs
    errs = {}
    for phased in (False, True):
        set_density(m, 0.5)
        errs["phased" if phased else "persistent"] = check(m, a.pos, phased, nprog=nprog_check, **tiles)
    print("check (max |kernel - reference| / max |reference|, density 0.5):",
          ", ".join(f"{k} {v:.2e}" for k, v in errs.items()), flush=True)
    bad = {k: v for k, v in errs.items() if not v < 2e-3}
    if bad:
        print(json.dumps(dict(ok=False, errors=errs)))
        return 1
    if a.check_only:
        print(json.dumps(dict(ok=True, errors=errs, shape=shape, layers=a.layers)))
        return 0
    L, d, F, qm = m["L"], m["d"], m["F"], m["qkv_m"]
    per_layer_params = d * qm + d * d + 3 * d * F
    print(f"\n{shape}: {L} layers, {per_layer_params * 2 * L / 1e9:.3f} GB of bf16 weights, pos {a.pos}, "
          f"{torch.cuda.get_device_name(dev)}\n")
    print("| density | persistent µs a step | phased µs a step | persistent / phased | µs a layer (persistent) |"
          " TB/s (persistent) |")
    print("|---|---|---|---|---|---|")
    for dens in a.densities:
        set_density(m, dens)
        out = {}
        for phased in (False, True):
            st = Step(m, a.pos, nprog=a.programs, phased=phased, **tiles)
            st.set_input(torch.randn(d, device=dev))
            out["phased" if phased else "persistent"] = time_graph([st.run], a.target_ms, a.rounds)
        if a.breakdown:
            for p, pname in enumerate(PHASES):
                out[pname] = time_graph([Step(m, a.pos, nprog=a.programs, only=p, **tiles).run], a.target_ms,
                                        a.rounds)
        gb = (dens or 0.0) * per_layer_params * 2 * L / 1e9
        tbs = gb / (out["persistent"] * 1e-6) / 1e3 if dens else None
        name = "off" if dens is None else f"{dens:g}"
        res[name] = dict(out, gb=gb)
        print(f"| {name} | {out['persistent']:.1f} | {out['phased']:.1f} | {out['persistent'] / out['phased']:.3f} | "
              f"{out['persistent'] / L:.2f} | {'' if tbs is None else f'{tbs:.2f}'} |", flush=True)
    if a.breakdown:
        print("\nEach phase alone (its launch for every layer), µs a layer:\n")
        print("| density | " + " | ".join(PHASES) + " | sum | phased |")
        print("|---" * (len(PHASES) + 3) + "|")
        for name, r in res.items():
            print(f"| {name} | " + " | ".join(f"{r[p] / L:.2f}" for p in PHASES) +
                  f" | {sum(r[p] for p in PHASES) / L:.2f} | {r['phased'] / L:.2f} |")
    summary = dict(shape=shape, layers=L, tiles=tiles, pos=a.pos, device=torch.cuda.get_device_name(dev), errors=errs,
                   programs=a.programs or torch.cuda.get_device_properties(dev).multi_processor_count,
                   results=res, seconds=round(time.time() - t0, 1))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gpu_persistent.json"), "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
