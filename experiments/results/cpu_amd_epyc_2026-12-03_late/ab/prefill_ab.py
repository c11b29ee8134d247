"""Paired A/B of CpuDecoder.prefill (SmolLM2 CWIC at 3x APR, chunk 16 and 64) over CWIC_CPU_DOWN_UNITS=0/1."""
import os, sys, time, statistics
ROOT = "/work/main"
sys.path[:0] = [ROOT, os.path.join(ROOT, "src"), os.path.join(ROOT, "experiments", "bench")]
import torch, cpu_decode as B
B.ensure_imports()
import cwic_exp
from cwic_exp.cpu_decode import CpuDecoder, calibrate_apr
model, tok = cwic_exp.load_teacher("smollm2-135m-instruct"); model = model.float().eval()
calib = B.calib_batch(tok)
cwic_exp.to_cwic(model, stripe_size=192)
calibrate_apr(model, calib[0], 3.0, attention_mask=calib[1], stats=True)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 49152, (128,), generator=g)
dec = CpuDecoder(model, mode="cwic", dtype=torch.bfloat16, max_len=140, nthreads=2)
ROUNDS = int(os.environ.get("ROUNDS", "6"))
for chunk in (16, 64):
    res = {"0": [], "1": []}
    for r in range(ROUNDS + 1):
        for v in (("0", "1") if r % 2 == 0 else ("1", "0")):
            os.environ["CWIC_CPU_DOWN_UNITS"] = v
            dec.reset(); t0 = time.perf_counter(); dec.prefill(ids, chunk=chunk); t = time.perf_counter() - t0
            if r: res[v].append(t * 1e3)
    rat = [a / b for a, b in zip(res["0"], res["1"])]
    print(f"chunk {chunk}: old {statistics.median(res['0']):.1f} ms, by units {statistics.median(res['1']):.1f} ms, "
          f"median old/new {statistics.median(rat):.3f}", flush=True)
