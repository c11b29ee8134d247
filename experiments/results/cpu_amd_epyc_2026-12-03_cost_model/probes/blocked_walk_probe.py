import os, sys, time, statistics, torch
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * 4))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src")]
from cwic_kernels import cpu
torch.manual_seed(0)
def heavy(n):
    return torch.randn(n) * torch.distributions.Exponential(1.0).sample((n,))
cases = [("head", 576, 49152, 192, 1), ("o", 576, 576, 192, 200), ("gate", 576, 1536, 192, 60), ("qkv", 576, 960, 192, 100),
         ("1b-o", 2048, 2048, 512, 12), ("1b-head", 2048, 128256, 512, 1)]
variants = [("tiles", {"CWIC_CPU_BLOCKED": "0"})] + [(f"blk pf{pf} s{s} b{b}", {"CWIC_CPU_BLOCKED": "1", "CWIC_CPU_BLOCK_PF": str(pf), "CWIC_CPU_BLOCK_SPAN": str(s), "CWIC_CPU_BLOCK_BYTES": str(b)}) for pf, s, b in [(2, 8192, 65536), (2, 4096, 32768), (2, 16384, 131072), (1, 8192, 65536)]]
only = os.environ.get("CASES")
for name, n, m, stripe, copies in cases:
    if only and name not in only.split(","): continue
    k = (m + stripe - 1) // stripe
    ws = [torch.randn(n, m).to(torch.bfloat16) for _ in range(copies)]
    mean = torch.zeros(n)
    x = heavy(n)[None]
    z = (x[0]).abs()
    # thresholds: per (stripe, input) jittered so ~1/3 on
    jit = 1 + 0.3 * (2 * torch.rand(k, n) - 1)
    lo, hi = 0.0, 100.0
    for _ in range(40):
        c = (lo + hi) / 2
        d = (z[None] >= c * jit).float().mean()
        lo, hi = (c, hi) if d > 1/3 else (lo, c)
    thr = c * jit
    bias = torch.zeros(m)
    res = {v: [] for v, _ in variants}
    for rnd in range(7):
        for v, env in (variants if rnd % 2 == 0 else variants[::-1]):
            os.environ.update(env)
            t0 = time.perf_counter()
            reps = max(1, 40 // copies) if copies > 1 else 6
            for _ in range(reps):
                for w in ws:
                    cpu.gemv(x, w, mean, thr, bias, stripe)
            res[v].append((time.perf_counter() - t0) / (reps * len(ws)) * 1e6)
    base = statistics.median(res["tiles"])
    print(f"{name} {n}x{m} s{stripe}: " + ", ".join(f"{v} {statistics.median(r):.1f}us ({base/statistics.median(r):.3f}x)" for v, r in res.items()), flush=True)
