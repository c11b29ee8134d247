import os, sys, torch
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * 4))
sys.path[:0] = [ROOT, os.path.join(ROOT, "src")]
import importlib
from cwic_kernels import cpu
torch.manual_seed(0)
for (n, m, stripe) in [(576, 49152, 192), (2048, 2048, 512), (576, 1536, 192), (100, 320, 64)]:
    x = torch.randn(1, n) * torch.rand(n) * 3
    wt = torch.randn(n, m).to(torch.bfloat16)
    mean = torch.randn(n) * 0.1
    k = (m + stripe - 1) // stripe
    thr = (torch.rand(k, n) * 1.5)
    bias = torch.randn(m)
    outs = {}
    for flag in ("0", "1"):
        os.environ["CWIC_CPU_BLOCKED"] = flag
        y = cpu.gemv(x, wt, mean, thr, bias, stripe)
        outs[flag] = y
    ref = cpu.gemv(x, wt, mean, thr, bias, stripe, isa="scalar")
    print(n, m, stripe, "blocked==tiles bitwise:", torch.equal(outs["0"], outs["1"]), "vs scalar:", torch.equal(outs["1"], ref), float((outs["1"]-ref).abs().max()))
