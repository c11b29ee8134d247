"""SmolLM2 at 3x APR: the CWIC FFN's unit rows side by side (up and down of a unit one span, the default for rows up to
cpu_decode.SIDE_BY_SIDE_MAX_ROW bytes) against apart (two matrices), two decoders of the same calibrated model timed
in alternation round by round in one process. Usage: updown_layout.py ROUNDS"""
import os, sys, statistics, time
ROOT = os.path.abspath(__file__).rsplit("/experiments/", 1)[0]
sys.path.insert(0, ROOT)
import torch
from experiments.bench.cpu_decode import chat_ids, calib_batch, PROMPT, ensure_imports
from experiments.bench.cpu_kernels import rotated
ensure_imports()
import cwic_exp
import cwic_exp.cpu_decode as cd
rounds = int(sys.argv[1])
model, tok = cwic_exp.load_teacher("smollm2-135m-instruct")
model = model.float().eval()
prompt, calib, N = chat_ids(tok, PROMPT), calib_batch(tok), 32
ml = len(prompt) + N + 8
dense = cd.CpuDecoder(model, mode="dense", dense="own", dtype=torch.bfloat16, max_len=ml)
forced = dense.generate(prompt, N)[len(prompt):]
cwic_exp.to_cwic(model, stripe_size=192)
cd.calibrate_apr(model, calib[0], 3.0, attention_mask=calib[1], stats=True, cache={})
decs = {"dense": dense, "side_by_side": cd.CpuDecoder(model, mode="cwic", dtype=torch.bfloat16, max_len=ml)}
cd.SIDE_BY_SIDE_MAX_ROW = 0
decs["apart"] = cd.CpuDecoder(model, mode="cwic", dtype=torch.bfloat16, max_len=ml)
outs = {k: d.generate(prompt, 4) for k, d in decs.items() if k != "dense"}
assert outs["apart"] == outs["side_by_side"], outs


def once(d):
    d.prefill(prompt)
    t0 = time.perf_counter()
    for t in forced:
        d.step(t)
    return (time.perf_counter() - t0) / len(forced) * 1e3


res = {k: [] for k in decs}
for r in range(rounds):
    for k in rotated(list(decs), r):
        res[k].append(once(decs[k]))
    print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in res.items()), flush=True)
for k in decs:
    rel = statistics.median(a / b for a, b in zip(res["side_by_side"], res[k]))
    print(f"| {k} | {statistics.median(res[k]):.3f} ms | speed against side_by_side {rel:.3f}x |")
