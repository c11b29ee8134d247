"""SmolLM2 CPU decode: per-part ms at 3x APR, at density ~0 (fixed costs), and dense-own"""
import os as _os, sys as _sys
_ROOT = _os.path.abspath(_os.path.join(_os.path.dirname(__file__), *[_os.pardir] * 4))
_sys.path[:0] = [_ROOT, _os.path.join(_ROOT, 'src')]

import sys, time, json, torch
sys.path.insert(0, _os.path.join(_ROOT, "experiments", "bench"))
import cpu_decode as B
B.ensure_imports()
import cwic_exp
from cwic_exp.cpu_decode import CpuDecoder, calibrate_apr
model, tok = cwic_exp.load_teacher("smollm2-135m-instruct"); model = model.float().eval()
prompt = B.chat_ids(tok, B.PROMPT); calib = B.calib_batch(tok)
def prof(dec, n=64, rounds=3):
    best = None
    for _ in range(rounds):
        dec.reset()
        st = dec.timed_decode(prompt, n)
        p = dec.profile()
        tps = st.tokens_per_s
        if best is None or tps > best[0]: best = (tps, p, st.apr)
    return best
which = sys.argv[1:] or ["dense", "3x", "zero"]
out = {}
if "dense" in which:
    d = CpuDecoder(model, mode="dense", dense="own", dtype=torch.bfloat16, max_len=200, nthreads=2)
    out["dense"] = prof(d); del d
cwic_exp.to_cwic(model, stripe_size=192)
st = calibrate_apr(model, calib[0], 3.0, attention_mask=calib[1], stats=True)
if "3x" in which:
    d = CpuDecoder(model, mode="cwic", dtype=torch.bfloat16, max_len=200, nthreads=2)
    out["3x"] = prof(d); del d
if "zero" in which:
    with torch.no_grad():
        for m in cwic_exp.iter_cwic_modules(model):
            (m.theta if hasattr(m, "theta") else m.phi).fill_(1e6)
    d = CpuDecoder(model, mode="cwic", dtype=torch.bfloat16, max_len=200, nthreads=2)
    out["zero"] = prof(d); del d
for k, (tps, p, apr) in out.items():
    print(k, f"{1000/tps:.3f} ms/tok apr {apr:.2f}", {a: round(b*1e3, 3) for a, b in p.items()})
