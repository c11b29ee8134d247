"""The floor of a decode step built from kernel launches: a CUDA graph of N back-to-back Triton kernels that do
(almost) nothing, with and without PDL, at the decode engine's grid sizes. µs a graph replay, median of 50.

    python probes/empty_chain.py            # N = 88: one step of the 1B-shaped CWIC engine has 88 launches
"""
import json
import statistics
import sys
import time

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _touch(X, Y, n, USE_PDL: tl.constexpr, BLOCK: tl.constexpr):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(X + offs, mask=offs < n, other=0.0)       # one dependent read and write per program
    tl.store(Y + offs, v + 1.0, mask=offs < n)


def chain(n_kernels: int, grid: int, pdl: bool, warps: int = 4):
    x = torch.zeros(grid * 128, device="cuda")
    bufs = [x] + [torch.zeros_like(x) for _ in range(2)]
    kw = {"launch_pdl": True} if pdl else {}

    def step():
        for i in range(n_kernels):
            _touch[(grid,)](bufs[i % 2], bufs[(i + 1) % 2], x.numel(), USE_PDL=pdl, BLOCK=128, num_warps=warps, **kw)

    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        step()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            step()
    torch.cuda.synchronize()
    ts = []
    for _ in range(50):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            g.replay()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) / 10 * 1e6)
    return statistics.median(ts)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 88
    res = {}
    print(f"{torch.cuda.get_device_name()}: a graph of {n} dependent one-load kernels, µs a replay")
    for grid in (32, 132, 264, 512):
        for pdl in (False, True):
            us = chain(n, grid, pdl)
            res[f"grid{grid}_pdl{int(pdl)}"] = us
            print(f"  grid {grid:4d}, PDL {'on ' if pdl else 'off'}: {us:7.1f} µs ({us / n:.2f} µs a kernel)", flush=True)
    print(json.dumps({"bench": "empty_chain", "kernels": n, "us": res}))


if __name__ == "__main__":
    main()
