"""SmolLM2 at 3x APR (calibrated as bench_decode does, no decode correction): how often a row on in one stripe is on in
the next, per matrix kind, over 256 calibration tokens."""
import os as _os, sys as _sys
_ROOT = _os.path.abspath(_os.path.join(_os.path.dirname(__file__), *[_os.pardir] * 4))
_sys.path[:0] = [_ROOT, _os.path.join(_ROOT, 'src')]
import sys, os, torch
sys.path.insert(0, _os.path.join(_ROOT, "experiments", "bench"))
import cpu_decode as B
B.ensure_imports()
import cwic_exp
from cwic_exp.cpu_decode import calibrate_apr, _collect
from cwic_exp.modeling import CwicLinear
model, tok = cwic_exp.load_teacher("smollm2-135m-instruct"); model = model.float().eval()
calib = B.calib_batch(tok)
cwic_exp.to_cwic(model, stripe_size=192)
st = calibrate_apr(model, calib[0], 3.0, attention_mask=calib[1], stats=True)
store = _collect(model, calib[0], calib[1])
agg = {}
for name, m in model.named_modules():
    if not isinstance(m, CwicLinear): continue
    kind = name.split(".")[-1]
    x = store[m][:256]
    thr = m.thresholds().detach().float(); mean = m.running_stats()[0].detach().float()
    on = (x[:, None, :] - mean).abs() >= thr[None]          # (N, k, n)
    k = on.shape[1]
    dens = on.float().mean().item()
    nxt = (on[:, :-1] & on[:, 1:]).float().sum() / on[:, :-1].float().sum().clamp_min(1)
    anyrow = on.any(1).float().mean().item()
    a = agg.setdefault(kind, [0, 0, 0, 0]); a[0] += dens; a[1] += nxt.item(); a[2] += anyrow; a[3] += 1
for kind, (d, n, r, c) in agg.items():
    print(f"{kind}: density {d/c:.3f}  P(on in next stripe | on) {n/c:.3f}  rows on in any stripe {r/c:.3f}")
