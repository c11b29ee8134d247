import sys, time, statistics
sys.path.insert(0, __import__("os").path.abspath(__file__).rsplit("/experiments/", 1)[0])
import torch
from experiments.bench.cpu_decode import chat_ids, PROMPT, ensure_imports
ensure_imports()
import cwic_exp
from cwic_exp.cpu_decode import CpuDecoder
model, tok = cwic_exp.load_teacher("smollm2-135m-instruct")
model = model.float().eval()
prompt = chat_ids(tok, PROMPT)
N = 64
d = CpuDecoder(model, mode="dense", dense="own", dtype=torch.bfloat16, max_len=len(prompt) + N + 8)
forced = d.generate(prompt, N)[len(prompt):]
t0 = time.time()
for blk in range(int(sys.argv[1])):
    v = []
    for r in range(4):
        d.prefill(prompt[:4])
        v.append(d.timed_decode(prompt, N, forced=forced).tokens_per_s)
    print(f"t={time.time()-t0:5.1f}s own {statistics.median(v):.1f}", flush=True)
    if len(sys.argv) > 2:
        time.sleep(float(sys.argv[2]))
