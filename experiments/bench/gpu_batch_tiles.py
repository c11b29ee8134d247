"""Small-batch tiles of the granular GEMV (2–16 tokens: batched decode, speculative verification, short prefill).

    python experiments/bench/gpu_batch_tiles.py --out experiments/results/<folder>
    python experiments/bench/gpu_batch_tiles.py --shapes 2048x8192 --batches 2,16 --configs current,nopipe

For each matrix shape and batch size, every tile configuration of the batch kernel (`gemv.gemv_config` overrides:
16-token blocks unless a config names its `block_b`) is timed against dense `F.linear` (cuBLAS) and against the
per-stripe GEMMs of long prefill
(`prefill.masked_gemm`), with the protocol of `gpu_kernels.py`: 66 % per-token sparsity, heavy-tailed tokens, each
call reading its weights from HBM (copies cycled inside one CUDA graph). A (stripe, input) row is read when some
token of the batch uses it, so the "union density" is what the kernel must read.

"current" is what `gemv_ex` runs now: the small blocks of `gemv.small_block` where they apply (2 tokens; 3-4 tokens
of some shapes), else below `gemv.DENSE_W_FROM` tokens the 16-token union reads (the shape's `gemv.TUNED` entry,
else the defaults), from there on every weight row read (`dense_w`); the others override it. `--share` makes a
batch's tokens share their sparsity, as real neighbouring tokens do.
It prints, per shape, one row a configuration (µs at each batch size), the best configuration of each batch size,
and the configuration with the least total time over the batch sizes (for the 16-token configs, the one a
`gemv.TUNED[(n, m, 16)]` entry can name). The LAST line is one JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.bench import gpu_kernels as K  # noqa: E402
from experiments.cli import parse_list  # noqa: E402

CONFIGS = {  # name -> gemv_config overrides (the batch kernel's tiles); "current": none, i.e. what gemv_ex runs (below
    # gemv.DENSE_W_FROM tokens the union reads with the shape's `gemv.TUNED` entry, else the defaults; from there on the
    # dense reads); the others name their mode (dense_w)
    "current": {},
    "nopipe": dict(pipe=False, dense_w=False),
    "pipe": dict(pipe=True, dense_w=False),
    "bn64": dict(block_n=64, dense_w=False),
    "bn64_pipe": dict(block_n=64, pipe=True, dense_w=False),
    "w8": dict(waves=8, max_split=128, dense_w=False),
    "w8_pipe": dict(waves=8, max_split=128, pipe=True, dense_w=False),
    "w8_bn64_pipe": dict(waves=8, max_split=128, block_n=64, pipe=True, dense_w=False),
    "w4_bn64_pipe": dict(waves=4, max_split=128, block_n=64, pipe=True, dense_w=False),
    "bm128_w8_pipe": dict(block_m=128, waves=8, max_split=128, pipe=True, dense_w=False),
    "w8_pipe_nw8": dict(waves=8, max_split=128, pipe=True, num_warps=8, dense_w=False),
    "w16_pipe": dict(waves=16, max_split=128, pipe=True, dense_w=False),
    "bm32_w8_pipe": dict(block_m=32, waves=8, max_split=128, pipe=True, dense_w=False),
    # every weight row read (`dense_w`: the masks on x alone), so the compiler can pipeline the weight loads
    # (dense_bn64_s3: the defaults of the dense reads)
    "dense": dict(dense_w=True, pipe=False, block_n=32, num_stages=2),
    "dense_s3": dict(dense_w=True, pipe=False, block_n=32, num_stages=3),
    "dense_pipe": dict(dense_w=True, pipe=True, block_n=32, num_stages=2),
    "dense_w8_s3": dict(dense_w=True, pipe=False, block_n=32, num_stages=3, waves=8, max_split=128),
    "dense_bn64_s3": dict(dense_w=True, pipe=False, block_n=64, num_stages=3),
    "dense_bm128_w8_s3": dict(dense_w=True, pipe=False, block_n=32, num_stages=3, block_m=128, waves=8,
                              max_split=128),
    # blocks of 2 or 4 tokens with fp32 products (`gemv._batch_mac`) instead of 16-token tensor-core dots; union
    # reads unless named dense
    "b2_bn64": dict(block_b=2, block_n=64, dense_w=False),
    "b2_bn128_w8": dict(block_b=2, block_n=128, num_warps=8, dense_w=False),
    "b4": dict(block_b=4, block_n=32, dense_w=False),
    "b4_bn64": dict(block_b=4, block_n=64, dense_w=False),
    "b4_bn64_w8": dict(block_b=4, block_n=64, num_warps=8, dense_w=False),
    "b4_bn128_w8": dict(block_b=4, block_n=128, num_warps=8, dense_w=False),
    "b4_dense": dict(block_b=4, dense_w=True, pipe=False, block_n=64, num_stages=3),
    # ... with more programs (split-K over more, shorter chunks)
    "b2_bn64_v4": dict(block_b=2, block_n=64, waves=4, max_split=128, dense_w=False),
    "b2_bn64_v8": dict(block_b=2, block_n=64, waves=8, max_split=128, dense_w=False),
    "b4_bn64_v4": dict(block_b=4, block_n=64, waves=4, max_split=128, dense_w=False),
    "b4_bn64_v8": dict(block_b=4, block_n=64, waves=8, max_split=128, dense_w=False),
    "b4_bn32_v8": dict(block_b=4, block_n=32, waves=8, max_split=128, dense_w=False),
}
SHAPES = ["2048x2048", "2048x512", "2048x3072", "2048x8192", "8192x2048"]
BATCHES = [2, 4, 8, 16]


def shape_of(s: str) -> tuple:
    n, m = s.lower().split("x")
    return int(n), int(m)


def bench(n: int, m: int, batches: list, configs: dict, dev, l2: int, share: float = 0.0) -> dict:
    """Times (µs a call) of dense, the prefill GEMMs and each config at each batch size, and the union densities."""
    from cwic_kernels.gpu import gemv as G
    from cwic_kernels.gpu.prefill import masked_gemm
    S = K.Shape(n, m, dev, l2)
    res = {"union": {}, "dense": {}, "gemm": {}, "configs": {c: {} for c in configs}, "grid": {}}
    for B in batches:
        xs, mean, thr, res["union"][B] = K.batch_inputs(S, B, 0.34, dev, share)
        res["dense"][B] = K.time_graph([lambda i=i: F.linear(xs[i], S.W[i]) for i in range(S.copies)], 10, 3)
        res["gemm"][B] = K.time_graph([lambda i=i: masked_gemm(xs[i], S.WT[i], mean, thr, S.bias, K.STRIPE)
                                       for i in range(S.copies)], 10, 3)
        for name, over in configs.items():
            cfg = G.gemv_config(B, n, m, K.STRIPE, dev, **over)
            res["grid"][name] = list(cfg["grid"])
            try:
                us = K.time_graph([lambda i=i: G.gemv_ex(xs[i], S.WT[i], mean, thr, S.bias, K.STRIPE, config=cfg)
                                   for i in range(S.copies)], 10, 3)
            except Exception as e:  # a config the compiler rejects is reported, not fatal
                print(f"  {n}x{m} B={B} {name} failed: {type(e).__name__}: {e}"[:200], flush=True)
                us = float("nan")
            res["configs"][name][B] = us
    return res


def summarise(res: dict, batches: list) -> dict:
    """Best config per batch size, and the one with the least total time (failed configs excluded)."""
    ok = {c: t for c, t in res["configs"].items() if all(t[B] == t[B] for B in batches)}
    best_b = {B: min(ok, key=lambda c: ok[c][B]) for B in batches} if ok else {}
    total = min(ok, key=lambda c: sum(ok[c][B] for B in batches)) if ok else None
    return {"best_per_batch": best_b, "best_total": total}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of NxM (inputs x outputs)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list of " + ",".join(CONFIGS))
    ap.add_argument("--share", type=float, default=0.0,
                    help="how much a batch's tokens share their sparsity: each input takes the batch's common value "
                    "with this probability (0: independent tokens; real neighbouring tokens: see "
                    "experiments/analyses/union_density.py)")
    ap.add_argument("--out", default=None, help="folder for gpu_batch_tiles.md / .json")
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = parse_list(args.shapes, shape_of, "--shapes")
    batches = parse_list(args.batches, int, "--batches")
    if any(not 2 <= B <= 16 for B in batches):
        raise SystemExit(f"--batches: sizes of 2..16 (one batch block of the kernel), got {batches}")
    if not 0.0 <= args.share <= 1.0:
        raise SystemExit(f"--share: a probability in [0, 1], got {args.share}")
    names = parse_list(args.configs, str, "--configs")
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    configs = {c: CONFIGS[c] for c in names}
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        K.DRY_RUN = True
    K.ensure_imports()
    if not (K.DRY_RUN or torch.cuda.is_available()):
        raise SystemExit("no CUDA device visible: this is a GPU benchmark")
    dev = torch.device("cpu" if K.DRY_RUN else "cuda")
    if K.DRY_RUN:
        l2, gpu = 1 << 20, "cpu (dry run)"
    else:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
        gpu = torch.cuda.get_device_name(dev)
    import triton
    result = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, stripe=K.STRIPE, sparsity=0.66,
                  share=args.share,
                  batches=batches, configs=configs, shapes={})
    lines = [f"# Small-batch tiles of the granular GEMV — {gpu}, torch {torch.__version__}, "
             f"triton {triton.__version__}, bf16, stripe {K.STRIPE}, 66 % per-token sparsity"
             + (f", tokens sharing {args.share:g} of their inputs" if args.share else ""), "",
             "µs a call, weights streamed from HBM (copies cycled in one CUDA graph). Prefill GEMMs: the per-stripe "
             "GEMMs of long prefill (`prefill.masked_gemm`). Speedups are over dense `F.linear`.", ""]
    for n, m in shapes:
        t0 = time.time()
        res = bench(n, m, batches, configs, dev, l2, args.share)
        if dev.type == "cuda":   # the shape's weight copies are gone with bench's frame
            torch.cuda.empty_cache()
        res.update(summarise(res, batches))
        result["shapes"][f"{n}x{m}"] = res
        print(f"[{n}x{m}] {time.time() - t0:.1f}s", flush=True)
        head = " | ".join(f"B={B}" for B in batches)
        lines += [f"## {n}×{m}", "", f"| config | grid | {head} |", "|---|---|" + "---|" * len(batches)]
        lines.append("| union density | | " + " | ".join(f"{res['union'][B]:.3f}" for B in batches) + " |")
        lines.append("| dense F.linear | | " + " | ".join(f"{res['dense'][B]:.2f}" for B in batches) + " |")
        lines.append("| prefill GEMMs | | " + " | ".join(f"{res['gemm'][B]:.2f}" for B in batches) + " |")
        for c, t in res["configs"].items():
            mark = " **(least total)**" if c == res["best_total"] else ""
            lines.append(f"| {c}{mark} | {res['grid'].get(c, '')} | " + " | ".join(
                f"{t[B]:.2f} ({res['dense'][B] / t[B]:.2f}×)" for B in batches) + " |")
        lines.append("")
    md = "\n".join(lines)
    print(md)
    K.save_outputs(args.out, "gpu_batch_tiles", md, result)
    summary = {k: {"best_total": v["best_total"],
                   "speedup_best_total": {B: v["dense"][B] / v["configs"][v["best_total"]][B] for B in batches}
                   if v["best_total"] else None,
                   "speedup_current": {B: v["dense"][B] / v["configs"]["current"][B] for B in batches}
                   if "current" in v["configs"] else None}
               for k, v in result["shapes"].items()}
    print(K.dumps({"bench": "gpu_batch_tiles", "gpu": gpu, "shapes": summary}))
    return result


if __name__ == "__main__":
    main()
