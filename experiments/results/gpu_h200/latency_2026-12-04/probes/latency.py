"""What a step of a persistent (one-launch) decode kernel could cost at least, measured on the GPU: the latency of a
grid-wide hand-off (every program arrives on one counter, then waits until all have), of one dependent load from the
L2 and from HBM (pointer chases), next to a chain of near-empty dependent kernels (one launch an operation, as now).

    python experiments/results/gpu_h200/latency_2026-12-04/probes/latency.py [--out DIR]

Prints a table and a last-line JSON. Each figure is the median of 5 timings (CUDA events) of a kernel that repeats
the operation N times, minus the same kernel with 0 repetitions, over N. Each pointer chase starts from another
random slot, so that its lines are not in a cache from an earlier timing (the 8 MiB one fits the L2 after its first
pass; the chases through 256 MiB and 2 GiB touch lines no earlier timing touched, with high probability). A first
run without that (every chase from slot 0) read about 150 ns a load everywhere: the L2's latency.
"""
import argparse
import json
import os
import statistics

import torch
import triton
import triton.language as tl


@triton.jit
def _handoff(CNT, N, P):
    """N grid-wide hand-offs: arrive (release), then poll until every program has arrived (acquire)."""
    for i in range(N):
        tl.atomic_add(CNT, 1, sem="release", scope="gpu")
        target = (i + 1) * P
        c = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")
        while c < target:
            c = tl.atomic_add(CNT, 0, sem="acquire", scope="gpu")


@triton.jit
def _chase(NEXT, OUT, START, N, CG: tl.constexpr):
    """N dependent loads j = NEXT[j] from j = START (one program)."""
    j = tl.zeros((), dtype=tl.int64) + START
    for i in range(N):
        if CG:
            j = tl.load(NEXT + j, cache_modifier=".cg").to(tl.int64)
        else:
            j = tl.load(NEXT + j).to(tl.int64)
    tl.store(OUT, j)


@triton.jit
def _empty(X):
    pass


def timed(fn, reps=5):
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)   # µs
    return statistics.median(ts)


def cycle(n, stride_elems, seed=0):
    """A random cyclic permutation over n slots spaced stride_elems apart (next pointers as int32 indices)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    nxt = torch.empty(n, dtype=torch.int64)
    nxt[order] = order.roll(-1)
    buf = torch.zeros(n * stride_elems, dtype=torch.int32)
    buf[torch.arange(n) * stride_elems] = (nxt * stride_elems).to(torch.int32)
    return buf.cuda()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    res = {"gpu": torch.cuda.get_device_name(dev), "sms": sms, "torch": torch.__version__, "triton": triton.__version__}
    N = args.n
    cnt = torch.zeros(1, dtype=torch.int32, device=dev)
    hand = {}
    for P in sorted({8, 32, sms // 2, sms}):
        for warps in (1, 4):
            def run(n, P=P, warps=warps):
                cnt.zero_()
                _handoff[(P,)](cnt, n, P, num_warps=warps)
            run(4)
            torch.cuda.synchronize()
            t = (timed(lambda: run(N)) - timed(lambda: run(0))) / N
            hand[f"P={P},warps={warps}"] = round(t, 3)
    res["handoff_us"] = hand
    out = torch.zeros(1, dtype=torch.int64, device=dev)
    chase = {}
    # L2: 8 MiB of 128 B-spaced slots (beyond L1, inside the L2), .cg loads; HBM: 256 MiB (several times the L2) and
    # 2 GiB with one slot a 4 KiB page (more TLB misses)
    for name, n, stride, cg in (("L2 (8 MiB, 128 B apart, .cg)", 65536, 32, True),
                                ("HBM (256 MiB, 128 B apart, .cg)", 2097152, 32, True),
                                ("HBM (2 GiB, 4 KiB apart, .cg)", 524288, 1024, True),
                                ("HBM (256 MiB, 128 B apart, default caching)", 2097152, 32, False)):
        buf = cycle(n, stride)
        starts = iter(torch.randint(0, n, (64,), generator=torch.Generator().manual_seed(1)).tolist())
        _chase[(1,)](buf, out, 0, 10, CG=cg)
        torch.cuda.synchronize()

        def run(k, buf=buf, cg=cg, stride=stride, starts=starts):   # from another random slot each time
            _chase[(1,)](buf, out, next(starts) * stride, k, CG=cg)
        t = (timed(lambda: run(N)) - timed(lambda: run(0))) / N
        chase[name] = round(t * 1e3, 1)   # ns a load
    res["dependent_load_ns"] = chase
    # one launch an operation: 88 dependent near-empty kernels in a CUDA graph (no PDL), per kernel
    x = torch.zeros(1, device=dev)
    _empty[(sms,)](x)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            for _ in range(88):
                _empty[(sms,)](x)
    torch.cuda.synchronize()
    g.replay()
    res["empty_kernel_in_graph_us"] = round(timed(lambda: g.replay()) / 88, 3)
    print(f"{res['gpu']}, {sms} SMs, torch {res['torch']}, triton {res['triton']}\n")
    print("| measure | value |\n|---|---|")
    for k, v in hand.items():
        print(f"| grid-wide hand-off, {k} | {v} µs |")
    for k, v in chase.items():
        print(f"| dependent load, {k} | {v} ns |")
    print(f"| near-empty kernel in a CUDA graph (88 in a chain, no PDL), grid {sms} | {res['empty_kernel_in_graph_us']} µs |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "latency.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
