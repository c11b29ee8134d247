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


def check_input(x: torch.Tensor, n: int) -> None:
    """The ops take one row per token, x (B, n): every backend and the fake kernel refuse anything else (a
    (batch, seq, n) input used to give (batch, m) under the fake kernel and (batch·seq, m) on the CPU)."""
    if x.dim() != 2 or x.shape[1] != n:
        raise ValueError(f"cwic ops take x of shape (B, {n}), got {tuple(x.shape)}: flatten the leading dims")


@torch.library.custom_op("cwic::gemv", mutates_args=())
def gemv(x: torch.Tensor, wt: torch.Tensor, mean: torch.Tensor, thr: torch.Tensor,
         bias: torch.Tensor, stripe: int) -> torch.Tensor:
    check_input(x, wt.shape[0])
    return ref.gemv_reference(x, wt, mean, thr, bias, stripe)


@gemv.register_fake
def _(x, wt, mean, thr, bias, stripe):
    check_input(x, wt.shape[0])
    return x.new_empty((x.shape[0], wt.shape[1]))


@torch.library.custom_op("cwic::ffn", mutates_args=())
def ffn(x: torch.Tensor, gate_wt: torch.Tensor, gate_mean: torch.Tensor, gate_thr: torch.Tensor,
        gate_bias: torch.Tensor, stripe: int, up_w: torch.Tensor, down_wt: torch.Tensor,
        unit_thr: torch.Tensor, act: str) -> torch.Tensor:
    check_input(x, gate_wt.shape[0])
    return ref.ffn_reference(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt,
                             unit_thr, act)


@ffn.register_fake
def _(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt, unit_thr, act):
    check_input(x, gate_wt.shape[0])
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
