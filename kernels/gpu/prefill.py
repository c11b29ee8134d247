"""Long prompts: the CWIC products of many tokens as per-stripe GEMMs on masked, centred inputs (pure PyTorch).

The small-batch GEMV kernels skip a (stripe, input) pair only when every token of their batch skips it, and
read the weights once per 16 tokens: past a few tokens they read nearly everything, many times. For T tokens
this module instead forms, for each stripe r, the masked centred inputs

    X_r[t, i] = (x[t, i] - mean_r[i]) · [|x[t, i] - mean_r[i]| >= thr[r, i]]

and multiplies them with the stripe's columns in one batched GEMM (cuBLAS on CUDA): Y[:, stripe r] = X_r W_r + bias.
The input-major weight (n, m) is viewed as (k, n, stripe) without a copy (row stride m), the flops are those
of the dense product, and the weights are read once. Same semantics as `cwic_kernels.reference.gemv_reference`.

Precision: the GEMMs take bf16/fp16 operands. x - mean is not representable in them, so by default (`exact`)
each operand is split into hi + lo (hi = rounded, lo = the rounded remainder) and both go through the same GEMM
as extra rows (one weight read; twice the flops, which prefill has to spare up to a few hundred tokens): the
products then carry about 16 bits of the inputs, and the sums are fp32 (`out_dtype=torch.float32` where the
backend has it, i.e. CUDA). `exact=False` rounds the inputs once, as a dense bf16 model rounds its activations.
On the CPU the products are computed in fp32 (the engine's CPU twins and the tests).
"""
from __future__ import annotations

import torch

from ..reference import ACTIVATIONS, act_in_dtype

__all__ = ["masked_gemm", "ffn_gemm", "mm_f32"]

_MAX_ELEMS = 1 << 26   # masked operand elements formed at once (stripes are processed in groups below this)


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (batched or not) with fp32 results: low-precision operands on CUDA (fp32 accumulation), fp32 on CPU."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        fn = torch.bmm if a.dim() == 3 else torch.mm
        try:
            return fn(a, b, out_dtype=torch.float32)
        except (TypeError, NotImplementedError):   # no out_dtype overload in this torch: products in fp32
            pass
    return torch.matmul(a.float(), b.float())


def _low_precision(t: torch.Tensor) -> bool:
    """Whether products on t's device take bf16/fp16 operands (CUDA; the tests force it on the CPU)."""
    return t.device.type == "cuda"


def mm_f32(a: torch.Tensor, b: torch.Tensor, exact: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
    """a (..., T, n) fp32 @ b (..., n, p) in b's dtype, fp32 result; a is rounded to `dtype` (default b's) as hi
    (+ lo when `exact`, stacked as extra rows so the weights are read once)."""
    dtype = dtype or b.dtype
    if not _low_precision(a) or dtype == torch.float32:
        return torch.matmul(a.float(), b.float())
    hi = a.to(dtype)
    if not exact:
        return _bmm_f32(hi, b)
    lo = (a - hi.float()).to(dtype)
    T = a.shape[-2]
    y = _bmm_f32(torch.cat([hi, lo], dim=-2), b)
    return y[..., :T, :] + y[..., T:, :]


def masked_gemm(x: torch.Tensor, wt: torch.Tensor, mean: torch.Tensor, thr: torch.Tensor,
                bias: torch.Tensor | None, stripe: int, residual: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, exact: bool = True) -> torch.Tensor:
    """y (T, m) = the granular CWIC product of T tokens (`gemv_reference` semantics) (+ residual), fp32 sums.

    x (T, n); wt (n, m) input-major, contiguous; mean (n,) or per stripe (k, n) fp32; thr (k, n) fp32, k =
    ceil(m / stripe); bias (m,) fp32 or None; residual (T, m) or None. Output in out_dtype (default x's)."""
    if x.dim() != 2 or wt.dim() != 2 or x.shape[1] != wt.shape[0]:
        raise ValueError(f"masked_gemm: x (T, n) and wt (n, m), got {tuple(x.shape)} and {tuple(wt.shape)}")
    T, n = x.shape
    m = wt.shape[1]
    k = -(-m // stripe)
    if thr.shape != (k, n) or mean.shape[-1] != n or (mean.dim() == 2 and mean.shape[0] != k):
        raise ValueError(f"masked_gemm: thr ({k}, {n}) and mean ({n},) or ({k}, {n}) for stripe {stripe}, got "
                         f"{tuple(thr.shape)} and {tuple(mean.shape)}")
    if not wt.is_contiguous():
        raise ValueError("masked_gemm: wt must be contiguous (it is viewed as (k, n, stripe))")
    xf = x.float()
    mean2 = mean.float().reshape(-1, n)
    full = m // stripe
    w3 = wt[:, :full * stripe].view(n, full, stripe).permute(1, 0, 2) if full else None   # (full, n, stripe)
    y = torch.empty((T, m), dtype=torch.float32, device=x.device)
    group = max(1, _MAX_ELEMS // max(1, T * n))
    for r0 in range(0, k, group):
        r1 = min(k, r0 + group)
        mu = mean2[r0:r1, None, :] if mean2.shape[0] > 1 else mean2[:, None, :]
        xc = xf[None] - mu                                                  # (g or 1, T, n)
        xm = torch.where(xc.abs() < thr[r0:r1, None, :].float(), 0.0, xc)    # (g, T, n); NaN: on
        nf = max(0, min(r1, full) - r0)                                     # whole stripes of the group
        if nf:
            yb = mm_f32(xm[:nf], w3[r0:r0 + nf], exact)                     # (nf, T, stripe)
            y[:, r0 * stripe:(r0 + nf) * stripe] = yb.permute(1, 0, 2).reshape(T, nf * stripe)
        if r1 > full:                                                       # the partial last stripe
            y[:, full * stripe:] = mm_f32(xm[-1], wt[:, full * stripe:], exact)
    if bias is not None:
        y += bias.float()
    if residual is not None:
        y += residual.float()
    return y.to(out_dtype or x.dtype)


def ffn_gemm(x: torch.Tensor, gate_wt: torch.Tensor, gate_mean: torch.Tensor, gate_thr: torch.Tensor,
             gate_bias: torch.Tensor | None, stripe: int, up_w: torch.Tensor, down_wt: torch.Tensor,
             unit_thr: torch.Tensor, act: str = "silu", residual: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None, exact: bool = True) -> torch.Tensor:
    """The CWIC gated FFN of T tokens (`ffn_reference` semantics) with GEMMs: the gate as `masked_gemm`, act and
    unit mask, then the dense up and down products (a unit that is off contributes h = 0). x (T, d) is the
    FFN's input (already normalised); up_w (F, d), down_wt (F, d) as in `ffn_reference`."""
    if act not in ACTIVATIONS:
        raise ValueError(f"ffn_gemm: activation {act!r} not in {sorted(ACTIVATIONS)}")
    g = masked_gemm(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, out_dtype=torch.float32, exact=exact)
    a = act_in_dtype(g, act, x.dtype)
    a = torch.where(a.abs() < unit_thr.float(), 0.0, a)                 # NaN: on
    h = mm_f32(x.float(), up_w.t(), exact=False, dtype=x.dtype) * a     # x is exact in its own dtype
    y = mm_f32(h, down_wt, exact)
    if residual is not None:
        y += residual.float()
    return y.to(out_dtype or x.dtype)
