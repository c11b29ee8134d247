"""SmolLM2 dense-own and CWIC at 3x APR (calibration tokens only, no decode correction) in one process: tokens/s and
ms a token by part (the decoder's own clocks), medians of 5 forced decodes of 64 tokens each."""
import sys, os, statistics
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src"), os.path.join(ROOT, "experiments", "bench")]
import cpu_decode as B
B.ensure_imports()
import torch, cwic_exp
from cwic_exp.cpu_decode import CpuDecoder, calibrate_apr
model, tok = cwic_exp.load_teacher("smollm2-135m-instruct"); model = model.float().eval()
prompt = B.chat_ids(tok, B.PROMPT); calib = B.calib_batch(tok)
dense = CpuDecoder(model, mode="dense", dtype=torch.bfloat16, max_len=len(prompt) + 72, nthreads=2)
text = dense.generate(prompt, 64)[len(prompt):]
cwic_exp.to_cwic(model, stripe_size=192)
calibrate_apr(model, calib[0], 3.0, attention_mask=calib[1])
dec = CpuDecoder(model, mode="cwic", dtype=torch.bfloat16, max_len=len(prompt) + 72, nthreads=2)
for name, d in (("dense", dense), ("cwic", dec)):
    profs, tps = [], []
    for r in range(5):
        s = d.timed_decode(prompt, 64, forced=text); profs.append(d.profile()); tps.append(s.tokens_per_s)
    print(name, "tok/s", round(statistics.median(tps), 1), {k: round(statistics.median(p[k] for p in profs) * 1e3, 4) for k in profs[0]})
