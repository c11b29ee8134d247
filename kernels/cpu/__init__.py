"""CWIC CPU kernels: C++ (OpenMP, AVX2 / AVX-512 with a scalar twin), built on first use.

    cwic_kernels/cpu/cwic_cpu.h, cwic_cpu.cpp, cwic_cpu_impl.inc   torch-free core
    cwic_kernels/cpu/binding.cpp                                   ATen / pybind11 binding + C++ decode step

`load()` compiles the extension with `torch.utils.cpp_extension.load` the first time (about a minute;
cached under TORCH_EXTENSIONS_DIR, rebuilt only when a source changes) and returns the module, or None
with one warning line when no C++ compiler works; every function below then runs the PyTorch reference
(`cwic_kernels.reference`). `register()` installs the C++ kernels as the CPU implementations of the
`cwic::gemv` and `cwic::ffn` custom ops (`cwic_kernels.ops`).

    gemv(x, wt, mean, thr, bias, stripe, isa=None)   -> (B, m) in x's dtype
    ffn(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt, unit_thr, act, isa=None)

`isa`: None (best this CPU runs, or $CWIC_CPU_ISA), "avx512", "avx2" or "scalar" (the scalar twin).
Weights: fp32 or bf16, input-major (`wt` (n, m) = Wᵀ; `up_w`, `down_wt` (F, d), each row contiguous, rows any
stride apart); other dtypes (fp16) go to the reference.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
import warnings

import torch

from ..reference import ACT_KINDS

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("cwic_cpu.cpp", "binding.cpp")
DEPENDS = ("cwic_cpu.h", "cwic_cpu_impl.inc")
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
_EXT = None
_ERR: str | None = None
_LOCK = threading.Lock()
_REGISTERED = False


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


STALE_LOCK_S = float(os.environ.get("CWIC_CPU_BUILD_LOCK_S", 600))


def _clear_stale_lock(name: str) -> bool:
    """Remove the build lock of `name` if it is older than STALE_LOCK_S: a build killed part-way (SIGKILL, a lost
    machine) leaves it behind, and torch's loader would then wait for it forever, silently. A live build finishes in
    a minute or two; True when a lock was removed."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        lock = os.path.join(_get_build_directory(name, False), "lock")
        age = time.time() - os.path.getmtime(lock)
    except (ImportError, OSError):
        return False
    if age <= STALE_LOCK_S:
        return False
    try:
        os.remove(lock)
    except OSError:
        return False
    warnings.warn(f"cwic_kernels.cpu: removed a build lock {age:.0f} s old, left by an interrupted build ({lock})",
                  RuntimeWarning, stacklevel=3)
    return True


def load(verbose: bool = False):
    """The compiled extension module (built on first use, then cached), or None (one warning)."""
    global _EXT, _ERR
    if _EXT is not None or _ERR is not None:
        return _EXT
    with _LOCK:
        if _EXT is not None or _ERR is not None:
            return _EXT
        try:
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set CXX or install g++)")
            if "CXX" not in os.environ and shutil.which("c++") is None:
                os.environ["CXX"] = cxx
            if shutil.which("ninja") is None:   # torch calls `ninja` from PATH: the pip wheel's, if installed
                try:
                    import ninja
                    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
                except ImportError:
                    pass
            from torch.utils.cpp_extension import load as _load
            # the build hash covers SOURCES and flags only: fold the headers' contents into the name
            import hashlib
            h = hashlib.sha1()
            for f in SOURCES + DEPENDS:
                with open(os.path.join(_HERE, f), "rb") as fh:
                    h.update(fh.read())
            name = f"cwic_cpu_{h.hexdigest()[:10]}"
            cflags, ldflags = ["-O3"], ["-fopenmp"]
            if os.environ.get("CWIC_CPU_SANITIZE") == "1":   # `make test-asan`: a separate ASan/UBSan build
                san = ["-fsanitize=address,undefined"]
                cflags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"] + san
                ldflags += san
                name += "_san"
            _clear_stale_lock(name)
            _EXT = _load(name=name, sources=[os.path.join(_HERE, f) for f in SOURCES],
                         extra_include_paths=[_HERE],
                         extra_cflags=cflags + ["-std=c++17", "-fopenmp", "-Wno-maybe-uninitialized",
                                                "-Wno-unused-function"],
                         extra_ldflags=ldflags, verbose=verbose)
        except Exception as e:  # no compiler, failed build, ...
            if os.environ.get("CWIC_CPU_SANITIZE") == "1":   # a sanitizer run must not pass by skipping every test
                raise RuntimeError(f"cwic_kernels.cpu: the ASan/UBSan build failed: {e}") from e
            msg = " ".join(str(e).split())[:300]
            _ERR = msg
            warnings.warn(f"cwic_kernels.cpu: C++ kernels unavailable ({msg}); using the PyTorch reference",
                          RuntimeWarning, stacklevel=2)
    return _EXT


def available() -> bool:
    return load() is not None


def error() -> str | None:
    """Why the extension is unavailable (None when it loaded or was not tried)."""
    return _ERR


def isa_id(isa: str | int | None) -> int:
    """-1 (best) for None unless $CWIC_CPU_ISA names one; else the ISA's number."""
    if isa is None:
        isa = os.environ.get("CWIC_CPU_ISA") or None
        if isa is None:
            return -1
    if isinstance(isa, int):
        return isa
    return ISAS[isa.lower()]


def best_isa() -> str:
    ext = load()
    if ext is None:
        return "reference"
    return ext.isa_name(ext.resolve_isa(isa_id(None)))


def supported_isas() -> list[str]:
    ext = load()
    if ext is None:
        return []
    return [n for n, i in ISAS.items() if i <= ext.best_isa()]


def _ok_dtype(*ts) -> bool:
    return all(t.dtype in (torch.float32, torch.bfloat16) for t in ts)


def gemv(x, wt, mean, thr, bias, stripe: int, isa=None, nthreads: int = 0, return_reads: bool = False):
    """y (B, m) in x's dtype: the granular sparse GEMV (reference semantics)."""
    ext = load()
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if ext is None or not _ok_dtype(wt) or x.device.type != "cpu":
        from ..reference import gemv_active_params, gemv_reference
        y = gemv_reference(x2, wt, mean, thr, bias, stripe)
        if return_reads:   # as the C++ counts: each (stripe, input) pair on for any token of the batch, once
            return y, int(gemv_active_params(x2, mean, thr, wt.shape[1], stripe, union=True).item())
        return y
    y, reads = ext.gemv(x2, wt.contiguous(), mean, thr, bias, int(stripe), isa_id(isa), int(nthreads))
    y = y.to(x.dtype)
    return (y, reads) if return_reads else y


def _rows(t):
    """t itself where each row is contiguous (rows may lie further apart: the halves of an (F, 2d) block), else a
    contiguous copy."""
    ok = t.dim() == 2 and (t.size(1) <= 1 or t.stride(1) == 1) and (t.size(0) <= 1 or t.stride(0) >= t.size(1))
    return t if ok else t.contiguous()


def ffn(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe: int, up_w, down_wt, unit_thr, act: str = "silu",
        isa=None, nthreads: int = 0, return_reads: bool = False):
    """y (B, d) in x's dtype: the fused CWIC gated FFN (reference semantics)."""
    ext = load()
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    same = gate_wt.dtype == up_w.dtype == down_wt.dtype
    # x in fp16 (with fp32 or bf16 weights): the kernel rounds g and act(g) for bf16 x only, the reference to x's dtype
    if (ext is None or not _ok_dtype(gate_wt) or not same or x.device.type != "cpu" or act not in _ACTS
            or x.dtype not in (torch.float32, torch.bfloat16)):
        from ..reference import ffn_reference
        y = ffn_reference(x2, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt, unit_thr, act)
        return (y, -1) if return_reads else y
    y, reads = ext.ffn(x2, gate_wt.contiguous(), gate_mean, gate_thr, gate_bias, int(stripe), _rows(up_w),
                       _rows(down_wt), unit_thr, act, isa_id(isa), int(nthreads))
    y = y.to(x.dtype)
    return (y, reads) if return_reads else y


_ACTS = tuple(ACT_KINDS)   # the names the C++ kernels take (binding.cpp's act_id)


def register() -> bool:
    """Register the C++ kernels for "cpu" under `cwic::gemv` and `cwic::ffn`; False when unavailable."""
    global _REGISTERED
    if _REGISTERED:
        return True
    if load() is None:
        return False
    from .. import ops  # (defines the ops)

    def _gemv_cpu(x, wt, mean, thr, bias, stripe):
        ops.check_input(x, wt.shape[0])
        return gemv(x, wt, mean, thr, bias, stripe)

    def _ffn_cpu(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt, unit_thr, act):
        ops.check_input(x, gate_wt.shape[0])
        return ffn(x, gate_wt, gate_mean, gate_thr, gate_bias, stripe, up_w, down_wt, unit_thr, act)

    torch.library.register_kernel("cwic::gemv", "cpu", _gemv_cpu)
    torch.library.register_kernel("cwic::ffn", "cpu", _ffn_cpu)
    _REGISTERED = True
    return True
