"""python .gpu/ab/dec_var.py '{"num_warps": 8, "block_g": 256}' <bench_decode args>: bench_decode with FFN tile overrides."""
import json, runpy, sys
over = json.loads(sys.argv[1])
from cwic_kernels.gpu import ffn_fused as F
F.TUNED_UPDOWN[(2048, 8192)] = {**F.TUNED_UPDOWN[(2048, 8192)], **over}
print("TUNED_UPDOWN", F.TUNED_UPDOWN, flush=True)
sys.argv = ["experiments/bench_decode.py"] + sys.argv[2:]
runpy.run_path("experiments/bench_decode.py", run_name="__main__")
