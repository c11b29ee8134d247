"""Does the dense decoder slow down after to_cwic + calibration + a CWIC decoder exist? One process."""
import gc, sys, time, statistics
sys.path.insert(0, __import__("os").path.abspath(__file__).rsplit("/experiments/", 1)[0])
import torch
from experiments.bench.cpu_decode import chat_ids, calib_batch, PROMPT, ensure_imports
ensure_imports()
import cwic_exp
from cwic_exp.cpu_decode import CpuDecoder, calibrate_apr

model, tok = cwic_exp.load_teacher("smollm2-135m-instruct")
model = model.float().eval()
prompt = chat_ids(tok, PROMPT)
N = 64
dec = {k: CpuDecoder(model, mode="dense", dense=k, dtype=torch.bfloat16, max_len=len(prompt) + N + 8) for k in ("own", "fused")}
forced = dec["own"].generate(prompt, N)[len(prompt):]

def t(label, ds, rounds=4):
    out = {k: [] for k in ds}
    for r in range(rounds):
        for k, d in ds.items():
            d.prefill(prompt[:4])
            out[k].append(d.timed_decode(prompt, N, forced=forced).tokens_per_s)
    print(label, {k: round(statistics.median(v), 1) for k, v in out.items()}, flush=True)

t("A fresh", dec)
t("A again", dec)
cwic_exp.to_cwic(model, stripe_size=192)
t("B after to_cwic", dec)
ci, cm = calib_batch(tok)
st = calibrate_apr(model, ci, 3.0, attention_mask=cm, stats=True, cache={})
t("C after calibrate", dec)
gc.collect()
t("C2 after gc", dec)
cw = CpuDecoder(model, mode="cwic", dtype=torch.bfloat16, max_len=len(prompt) + N + 8)
t("D with cwic built", dec)
t("E incl cwic", {**dec, "cwic": cw})
del cw; gc.collect()
t("F cwic freed", dec)
