"""Triton (GPU) kernels of CWIC decoding.

    gemv.py      granular sparse GEMV (split-K, in-kernel masks, fused epilogues) and the fused FFN
    gemv_compact.py  the one-token GEMV that lists the active rows first (work ∝ density)
    ffn_fused.py the FFN's up and down projections in one launch (one token)
    decode.py    RMSNorm, RoPE + KV-cache write, decode attention, dense act·up: the engine's glue
    fallback.py  PyTorch twins of the extended launchers (CPU engine, test references)

`register()` installs the Triton kernels as the CUDA implementations of the `cwic::gemv` and
`cwic::ffn` custom ops (`cwic_kernels.ops`), so `torch.compile` and CUDA graphs capture them.
`backend(device)` returns the functions the decode engine calls: Triton on CUDA (or anywhere with
`triton=True`, e.g. the CPU under TRITON_INTERPRET=1), the PyTorch twins otherwise.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

_REGISTERED = False


def register() -> bool:
    """Register the Triton kernels for "cuda" under `cwic::gemv` and `cwic::ffn`; True when done."""
    global _REGISTERED
    if _REGISTERED:
        return True
    from .. import ops  # (defines the ops)
    from ..reference import ffn_reference, gemv_reference
    from . import gemv as G

    def _consts(*ts):
        """fp32 contiguous copies where needed, and whether a copy kernel ran (then no PDL: the kernels read
        their constant operands before waiting for the previous kernel)."""
        out = [t.float().contiguous() for t in ts]
        return out, any(a is not b for a, b in zip(out, ts))

    def _gemv_cuda(x, wt, mean, thr, bias, stripe):
        ops.check_input(x, wt.shape[0])
        if not G.supports_stripe(stripe, wt.shape[1]):
            return gemv_reference(x, wt, mean, thr, bias, stripe)
        (mean, thr, bias), fresh = _consts(mean, thr, bias)
        with G.plain_launches(fresh):
            return G.gemv_ex(x.contiguous(), wt.contiguous(), mean, thr, bias, stripe)

    def _ffn_cuda(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt, unit_thr, act):
        ops.check_input(x, gate_wt.shape[0])
        if not G.supports_stripe(stripe, gate_wt.shape[1]) or act not in G.ACT_IDS:
            return ffn_reference(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt,
                                 unit_thr, act)
        (gate_mean, gate_thr, gate_bias, unit_thr), fresh = _consts(gate_mean, gate_thr, gate_bias, unit_thr)
        with G.plain_launches(fresh):
            return G.ffn(x.contiguous(), gate_wt.contiguous(), gate_mean, gate_thr, gate_bias, stripe,
                         up_w.contiguous(), down_wt.contiguous(), unit_thr, act)

    torch.library.register_kernel("cwic::gemv", "cuda", _gemv_cuda)
    torch.library.register_kernel("cwic::ffn", "cuda", _ffn_cuda)
    _REGISTERED = True
    return True


def backend(device: torch.device | str, triton: bool | None = None) -> SimpleNamespace:
    """The engine's kernels for `device`: Triton when `triton` (default: device is CUDA), else PyTorch."""
    device = torch.device(device)
    use_triton = device.type == "cuda" if triton is None else triton
    if use_triton:
        from . import decode as D
        from . import gemv as G
        return SimpleNamespace(name="triton", gemv_ex=G.gemv_ex, qkv_rope=G.gemv_qkv_rope, ffn_up=G.ffn_up, ffn=G.ffn,
                               ffn_one_launch=G.ffn_one_launch,
                               rmsnorm=D.rmsnorm, rope_cache=D.rope_cache, rope_attention=D.rope_attention,
                               decode_attention=D.decode_attention, act_mul=D.act_mul,
                               argmax=D.argmax, supports_stripe=G.supports_stripe,
                               attn_o=D.attn_o, attn_o_config=D.attn_o_config)
    from . import decode as D
    from . import fallback as R
    from .gemv import supports_stripe
    return SimpleNamespace(name="torch", gemv_ex=R.gemv_ex_ref, qkv_rope=R.gemv_qkv_rope_ref, ffn_up=R.ffn_up_ref,
                           ffn=R.ffn_ref,
                           rmsnorm=R.rmsnorm_ref, rope_cache=R.rope_cache_ref, rope_attention=R.rope_attention_ref,
                           decode_attention=R.decode_attention_ref, act_mul=R.act_mul_ref,
                           argmax=R.argmax_ref, attn_o=R.attn_o_ref, attn_o_config=D.attn_o_config,
                           supports_stripe=lambda stripe, m: True,
                           ffn_one_launch=lambda d, F, stripe: False)   # the twin forms an x_acc input first
