"""Paired in-process A/B on the SmolLM2 CWIC decode at 3x APR: variants = values of env var $VAR read per call by a
scratch kernel copy (PYTHONPATH). Prints median tok/s and per-part ms per variant, and paired ratios."""
import os as _os, sys as _sys
_ROOT = _os.path.abspath(_os.path.join(_os.path.dirname(__file__), *[_os.pardir] * 4))
_sys.path[:0] = [_ROOT, _os.path.join(_ROOT, 'src')]

import sys, os, time, json, statistics, torch
sys.path.insert(0, _os.path.join(_ROOT, "experiments", "bench"))
import cpu_decode as B
B.ensure_imports()
import cwic_exp
from cwic_exp.cpu_decode import CpuDecoder, calibrate_apr
VAR = os.environ.get("VAR", "CWIC_PF_ALL"); VALS = os.environ.get("VALS", "0,1").split(",")
ROUNDS = int(os.environ.get("ROUNDS", "8")); NT = int(os.environ.get("NT", "32")); APR = float(os.environ.get("APR", "3"))
MODEL = os.environ.get("MODEL", "smollm2")
if MODEL == "smollm2":
    model, tok = cwic_exp.load_teacher("smollm2-135m-instruct"); model = model.float().eval()
    prompt = B.chat_ids(tok, B.PROMPT); calib = B.calib_batch(tok); stripe = 192
else:
    model = B.llama1b_shaped(layers=16); stripe = 512
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (24,), generator=g).tolist()
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=g); calib = (ids, torch.ones_like(ids))
cwic_exp.to_cwic(model, stripe_size=stripe)
st = calibrate_apr(model, calib[0], APR, attention_mask=calib[1], stats=True)
dec = CpuDecoder(model, mode="cwic", dtype=torch.bfloat16, max_len=len(prompt) + NT + 8, nthreads=2)
res = {v: [] for v in VALS}; prof = {v: [] for v in VALS}
apr = None
for r in range(ROUNDS + 1):
    for v in (VALS if r % 2 == 0 else VALS[::-1]):
        os.environ[VAR] = v
        s = dec.timed_decode(prompt, NT); p = dec.profile(); apr = s.apr
        if r == 0: continue
        res[v].append(s.tokens_per_s); prof[v].append(p)
out = {"var": VAR, "apr_decode": apr}
for v in VALS:
    out[v] = {"tok_s": round(statistics.median(res[v]), 2),
              "ms": {k: round(statistics.median(p[k] for p in prof[v]) * 1e3, 3) for k in prof[v][0]}}
    print(v, out[v])
base = VALS[0]
for v in VALS[1:]:
    rat = [a / b for a, b in zip(res[v], res[base])]
    print(f"{v}/{base} tok/s ratio per round:", [round(x, 3) for x in rat], "median", round(statistics.median(rat), 3))
print(json.dumps(out))
