"""How calibrate_apr answers close targets (SmolLM2, stripe 192): one pass (iters=1) and the default two, no global
correction (fix_steps=0), targets 3.15, 3.1500154, 3.16; prints the APR and densities on the calibration tokens and
the largest relative change of any threshold from the previous target."""
import os, sys
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src"), os.path.join(ROOT, "experiments", "bench")]
import cpu_decode as B
B.ensure_imports()
import torch, cwic_exp
import cwic_exp.cpu_decode as CD
from cwic_exp.modeling.layers import CwicLinear
model, tok = cwic_exp.load_teacher("smollm2-135m-instruct"); model = model.float().eval()
calib = B.calib_batch(tok)
cwic_exp.to_cwic(model, stripe_size=192)
mods = list(cwic_exp.iter_cwic_modules(model))
cache = {}
CD.calibrate_apr(model, calib[0], 3.0, attention_mask=calib[1], stats=True, cache=cache, tol=0.005, fix_steps=0, iters=1)
for iters in (1, 2):
    prev = None
    for t in (3.15, 3.1500153973495433, 3.16):
        st = CD.calibrate_apr(model, calib[0], t, attention_mask=calib[1], stats=False, cache=cache, fix_steps=0, iters=iters)
        th = torch.cat([(m.theta if isinstance(m, CwicLinear) else m.phi).detach().double().flatten() for m in mods])
        d = None if prev is None else float(((th - prev).abs() / prev.abs().clamp_min(1e-9)).max())
        print("iters", iters, t, round(st["apr"], 5), {kk: round(v, 4) for kk, v in st["density"].items()}, "max rel dtheta", d, flush=True)
        prev = th
