"""Shared by the GEMV probes of this folder: the checkout on sys.path, the C++ extension, huge-page weights, and
the per-call time of a function cycled over weight copies (enough copies that they do not fit the L3)."""
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src")]


def load():
    """(the C++ extension, a HugePageArena for the weights)"""
    from cwic_kernels import cpu
    from cwic_exp.cpu_decode import HugePageArena
    return cpu.load(), HugePageArena()


def time_cycled(f, copies: int, reps: int = 3) -> float:
    """Median over `reps` of the seconds a call of f(c), c cycling over the copies."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for c in range(copies):
            f(c)
        ts.append((time.perf_counter() - t0) / copies)
    return statistics.median(ts)
