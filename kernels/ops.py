"""The CWIC inference ops, registered with `torch.library` so `torch.compile` and CUDA graphs trace them.

    torch.ops.cwic.gemv(x, wt, mean, thr, bias, stripe)                        -> (B, m)
    torch.ops.cwic.ffn(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe,
                       up_w, down_wt, unit_thr, act)                           -> (B, d)

Semantics and layouts: `cwic_kernels.reference` (the default implementation on every device).
Backends override per device type: `cwic_kernels.gpu` registers Triton kernels for "cuda",
`cwic_kernels.cpu` registers the C++ kernels for "cpu" once they are built. Call
`cwic_kernels.ops.load_backends()` to register whatever is available here.
"""
from __future__ import annotations

import torch

from . import reference as ref


@torch.library.custom_op("cwic::gemv", mutates_args=())
def gemv(x: torch.Tensor, wt: torch.Tensor, mean: torch.Tensor, thr: torch.Tensor,
         bias: torch.Tensor, stripe: int) -> torch.Tensor:
    return ref.gemv_reference(x, wt, mean, thr, bias, stripe)


@gemv.register_fake
def _(x, wt, mean, thr, bias, stripe):
    return x.new_empty((x.shape[0], wt.shape[1]))


@torch.library.custom_op("cwic::ffn", mutates_args=())
def ffn(x: torch.Tensor, gate_wt: torch.Tensor, gate_mean: torch.Tensor, gate_thr: torch.Tensor,
        gate_bias: torch.Tensor, stripe: int, up_w: torch.Tensor, down_wt: torch.Tensor,
        unit_thr: torch.Tensor, act: str) -> torch.Tensor:
    return ref.ffn_reference(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt,
                             unit_thr, act)


@ffn.register_fake
def _(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt, unit_thr, act):
    return x.new_empty((x.shape[0], down_wt.shape[1]))


_LOADED: dict[str, bool] = {}


def load_backends(verbose: bool = False) -> dict[str, bool]:
    """Register the device kernels that can run here; returns {backend: registered}."""
    if not _LOADED:
        try:
            from .gpu import register as _gpu_register  # noqa: F401  (Triton, CUDA only)
            _LOADED["cuda"] = _gpu_register() if torch.cuda.is_available() else False
        except Exception as e:  # pragma: no cover - depends on the machine
            if verbose:
                print(f"cwic: Triton kernels unavailable ({e}); using the PyTorch reference on CUDA")
            _LOADED["cuda"] = False
        try:
            from .cpu import register as _cpu_register
            _LOADED["cpu"] = _cpu_register()
        except Exception as e:  # pragma: no cover
            if verbose:
                print(f"cwic: CPU kernels unavailable ({e}); using the PyTorch reference on CPU")
            _LOADED["cpu"] = False
    return dict(_LOADED)
