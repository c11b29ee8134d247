"""ext.argmax (the decoder's greedy choice) on SmolLM2's 49,152 logits, each ISA build, binding included; and
torch.argmax for scale. Median of 7 × 2000 calls."""
import os, statistics, sys, time
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src")]
import torch
from cwic_kernels import cpu as C
ext = C.load()
x = torch.randn(49152)
for isa in C.supported_isas():
    ts = []
    for r in range(7):
        t0 = time.perf_counter()
        for _ in range(2000):
            ext.argmax(x, C.isa_id(isa))
        ts.append((time.perf_counter() - t0) / 2000 * 1e6)
    print(isa, f"{statistics.median(ts):.2f} us/call incl. binding")
t0 = time.perf_counter()
for _ in range(2000):
    torch.argmax(x)
print("torch.argmax", round((time.perf_counter() - t0) / 2000 * 1e6, 2))
