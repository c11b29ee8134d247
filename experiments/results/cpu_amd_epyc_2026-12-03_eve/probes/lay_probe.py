"""SmolLM2 shapes (or the 1B shapes with S=512), B=1, ~33% of (stripe, input) pairs: input-major CWIC GEMV without and
with the row-span prefetch of patches/pfall.patch ($CWIC_PF_ALL read per call) vs dense-own vs nothing on, per-call us
(weights cycled over enough copies to exceed the L3); alternating rounds. (Its first run also timed the stripe-major
layout through gemv_layout; that code was removed after it.)"""
import os as _os, sys as _sys
_ROOT = _os.path.abspath(_os.path.join(_os.path.dirname(__file__), *[_os.pardir] * 4))
_sys.path[:0] = [_ROOT, _os.path.join(_ROOT, 'src')]

import sys, time, statistics, torch, json
from cwic_kernels import cpu
from cwic_exp.cpu_decode import HugePageArena
ext = cpu.load(); torch.manual_seed(0)
arena = HugePageArena()
res = {}
import os
S = int(os.environ.get("S", "192"))
shapes = [("qkv", 576, 960, 80), ("o", 576, 576, 120), ("gate", 576, 1536, 50), ("head", 576, 49152, 3)] if S == 192 else \
    [("qkv", 2048, 3072, 8), ("o", 2048, 2048, 12), ("gate", 2048, 8192, 4), ("head", 2048, 128000, 1)]
if len(sys.argv) > 1: shapes = [s for s in shapes if s[0] in sys.argv[1:]]
for name, n, m, copies in shapes:
    s = S; k = m // s
    x = torch.randn(1, n) * torch.exp(torch.randn(n) * 0.5); mean = torch.zeros(n)
    thr = torch.stack([torch.quantile(x.abs()[0] * (1 + 0.05 * (r % 7)), 0.67).expand(n) / (1 + 0.05 * (r % 7)) for r in range(k)]).contiguous()
    thr = thr * (1 + 0.3 * (2 * torch.rand(k, n) - 1))
    bias = torch.zeros(m)
    im = [arena.put(torch.randn(n, m).to(torch.bfloat16)) for _ in range(copies)]
    sm = im[:1] if 1 else [arena.put(w.view(n, k, s).permute(1, 0, 2).contiguous()) for w in im]   # (k, n, s)
    def t(f, reps):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for c in range(copies): f(c)
            ts.append((time.perf_counter() - t0) / copies)
        return statistics.median(ts)
    y1 = ext.gemv(x, im[0], mean, thr, bias, s, -1, 0)[0]
    y2 = ext.gemv_layout(x, sm[0], m, mean, thr, bias, s, s, n * s, -1, 0)[0]
    pass
    inf = torch.full_like(thr, 1e9)
    import os
    def pfa(v, c):
        os.environ["CWIC_PF_ALL"] = v
        return ext.gemv(x, im[c], mean, thr, bias, s, -1, 0)
    fs = {"input_major": lambda c: pfa("0", c), "pf_all": lambda c: pfa("1", c),
                    "dense_own": lambda c: ext.gemv(x, im[c], None, None, bias, s, -1, 0),
          "zero": lambda c: ext.gemv(x, im[c], mean, inf, bias, s, -1, 0)}
    r = {k2: [] for k2 in fs}
    for rnd in range(9):
        for k2, f in fs.items(): r[k2].append(t(f, 3) * 1e6)
    dens = float((x.abs()[0] > thr).float().mean())
    res[name] = {k2: round(statistics.median(v), 2) for k2, v in r.items()} | {"density": round(dens, 3)}
    print(name, res[name], flush=True)
print(json.dumps(res))
