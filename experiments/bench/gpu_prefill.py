"""GPU prefill benchmark: time to the first token of a Llama-3.2-1B-shaped model against the prompt length.

    python experiments/bench/gpu_prefill.py                          # prompts of 8 … 512 tokens, 3x APR
    python experiments/bench/gpu_prefill.py --lens 32,128 --apr 4 --out experiments/results/gpu_h200

The decode engine's `prefill` (eager: one pass over the prompt, the cache written, the first token picked) for
the dense model (cuBLAS) and for the CWIC model (stripe 512, thresholds calibrated as bench_decode.py does)
three ways: the small-batch GEMV kernels (`gemm_from=0`), the per-stripe GEMMs on masked, centred inputs
(`cwic_kernels.gpu.prefill`, bf16 operands split into hi + lo), and the same GEMMs with the operands rounded
once (`exact=False`). The engine's default takes the kernels below 512 tokens and the GEMMs from 512 on (`CWIC_PREFILL_GEMM`).
Also the last position's logits of each CWIC path against the fp32 CWIC model (relative error). Medians of
--repeats runs after a warm-up run of each length. Prints a table; LAST line JSON.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_kernels import dumps, ensure_imports, save_outputs  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_prefill(eng, prompt, repeats: int) -> float:
    eng.prefill(prompt)                         # warm-up (compiles the kernels of this length)
    ts = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        eng.prefill(prompt)
        _sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lens", default="8,16,32,64,128,256,512", help="prompt lengths")
    ap.add_argument("--apr", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)  # tiny model on the CPU
    args = ap.parse_args(argv)
    ensure_imports()
    import gpu_decode as GD

    import cwic_exp
    from cwic_exp.engine import DecodeEngine
    from cwic_kernels.gpu import prefill as P
    size = "tiny" if args.dry_run else "1B"
    if args.dry_run:
        args.lens, args.repeats = "4,20", 1
    else:
        assert torch.cuda.is_available(), "needs a CUDA device"
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    lens = [int(t) for t in args.lens.split(",")]
    model = GD.build_model(size, dev)
    V = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(1)
    prompts = {T: torch.randint(0, V, (T,), generator=g).to(dev) for T in lens}
    calib = torch.randint(0, V, (1, 256), generator=g).to(dev)
    max_len = max(lens) + 8
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    rows = {T: dict(tokens=T) for T in lens}

    eng = DecodeEngine(model, max_len=max_len, cuda_graph=False)
    for T in lens:
        rows[T]["dense_ms"] = time_prefill(eng, prompts[T], args.repeats)
    print("[dense] " + ", ".join(f"{T}: {rows[T]['dense_ms']:.2f} ms" for T in lens), flush=True)
    del eng

    cwic_exp.to_cwic(model, stripe_size=32 if args.dry_run else 512)
    z = GD.collect_calibration(model, calib)
    GD.calibrate_density(model, z, calib, args.apr)
    apr = GD.measure_apr(model, calib)["apr"]
    with torch.no_grad():
        m32 = copy.deepcopy(model).float()
        ref = {T: m32(prompts[T][None]).logits[0, -1].float() for T in lens}
        del m32
    once = dict(masked_gemm=functools.partial(P.masked_gemm, exact=False),
                ffn_gemm=functools.partial(P.ffn_gemm, exact=False))
    saved = dict(masked_gemm=P.masked_gemm, ffn_gemm=P.ffn_gemm)
    for name, gemm_from, patch in (("kernels", 0, None), ("gemm", 1, None), ("gemm_once", 1, once)):
        for k, fn in (patch or saved).items():
            setattr(P, k, fn)
        try:
            eng = DecodeEngine(model, max_len=max_len, cuda_graph=False, gemm_from=gemm_from)
            for T in lens:
                rows[T][f"{name}_ms"] = time_prefill(eng, prompts[T], args.repeats)
                rows[T][f"{name}_err"] = GD.rel(GD._last_logits(eng, prompts[T]), ref[T])
            del eng
        finally:
            for k, fn in saved.items():
                setattr(P, k, fn)
        print(f"[cwic {name}] " + ", ".join(f"{T}: {rows[T][f'{name}_ms']:.2f} ms" for T in lens), flush=True)

    md = [f"# GPU prefill (time to first token), Llama-3.2-{size}-shaped random bf16, CWIC at APR {apr:.2f}",
          "", f"GPU: {gpu}; torch {torch.__version__}; medians of {args.repeats} runs; eager engine prefill "
          "(the cache written, the first token picked). Errors: last position's logits vs the fp32 CWIC model.", "",
          "| prompt tokens | dense ms | CWIC kernels ms | CWIC GEMMs ms | GEMMs, rounded once ms | "
          "GEMMs × dense | err kernels | err GEMMs | err rounded once |", "|---" * 9 + "|"]
    for T in lens:
        r = rows[T]
        md.append(f"| {T} | {r['dense_ms']:.2f} | {r['kernels_ms']:.2f} | {r['gemm_ms']:.2f} | {r['gemm_once_ms']:.2f}"
                  f" | {r['dense_ms'] / r['gemm_ms']:.2f}× | {r['kernels_err']:.2e} | {r['gemm_err']:.2e} | "
                  f"{r['gemm_once_err']:.2e} |")
    md = "\n".join(md)
    print("\n" + md)
    result = dict(bench="gpu_prefill", gpu=gpu, torch=torch.__version__, apr=apr, repeats=args.repeats,
                  rows=list(rows.values()))
    save_outputs(args.out, "gpu_prefill", md, result)
    print(dumps(result))
    return result


if __name__ == "__main__":
    main()
