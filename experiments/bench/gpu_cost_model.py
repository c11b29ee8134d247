"""Where a CWIC decode step's GPU time goes: a fixed part and a part per weight byte read.

    python experiments/bench/gpu_cost_model.py                    # 1B-shaped, densities 1/2, 1/3, 1/4, 1/6, 0
    python experiments/bench/gpu_cost_model.py --rounds 3 --tokens 128 --out DIR

The decode engine of bench_decode.py --device cuda (CUDA graph, PDL, the same kernels) runs the 1B-shaped random
model densely and as CWIC with thresholds set (as gpu_decode.py's `set_density`, without its APR correction) to
several densities, plus once with every threshold at infinity ("off": no row read; what remains is the launches,
the selections, the norms, the attention and every kernel's fixed latency). Rounds alternate the configurations; a
configuration's figure is the median of its rounds. The weights each CWIC configuration reads per token come from
its APR by HF's accounting (`active_parameters`) on the prompt plus up to 64 tokens the engine generates. The step
time is fitted over the CWIC configurations as µs = fixed + bytes / rate (least squares), and set against the dense
engine's own bytes / µs. `speedup_3x_at_peak`: the speedup over the dense engine at 3x APR if CWIC kept its
nothing-on step and streamed a third of the dense bytes at the HBM peak (--peak-tb-s): a bound under the model that
the fixed step and the streaming add up (the fit's intercept, close to the measured nothing-on step, supports it),
not a strict limit; `fixed_us_for_2p5x_at_peak`: the nothing-on step that 2.5x would need even then. Prints a table
and a last-line JSON (`--out`: also cost_model_gpu.json and .md; nan and infinity as null).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_decode as GD  # noqa: E402
from cpu_cost_model import finite, fit, set_off  # noqa: E402
from gpu_kernels import ensure_imports, save_outputs  # noqa: E402

# HBM bandwidth from NVIDIA's data sheets, matched in order against the device name (SXM last)
PEAK_TB_S = (("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H200", 4.8))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="1B", choices=list(GD.CONFIGS))
    ap.add_argument("--densities", default="0.5,0.3333,0.25,0.1667", help="CWIC densities besides 'off'")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128, help="decode steps timed per run")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-kernel profile at 1/3 and off")
    ap.add_argument("--peak-tb-s", type=float, default=0.0,
                    help="HBM peak for the bound (default by GPU name: H200 4.8, H100 3.35; else no bound)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)   # tiny model on the CPU
    args = ap.parse_args(argv)
    dens = [float(d) for d in args.densities.split(",") if d]
    if not dens or not all(0 < d <= 1 for d in dens):
        ap.error("--densities: values in (0, 1], comma-separated")
    GD.DRY_RUN = args.dry_run
    if args.dry_run:
        args.model, args.tokens, args.rounds, args.prompt_len = "tiny", 8, 2, 8
    ensure_imports()
    assert args.dry_run or torch.cuda.is_available(), "needs a CUDA device"
    import cwic_exp
    from cwic_exp.engine import DecodeEngine, weight_bytes
    from cwic_kernels.gpu import register
    from cwic_kernels.gpu.gemv import use_pdl
    register()
    dev = torch.device("cpu" if args.dry_run else "cuda")
    gpu = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(dev)
    stripe = 32 if args.dry_run else 512
    model = GD.build_model(args.model, dev)
    V = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, V, (args.prompt_len,), generator=g).to(dev)
    calib = torch.randint(0, V, (1, 256), generator=g).to(dev)
    max_len = args.prompt_len + args.tokens + 16
    deng = DecodeEngine(model, max_len=max_len)
    dense_gb = weight_bytes(deng.w)["total"] / 1e9
    cwic_exp.to_cwic(model, stripe_size=stripe)
    z = GD.collect_calibration(model, calib)
    ceng = DecodeEngine(model, max_len=max_len)
    density = {f"d={d:.3g}": d for d in dens}
    if len(density) < len(dens):
        ap.error("--densities: two values print alike (3 significant digits)")
    names = list(density) + ["off"]

    def setup(name):
        if name == "off":
            set_off(model)
        else:
            GD.set_density(z, density[name])
        ceng.refresh()

    def active_apr(name):   # HF's accounting (active_parameters) on the prompt + up to 64 tokens the engine generates
        setup(name)
        s = cwic_exp.active_parameters(model, ceng.generate(prompt, min(args.tokens, 64))[None])
        return s["active"], s["apr"]

    apr, active_off = {}, None
    for name in names:
        act, a = active_apr(name)
        if name == "off":
            active_off = act
        apr[name] = float("inf") if name == "off" else a
    us = {k: [] for k in ["dense"] + names}
    for r in range(args.rounds):
        order = ["dense"] + names if r % 2 == 0 else names[::-1] + ["dense"]
        for name in order:
            if name == "dense":
                us[name].append(1e6 / GD.time_step(deng, prompt, args.tokens, 3))
            else:
                setup(name)
                us[name].append(1e6 / GD.time_step(ceng, prompt, args.tokens, 3))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {us[k][-1]:.1f}" for k in order) + " µs a step",
              flush=True)
    med = {k: statistics.median(v) for k, v in us.items()}
    apr_recheck = active_apr(names[0])[1]   # the first setting again after all the others: the same thresholds
    gb = {k: (0.0 if k == "off" else dense_gb / apr[k]) for k in names}
    a, b, r2 = fit([gb[k] * 1e3 for k in names], [med[k] for k in names])   # MB vs µs: slope µs/MB
    rate = 1.0 / b if b > 0 else float("inf")            # MB/µs = TB/s
    dense_rate = dense_gb / med["dense"] * 1e3           # GB/ms = TB/s
    stream_rate = {k: gb[k] / (med[k] - med["off"]) * 1e3 if med[k] > med["off"] else float("nan")
                   for k in names if k != "off"}   # TB/s past the nothing-on step (nan: no slower than it)
    gb3 = dense_gb / 3.0
    fit_3x = med["dense"] / (a + gb3 / rate * 1e3)
    peak = args.peak_tb_s if args.peak_tb_s > 0 else next((v for n, v in PEAK_TB_S if n in gpu), 0.0)
    at_peak = med["dense"] / (med["off"] + gb3 / peak * 1e3) if peak > 0 else None
    fixed_for_goal = med["dense"] / 2.5 - gb3 / peak * 1e3 if peak > 0 else None
    lines = [f"# GPU decode step cost model — {args.model}-shaped random bf16, {gpu}, torch {torch.__version__}", "",
             f"{args.rounds} rounds × 3 runs of {args.tokens} steps (CUDA graph); dense matrices {dense_gb:.3f} GB "
             "a token",
             "", "| config | APR (decode) | GB read a token | µs a step | × dense | TB/s past the nothing-on step |",
             "|---|---|---|---|---|---|",
             f"| dense engine | 1.00 | {dense_gb:.3f} | {med['dense']:.1f} | 1.00 | {dense_rate:.2f} (whole step) |"]
    for k in names:
        sr = f"{stream_rate[k]:.2f}" if k in stream_rate else ""
        lines.append(f"| CWIC {k} | {apr[k]:.2f} | {gb[k]:.3f} | {med[k]:.1f} | {med['dense'] / med[k]:.2f} | {sr} |")
    lines += ["", f"Fit over the CWIC rows: {a:.0f} µs fixed + bytes at {rate:.2f} TB/s (r² {r2:.3f}); at 3× APR "
              f"({gb3:.3f} GB) it gives {fit_3x:.2f}× over the dense engine."]
    if peak > 0:
        lines += [f"With the nothing-on step ({med['off']:.0f} µs) and a third of the dense bytes at the HBM peak "
                  f"({peak:g} TB/s): at most {at_peak:.2f}× at 3× APR. 2.5× at 3× APR would need the fixed step at or "
                  f"below {fixed_for_goal:.0f} µs even at the peak."]
    res = dict(bench="gpu_cost_model", gpu=gpu, torch=torch.__version__, model=args.model, rounds=args.rounds,
               tokens=args.tokens, dense_gb=dense_gb, apr={k: (None if k == "off" else v) for k, v in apr.items()},
               us_per_step=med, runs=us, gb_per_token=gb,
               fit=dict(fixed_us=a, rate_tb_s=rate, r2=r2), dense_rate_tb_s=dense_rate,
               stream_rate_tb_s=stream_rate, speedup_3x_fit=fit_3x, peak_tb_s=peak, speedup_3x_at_peak=at_peak,
               fixed_us_for_2p5x_at_peak=fixed_for_goal, active_off=active_off, apr_recheck=apr_recheck)
    if not args.no_breakdown:
        third = min(density, key=lambda k: abs(density[k] - 1 / 3))
        for name in (third, "off"):
            if name in names:
                setup(name)
                ceng.graph = None
                ceng.capture()
                res[f"breakdown_{name}"] = GD.kernel_breakdown(ceng, prompt)
                bd = res[f"breakdown_{name}"]
                if "kernels" in bd:
                    how = ("PDL on: waits for the previous kernel included" if use_pdl(dev)
                           else "PDL off: each kernel's own time")
                    lines += ["", f"Kernels, CWIC {name} (µs a token, {how}):", "",
                              "| kernel | µs | launches |", "|---|---|---|"]
                    lines += [f"| `{k}` | {v['us_per_token']:.1f} | {v['calls_per_token']:.0f} |"
                              for k, v in bd["kernels"].items()]
    text = "\n".join(lines)
    print(text)
    save_outputs(args.out, "cost_model_gpu", text, finite(res))
    print(json.dumps(finite({k: res[k] for k in ("bench", "gpu", "us_per_step", "apr", "fit", "dense_rate_tb_s",
                                          "stream_rate_tb_s", "speedup_3x_fit", "speedup_3x_at_peak",
                                          "fixed_us_for_2p5x_at_peak")})))
    return res


if __name__ == "__main__":
    main()
