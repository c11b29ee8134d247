"""CPU kernel benchmark: the C++ granular sparse GEMV against dense `F.linear` in the same dtype, batch 1.

    python experiments/bench_kernels.py --device cpu                      # full table (bf16 and fp32)
    python -m experiments.bench.cpu_kernels --quick                       # bf16, 3 sparsities
    python -m experiments.bench.cpu_kernels --out experiments/results     # also write cpu_kernels.{json,md}

Shapes: the decode matrices of Llama-3.2-1B (q 2048→2048, k/v 2048→512, o 2048→2048, gate/up
2048→8192, down 8192→2048), stripe 512, random weights. Inputs are heavy-tailed (x = x̄ + σ·t₃, per
feature x̄ and σ); thresholds θ[r,i]·σ_i with a per-(stripe, input) jitter, scaled per stripe so each
stripe keeps the target density on calibration tokens; every timed call uses one of 8 fresh tokens, and
the sparsity reported is the one measured on them (fraction of the weights skipped).

Timing, as the paper did: before every timed call the weights are evicted from the caches (a buffer twice
the last-level cache, at least 128 MiB, is written: 960 MiB on a host with a 480 MiB L3), then one call is
timed with a wall clock; dense F.linear, our kernel with every pair on ("own dense") and the sparse calls
are interleaved, their order rotating by one each round, so load from other processes hits them alike; medians over --reps rounds,
taken over the calls during which no thread of this process was preempted (getrusage's involuntary context switches; the machine is shared) when there
are at least 5 such calls, else over all. Speedup = dense F.linear time / sparse time;
`layer` sums one decoder layer's matrices (q, k, v, o, gate, up, down). The JSON on the LAST line
carries `speedup` (layer, bf16) keyed by sparsity.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [("q", 2048, 2048, 1), ("k,v", 2048, 512, 2), ("o", 2048, 2048, 1), ("gate,up", 2048, 8192, 2),
          ("down", 8192, 2048, 1)]          # (name, n_in, m_out, count per layer): Llama-3.2-1B
SPARSITIES = [0.0, 0.25, 0.5, 0.66, 0.75, 0.8, 0.9]
QUICK_SPARSITIES = [0.5, 0.66, 0.8]
STRIPE = 512
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def ensure_imports():
    for p in (ROOT, os.path.join(ROOT, "src")):
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        import cwic_kernels  # noqa: F401
    except ImportError:
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "cwic_kernels", os.path.join(ROOT, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(ROOT, "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["cwic_kernels"] = mod
        spec.loader.exec_module(mod)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def make_inputs(n, m, tokens, sparsity, seed=0):
    """Heavy-tailed tokens (T, n) fp32, their mean, and thresholds keeping 1 - sparsity per stripe."""
    g = torch.Generator().manual_seed(seed)
    k = math.ceil(m / STRIPE)
    mean = torch.randn(n, generator=g) * 0.1
    sigma = torch.exp(torch.randn(n, generator=g) * 0.5)
    t3 = torch.distributions.StudentT(3.0)
    torch.manual_seed(seed + 1)

    def draw(T):
        z = t3.sample((T, n)) / math.sqrt(3.0)
        return mean + sigma * z, z
    x, _ = draw(tokens)
    density = 1.0 - sparsity
    if density >= 1.0:
        return x, mean, torch.zeros(k, n)
    jitter = torch.exp(torch.randn(k, n, generator=g) * 0.3)
    _, zc = draw(256)
    c = torch.empty(k)
    q = max(1, int((1 - density) * zc.numel()))
    for r0 in range(0, k, 8):
        ratio = zc.abs()[None] / jitter[r0:r0 + 8, None, :]
        c[r0:r0 + 8] = ratio.flatten(1).kthvalue(q, dim=1).values
    thr = (c[:, None] * jitter * sigma[None, :]).contiguous()
    return x, mean, thr


def _cpu_times():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v), idle


class Quiet:
    """Waits (up to `max_wait` s) until the other processes leave the CPUs nearly idle.

    The machine is shared: a timed call whose threads lose their cores to another process measures
    the scheduler, not the kernel. Before each timed call (and before the cache eviction, which then
    wakes the cores up again) the CPUs' busy fraction is sampled over a short window while this
    process sleeps; the call is flagged quiet when it is below `busy`. Medians
    are taken over the quiet calls when there are enough of them (and over all calls otherwise); the
    JSON records how many were quiet.
    """

    def __init__(self, busy: float = 0.2, window: float = 0.02, max_wait: float = 3.0, enabled: bool = True,
                 budget: float = 300.0):
        self.busy, self.window, self.max_wait, self.budget = busy, window, max_wait, budget
        self.enabled = enabled and os.path.exists("/proc/stat")
        self.quiet_calls = self.calls = 0
        self.waited = 0.0

    def __call__(self) -> bool:
        self.calls += 1
        if not self.enabled:
            return True
        t0 = time.time()
        t_end = t0 + (self.max_wait if self.waited < self.budget else 0.0)
        while True:
            a = _cpu_times()
            time.sleep(self.window)
            b = _cpu_times()
            tot = max(b[0] - a[0], 1)
            busy = 1.0 - (b[1] - a[1]) / tot
            if busy <= self.busy:
                self.quiet_calls += 1
                self.waited += time.time() - t0
                return True
            if time.time() > t_end:
                self.waited += time.time() - t0
                return False
            time.sleep(0.05)


def rotated(items: list, r: int) -> list:
    """Round r's order: items rotated by r, so over len(items) rounds each takes every position once (a fixed or
    merely reversed order leaves an item always in the same place, and with it any effect of that place)."""
    k = r % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


def involuntary_switches() -> int:
    """Times any thread of this process lost its core to another runnable task (getrusage)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def robust_median(samples, min_quiet: int = 5):
    """Median over the quiet samples when there are at least `min_quiet`, else over all. samples: [(t, quiet)]"""
    q = [t for t, ok in samples if ok]
    return statistics.median(q if len(q) >= min_quiet else [t for t, _ in samples]), len(q)


def llc_bytes() -> int:
    """Size of the largest CPU cache sysfs reports (the L3 of x86 hosts), 0 when unknown."""
    import glob
    best = 0
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            t = open(f).read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
            best = max(best, int(t.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best


def evict_mib_default() -> int:
    """Twice the last-level cache, at least 128 MiB."""
    return max(128, 2 * llc_bytes() // (1 << 20))


class Evictor:
    """Writes a buffer (twice the L3 by default, at least 128 MiB) so the next call reads its weights from DRAM."""

    def __init__(self, mib: int | None = None):
        self.mib = mib or evict_mib_default()
        self.buf = torch.empty(self.mib * 1024 * 1024 // 4)

    def __call__(self):
        self.buf.add_(1.0)


def cycler(xs: list):
    """A function giving the next of `xs` at each call, round and round. Each timed variant has its own, so every one
    is timed on all the tokens in turn. (One counter shared by name gave every variant, of every shape, the last
    shape's: with 7 sparsities and 21 rounds a row was timed on 2 to 4 of its 8 tokens, with --quick on 1 or 2.)"""
    it = itertools.cycle(xs)
    return lambda: next(it)


def bench_dtype(ext, dtype, sparsities, reps, tokens, evict, threads, log):
    from cwic_kernels import cpu as C
    isa = C.isa_id(None)
    variants = []          # (shape_idx, label, fn, reads_fn)
    shapes = []
    for si, (name, n, m, count) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(100 + si)
        W = (torch.randn(m, n, generator=g) / math.sqrt(n)).to(dtype)
        wt = W.t().contiguous()
        bias = torch.randn(m, generator=g) * 0.01
        per = {"name": name, "n": n, "m": m, "count": count, "W": W, "wt": wt}
        x0, _, _ = make_inputs(n, m, tokens, 0.0, seed=si)
        xs_dense = [x0[t:t + 1].to(dtype) for t in range(tokens)]
        variants.append((si, "dense", lambda W=W, nxt=cycler(xs_dense): F.linear(nxt(), W)))
        variants.append((si, "own", lambda wt=wt, nxt=cycler(xs_dense):
                         ext.gemv(nxt(), wt, None, None, None, STRIPE, isa, threads)))
        per["sparse"] = {}
        for sp in sparsities:
            x, mean, thr = make_inputs(n, m, tokens, sp, seed=si)
            xs = [x[t:t + 1].to(dtype) for t in range(tokens)]
            reads = [ext.gemv(xx, wt, mean, thr, bias, STRIPE, isa, threads)[1] for xx in xs]
            per["sparse"][sp] = {"measured": 1.0 - statistics.mean(reads) / (n * m)}
            variants.append((si, sp, lambda wt=wt, nxt=cycler(xs), mean=mean, thr=thr, b=bias:
                             ext.gemv(nxt(), wt, mean, thr, b, STRIPE, isa, threads)))
        shapes.append(per)
    times = {(si, lab): [] for si, lab, _ in variants}
    for _, _, fn in variants:      # warm up (page in, first-touch)
        fn()
    t_start = time.time()
    for r in range(reps):
        for si, lab, fn in rotated(variants, r):
            evict()
            c0 = involuntary_switches()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times[(si, lab)].append((dt, involuntary_switches() == c0))   # not preempted: "quiet"
        if r == 0:
            log(f"  ({dtype}: one round {time.time() - t_start:.1f} s, {reps} rounds)")
    med, nq = {}, {}
    for key, v in times.items():
        t, q = robust_median(v)
        med[key], nq[key] = t * 1e6, q
    mn = {key: min(t for t, _ in v) * 1e6 for key, v in times.items()}
    out = {"shapes": [], "layer": {}}
    layer_dense = sum(med[(si, "dense")] * s["count"] for si, s in enumerate(shapes))
    layer_own = sum(med[(si, "own")] * s["count"] for si, s in enumerate(shapes))
    for si, s in enumerate(shapes):
        nbytes = s["n"] * s["m"] * torch.finfo(dtype).bits // 8
        d = {"name": s["name"], "n_in": s["n"], "m_out": s["m"], "count": s["count"],
             "dense_us": med[(si, "dense")], "dense_min_us": mn[(si, "dense")],
             "dense_GBps": nbytes / med[(si, "dense")] / 1e3,
             "own_dense_us": med[(si, "own")], "own_dense_GBps": nbytes / med[(si, "own")] / 1e3,
             "sparse": {}}
        for sp in sparsities:
            t = med[(si, sp)]
            d["sparse"][str(sp)] = {"us": t, "min_us": mn[(si, sp)], "measured_sparsity": s["sparse"][sp]["measured"],
                                    "speedup": med[(si, "dense")] / t, "speedup_vs_own_dense": med[(si, "own")] / t}
        out["shapes"].append(d)
    for sp in sparsities:
        t = sum(med[(si, sp)] * s["count"] for si, s in enumerate(shapes))
        meas = sum(s["sparse"][sp]["measured"] * s["n"] * s["m"] * s["count"] for s in shapes) / \
            sum(s["n"] * s["m"] * s["count"] for s in shapes)
        out["layer"][str(sp)] = {"us": t, "measured_sparsity": meas, "speedup": layer_dense / t,
                                 "speedup_vs_own_dense": layer_own / t}
    out["quiet_fraction"] = sum(nq.values()) / max(1, sum(len(v) for v in times.values()))
    out["layer_dense_us"] = layer_dense
    out["layer_own_dense_us"] = layer_own
    return out


def table(name: str, res: dict, sparsities) -> str:
    lines = [f"### {name}: µs per call (median), speedup over dense F.linear (and over our kernel dense)", ""]
    hdr = "| matrix | n→m | F.linear | own dense | " + " | ".join(f"s={s}" for s in sparsities) + " |"
    lines += [hdr, "|" + "---|" * (4 + len(sparsities))]
    for d in res["shapes"]:
        cells = [f"{d['sparse'][str(s)]['us']:.0f} ({d['sparse'][str(s)]['speedup']:.2f}×/"
                 f"{d['sparse'][str(s)]['speedup_vs_own_dense']:.2f}×)" for s in sparsities]
        lines.append(f"| {d['name']} | {d['n_in']}→{d['m_out']} | {d['dense_us']:.0f} ({d['dense_GBps']:.0f} GB/s) | "
                     f"{d['own_dense_us']:.0f} ({d['own_dense_GBps']:.0f} GB/s) | " + " | ".join(cells) + " |")
    cells = [f"**{res['layer'][str(s)]['speedup']:.2f}×** / {res['layer'][str(s)]['speedup_vs_own_dense']:.2f}×"
             for s in sparsities]
    lines.append(f"| layer (q,k,v,o,gate,up,down) | | {res['layer_dense_us']:.0f} | {res['layer_own_dense_us']:.0f} | "
                 + " | ".join(cells) + " |")
    meas = " ".join(f"{s}→{res['layer'][str(s)]['measured_sparsity']:.3f}" for s in sparsities)
    lines += ["", f"measured sparsity (target→measured, layer): {meas}", ""]
    return "\n".join(lines)


def main(argv=None):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from experiments.cli import at_least
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32 (first: headline)")
    ap.add_argument("--sparsities", default=None, help="comma list (default 0,0.25,0.5,0.66,0.75,0.8,0.9)")
    ap.add_argument("--reps", type=at_least(1), default=None, help="rounds (median; default 21, --quick 9)")
    ap.add_argument("--tokens", type=at_least(1), default=8, help="distinct tokens cycled through")
    ap.add_argument("--threads", type=at_least(0), default=0, help="threads (0: torch.get_num_threads())")
    ap.add_argument("--evict-mib", type=int, default=None,
                    help="eviction buffer before each timed call (default: twice the L3, at least 128 MiB)")
    ap.add_argument("--quick", action="store_true", help="bf16 only, sparsities 0.5/0.66/0.8, 9 rounds")
    ap.add_argument("--repeat", type=at_least(1), default=1, help="whole measurements; headline = median over them")
    ap.add_argument("--out", default=None, help="folder for cpu_kernels.json and cpu_kernels.md")
    args = ap.parse_args(argv)
    if args.quick and args.sparsities:   # --quick used to replace them without a word
        raise SystemExit(f"--quick times its own sparsities ({', '.join(map(str, QUICK_SPARSITIES))}): drop "
                         f"--quick to time --sparsities {args.sparsities}")
    dtypes = ["bf16"] if args.quick else [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):   # before any work, not after the first dtype's table
        raise SystemExit(f"--dtypes: a comma-separated list of {', '.join(DTYPES)}; got {args.dtypes!r}")
    try:
        sparsities = QUICK_SPARSITIES if args.quick else (
            [float(s) for s in args.sparsities.split(",")] if args.sparsities else SPARSITIES)
    except ValueError:
        raise SystemExit(f"--sparsities: comma-separated fractions such as 0.5,0.66; got {args.sparsities!r}") from None
    if not all(0 <= x < 1 for x in sparsities):
        raise SystemExit(f"--sparsities: every sparsity must lie in [0, 1); got {args.sparsities!r}")
    sparsities = list(sparsities)
    ensure_imports()
    from cwic_kernels import cpu as C
    ext = C.load()
    if ext is None:
        raise SystemExit(f"C++ kernels unavailable: {C.error()}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    for must in (0.5, 0.66, 0.8):
        if must not in sparsities:
            sparsities.append(must)
    sparsities = sorted(set(sparsities))
    reps = args.reps or (9 if args.quick else 21)
    info = machine()
    info.update({"isa": C.best_isa(), "kernel_threads": threads})
    print(f"CPU kernels: {info.get('cpu', '?')}, {info['cpus']} CPUs, torch {torch.__version__} "
          f"({threads} threads), ISA {info['isa']}, load {info.get('loadavg_start')}")
    evict = Evictor(args.evict_mib)
    info["evict_mib"] = evict.mib
    info["llc_mib"] = llc_bytes() / (1 << 20)
    results = {}
    md = [f"# CPU kernel benchmark (batch 1, Llama-3.2-1B decode shapes, stripe {STRIPE})", "",
          f"Machine: {info.get('cpu', '?')}, {info['cpus']} CPUs, {threads} threads, ISA {info['isa']}, "
          f"torch {torch.__version__}. Weights evicted from the caches before every timed call (a {evict.mib} MiB "
          f"buffer written; L3 {info['llc_mib']:.0f} MiB); medians of "
          f"{reps} interleaved rounds. Cells: µs (speedup over F.linear / over our kernel with every pair on).",
          ""]
    runs = {dn: [] for dn in dtypes}
    for rep in range(max(1, args.repeat)):
        for dn in dtypes:
            res = bench_dtype(ext, DTYPES[dn], sparsities, reps, args.tokens, evict, threads, print)
            runs[dn].append(res)
            t = table(dn if args.repeat <= 1 else f"{dn}, measurement {rep + 1}/{args.repeat}", res, sparsities)
            print(t)
            md.append(t)
    results = {dn: r[-1] for dn, r in runs.items()}

    def med(dn, sp, key):   # median over the repeated measurements
        return statistics.median(r["layer"][str(sp)][key] for r in runs[dn])
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    head = dtypes[0]
    summary = {
        "bench": "cpu_kernels", "device": "cpu", "machine": info, "stripe": STRIPE, "reps": reps,
        "dtype": head, "sparsities": sparsities,
        "unpreempted_fraction": {dn: round(r["quiet_fraction"], 3) for dn, r in results.items()},
        "repeats": max(1, args.repeat),
        "speedup": {str(s): round(med(head, s, "speedup"), 3) for s in sparsities},
        "speedup_vs_own_dense": {str(s): round(med(head, s, "speedup_vs_own_dense"), 3) for s in sparsities},
        "measured_sparsity": {str(s): round(results[head]["layer"][str(s)]["measured_sparsity"], 4)
                              for s in sparsities},
        "by_dtype": {dn: {"speedup": {str(s): round(med(dn, s, "speedup"), 3) for s in sparsities},
                          "speedup_vs_own_dense": {str(s): round(med(dn, s, "speedup_vs_own_dense"), 3)
                                                   for s in sparsities},
                          "speedup_each_measurement": [{str(s): round(x["layer"][str(s)]["speedup"], 3)
                                                        for s in sparsities} for x in runs[dn]],
                          "layer_dense_us": round(r["layer_dense_us"], 1),
                          "layer_own_dense_us": round(r["layer_own_dense_us"], 1),
                          "shapes": r["shapes"]} for dn, r in results.items()},
        "note": "speedup = layer time of dense F.linear (same dtype) / CWIC kernel, weights evicted before each "
                "call, median over the repeated measurements (shapes: the last one); speedup_vs_own_dense = our "
                "kernel with every pair on / CWIC kernel",
    }
    lines = []
    for dn, r in results.items():
        each = ", ".join(f"{x['layer']['0.66']['speedup']:.2f}" for x in runs[dn])
        lines.append(f"66 % sparsity, {dn}, one layer: {med(dn, 0.66, 'speedup'):.2f}× over dense F.linear "
                     f"(measurements: {each}), {med(dn, 0.66, 'speedup_vs_own_dense'):.2f}× over our kernel with "
                     f"every pair on (target ≥ 2.7× over F.linear)")
    for line in lines:
        print(line)
    md += lines + [""]
    from cwic_exp.files import dumps   # strict JSON: a missing figure (NaN) is null
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cpu_kernels.json"), "w") as f:
            f.write(dumps(summary, indent=1))
        with open(os.path.join(args.out, "cpu_kernels.md"), "w") as f:
            f.write("\n".join(md))
    print(dumps(summary, separators=(",", ":")))
    return summary


if __name__ == "__main__":
    main()
