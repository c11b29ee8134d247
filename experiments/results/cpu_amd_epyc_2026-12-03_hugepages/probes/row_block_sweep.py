"""In-process sweep of the row-block walk settings on one CWIC decoder: ms/token by part, configs interleaved."""
import os, sys, time, statistics, json
sys.path[:0] = [".", "src"]   # run from the repository root, with the row_blocks patch applied
import torch, cwic_exp, cwic_exp.cpu_decode as CD
from experiments.bench.cpu_decode import PROMPT, calib_batch, chat_ids, llama1b_shaped
model_name = os.environ.get("MODEL", "smollm2")
cfgs = [tuple(int(v) for v in c.split(":")) for c in os.environ.get("CFGS", "0:8,4096:8,16384:8").split(",")]
rounds = int(os.environ.get("ROUNDS", "8")); ntok = int(os.environ.get("TOKENS", "32"))
if model_name == "smollm2":
    model, tok = cwic_exp.load_teacher("smollm2-135m-instruct"); model = model.float().eval()
    prompt = chat_ids(tok, PROMPT); ids, mask = calib_batch(tok); stripe = 192
else:
    model = llama1b_shaped(layers=int(os.environ.get("LAYERS", "16")))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128256, (24,), generator=g).tolist()
    ids, mask = torch.randint(0, 128256, (2, 64), generator=g), torch.ones(2, 64, dtype=torch.long); stripe = 512
dd = CD.CpuDecoder(model, dtype=torch.bfloat16, max_len=len(prompt) + ntok + 8, mode="dense", dense="own")
forced = dd.generate(prompt, ntok)[len(prompt):]
del dd
cwic_exp.to_cwic(model, stripe_size=stripe)
st = CD.calibrate_apr(model, ids, float(os.environ.get("APR", "3")), attention_mask=mask, stats=True, cache={})
dec = CD.CpuDecoder(model, mode="cwic", dtype=torch.bfloat16, max_len=len(prompt) + ntok + 8)
ext = CD._ext()
print("huge MiB", dec.arena.huge_bytes() / 2**20, "apr", st["apr"], flush=True)
res = {c: {"total": [], "head": [], "qkv": [], "o": [], "ffn": []} for c in cfgs}
for r in range(rounds):
    order = cfgs if r % 2 == 0 else cfgs[::-1]
    for c in order:
        ext.set_row_blocks(*c)
        dec.prefill(prompt, chunk=64); dec._dec.reset_reads()
        t0 = time.perf_counter()
        for t in forced: dec.step(t)
        dt = (time.perf_counter() - t0) / len(forced) * 1e3
        p = dec.profile()
        res[c]["total"].append(dt)
        for k in ("head", "qkv", "o", "ffn"): res[c][k].append(p[k] * 1e3)
    print(f"round {r+1}: " + ", ".join(f"{c} {res[c]['total'][-1]:.2f}" for c in cfgs), flush=True)
base = cfgs[0]
for c in cfgs:
    rat = statistics.median([a / b for a, b in zip(res[base]["total"], res[c]["total"])])
    print(c, " ".join(f"{k} {statistics.median(v):.3f}" for k, v in res[c].items()), f"speed vs {base}: {rat:.3f}")
