"""Where a CWIC token's CPU time goes: a fixed part and a part per weight read, fitted by part.

    python -m experiments.bench.cpu_cost_model                      # SmolLM2, APR 2/3/4/6 and nothing on
    python -m experiments.bench.cpu_cost_model --model llama1b --layers 8 --tokens 12 --rounds 4

One process builds our dense decoder and CWIC decoders of the same model calibrated to several APRs on the
calibration tokens (`calibrate_apr`, as bench_decode.py --device cpu does, but without its decode-time correction:
the APR each decoder reads on the forced text is printed as "decode APR"), plus one with every threshold at
infinity ("off": every list empty, no row read: what remains is selection, synchronisation, glue and attention).
All decode the same text (the prompt, then the dense model's greedy continuation fed token by token), interleaved
round by round. For each part (q/k/v, o, FFN, head) the median ms per token is set against the weights that part
read per token, over the CWIC decoders, two ways: each APR's streaming rate, bytes / (ms - the nothing-on ms of the
part), and a least-squares line ms = fixed + bytes / rate through all CWIC points (nothing on included). Next to
them the dense decoder's rate: the dense part's bytes over its whole time (its own per-call costs included).

The bounds are model estimates, not strict limits: the speedup over dense that exactly 3x APR would give if every
part streamed a third of the dense bytes at that dense rate, on top of CWIC's nothing-on matrix-part times and
glue + attention as measured in the APR decoders (`bound_3x`), or as measured in the nothing-on decoder, where the
caches are warmer (`bound_3x_nothing_on_glue`); `bound_3x_no_fixed` keeps only the dense decoder's glue and
attention. Prints a table and a last-line JSON (strict: nan and infinity as null).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = ("glue", "qkv", "attention", "o", "ffn", "head")
MATS = ("qkv", "o", "ffn", "head")


def finite(o):
    """o with every nan or infinite float replaced by None (strict JSON)."""
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return None if isinstance(o, float) and not math.isfinite(o) else o


def set_off(model):
    """Every threshold at infinity: no (stripe, input) pair and no FFN unit is on (the "off" configuration)."""
    import torch

    import cwic_exp
    from cwic_exp import CwicLinear
    with torch.no_grad():
        for m in cwic_exp.iter_cwic_modules(model):
            (m.theta if isinstance(m, CwicLinear) else m.phi).fill_(float("inf"))


def fit(xs, ys):
    """Least squares y = a + b x; returns a, b, r^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx if sxx > 0 else 0.0
    a = my - b * mx
    ss = sum((y - my) ** 2 for y in ys)
    res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, (1 - res / ss) if ss > 0 else 1.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("smollm2", "llama1b"), default="smollm2")
    ap.add_argument("--layers", type=int, default=16, help="llama1b: layers")
    ap.add_argument("--aprs", default="2,3,4,6")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="forced tokens timed per run")
    ap.add_argument("--out", default=None, help="folder for cost_model.json")
    args = ap.parse_args(argv)
    for p in (ROOT, os.path.join(ROOT, "src")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import torch

    import cwic_exp
    import cwic_exp.cpu_decode as CD
    from experiments.bench.cpu_decode import forced_rounds, forced_setup, huge_mb
    from experiments.bench.cpu_kernels import machine

    aprs = [float(a) for a in args.aprs.split(",") if a]
    if not aprs or min(aprs) < 1:
        ap.error("--aprs: APRs >= 1, comma-separated")
    model, prompt, ids, mask, stripe, name = forced_setup(args.model, args.layers)
    max_len = len(prompt) + args.tokens + 8
    decs = {"dense": CD.CpuDecoder(model, mode="dense", dense="own", dtype=torch.bfloat16, max_len=max_len)}
    forced = decs["dense"].generate(prompt, args.tokens)[len(prompt):]
    cwic_exp.to_cwic(model, stripe_size=stripe)
    cache: dict = {}
    apr_calib = {}
    for a in aprs:
        st = CD.calibrate_apr(model, ids, a, attention_mask=mask, stats=not cache, cache=cache)
        apr_calib[f"cwic-{a:g}x"] = st["apr"]
        decs[f"cwic-{a:g}x"] = CD.CpuDecoder(model, mode="cwic", dtype=torch.bfloat16, max_len=max_len)
    set_off(model)
    decs["cwic-off"] = CD.CpuDecoder(model, mode="cwic", dtype=torch.bfloat16, max_len=max_len)
    print("weights on huge pages: " + ", ".join(f"{k} {huge_mb(d):.0f} MiB" for k, d in decs.items()))
    print(f"{name}, stripe {stripe}, {len(prompt)}-token prompt + {len(forced)} forced tokens, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads", flush=True)

    res, reads = forced_rounds(decs, prompt, forced, args.rounds)
    n = len(forced)
    med = {k: {p: statistics.median(v) for p, v in res[k].items()} for k in decs}
    # weights read per token by part (the C++ counters: q/k/v, o, FFN, head), in MB of bf16
    mb = {k: {p: reads[k][p] / n * 2 / 1e6 for p in MATS} for k in decs}
    cw = [k for k in decs if k.startswith("cwic-")]
    total_mb = {k: sum(v.values()) for k, v in mb.items()}
    apr_decode = {k: total_mb["dense"] / total_mb[k] if total_mb[k] > 0 else None for k in decs}
    print("\n| config | " + " | ".join(f"{p} ms" for p in PARTS) + " | total ms | MB read | decode APR | tok/s |")
    print("|---" * (len(PARTS) + 5) + "|")
    for k in decs:
        da = "-" if apr_decode[k] is None else f"{apr_decode[k]:.2f}"
        print(f"| {k} | " + " | ".join(f"{med[k][p]:.3f}" for p in PARTS) +
              f" | {med[k]['total']:.3f} | {total_mb[k]:.1f} | {da} | {1e3 / med[k]['total']:.1f} |")
    fits, rates = {}, {}
    off = med["cwic-off"]
    sp = [k for k in cw if k != "cwic-off"]
    print("\n| part | nothing on µs a token | " + " | ".join(f"rate at {k[5:]} GB/s" for k in sp) +
          " | fit: fixed µs | fit: rate GB/s | fit r² | dense rate GB/s |")
    print("|---" * (len(sp) + 6) + "|")
    for p in MATS:
        xs = [mb[k][p] for k in cw]
        ys = [med[k][p] for k in cw]
        a, b, r2 = fit(xs, ys)
        drate = mb["dense"][p] / med["dense"][p]
        # each point's streaming rate: its bytes over its time less the nothing-on time of the part (nan where that
        # time is not positive: a point as fast as nothing on says nothing about a rate)
        rates[p] = {k: mb[k][p] / (med[k][p] - off[p]) if med[k][p] > off[p] else float("nan") for k in sp}
        fits[p] = {"fixed_ms": a, "rate_gb_s": 1.0 / b if b > 0 else float("nan"), "r2": r2, "dense_rate_gb_s": drate}
        print(f"| {p} | {off[p] * 1e3:.0f} | " + " | ".join(f"{rates[p][k]:.1f}" for k in sp) +
              f" | {a * 1e3:.0f} | {fits[p]['rate_gb_s']:.1f} | {r2:.3f} | {drate:.1f} |")
    dense_total = med["dense"]["total"]
    mb3 = {p: mb["dense"][p] / 3.0 for p in MATS}
    stream3 = sum(mb3[p] / fits[p]["dense_rate_gb_s"] for p in MATS)
    other_cw = statistics.median(med[k]["glue"] + med[k]["attention"] for k in sp)   # as measured at the APRs
    other_off = off["glue"] + off["attention"]                                       # in the nothing-on decoder
    other_dense = med["dense"]["glue"] + med["dense"]["attention"]
    fixed_off = sum(off[p] for p in MATS)
    bound = dense_total / (other_cw + fixed_off + stream3)
    bound_off_glue = dense_total / (other_off + fixed_off + stream3)
    bound_nf = dense_total / (other_dense + stream3)
    print(f"\nnothing on: {off['total'] * 1e3:.0f} µs a token, of which the four matrix parts {fixed_off * 1e3:.0f} and "
          f"glue + attention {other_off * 1e3:.0f}; glue + attention at the APRs {other_cw * 1e3:.0f} µs (CWIC, median), "
          f"{other_dense * 1e3:.0f} µs (dense)")
    print(f"3x APR, model estimate with every part streaming at the dense rate (the dense part's bytes over its whole "
          f"time): {bound:.2f}x over dense with CWIC's nothing-on matrix costs and its glue + attention at the APRs, "
          f"{bound_off_glue:.2f}x with the nothing-on decoder's glue + attention, {bound_nf:.2f}x with the dense "
          f"decoder's glue and attention only; measured: " +
          ", ".join(f"{k} {dense_total / med[k]['total']:.2f}x (decode APR {apr_decode[k]:.2f})" for k in sp))
    out = {"bench": "cpu_cost_model", "model": name, "stripe": stripe, "rounds": args.rounds,
           "forced_tokens": n, "apr_calib": apr_calib, "ms_per_token": med, "mb_read_per_token": mb,
           "apr_decode": apr_decode, "fits": fits, "rates_gb_s": rates, "nothing_on_ms": off, "bound_3x": bound,
           "bound_3x_nothing_on_glue": bound_off_glue, "bound_3x_no_fixed": bound_nf,
           "speedup": {k: dense_total / med[k]["total"] for k in sp}, "machine": machine()}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cost_model.json"), "w") as f:
            json.dump(finite(out), f, indent=1)
    print(json.dumps(finite(out)))
    return out


if __name__ == "__main__":
    main()
