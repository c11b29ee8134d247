"""PyTorch twins of the Triton launchers' extended signatures (epilogues, mask modes).

The engine uses them on devices without Triton kernels (the CPU); the tests use them as references.
They follow `cwic_kernels.reference` exactly: fp32 accumulation, one rounding at the end.
"""
from __future__ import annotations

import torch

from ..reference import act_in_dtype, gemv_reference
from .decode import act_mul_ref, argmax_ref, decode_attention_ref, rmsnorm_ref, rope_attention_ref, rope_cache_ref
from .gemv import MASK_NONE, MASK_NONZERO, MASK_THRESHOLD, check_count

__all__ = ["attn_o_ref", "reads_ref", "gemv_ex_ref", "gemv_qkv_rope_ref", "ffn_up_ref", "ffn_ref", "rmsnorm_ref", "rope_cache_ref",
           "rope_attention_ref", "decode_attention_ref", "act_mul_ref", "argmax_ref"]


def gemv_ex_ref(x, wt, mean, thr, bias, stripe, *, residual=None, act=None, unit_thr=None,
                mask_mode=MASK_THRESHOLD, out_dtype=None, out=None, config=None, compact=None, norm_w=None,
                eps=1e-6, acc_out=None, x_acc=None, x_out=None, count=None):
    n, m = wt.shape
    check_count(count, x)
    if x_acc is not None or x_out is not None:   # `gemv.gemv_ex(x_acc=..., x_out=...)`: the input is x + x_acc
        if acc_out is None:
            raise ValueError("x_acc / x_out: only with acc_out")
        if x_acc is not None:
            x = (x_acc + x.float()).to(x.dtype)
        if x_out is not None:
            x_out.copy_(x)
    if acc_out is not None:   # `gemv.gemv_ex(acc_out=...)`: the fp32 product (+ bias) added into acc_out
        assert residual is None and act is None and out is None
        acc_out += gemv_ex_ref(x, wt, mean, thr, bias, stripe, mask_mode=mask_mode, out_dtype=torch.float32,
                               norm_w=norm_w, eps=eps, count=count)
        return acc_out
    if norm_w is not None:
        x = rmsnorm_ref(x, norm_w, eps)
    xf = x.float()
    if count is not None:
        count += reads_ref(xf, m, mean, thr, stripe, mask_mode)
    if mask_mode == MASK_THRESHOLD:
        if mean.dim() == 2:     # per-stripe means (fused q/k/v): one reference call per stripe group
            k = thr.shape[0]
            ys = []
            for r in range(k):
                lo, hi = r * stripe, min(m, (r + 1) * stripe)
                ys.append(gemv_reference(xf, wt[:, lo:hi].float(), mean[r], thr[r:r + 1],
                                         torch.zeros(hi - lo, device=x.device), stripe).float())
            y = torch.cat(ys, 1)
        else:
            y = gemv_reference(xf, wt.float(), mean, thr, torch.zeros(m, device=x.device), stripe).float()
    elif mask_mode == MASK_NONZERO or mask_mode == MASK_NONE:
        y = xf @ wt.float()
    else:
        raise ValueError(mask_mode)
    if bias is not None:
        y = y + bias.float()
    if act is not None:
        a = act_in_dtype(y, act, x.dtype)
        y = torch.where(a.abs() < unit_thr.float(), 0.0, a)          # a NaN unit is on (reference.py)
    if residual is not None:
        y = y + residual.float()
    if out_dtype is None:
        out_dtype = torch.float32 if act is not None else x.dtype
    y = y.to(out_dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def reads_ref(xf, m, mean, thr, stripe, mask_mode=MASK_THRESHOLD):
    """Weights one token's product reads (the kernels' `count`): its active (stripe, input) pairs × the stripe's
    rows, from the same fp32 comparison as the kernels' masks; xf (1, n) fp32, the product's input."""
    n = xf.shape[1]
    if mask_mode == MASK_THRESHOLD:
        k = thr.shape[0]
        mu = mean if mean.dim() == 2 else mean.expand(k, -1)
        on = ~((xf[0][None, :] - mu).abs() < thr)                         # (k, n); NaN: on, as the kernels
        rows = (m - torch.arange(k, device=xf.device) * stripe).clamp(max=stripe)
        return (on.sum(1) * rows).sum()
    if mask_mode == MASK_NONZERO:
        return (xf[0] != 0).sum() * m
    return xf.new_full((), n * m, dtype=torch.int64)   # (no host copy: capturable)


def ffn_up_ref(x, up_w, a, config=None):
    return (x.float() @ up_w.float().T) * a.float()


def ffn_ref(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt, unit_thr, act="silu",
            residual=None, fused=None, norm_w=None, eps=1e-6, x_acc=None, y_acc=None, out_dtype=None, count=None):
    check_count(count, x)
    if y_acc is not None:   # `ffn_fused.ffn_gate_updown(y_acc=...)`: the product into y_acc, the input returned
        assert residual is x
        xin = (x_acc + x.float()).to(x.dtype) if x_acc is not None else x
        y_acc += ffn_ref(xin, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt, unit_thr, act,
                         norm_w=norm_w, eps=eps, out_dtype=torch.float32, count=count)
        return xin.clone()
    if x_acc is not None:   # `gemv.ffn(x_acc=...)`: the input and residual are (x_acc + x) in x's dtype
        assert residual is x
        x = residual = (x_acc + x.float()).to(x.dtype)
        x_acc.zero_()
    dtype = x.dtype if out_dtype is None else out_dtype
    if norm_w is not None:
        x = rmsnorm_ref(x, norm_w, eps)
    a = gemv_ex_ref(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, act=act, unit_thr=unit_thr, count=count)
    if count is not None:   # the up rows and down rows of the active units
        count += (a != 0).sum() * (2 * up_w.shape[1])
    h = ffn_up_ref(x, up_w, a)
    return gemv_ex_ref(h, down_wt, None, None, None, down_wt.shape[1], mask_mode=MASK_NONZERO,
                       residual=residual, out_dtype=dtype)


def gemv_qkv_rope_ref(x, wt, mean, thr, bias, stripe, pos, cos, sin, kc, vc, hq, hkv, norm_w=None, eps=1e-6,
                      count=None):
    """`gemv.gemv_qkv_rope`: the fused q/k/v product, then RoPE and the cache writes."""
    y = gemv_ex_ref(x, wt, mean, thr, bias, stripe, norm_w=norm_w, eps=eps, count=count)
    return rope_cache_ref(y, pos, cos, sin, kc, vc, hq, hkv)


def attn_o_ref(q, kc, vc, pos, hq, sm_scale, wt, mean, thr, bias, stripe, acc_out, block_t=None, config=None):
    """`decode.attn_o`: the attention output (rounded to q's dtype), then its CWIC o product added into acc_out."""
    att = decode_attention_ref(q, kc, vc, pos, hq, sm_scale)
    return gemv_ex_ref(att, wt, mean, thr, bias, stripe, acc_out=acc_out)
