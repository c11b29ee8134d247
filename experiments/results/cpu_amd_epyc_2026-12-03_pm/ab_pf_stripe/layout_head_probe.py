import sys, time, statistics, torch
sys.path.insert(0, "/tmp/pp")
from cwic_kernels import cpu
ext = cpu.load()
torch.manual_seed(0)
n, m, s = 2048, 128256 // 512 * 512, 512
k = m // s
x = torch.randn(1, n)
mean = torch.zeros(n)
thr = torch.stack([torch.quantile(x.abs()[0] * (1 + 0.05 * (r % 7)), 0.67).expand(n) / (1 + 0.05 * (r % 7)) for r in range(k)]).contiguous()
bias = torch.zeros(m)
im = torch.randn(n, m).to(torch.bfloat16)
sm = im.view(n, k, s).permute(1, 0, 2).contiguous()
y1, reads = ext.gemv(x, im, mean, thr, bias, s, -1, 0)
assert torch.equal(y1, ext.gemv_layout(x, sm, m, mean, thr, bias, s, s, n * s, -1, 0)[0])
dens = reads / (n * m)
fi = lambda: ext.gemv(x, im, mean, thr, bias, s, -1, 0)
fs = lambda: ext.gemv_layout(x, sm, m, mean, thr, bias, s, s, n * s, -1, 0)
fd = lambda: ext.gemv(x, im, None, None, bias, s, -1, 0)
res = {"input-major": [], "stripe-major": [], "dense own": []}
for rnd in range(7):
    for name, f in res.items():
        fn = {"input-major": fi, "stripe-major": fs, "dense own": fd}[name]
        t0 = time.perf_counter(); fn(); res[name].append(time.perf_counter() - t0)
byt = n * m * 2
print(f"head {n}x{m} density {dens:.3f}: " + "; ".join(
    f"{k_} {statistics.median(v)*1e3:.2f} ms ({byt * (dens if k_ != 'dense own' else 1) / statistics.median(v) / 1e9:.1f} GB/s; {', '.join(f'{t*1e3:.1f}' for t in v)})" for k_, v in res.items()))
