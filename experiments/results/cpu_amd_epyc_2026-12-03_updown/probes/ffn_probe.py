"""FFN kernel probe: one FFN call of an old build (git rev $OLD, rows apart) against this tree's, rows apart or side by
side, weights beyond the L3 ($COPIES copies), variants alternated in one process ($ROUNDS rounds).

    D=2048 FF=8192 S=512 .venv/bin/python experiments/results/cpu_amd_epyc_2026-12-03_updown/probes/ffn_probe.py
    D=576 FF=1536 S=192 COPIES=30 VARS=old,apart,side ...

A variant "side:PF:PFB:G" (prefetch PF units ahead, PFB bytes of each row, groups of G units) needs the scratch
build's set_ud_tuning hook (not in the tree); "apart" and "side" run the tree as it is.
"""
import os, sys, time, statistics, tempfile
import torch
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * 4))
sys.path[:0] = [ROOT, ROOT + "/src"]
from experiments.bench.cpu_ab import load_old
from cwic_kernels import cpu as C
d, F_, s = int(os.environ.get("D", 2048)), int(os.environ.get("FF", 8192)), int(os.environ.get("S", 512))
copies = int(os.environ.get("COPIES", 6)); rounds = int(os.environ.get("ROUNDS", 7))
new = C.load(); old = load_old(os.environ.get("OLD", "HEAD"), tempfile.mkdtemp())
g = torch.Generator().manual_seed(0)
k = F_ // s
def mk():
    gw = (torch.randn(d, F_, generator=g) * 0.02).bfloat16()
    up = (torch.randn(F_, d, generator=g) * 0.02).bfloat16()
    dn = (torch.randn(F_, d, generator=g) * 0.02).bfloat16()
    blk = torch.cat([up, dn], 1).contiguous()
    return gw, up, dn, blk
W = [mk() for _ in range(copies)]
x = (torch.randn(1, d, generator=g) * torch.distributions.StudentT(3.0).sample((1, d))).bfloat16()
gm = torch.zeros(d)
gthr = torch.full((k, d), float(x.float().abs().quantile(0.67)))   # ~1/3 of inputs on
gb = torch.zeros(F_)
# unit thresholds: ~1/3 units on (from a dense run)
gg = torch.nn.functional.silu((x.float() * (x.float().abs() > gthr[0])) @ W[0][0].float())
ut = torch.full((F_,), float(gg.abs().quantile(0.67)))
def run(ext, wi, var):
    gw, up, dn, blk = W[wi]
    if var == "side":
        u, dd = blk[:, :d], blk[:, d:]
    else:
        u, dd = up, dn
    return ext.ffn(x, gw, gm, gthr, gb, s, u, dd, ut, "silu", -1, 0)
ref = run(new, 0, "apart")
assert torch.equal(run(new, 0, "side")[0], ref[0]) and torch.equal(run(old, 0, "apart")[0], ref[0])
print("units on:", (ref[1] - 0) , "weights read; per call MB", ref[1] * 2 / 1e6)
import json
VARS = os.environ.get("VARS", "old,apart,side").split(",")
def call(v, wi):
    if v == "old":
        return run(old, wi, "apart")
    if ":" in v:
        kind, pf, pfb, grp = v.split(":")
        new.set_ud_tuning(int(pf), int(pfb) or (1 << 40), int(grp))
        return run(new, wi, kind)
    return run(new, wi, v)
res = {v: [] for v in VARS}
for r in range(rounds):
    for v in VARS:
        call(v, 0)
        t0 = time.perf_counter()
        for rep in range(3):
            for wi in range(copies):
                call(v, wi)
        res[v].append((time.perf_counter() - t0) / (3 * copies) * 1e6)
base = res[VARS[0]]
for v in VARS:
    print(f"{v:16s} median {statistics.median(res[v]):8.1f} us/call  paired {VARS[0]}/this "
          f"{statistics.median([a / b for a, b in zip(base, res[v])]):.3f}")
