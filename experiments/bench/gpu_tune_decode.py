"""Tile tuning on the whole decode step: which kernel tiles make the CWIC engine fastest end to end.

    python experiments/bench/gpu_tune_decode.py                 # 1B-shaped, 3x APR, every variant below
    python experiments/bench/gpu_tune_decode.py --groups ffn,head --out experiments/results/gpu_h200

The kernel benchmarks time one matrix at a time in a loop of copies; a decode step chains ~70 dependent
launches (with PDL each one waits for the previous), so a tile that wins alone can lose in the chain and the
other way round. Here every variant is timed as the decode engine runs it: the same 1B-shaped random model as
`bench_decode.py`, thresholds calibrated to the target APR there, one CUDA graph per decode step, re-captured
for each variant. A variant overrides the tuned tables the launchers read (`gemv.TUNED` for the masked-load
q/k/v and o kernels, `gemv_compact.TUNED_COMPACT` for the LM head and for q/k/v or o moved to the compacted
kernel, `ffn_fused.TUNED_UPDOWN` for the one-launch FFN) or the engine's RoPE epilogue switch.

Each group's variants are timed against the current tables (median of `--repeats` runs of `--tokens` decode
steps); the best variant of each group that wins by more than `--min-gain` is kept, the kept ones are
combined, and the combination is timed against the current tables in alternation. Prints a table; the LAST
line is JSON with every figure and the kept overrides (to be copied into the tables by hand).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_decode import (CONFIGS, build_model, calibrate_density, collect_calibration,  # noqa: E402
                        kernel_breakdown, measure_apr, shape_name, time_step)
from gpu_kernels import dumps, ensure_imports, save_outputs  # noqa: E402

QKV, O, HEAD, FFN, FFNX, HAND = "qkv", "o", "head", "ffn", "ffnx", "hand"


def variants(d: int, qkv_m: int, vocab: int, F: int) -> dict:
    """group -> {name: override}. An override is (table, key, entry) triples, ("engine", attribute, value) and/or
    the 'rope' switch. The compacted-kernel variants of q/k/v and o turn the engine's split-K hand-off for that
    product off (`gemv_ex(acc_out=...)` runs the masked-load kernel only)."""
    gm = lambda key, **kw: [("gemv", key, kw)]                      # noqa: E731  masked-load kernel tiles
    cp = lambda key, **kw: [("compact", key, kw)]                   # noqa: E731  compacted kernel tiles
    fu = lambda **kw: [("updown", (d, F), kw)]                      # noqa: E731  one-launch FFN tiles
    g = {}
    for grp, m in ((QKV, qkv_m), (O, d)):
        key = (d, m, 1)
        own = [("engine", "acc_qkv" if grp == QKV else "acc_o", False)]
        g[grp] = {"waves4": gm(key, waves=4, max_split=128), "waves16": gm(key, waves=16, max_split=128),
                  "bn128": gm(key, waves=8, max_split=128, block_n=128),
                  "bn64": gm(key, waves=8, max_split=128, block_n=64),
                  "bm32": gm(key, waves=8, max_split=128, block_m=32),
                  "nw2": gm(key, waves=8, max_split=128, num_warps=2),
                  "nw8": gm(key, waves=8, max_split=128, num_warps=8),
                  "pipe_bn128": gm(key, waves=4, max_split=128, block_n=128, pipe=True),
                  "compact_fused256": cp((d, m), fused=True, chunk=256) + own,
                  "compact_fused512": cp((d, m), fused=True, chunk=512) + own,
                  "compact_select256": cp((d, m), chunk=256) + own}
    g[QKV]["rope_epilogue"] = ["rope"]
    g[HEAD] = {"chunk1024": cp((d, vocab), chunk=1024), "chunk4096": cp((d, vocab), chunk=4096),
               "bm128": cp((d, vocab), chunk=2048, block_m=128), "nw8": cp((d, vocab), chunk=2048, num_warps=8),
               "bn512": cp((d, vocab), chunk=2048, block_n=512), "fused2048": cp((d, vocab), chunk=2048, fused=True),
               "select_pdl": cp((d, vocab), chunk=2048, pdl=True)}
    from cwic_kernels.gpu.ffn_fused import TUNED_UPDOWN
    base = dict(TUNED_UPDOWN.get((d, F), {}))        # each FFN variant changes one thing of the current entry
    vary = lambda **kw: fu(**{**base, **kw})         # noqa: E731
    g[FFN] = {"bg128": vary(block_g=128), "bg256": vary(block_g=256), "bg1024": vary(block_g=1024),
              "nw8": vary(num_warps=8), "bs2": vary(block_s=2), "bs8": vary(block_s=8),
              "bu16": vary(block_u=16), "bu64": vary(block_u=64), "copies4": vary(copies=4),
              "stages2": vary(num_stages=2), "nopipe": vary(pipe=False), "nopipe_bs8": vary(block_s=8, pipe=False)}
    # `--groups ffnx`: the one-launch FFN with 8 warps a program and gate steps that keep it at 128 registers a thread
    # (Triton 3.6; `sass_stats.py` shows them), so that two programs (16 warps) share an SM. The kernel issues its
    # instructions one warp at a time at two warps a scheduler (ncu), so halving each warp's share can pay only where
    # the registers leave room for the second program
    g[FFNX] = {"nw8_bg256": vary(num_warps=8, block_g=256), "nw8_bg128": vary(num_warps=8, block_g=128),
               "nw8_bg256_bs8_nopipe": vary(num_warps=8, block_g=256, block_s=8, pipe=False)}
    # the engine's hand-offs of fp32 sums between kernels, each turned off (`--groups hand`: an in-process A/B)
    g[HAND] = {"acc_ffn_off": [("engine", "acc_ffn", False)], "acc_o_off": [("engine", "acc_o", False)],
               "acc_qkv_off": [("engine", "acc_qkv", False)], "fuse_attn_off": [("engine", "fuse_attn", False)]}
    return g


class Tables:
    """Apply / undo overrides of the launchers' tuned tables (module globals read at every call)."""

    def __init__(self):
        from cwic_kernels.gpu import ffn_fused, gemv, gemv_compact
        self.mods = {"gemv": (gemv, "TUNED"), "compact": (gemv_compact, "TUNED_COMPACT"),
                     "updown": (ffn_fused, "TUNED_UPDOWN")}
        self.saved = {k: copy.deepcopy(getattr(m, a)) for k, (m, a) in self.mods.items()}
        self.switches = None

    def apply(self, eng, override: list):
        self.reset(eng)
        for o in override:
            if o == "rope":
                eng.fuse_rope = True
                continue
            table, key, entry = o
            if table == "engine":
                setattr(eng, key, entry)
                continue
            mod, attr = self.mods[table]
            getattr(mod, attr)[key] = dict(entry)
            if table == "compact" and len(key) == 2:       # a q/k/v or o shape moved to the compacted kernel
                getattr(self.mods["gemv"][0], "TUNED").pop((*key, 1), None)

    def reset(self, eng):
        for k, (m, a) in self.mods.items():
            t = getattr(m, a)
            t.clear()
            t.update(copy.deepcopy(self.saved[k]))
        if self.switches is None:   # the engine's own settings, as it was built
            self.switches = {a: getattr(eng, a) for a in ("fuse_rope", "acc_qkv", "acc_o", "acc_ffn", "fuse_attn")}
        for a, v in self.switches.items():
            setattr(eng, a, v)


DRY_RUN = False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1B", choices=list(CONFIGS))
    ap.add_argument("--apr", type=float, default=3.0)
    ap.add_argument("--groups", default=f"{QKV},{O},{FFN},{HEAD}")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of current vs combined at the end")
    ap.add_argument("--min-gain", type=float, default=0.015)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)  # tiny model, CPU, interpreter
    args = ap.parse_args(argv)
    global DRY_RUN
    DRY_RUN = args.dry_run
    if DRY_RUN:
        args.model, args.tokens, args.repeats, args.rounds, args.min_gain = "tiny", 4, 1, 1, -1.0
    ensure_imports()
    assert DRY_RUN or torch.cuda.is_available(), "needs a CUDA device"
    import cwic_exp
    from cwic_exp.engine import DecodeEngine
    from cwic_kernels.gpu import gemv as G
    from cwic_kernels.gpu import register
    register()
    dev = torch.device("cpu" if DRY_RUN else "cuda")
    gpu = "cpu (dry run)" if DRY_RUN else torch.cuda.get_device_name(dev)
    engine = (lambda m, n: DecodeEngine(m, max_len=n, triton=True)) if DRY_RUN else \
        (lambda m, n: DecodeEngine(m, max_len=n))
    t_start = time.time()
    model = build_model(args.model, dev)
    cfg = model.config
    V, d, F = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    qkv_m = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * (getattr(cfg, "head_dim", None)
                                                                       or d // cfg.num_attention_heads)
    g = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, V, (8 if DRY_RUN else 32,), generator=g).to(dev)
    calib = torch.randint(0, V, (1, 256), generator=g).to(dev)
    max_len = 32 + args.tokens + 64
    eng = engine(model, max_len)
    dense = time_step(eng, prompt, args.tokens, args.repeats)
    del eng
    if not DRY_RUN:
        torch.cuda.empty_cache()
    print(f"[dense engine] {dense:.1f} tok/s ({time.time() - t_start:.0f}s)", flush=True)

    cwic_exp.to_cwic(model, stripe_size=512)
    z = collect_calibration(model, calib)
    calibrate_density(model, z, calib, args.apr)
    eng = engine(model, max_len)
    toks = eng.generate(prompt, args.tokens)
    apr = measure_apr(model, toks[None])
    print(f"[cwic] APR {apr['apr']:.2f} on the engine's tokens ({time.time() - t_start:.0f}s)", flush=True)

    tables = Tables()
    groups = variants(d, qkv_m, V, F)
    if DRY_RUN:   # one variant a group, at the tiny model's shapes
        groups = {k: dict(list(v.items())[-1:]) for k, v in groups.items()}
    results, kept = {}, {}
    tables.reset(eng)
    base = time_step(eng, prompt, args.tokens, args.repeats)
    results["current"] = base
    print(f"[current tables] {base:.1f} tok/s = {base / dense:.3f}x dense", flush=True)
    for grp in [s for s in args.groups.split(",") if s]:
        best = (None, base)
        for name, ov in groups[grp].items():
            try:
                tables.apply(eng, ov)
                tps = time_step(eng, prompt, args.tokens, args.repeats)
            except Exception as ex:  # a tile the kernel rejects is a result too, not a crash of the sweep
                print(f"  {grp}/{name}: failed: {type(ex).__name__}: {str(ex)[:120]}", flush=True)
                results[f"{grp}/{name}"] = None
                continue
            results[f"{grp}/{name}"] = tps
            print(f"  {grp}/{name}: {tps:.1f} tok/s ({tps / base - 1:+.1%} vs current) "
                  f"({time.time() - t_start:.0f}s)", flush=True)
            if tps > best[1]:
                best = (name, tps)
        if best[0] is not None and best[1] > base * (1 + args.min_gain):
            kept[grp] = best[0]
    tables.reset(eng)
    combined = [o for grp, name in kept.items() for o in groups[grp][name]]
    if "rope" in combined:   # the RoPE epilogue runs q/k/v in the masked-load kernel with one head per block
        combined = [o for o in combined if o == "rope" or o[0] != "compact" or o[1] != (d, qkv_m)]
    final = {"current": [], "combined": []}
    if combined:
        for _ in range(args.rounds):
            for name, ov in (("current", []), ("combined", combined)):
                tables.apply(eng, ov)
                final[name].append(time_step(eng, prompt, args.tokens, args.repeats))
        print(f"[final] current {statistics.median(final['current']):.1f}, combined "
              f"{statistics.median(final['combined']):.1f} tok/s", flush=True)
    tables.apply(eng, combined)
    G_PDL = G.PDL
    G.PDL = False                                   # per-kernel times without PDL's waits folded in
    eng.graph = None
    eng.capture()
    breakdown = {} if DRY_RUN else kernel_breakdown(eng, prompt)
    G.PDL = G_PDL
    tables.reset(eng)

    lines = [f"# Decode-step tile tuning — {gpu}, torch {torch.__version__}",
             f"{shape_name(args.model)}-shaped, random weights, bf16, stripe 512, APR {apr['apr']:.2f} (target "
             f"{args.apr:g}); median of {args.repeats} × {args.tokens} decode steps; dense engine "
             f"{dense:.1f} tok/s.", "",
             "| variant | tok/s | vs current | × dense |", "|---|---|---|---|"]
    for k, v in results.items():
        lines.append(f"| {k} | {'failed' if v is None else f'{v:.1f}'} | "
                     f"{'' if v is None else f'{v / base - 1:+.1%}'} | {'' if v is None else f'{v / dense:.3f}'} |")
    if combined:
        c, b = statistics.median(final["combined"]), statistics.median(final["current"])
        lines += ["", f"Kept: {kept}. Alternated {args.rounds}×: current {b:.1f}, combined {c:.1f} tok/s "
                  f"({c / b - 1:+.1%}; {c / dense:.3f}× dense)."]
    else:
        lines += ["", f"No variant beat the current tables by more than {args.min_gain:.1%}."]
    if breakdown.get("kernels"):
        lines += ["", "GPU time per token by kernel, combined tiles, PDL off:", "", "| kernel | µs/token | launches |",
                  "|---|---|---|"]
        lines += [f"| `{k}` | {r['us_per_token']:.1f} | {r['calls_per_token']:.0f} |"
                  for k, r in breakdown["kernels"].items()]
    md = "\n".join(lines)
    print(md)
    res = dict(bench="gpu_tune_decode", gpu=gpu, torch=torch.__version__,
               apr=apr["apr"], dense_tps=dense, results=results, kept=kept,
               combined=[o if o == "rope" else [o[0], list(o[1]) if isinstance(o[1], tuple) else o[1], o[2]]
                         for o in combined], final=final,
               breakdown_combined_pdl_off=breakdown)
    save_outputs(args.out, "gpu_tune_decode", md, res)
    print(dumps(res))
    return res


if __name__ == "__main__":
    main()
