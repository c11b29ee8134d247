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


def _striped(weight: Tensor, k: int, stripe: int) -> Tensor:
    """(m, n) -> (k, stripe, n), zero-padding a partial last stripe."""
    m, n = weight.shape
    return F.pad(weight, (0, 0, 0, k * stripe - m)).view(k, stripe, n)


def granular_mask(xc: Tensor, thr: Tensor) -> Tensor:
    """(N, n), (k, n) -> (N, k, n) bool. Computed in fp32 whatever the activations' dtype."""
    return _wide(xc).abs().unsqueeze(1) >= _wide(thr).unsqueeze(0)


def granular_matmul_forward(xc: Tensor, weight: Tensor, thr: Tensor, stripe: int,
                            mask: Tensor | None = None) -> Tensor:
    """y = GMM(xc, W; thr) without autograd bookkeeping (inference and the Function's forward)."""
    n_tok, m = xc.shape[0], weight.shape[0]
    k = thr.shape[0]
    if mask is None:
        mask = granular_mask(xc, thr)
    if k == 1:  # column sparsity: one masked matmul, no padding needed
        return (xc * mask[:, 0].to(xc.dtype)) @ weight.t()
    xm = mask.to(xc.dtype) * xc.unsqueeze(1)                                  # (N, k, n)
    y = torch.einsum("bkn,ksn->bks", xm, _striped(weight, k, stripe))        # (N, k, s)
    return y.reshape(n_tok, k * stripe)[:, :m]


class GranularMatmul(torch.autograd.Function):
    """y = GMM(xc, W; thr) with the gradient routing of METHOD.md §3 (output path)."""

    @staticmethod
    def forward(ctx, xc: Tensor, weight: Tensor, thr: Tensor, eps: Tensor, stripe: int, ste: bool):
        mask = granular_mask(xc, thr)
        ctx.save_for_backward(xc, weight, thr, eps, mask)
        ctx.stripe, ctx.ste = stripe, ste
        return granular_matmul_forward(xc, weight, thr, stripe, mask)

    @staticmethod
    def backward(ctx, dy: Tensor):
        xc, weight, thr, eps, mask = ctx.saved_tensors
        stripe, k = ctx.stripe, thr.shape[0]
        n_tok, m = dy.shape
        dys = F.pad(dy, (0, k * stripe - m)).view(n_tok, k, stripe)
        # P[b, r, i] = Σ_{o in stripe r} dy[b, o] W[o, i]: the gradient reaching input i via stripe r.
        p = torch.einsum("bks,ksn->bkn", dys, _striped(weight, k, stripe).to(dy.dtype))
        fmask = mask.to(dy.dtype)
        dx = dw = dthr = None
        if ctx.needs_input_grad[0]:
            dx = p.sum(1) if ctx.ste else (p * fmask).sum(1)
        if ctx.needs_input_grad[1]:
            xm = fmask * xc.to(dy.dtype).unsqueeze(1)
            dw = torch.einsum("bks,bkn->ksn", dys, xm).reshape(k * stripe, -1)[:m].to(weight.dtype)
        if ctx.needs_input_grad[2]:
            # dL/dG[b,r,i] = xc[b,i] · P[b,r,i];  dG/dt = -rect(|xc| - t, ε)
            xf = _wide(xc)
            z = xf.abs().unsqueeze(1) - _wide(thr).unsqueeze(0)
            dthr = -(_wide(p) * xf.unsqueeze(1) * rectangle(z, _wide(eps))).sum(0).to(thr.dtype)
        return dx, dw, dthr, None, None, None


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

    Recomputes the mask in backward instead of saving an (N, k, n) tensor.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, thr: Tensor, eps: Tensor, rows: Tensor):
        ctx.save_for_backward(xc, thr, eps, rows)
        return (granular_mask(xc, thr).to(rows.dtype) * rows.view(1, -1, 1)).sum((1, 2))

    @staticmethod
    def backward(ctx, dcount: Tensor):
        xc, thr, eps, rows = ctx.saved_tensors
        xf = _wide(xc)
        z = xf.abs().unsqueeze(1) - _wide(thr).unsqueeze(0)
        g = _wide(dcount).view(-1, 1, 1) * rows.view(1, -1, 1) * rectangle(z, _wide(eps))
        dxc = dthr = None
        if ctx.needs_input_grad[0]:
            dxc = (g.sum(1) * torch.sign(xf)).to(xc.dtype)   # d|xc|/dxc = sign(xc)
        if ctx.needs_input_grad[1]:
            dthr = (-g.sum(0)).to(thr.dtype)
        return dxc, dthr, None, None


def active_count(xc: Tensor, thr: Tensor, rows: Tensor, eps: Tensor | None = None) -> Tensor:
    """Per-token active weights; differentiable (AP path) when eps is given and grads are on."""
    if eps is not None and torch.is_grad_enabled() and (xc.requires_grad or thr.requires_grad):
        return ActiveCount.apply(xc, thr, eps, rows)
    with torch.no_grad():
        return (granular_mask(xc, thr).to(rows.dtype) * rows.view(1, -1, 1)).sum((1, 2))
