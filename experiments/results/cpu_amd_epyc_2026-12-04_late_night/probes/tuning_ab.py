"""CWIC and dense decode time per token under several walk tunings, in one process, the settings rotated round by
round (kernels/cpu: cwic_cpu.set_tuning). Usage: tuning_ab.py MODEL(smollm2|llama1b) ROUNDS SETTING...
where SETTING is name=prefetch_rows,pf_stripe,stripe_budget,group_budget (-1 keeps the default)."""
import os, sys, statistics, time
ROOT = os.path.abspath(__file__).rsplit("/experiments/", 1)[0] if "/experiments/" in os.path.abspath(__file__) else "/work/main"
sys.path.insert(0, ROOT)
import torch
from experiments.bench.cpu_decode import chat_ids, calib_batch, PROMPT, ensure_imports, llama1b_shaped
from experiments.bench.cpu_kernels import rotated
ensure_imports()
import cwic_exp
from cwic_exp.cpu_decode import CpuDecoder, calibrate_apr
from cwic_kernels import cpu as C
ext = C.load()
model_name, rounds = sys.argv[1], int(sys.argv[2])
settings = {}
for a in sys.argv[3:]:
    n, v = a.split("=")
    settings[n] = [int(x) for x in v.split(",")]
default = ext.tuning()
if model_name == "smollm2":
    model, tok = cwic_exp.load_teacher("smollm2-135m-instruct")
    model = model.float().eval()
    prompt = chat_ids(tok, PROMPT)
    calib, stripe, N = calib_batch(tok), 192, 32
else:
    model = llama1b_shaped()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128256, (24,), generator=g).tolist()
    calib = (torch.randint(0, 128256, (2, 64), generator=g), torch.ones(2, 64, dtype=torch.long))
    stripe, N = 512, 12
ml = len(prompt) + N + 8
dense = CpuDecoder(model, mode="dense", dense="own", dtype=torch.bfloat16, max_len=ml)
forced = dense.generate(prompt, N)[len(prompt):]
cwic_exp.to_cwic(model, stripe_size=stripe)
calibrate_apr(model, calib[0], 3.0, attention_mask=calib[1], stats=True, cache={})
cw = CpuDecoder(model, mode="cwic", dtype=torch.bfloat16, max_len=ml)
decs = {"dense": dense, "cwic": cw}

def once(d):
    d.prefill(prompt)
    t0 = time.perf_counter()
    for t in forced:
        d.step(t)
    return (time.perf_counter() - t0) / len(forced) * 1e3

res = {(s, k): [] for s in settings for k in decs}
print(f"{model_name}: default tuning {default}; {rounds} rounds of {list(settings)} x {list(decs)}", flush=True)
for r in range(rounds):
    line = []
    for s in rotated(list(settings), r):
        ext.set_tuning(*default)
        ext.set_tuning(*settings[s])
        for k in rotated(list(decs), r):
            res[(s, k)].append(once(decs[k]))
            line.append(f"{s}/{k} {res[(s, k)][-1]:.2f}")
    print(f"  round {r + 1}: " + ", ".join(line), flush=True)
base = list(settings)[0]
print("| setting | dense ms | cwic ms | cwic/dense speedup | cwic vs first setting (median of per-round ratios) |")
for s in settings:
    d, c = statistics.median(res[(s, "dense")]), statistics.median(res[(s, "cwic")])
    rel = statistics.median(b / a for a, b in zip(res[(s, "cwic")], res[(base, "cwic")]))
    print(f"| {s} {settings[s]} | {d:.2f} | {c:.2f} | {d / c:.3f}x | {rel:.3f}x |")
