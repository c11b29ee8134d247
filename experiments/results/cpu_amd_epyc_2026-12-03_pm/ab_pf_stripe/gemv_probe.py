"""one process: time input-major CWIC GEMV (~33 % pairs) and dense-own for the gate, o and head shapes; prints ms"""
import sys, time, statistics, torch, json, os
sys.path.insert(0, "/tmp/pp")
from cwic_kernels import cpu
ext = cpu.load()
torch.manual_seed(0)
out = {}
for name, n, m, copies in (("o", 2048, 2048, 24), ("gate", 2048, 8192, 6), ("head", 2048, 128000, 1)):
    s = 512; k = m // s
    x = torch.randn(1, n); mean = torch.zeros(n)
    thr = torch.stack([torch.quantile(x.abs()[0] * (1 + 0.05 * (r % 7)), 0.67).expand(n) / (1 + 0.05 * (r % 7)) for r in range(k)]).contiguous()
    bias = torch.zeros(m)
    ws = [torch.randn(n, m).to(torch.bfloat16) for _ in range(copies)]
    def t(f, reps):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for c in range(copies): f(c)
            ts.append((time.perf_counter() - t0) / copies)
        return statistics.median(ts)
    sp = lambda c: ext.gemv(x, ws[c], mean, thr, bias, s, -1, 0)
    de = lambda c: ext.gemv(x, ws[c], None, None, bias, s, -1, 0)
    reps = 9 if name != "head" else 7
    out[name] = dict(sparse_ms=t(sp, reps) * 1e3, dense_ms=t(de, reps) * 1e3)
print(json.dumps(dict(pf=os.environ.get("CWIC_CPU_PF_STRIPE", "0"), **out)))
