"""The CWIC maths as autograd functions: granular matmul, unit masks and active-parameter counts.

Everything here is written against METHOD.md §1-§5 and routes gradients explicitly (custom
`autograd.Function`s), never by accident of composition:

output path  y_r = W_r (G_r ⊙ xc),  G[r,i] = H(|xc_i| - t[r,i]),  t = θ·σ
  - xc gets W^T dy as if nothing were masked (STE), or the true masked gradient with `ste=False`;
  - t gets dL/dG · dG/dt through the rectangle pseudo-derivative dH/dz = K(z/ε)/ε;
  - nothing reaches xc through |xc| inside G;
  - W gets the ordinary gradient of the masked product.
AP path      count_b = Σ_{r,i} rows_r · H(|xc_bi| - t[r,i])
  - both xc (through |xc|) and t get the pseudo-derivative.

This file (and the others in this folder) only imports torch and transformers: a saved checkpoint
carries copies of them, so it loads with `trust_remote_code=True` where cwic_exp is not installed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _wide(t: Tensor) -> Tensor:
    """At least fp32 (bf16/fp16 are upcast; fp64 stays fp64 so gradient checks can be exact)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def rectangle(z: Tensor, eps: Tensor) -> Tensor:
    """Pseudo-derivative of the Heaviside step: (1/ε)·K(z/ε), K the unit rectangle on [-½, ½]."""
    return (z.abs() <= 0.5 * eps).to(z.dtype) / eps


def stripe_rows(out_features: int, stripe: int, device=None) -> Tensor:
    """Number of output rows in each stripe; the last stripe may be partial."""
    k = -(-out_features // stripe)
    rows = torch.full((k,), float(stripe), device=device)
    rows[-1] = out_features - stripe * (k - 1)
    return rows


def _magnitude(xc: Tensor) -> Tensor:
    """|xc| in at least fp32, a NaN as +inf: a NaN input is on for every threshold, so it reaches the output as it
    does in the dense product (and in the sparse kernels), instead of being skipped and hidden."""
    return _wide(xc).abs().nan_to_num(nan=float("inf"), posinf=float("inf"))


def granular_mask(xc: Tensor, thr: Tensor) -> Tensor:
    """(N, n), (k, n) -> (N, k, n) bool. Computed in fp32 whatever the activations' dtype."""
    return _magnitude(xc).unsqueeze(1) >= _wide(thr).unsqueeze(0)


def stripe_mask(xc: Tensor, thr: Tensor) -> Tensor:
    """(N, n), (k, n) -> (k, N, n) bool, stripe-major so each stripe's mask is contiguous."""
    return _magnitude(xc).unsqueeze(0) >= _wide(thr).unsqueeze(1)


def _stripe_slices(k: int, stripe: int, m: int):
    for r in range(k):
        yield r, slice(r * stripe, min((r + 1) * stripe, m))


def granular_forward(xc: Tensor, weight: Tensor, thr: Tensor, stripe: int, rows: Tensor | None = None,
                     mask: Tensor | None = None, x: Tensor | None = None,
                     mean: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """y = GMM(xc, W; thr) stripe by stripe, plus the per-token active count when `rows` is given.

    With `x` and `mean` (x̄), each stripe multiplies x where active and x̄ where not, so y also holds
    the W x̄ term: W_r (x̄ + G_r ⊙ xc), the same sum, and where every input is active (θ = 0) the
    very product W x of the dense layer, with no rounding from taking x̄ out and adding W x̄ back.
    Returns (y, counts or None, mask (k, N, n) bool). No (N, k, n) float tensor is ever built.
    """
    k, m = thr.shape[0], weight.shape[0]
    if mask is None:
        mask = stripe_mask(xc, thr)
    if x is None:
        outs = [torch.mm(xc * mask[r], weight[sl].t()) for r, sl in _stripe_slices(k, stripe, m)]
    else:
        outs = [torch.mm(torch.where(mask[r], x, mean), weight[sl].t()) for r, sl in _stripe_slices(k, stripe, m)]
    y = outs[0] if k == 1 else torch.cat(outs, 1)
    counts = None
    if rows is not None:
        per = mask.sum(2, dtype=torch.float32 if xc.dtype != torch.float64 else torch.float64)   # (k, N)
        counts = (per * rows.to(per.dtype).unsqueeze(1)).sum(0)
    return y, counts, mask


def granular_matmul_forward(xc: Tensor, weight: Tensor, thr: Tensor, stripe: int,
                            mask: Tensor | None = None) -> Tensor:
    """y = GMM(xc, W; thr) without autograd bookkeeping."""
    return granular_forward(xc, weight, thr, stripe, None, mask)[0]


class GranularMatmul(torch.autograd.Function):
    """(y, counts) = GMM(xc, W; thr) with the gradient routing of METHOD.md §3.

    Output path (y): xc gets W^T dy (STE) or the masked gradient; θ gets the rectangle
    pseudo-derivative; nothing reaches xc through |xc|. AP path (counts, per token
    Σ_r rows_r·‖G_r‖): both xc (through |xc|) and θ get the pseudo-derivative. One node serves both so
    the mask and the rectangle are computed once.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, weight: Tensor, thr: Tensor, eps: Tensor, rows: Tensor, stripe: int,
                ste: bool, xm: Tensor | None = None, x: Tensor | None = None, mean: Tensor | None = None):
        # xm: x - x̄ in fp32 (not differentiable) when xc is a rounded copy in a low-precision compute
        # dtype; the mask and the pseudo-derivative use it, as the kernels do (mask in fp32 from x, x̄).
        # x, mean (not differentiable: x's gradient is xc's): y then holds W x̄ too (granular_forward),
        # and W's gradient gets the matching Σ dy ⊗ x̄.
        xf = xc if xm is None else xm
        y, counts, mask = granular_forward(xc, weight, thr, stripe, rows, stripe_mask(xf, thr), x, mean)
        ctx.save_for_backward(xc, weight, thr, eps, rows, mask, xf, mean)
        ctx.stripe, ctx.ste = stripe, ste
        ctx.mark_non_differentiable(mask)
        return y, counts

    @staticmethod
    def backward(ctx, dy: Tensor | None, dcount: Tensor | None):
        xc, weight, thr, eps, rows, mask, xf, mean = ctx.saved_tensors
        stripe, k, m = ctx.stripe, thr.shape[0], weight.shape[0]
        need_x, need_w, need_t = ctx.needs_input_grad[:3]
        xw, ew = _wide(xf), _wide(eps)
        xa = xw.abs()
        gdt = dy.dtype if dy is not None else xc.dtype
        # dx sums one partial product a stripe (k of them: 256 for SmolLM2's head at stripe 192): in fp32, as a
        # plain linear's K-sum is, not in bf16, where its rounding error grew with k (6.6× a plain bf16 linear's)
        dx = torch.zeros_like(xc, dtype=xc.dtype if xc.dtype == torch.float64 else torch.float32) if need_x else None
        dw = torch.zeros_like(weight, dtype=gdt) if need_w else None
        dthr = torch.zeros_like(thr, dtype=_wide(thr).dtype) if need_t else None
        dabs = torch.zeros_like(xw) if (need_x and dcount is not None) else None
        for r, sl in _stripe_slices(k, stripe, m):
            mr = mask[r]
            p = None
            if dy is not None:
                dyr = dy[:, sl]
                if need_x or need_t:
                    p = torch.mm(dyr, weight[sl].to(gdt))            # Σ_{o in stripe r} dy_o W_o,i
                    if need_x:
                        dx += p if ctx.ste else p * mr
                if need_w:
                    dw[sl] = torch.mm(dyr.t(), xc.to(gdt) * mr)
                    if mean is not None:                               # the W x̄ part of y
                        dw[sl] += torch.outer(dyr.sum(0), mean.to(gdt))
            if need_t or dabs is not None:
                rect = rectangle(xa - _wide(thr[r]), ew)                # (N, n)
                g = None
                if p is not None and need_t:
                    g = _wide(p) * xw                                   # dL/dG · dG/d(-t)
                if dcount is not None:
                    c = _wide(dcount).unsqueeze(1) * rows[r].to(xw.dtype)
                    if dabs is not None:
                        dabs += c * rect
                    g = c.expand_as(xw) if g is None else g + c
                if need_t and g is not None:
                    dthr[r] = -(g * rect).sum(0)
        if dabs is not None:
            dx += (dabs * torch.sign(xw)).to(dx.dtype)
        return (None if dx is None else dx.to(xc.dtype), None if dw is None else dw.to(weight.dtype),
                None if dthr is None else dthr.to(thr.dtype), None, None, None, None, None, None, None)


class UnitMask(torch.autograd.Function):
    """h = H(|a| - t) ⊙ a for the FFN's intermediate units (METHOD.md §5), same routing as GMM."""

    @staticmethod
    def forward(ctx, a: Tensor, thr: Tensor, eps: Tensor, ste: bool):
        mask = _wide(a).abs() >= _wide(thr)
        ctx.save_for_backward(a, thr, eps, mask)
        ctx.ste = ste
        return a * mask.to(a.dtype)

    @staticmethod
    def backward(ctx, dh: Tensor):
        a, thr, eps, mask = ctx.saved_tensors
        da = dthr = None
        if ctx.needs_input_grad[0]:
            da = dh if ctx.ste else dh * mask.to(dh.dtype)
        if ctx.needs_input_grad[1]:
            af = _wide(a)
            z = af.abs() - _wide(thr)
            dthr = -(_wide(dh) * af * rectangle(z, _wide(eps))).sum(0).to(thr.dtype)
        return da, dthr, None, None


class ActiveCount(torch.autograd.Function):
    """count[b] = Σ_{r,i} rows[r] · H(|xc[b,i]| - thr[r,i]); pseudo-derivative to xc and thr (AP path).

    Used for the FFN's unit masks (k = 1); the striped layers get their counts from GranularMatmul.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, thr: Tensor, eps: Tensor, rows: Tensor):
        ctx.save_for_backward(xc, thr, eps, rows)
        return _count(xc, thr, rows)

    @staticmethod
    def backward(ctx, dcount: Tensor):
        xc, thr, eps, rows = ctx.saved_tensors
        xf = _wide(xc)
        z = xf.abs().unsqueeze(1) - _wide(thr).unsqueeze(0)                       # (N, k, n)
        g = _wide(dcount).view(-1, 1, 1) * rows.to(xf.dtype).view(1, -1, 1) * rectangle(z, _wide(eps))
        dxc = (g.sum(1) * torch.sign(xf)).to(xc.dtype) if ctx.needs_input_grad[0] else None
        dthr = (-g.sum(0)).to(thr.dtype) if ctx.needs_input_grad[1] else None
        return dxc, dthr, None, None


def active_count(xc: Tensor, thr: Tensor, rows: Tensor, eps: Tensor | None = None) -> Tensor:
    """Per-token active weights; differentiable (AP path) when eps is given and grads are on."""
    if eps is not None and torch.is_grad_enabled() and (xc.requires_grad or thr.requires_grad):
        return ActiveCount.apply(xc, thr, eps, rows)
    with torch.no_grad():
        return _count(xc, thr, rows)


def _count(xc: Tensor, thr: Tensor, rows: Tensor) -> Tensor:
    """Σ_r rows[r] · #{i : |xc_i| ≥ thr[r, i]} per token."""
    dt = torch.float64 if xc.dtype == torch.float64 else torch.float32
    per = stripe_mask(xc, thr).sum(2, dtype=dt)                                  # (k, N)
    return (per * rows.to(dt).unsqueeze(1)).sum(0)
