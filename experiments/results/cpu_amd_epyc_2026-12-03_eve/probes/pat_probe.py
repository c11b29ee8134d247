"""Access pattern of a CWIC GEMV walk at one density (35 % of inputs on in every stripe; SmolLM2 o and gate shapes, B = 1,
bf16, weights cycled over copies beyond the L3): random active inputs vs the first 35 % vs every third input, against
our dense walk and a walk with nothing on (the fixed cost, Python call included). Prints median us a call."""
import statistics

import common
import torch

ext, arena = common.load()
torch.manual_seed(0)
for name, n, m, copies in [("o", 576, 576, 120), ("gate", 576, 1536, 50)]:
    s = 192; k = m // s
    mean = torch.zeros(n); bias = torch.zeros(m)
    W = [arena.put(torch.randn(n, m).to(torch.bfloat16)) for _ in range(copies)]
    thr = torch.ones(k, n)
    nact = int(0.35 * n)
    xr = torch.full((1, n), 0.1); xr[0, torch.randperm(n)[:nact]] = 2.0      # random 35 %
    xs = torch.full((1, n), 0.1); xs[0, :nact] = 2.0                          # first 35 % contiguous
    x1 = torch.full((1, n), 0.1); x1[0, ::3] = 2.0                           # every third
    fs = {"random": lambda c: ext.gemv(xr, W[c], mean, thr, bias, s, -1, 0),
          "contig": lambda c: ext.gemv(xs, W[c], mean, thr, bias, s, -1, 0),
          "every3": lambda c: ext.gemv(x1, W[c], mean, thr, bias, s, -1, 0),
          "dense": lambda c: ext.gemv(xr, W[c], None, None, bias, s, -1, 0),
          "zero": lambda c: ext.gemv(xr, W[c], mean, thr * 100, bias, s, -1, 0)}
    r = {a: [] for a in fs}
    for _ in range(9):
        for a, f in fs.items(): r[a].append(common.time_cycled(f, copies) * 1e6)
    print(name, {a: round(statistics.median(v), 1) for a, v in r.items()}, flush=True)
