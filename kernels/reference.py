"""Plain PyTorch references for every CWIC inference kernel.

These define the semantics the Triton (GPU) and C++ (CPU) kernels must reproduce; the kernels'
tests compare against them. Layout conventions (inference, after `cwic_exp` folds the statistics):

- `x`     (B, n)   activations, dtype of the weights (fp32, bf16 or fp16), B = tokens (1..16 decode)
- `wt`    (n, m)   weight stored input-major: `wt = W.T.contiguous()`, one contiguous row of m outputs
                   per input (so a (stripe, input) pair is one contiguous run of `stripe` values)
- `mean`  (n,)     fp32, running mean x̄ of the inputs
- `thr`   (k, n)   fp32, pre-scaled thresholds θ·σ, k = ceil(m / stripe) (last stripe may be partial)
- `bias`  (m,)     fp32, folded bias W x̄ (+ the layer's own bias, e.g. Qwen2's q/k/v bias)

    y[b, o] = bias[o] + Σ_i [ |x[b,i] − mean[i]| ≥ thr[o // stripe, i] ] · (x[b,i] − mean[i]) · wt[i, o]

computed with fp32 accumulation and returned in x's dtype. θ = 0 gives thr = 0, every pair active,
and y equals the dense layer `W x + b` (up to rounding). A NaN input is on for every threshold (its pairs are
read, and the NaN reaches every output it touches, as in the dense product): a sparse kernel must not hide it.

Gated FFN (METHOD.md §5), with `up_w` (d_ff, d) = W_up (row j = unit j's input weights) and
`down_wt` (d_ff, d) = W_downᵀ (row j = unit j's output weights), both contiguous per unit:

    g = gemv(x; gate)            a = act(g)            M = |a| ≥ unit_thr      (unit_thr fp32, (d_ff,))
    y = down_wt.T @ ((up_w @ x) ⊙ a ⊙ M)

so a unit that is off costs neither its row of W_up nor its row of W_downᵀ. In bf16 or fp16, g and a are rounded to
x's dtype as the model's gate projection and activation module return them (`act_in_dtype`), so that every path
keeps the units the model keeps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Hugging Face's activation names (`hidden_act`), aliases included -> the four activations the kernels compute. The
# one list of names: the Triton ids (gpu.gemv.ACT_IDS) and the C++ wrapper's (cpu._ACTS) derive from it; the C++
# act_id (cpu/binding.cpp) spells the same names.
ACT_KINDS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu"}
_ACT_FNS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}
ACTIVATIONS = {name: _ACT_FNS[kind] for name, kind in ACT_KINDS.items()}


def granular_mask(x: torch.Tensor, mean: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """(B, k, n) bool: stripe r of input i is used for token b."""
    xc = x.float() - mean.float()
    return ~(xc.abs().unsqueeze(1) < thr.float().unsqueeze(0))          # not below: a NaN is on


def gemv_reference(x, wt, mean, thr, bias, stripe: int) -> torch.Tensor:
    n, m = wt.shape
    k = thr.shape[0]
    assert k == -(-m // stripe), (k, m, stripe)
    xc = x.float() - mean.float()
    g = granular_mask(x, mean, thr)                              # (B, k, n)
    pad = k * stripe - m
    w = F.pad(wt.float(), (0, pad)).view(n, k, stripe)           # (n, k, s)
    y = torch.einsum("bkn,nks->bks", torch.where(g, xc.unsqueeze(1), 0.0), w).reshape(x.shape[0], k * stripe)[:, :m]
    return (y + bias.float()).to(x.dtype)


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values rounded to `dtype` when it is bf16 or fp16, then fp32 again (unchanged otherwise)."""
    return t.to(dtype).float() if dtype in (torch.bfloat16, torch.float16) else t


def act_in_dtype(g: torch.Tensor, act: str, dtype: torch.dtype) -> torch.Tensor:
    """act(g) as a model in `dtype` computes it, in fp32: the gate's sums rounded to `dtype` (the gate
    projection's output), the activation in fp32, its result rounded to `dtype` (the `act_fn` module's output,
    which the model's unit mask compares with the thresholds). Every FFN path decides its unit mask on this."""
    return in_dtype(ACTIVATIONS[act](in_dtype(g.float(), dtype)), dtype)


def ffn_reference(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe: int,
                  up_w, down_wt, unit_thr, act: str = "silu") -> torch.Tensor:
    g = gemv_reference(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe)
    a = act_in_dtype(g, act, x.dtype)
    a = torch.where(a.abs() < unit_thr.float(), 0.0, a)         # a NaN unit is on
    h = (x.float() @ up_w.float().T) * a
    return (h @ down_wt.float()).to(x.dtype)


def gemv_active_params(x, mean, thr, out_features: int, stripe: int, union: bool = False) -> torch.Tensor:
    """(B,) weights actually read per token: Σ over active (stripe, input) pairs of the stripe's rows. union:
    one scalar, the weights a batched kernel reads once for the whole batch (pairs on for any token)."""
    k = thr.shape[0]
    rows = torch.full((k,), float(stripe), device=x.device)
    rows[-1] = out_features - stripe * (k - 1)
    g = granular_mask(x, mean, thr)
    if union:
        g = g.any(0, keepdim=True)
    out = (g.float() * rows[None, :, None]).sum((1, 2))
    return out[0] if union else out
