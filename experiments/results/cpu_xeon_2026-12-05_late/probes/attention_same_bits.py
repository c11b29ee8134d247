"""Below 256 positions the new attention (dc5c341) gives the bits of the old per-head code: both builds in one
process, every ISA, SmolLM2's heads (9 / 3) and the 1B shape's (32 / 8), bf16 caches.

    python experiments/results/cpu_xeon_2026-12-05_late/probes/attention_same_bits.py [OLD_REV (18d106a)]
"""
import os
import sys
import tempfile

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * 4))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src")]
from cwic_kernels import cpu as C  # noqa: E402
from experiments.bench import cpu_ab  # noqa: E402

rev = sys.argv[1] if len(sys.argv) > 1 else "18d106a"
new, old = C.load(), cpu_ab.load_old(rev, tempfile.mkdtemp())
g = torch.Generator().manual_seed(0)
for T in (1, 42, 74, 255, 256, 300):
    for nh, nkv in ((9, 3), (32, 8)):
        q = torch.randn(nh, 64, generator=g) * 3
        kc = torch.randn(T, nkv, 64, generator=g).bfloat16()
        vc = torch.randn(T, nkv, 64, generator=g).bfloat16()
        for isa in C.supported_isas():
            a = old.attention(q, kc, vc, 0.125, C.isa_id(isa), 0)
            b = new.attention(q, kc, vc, 0.125, C.isa_id(isa), 0)
            print(f"T={T} heads={nh}/{nkv} {isa}: equal bits {torch.equal(a, b)}, max diff {(a - b).abs().max().item():.1e}")
