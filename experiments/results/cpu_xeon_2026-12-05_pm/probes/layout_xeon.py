"""Xeon: input-major vs stripe-major (gemv_layout) CWIC GEMV, SmolLM2 shapes, ~1/3 of pairs on, weights cycled
over copies totalling ~600 MB (L3 260 MiB); per-call µs, medians of alternated rounds."""
import json, os, statistics, sys
# the GEMV probes' shared helpers: the checkout on sys.path, the extension with a huge-page arena, time_cycled
sys.path.insert(0, os.path.join(os.path.dirname(__file__), *[os.pardir] * 2, "cpu_amd_epyc_2026-12-03_eve", "probes"))
import common
import torch
ext, arena = common.load()
torch.manual_seed(0)
S = 192
shapes = [("qkv", 576, 960), ("o", 576, 576), ("gate", 576, 1536), ("head", 576, 49152)]
tc = common.time_cycled
res = {}
for name, n, m in shapes:
    k = m // S
    copies = max(2, int(600e6 // (n * m * 2)))
    x = torch.randn(1, n) * torch.exp(torch.randn(n) * 0.5); mean = torch.zeros(n)
    thr = torch.stack([torch.quantile(x.abs()[0] * (1 + 0.05 * (r % 7)), 0.67).expand(n) / (1 + 0.05 * (r % 7)) for r in range(k)]).contiguous()
    thr = thr * (1 + 0.3 * (2 * torch.rand(k, n) - 1))
    bias = torch.zeros(m)
    im, sm = [], []
    for _ in range(copies):
        w = torch.randn(n, m).to(torch.bfloat16)
        im.append(arena.put(w))
        sm.append(arena.put(w.reshape(n, k, S).permute(1, 0, 2).contiguous()))
    y1 = ext.gemv(x, im[0], mean, thr, bias, S, -1, 0)[0]
    y2 = ext.gemv_layout(x, sm[0], m, mean, thr, bias, S, S, n * S, -1, 0)[0]
    assert torch.equal(y1, y2), (y1 - y2).abs().max()
    fs = {"input_major": lambda c: ext.gemv(x, im[c], mean, thr, bias, S, -1, 0),
          "stripe_major": lambda c: ext.gemv_layout(x, sm[c], m, mean, thr, bias, S, S, n * S, -1, 0),
          "dense_own": lambda c: ext.gemv(x, im[c], None, None, bias, S, -1, 0)}
    r = {k2: [] for k2 in fs}
    for rnd in range(9):
        order = list(fs.items()) if rnd % 2 == 0 else list(fs.items())[::-1]
        for k2, f in order: r[k2].append(tc(f, copies) * 1e6)
    dens = float((x.abs()[0] > thr).float().mean())
    ratio = statistics.median(a / b for a, b in zip(r["input_major"], r["stripe_major"]))
    res[name] = {k2: round(statistics.median(v), 2) for k2, v in r.items()} | {"density": round(dens, 3), "im_over_sm_paired": round(ratio, 3), "copies": copies}
    print(name, res[name], flush=True)
    im = sm = None   # the copies freed before the next shape
print(json.dumps(res))
