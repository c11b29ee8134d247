"""SmolLM2 shapes (or the 1B shapes with S=512), B=1, ~33% of (stripe, input) pairs: the input-major CWIC GEMV in
kernel variants read per call from the environment of a scratch copy (PYTHONPATH) vs dense-own vs nothing on, per-call
us (weights cycled over enough copies to exceed the L3); alternating rounds.

    VARIANTS=pf_all (default): without / with the row-span prefetch of patches/pfall.patch ($CWIC_PF_ALL)
    VARIANTS=union: the tiles / the union walk of patches/union_walk.patch in bands of 2048 / 8192 outputs ($UNION)

(Its first run also timed the stripe-major layout through gemv_layout; that code was removed after it.)"""
import json
import os
import statistics
import sys

import common
import torch

ext, arena = common.load()
torch.manual_seed(0)
S = int(os.environ.get("S", "192"))
VARIANTS = {"pf_all": ("CWIC_PF_ALL", {"input_major": "0", "pf_all": "1"}),
            "union": ("UNION", {"tiles": "0", "union2k": "2048", "union8k": "8192"})}[os.environ.get("VARIANTS", "pf_all")]
shapes = [("qkv", 576, 960, 80), ("o", 576, 576, 120), ("gate", 576, 1536, 50), ("head", 576, 49152, 3)] if S == 192 else \
    [("qkv", 2048, 3072, 8), ("o", 2048, 2048, 12), ("gate", 2048, 8192, 4), ("head", 2048, 128000, 1)]
if len(sys.argv) > 1:
    shapes = [s for s in shapes if s[0] in sys.argv[1:]]
res = {}
for name, n, m, copies in shapes:
    s = S; k = m // s
    x = torch.randn(1, n) * torch.exp(torch.randn(n) * 0.5); mean = torch.zeros(n)
    thr = torch.stack([torch.quantile(x.abs()[0] * (1 + 0.05 * (r % 7)), 0.67).expand(n) / (1 + 0.05 * (r % 7)) for r in range(k)]).contiguous()
    thr = thr * (1 + 0.3 * (2 * torch.rand(k, n) - 1))
    bias = torch.zeros(m)
    im = [arena.put(torch.randn(n, m).to(torch.bfloat16)) for _ in range(copies)]
    inf = torch.full_like(thr, 1e9)
    var, values = VARIANTS

    def sparse(v, c):
        os.environ[var] = v
        return ext.gemv(x, im[c], mean, thr, bias, s, -1, 0)
    fs = {key: (lambda c, v=v: sparse(v, c)) for key, v in values.items()}
    fs["dense_own"] = lambda c: ext.gemv(x, im[c], None, None, bias, s, -1, 0)
    fs["zero"] = lambda c: ext.gemv(x, im[c], mean, inf, bias, s, -1, 0)
    r = {k2: [] for k2 in fs}
    for rnd in range(9):
        for k2, f in fs.items(): r[k2].append(common.time_cycled(f, copies) * 1e6)
    dens = float((x.abs()[0] > thr).float().mean())
    res[name] = {k2: round(statistics.median(v), 2) for k2, v in r.items()} | {"density": round(dens, 3)}
    print(name, res[name], flush=True)
print(json.dumps(res))
