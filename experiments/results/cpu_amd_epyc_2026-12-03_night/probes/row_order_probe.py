"""Row order by activation frequency: SmolLM2 at 3x APR (calibrated as bench_decode does). Per matrix kind, how skewed
the rows' activation frequencies are, and the time of the real tokens' walks with the rows in their own order against the
rows sorted by frequency (W rows, mean, thresholds and x permuted together: the same products)."""
import os, sys, statistics
sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 2, "cpu_amd_epyc_2026-12-03_eve", "probes")]
import common
import torch
sys.path.insert(0, os.path.join(common.ROOT, "experiments", "bench"))
import cpu_decode as B
B.ensure_imports()
import cwic_exp
from cwic_exp.cpu_decode import calibrate_apr, _collect
from cwic_exp.modeling import CwicLinear
ext, arena = common.load()
torch.manual_seed(0)
model, tok = cwic_exp.load_teacher("smollm2-135m-instruct"); model = model.float().eval()
calib = B.calib_batch(tok)
cwic_exp.to_cwic(model, stripe_size=192)
calibrate_apr(model, calib[0], 3.0, attention_mask=calib[1], stats=True)
store = _collect(model, calib[0], calib[1])
NT = int(os.environ.get("NT", 256))
kinds = {}
for name, m in model.named_modules():
    if isinstance(m, CwicLinear):
        kinds.setdefault(name.split(".")[-1], []).append((name, m))
for kind, mods in kinds.items():
    tops = []
    for name, m in mods:
        x = store[m][:NT].float()
        thr = m.thresholds().detach().float(); mean = m.running_stats()[0].detach().float()
        on = ((x[:, None, :] - mean).abs() >= thr[None]).any(1).float()   # (N, n): row on in any stripe
        f = on.mean(0).sort(descending=True).values
        n = f.numel(); tot = f.sum()
        tops.append([float(f[: int(q * n)].sum() / tot) for q in (0.2, 0.4, 0.6)] + [float(f.mean())])
    t = torch.tensor(tops).mean(0).tolist()
    print(f"{kind:8s} rows on {t[3]:.3f}; share of row activations in the top 20/40/60 % of rows: "
          f"{t[0]:.3f} {t[1]:.3f} {t[2]:.3f}", flush=True)
# timing on one layer per kind
LAYER = int(os.environ.get("LAYER", 5))
for kind in os.environ.get("KINDS", "q_proj,o_proj,gate_proj").split(","):
    name, m = kinds[kind][LAYER]
    x = store[m][:NT].float()
    Wt = m.weight.detach().float().t().contiguous()      # (n, out) input-major
    thr = m.thresholds().detach().float().contiguous(); mean = m.running_stats()[0].detach().float().contiguous()
    n, out = Wt.shape
    on = ((x[:, None, :] - mean).abs() >= thr[None]).any(1).float()
    perm = on.mean(0).argsort(descending=True)
    copies = max(8, int(96e6 // (n * out * 2)))
    Wo = [arena.put(Wt.to(torch.bfloat16)) for _ in range(copies)]
    Wp = [arena.put(Wt[perm].to(torch.bfloat16)) for _ in range(copies)]
    bias = torch.zeros(out); s = 192
    tp, mp = thr[:, perm].contiguous(), mean[perm].contiguous()
    xs = [x[t:t + 1].contiguous() for t in range(64)]
    xps = [v[:, perm].contiguous() for v in xs]
    y0 = ext.gemv(xs[0], Wo[0], mean, thr, bias, s, -1, 0); y1 = ext.gemv(xps[0], Wp[0], mp, tp, bias, s, -1, 0)
    y0, y1 = y0[0], y1[0]
    assert torch.allclose(y0, y1, atol=1e-3, rtol=1e-3), (y0 - y1).abs().max()
    fs = {"own order": lambda c: ext.gemv(xs[c % 64], Wo[c], mean, thr, bias, s, -1, 0),
          "by frequency": lambda c: ext.gemv(xps[c % 64], Wp[c], mp, tp, bias, s, -1, 0),
          "dense": lambda c: ext.gemv(xs[c % 64], Wo[c], None, None, bias, s, -1, 0)}
    r = {a: [] for a in fs}
    for _ in range(int(os.environ.get("ROUNDS", 9))):
        for a, f in fs.items():
            r[a].append(common.time_cycled(f, copies) * 1e6)
    ratio = statistics.median([a / b for a, b in zip(r["own order"], r["by frequency"])])
    print(kind, f"layer {LAYER} ({n}x{out}, {copies} copies) us a call:",
          {a: round(statistics.median(v), 1) for a, v in r.items()}, f"own/by-frequency {ratio:.3f}", flush=True)
