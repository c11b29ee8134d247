"""Compacted batch-1 GEMV (kernels/gpu/gemv_compact.py) against the masked-load `gemv_ex` and cuBLAS.

    python experiments/bench_kernels.py --device cuda --compact --quick --out experiments/results
    python experiments/bench_kernels.py --device cuda --compact --down-nonzero   # the engine's FFN down
    python experiments/bench_kernels.py --device cuda --compact --ffn-updown     # up + down in one launch

Same protocol as experiments/bench/gpu_kernels.py (its inputs, weight copies and HBM-streaming
CUDA-graph timing): a config sweep at 66 % sparsity per shape, then the best config against the
masked-load kernel and cuBLAS over sparsities. Prints tables; the LAST line is one JSON object.
"""
from __future__ import annotations

import argparse
import importlib
import os


COMPACT_SWEEP = [dict(), dict(fused=True), dict(pdl=True), dict(waves=2), dict(waves=8), dict(chunk_scale=0.5),
                 dict(chunk_scale=2), dict(chunk_scale=2, fused=True), dict(block_n_scale=2),
                 dict(block_n_scale=0.5), dict(num_stages=2), dict(num_stages=4), dict(block_m=128),
                 dict(block_m=32), dict(num_warps=8), dict(chunk_scale=2, fused=True, block_m=32),
                 dict(chunk_scale=4, fused=True), dict(chunk_scale=4, fused=True, block_m=32),
                 dict(chunk_scale=2, fused=True, block_n_scale=0.5)]


def _compact_cfg(C, n, m, stripe, dev, c):
    """compact_config with the sweep's relative knobs (chunk_scale, block_n_scale) resolved."""
    c = dict(c)
    cs, bs = c.pop("chunk_scale", None), c.pop("block_n_scale", None)
    base = C.compact_config(n, m, stripe, dev, **{k: v for k, v in c.items() if k in ("waves", "block_m")})
    if cs:
        c["chunk"] = max(16, int(base["CHUNK"] * cs))
    if bs:
        c["block_n"] = max(8, int(base["BLOCK_N"] * bs))
    return C.compact_config(n, m, stripe, dev, **c), c


def _compact_err(C, G, x, wt, mean, thr, bias, stripe, cfg) -> float:
    """Relative L2 difference gemv_compact vs gemv_ex on one token (bf16 outputs: ~1e-3 expected)."""
    a = C.gemv_compact(x, wt, mean, thr, bias, stripe, config=cfg).float()
    b = G.gemv_ex(x, wt, mean, thr, bias, stripe, compact=False).float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None):
    """python experiments/bench_kernels.py --device cuda --compact [--quick] [--out DIR]"""
    import time
    ap = argparse.ArgumentParser(prog="bench_kernels.py --device cuda --compact",
                                 description="compacted batch-1 GEMV (gemv_compact) vs the masked-load gemv_ex "
                                             "vs cuBLAS F.linear; bf16, stripe 512, weights streamed from HBM")
    ap.add_argument("--quick", action="store_true", help="sparsities 0/50/66/90%% only")
    ap.add_argument("--models", default="1B", help="comma list of the gpu_kernels.py models (default 1B)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the config sweep at 66%% sparsity")
    ap.add_argument("--out", default=None, help="folder for gpu_kernels_compact.json / .md")
    ap.add_argument("--down-nonzero", action="store_true",
                    help="only the FFN down projection as the engine calls it (8192×2048, rows used iff h ≠ 0, "
                         "one stripe): masked-load vs compacted variants vs cuBLAS at 50/66/80%% zero units")
    ap.add_argument("--ffn-updown", action="store_true",
                    help="only the FFN's up + down projections (2048 → 8192 → 2048, one token) at 50/66/80%% "
                         "zero units: the fused kernel (kernels/gpu/ffn_fused.py, a tile sweep) vs the "
                         "two-kernel path vs cuBLAS")
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.nn.functional as F
    gk = importlib.import_module("experiments.bench.gpu_kernels")
    if args.dry_run:
        gk.DRY_RUN = True
        gk.SHAPES = {"1B": [("q", 128, 1024, 1), ("down", 96, 512, 1)]}
    gk.ensure_imports()
    assert gk.DRY_RUN or torch.cuda.is_available(), "needs a CUDA device"
    from cwic_kernels.gpu import gemv as G
    from cwic_kernels.gpu import gemv_compact as C
    import triton
    tuned = dict(C.TUNED_COMPACT)     # the sweep starts from the heuristic ({}), not from the tuned table
    C.TUNED_COMPACT.clear()
    if args.down_nonzero:
        return down_nonzero(gk, G, C, tuned, torch.device("cpu" if gk.DRY_RUN else "cuda"))
    if args.ffn_updown:
        C.TUNED_COMPACT.update(tuned)            # the two-kernel path as the engine runs it
        return ffn_updown(gk, G, torch.device("cpu" if gk.DRY_RUN else "cuda"))
    dev = torch.device("cpu" if gk.DRY_RUN else "cuda")
    stripe = gk.STRIPE
    l2 = 1 << 20 if gk.DRY_RUN else getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    gpu = "cpu (dry run)" if gk.DRY_RUN else torch.cuda.get_device_name(dev)
    sparsities = [0.0, 0.5, 0.66, 0.9] if args.quick else gk.SPARSITIES
    torch.manual_seed(0)
    pdl = (not gk.DRY_RUN) and G.use_pdl(dev)
    result = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, stripe=stripe, batch=1, pdl=pdl,
                  models={}, sweep={})
    lines = [f"# Compacted GEMV (gemv_compact) vs masked-load gemv_ex vs cuBLAS — {gpu}, torch {torch.__version__}, "
             f"triton {triton.__version__}, bf16, stripe {stripe}, batch 1", "",
             "Same protocol as gpu_kernels.md (weights streamed from HBM, copies cycled in one CUDA graph). "
             "compact = select + gather-GEMV launches (or one, fused), with the best config of the sweep "
             "below when swept; speedup and % of ideal are the compact kernel's vs cuBLAS. " + gk.pdl_note(pdl), ""]
    for model in args.models.split(","):
        result["models"][model] = {}
        lines += [f"## {model}", "",
                  "| matrix | n×m | sparsity | density read | dense µs | masked µs | compact µs | speedup | "
                  "% of ideal | compact GB/s | config |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        done = {}
        for name, n, m, cnt in gk.SHAPES[model]:
            if (n, m) in done:                      # q and o: same matrix shape, measured once
                v, rows_md = done[(n, m)]
                result["models"][model][name] = dict(v, per_layer=cnt)
                lines += [f"| {name} |" + ln.split("|", 2)[2] for ln in rows_md]
                continue
            t0 = time.time()
            S = gk.Shape(n, m, dev, l2)
            best = dict()
            if not args.no_sweep:
                x, mean, thr = gk.make_inputs(n, m, S.copies, 1 - 0.66, dev, 1)
                xs = [x[i:i + 1] for i in range(S.copies)]
                sw = []
                for c in COMPACT_SWEEP:
                    try:
                        cfg, cc = _compact_cfg(C, n, m, stripe, dev, c)
                        us = gk.time_graph([lambda i=i: C.gemv_compact(xs[i], S.WT[i], mean, thr, S.bias, stripe,
                                                                       config=cfg) for i in range(S.copies)],
                                           reps_target_ms=10, repeats=3)
                        err = _compact_err(C, G, x[:1], S.WT[0], mean, thr, S.bias, stripe, cfg)
                    except Exception as e:  # a config the compiler (or this Triton) rejects is skipped
                        print(f"  config {c} failed: {type(e).__name__}: {e}"[:300], flush=True)
                        continue
                    if err > 2e-2:
                        print(f"  config {c} WRONG: rel. error {err:.3g} vs gemv_ex; skipped", flush=True)
                        continue
                    sw.append(dict(config=cc, tiles={k: cfg[k] for k in ("CHUNK", "BLOCK_N", "BLOCK_M", "SPLIT",
                                                                         "num_warps", "num_stages", "fused", "pdl")},
                                   us=us))
                sw.sort(key=lambda r: r["us"])
                for r in sw:                         # as it goes: a run cut short still shows the sweep
                    print(f"  sweep {n}x{m} {r['config']} {r['tiles']} {r['us']:.2f} us", flush=True)
                result["sweep"][f"{n}x{m}"] = sw
                best = sw[0]["config"] if sw else {}
            if args.no_sweep:                        # no sweep: the tuned table's tiles, else the heuristic
                best = tuned.get((n, m), {})
            cfg = C.compact_config(n, m, stripe, dev, **best)
            xc, meanc, thrc = gk.make_inputs(n, m, 2, 1 - 0.66, dev, 3)
            err = _compact_err(C, G, xc[:1], S.WT[0], meanc, thrc, S.bias, stripe, cfg)
            assert err <= 2e-2, f"gemv_compact {n}x{m} {best}: rel. error {err:.3g} vs gemv_ex"
            x0, _, _ = gk.make_inputs(n, m, S.copies, 1.0, dev, 0)
            xs = [x0[i:i + 1] for i in range(S.copies)]
            dense_us = gk.time_graph([lambda i=i: F.linear(xs[i], S.W[i]) for i in range(S.copies)])
            rows = []
            for sp in sparsities:
                x, mean, thr = gk.make_inputs(n, m, S.copies, 1.0 - sp, dev, 0)
                xs = [x[i:i + 1] for i in range(S.copies)]
                dens = gk.measured_density(x, mean, thr, m)
                masked = gk.time_graph([lambda i=i: G.gemv_ex(xs[i], S.WT[i], mean, thr, S.bias, stripe, compact=False)
                                        for i in range(S.copies)])
                comp = gk.time_graph([lambda i=i: C.gemv_compact(xs[i], S.WT[i], mean, thr, S.bias, stripe,
                                                                 config=cfg) for i in range(S.copies)])
                sp_ = dense_us / comp
                gbps = dens * n * m * 2 / comp / 1e3
                rows.append(dict(sparsity=sp, density=dens, dense_us=dense_us, masked_us=masked, compact_us=comp,
                                 speedup=sp_, masked_speedup=dense_us / masked, pct_ideal=100 * sp_ * dens,
                                 compact_gbps=gbps))
                lines.append(f"| {name} | {n}×{m} | {sp:.0%} | {dens:.3f} | {dense_us:.2f} | {masked:.2f} | "
                             f"{comp:.2f} | {sp_:.2f}× | {100 * sp_ * dens:.0f}% | {gbps:.0f} | {best or 'default'} |")
                print(lines[-1], flush=True)
            result["models"][model][name] = dict(n=n, m=m, per_layer=cnt, config=best, rows=rows)
            done[(n, m)] = (result["models"][model][name], lines[-len(rows):])
            S = None                                 # free the weight copies before the next shape
            if not gk.DRY_RUN:
                torch.cuda.empty_cache()
            print(f"[{model} {name} {n}x{m}] {time.time() - t0:.1f}s", flush=True)
        layer = [v for v in result["models"][model].values() if v["per_layer"] > 0]
        if layer:
            lines += ["", f"**{model} decoder layer** (sum of per-matrix times):", "",
                      "| sparsity | dense µs | masked µs | compact µs | compact speedup | masked speedup |",
                      "|---|---|---|---|---|---|"]
            for j, sp in enumerate(sparsities):
                d = sum(v["rows"][j]["dense_us"] * v["per_layer"] for v in layer)
                mk = sum(v["rows"][j]["masked_us"] * v["per_layer"] for v in layer)
                cp = sum(v["rows"][j]["compact_us"] * v["per_layer"] for v in layer)
                result["models"][model].setdefault("_layer", []).append(
                    dict(sparsity=sp, dense_us=d, masked_us=mk, compact_us=cp, speedup=d / cp))
                lines.append(f"| {sp:.0%} | {d:.1f} | {mk:.1f} | {cp:.1f} | {d / cp:.2f}× | {d / mk:.2f}× |")
        lines.append("")
    if result["sweep"]:
        lines += ["## Config sweep at 66% sparsity (fastest first; {} = the default heuristic)", "",
                  "| n×m | config | tiles | µs |", "|---|---|---|---|"]
        for key, rows in result["sweep"].items():
            for r in rows:
                lines.append(f"| {key} | {r['config']} | {r['tiles']} | {r['us']:.2f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    gk.save_outputs(args.out, "gpu_kernels_compact", text, result)
    summary = {"bench": "gpu_kernels_compact", "gpu": gpu}
    for model, shapes in result["models"].items():
        for name, v in shapes.items():
            if name != "_layer":
                for r in v["rows"]:
                    if abs(r["sparsity"] - 0.66) < 1e-9:
                        summary[f"{model}_{name}_speedup_at_66"] = round(r["speedup"], 3)
        for r in shapes.get("_layer", []):
            if abs(r["sparsity"] - 0.66) < 1e-9:
                summary[f"{model}_layer_speedup_at_66"] = round(r["speedup"], 3)
    print(gk.dumps(summary))
    return result


def down_nonzero(gk, G, C, tuned, dev):
    """The FFN's down projection in the engine's mode: h (1, F) with a fraction of exact zeros (inactive
    units), rows of W_downᵀ read iff h ≠ 0, one stripe of width d. Prints a table and a last-line JSON."""
    import torch
    import torch.nn.functional as F
    n, m = (512, 128) if gk.DRY_RUN else (8192, 2048)
    l2 = 1 << 20 if gk.DRY_RUN else getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    S = gk.Shape(n, m, dev, l2)
    variants = {"masked-load": None, "tuned " + str(tuned.get((n, m), {})): tuned.get((n, m), {}),
                "heuristic": {}, "two-launch chunk 1024": dict(chunk=1024),
                "fused chunk 2048": dict(fused=True, chunk=2048), "two-launch chunk 2048": dict(chunk=2048),
                "fused chunk 512": dict(fused=True, chunk=512)}
    g = torch.Generator(device="cpu").manual_seed(0)
    out = {"shape": [n, m], "rows": []}
    print("| zero units | dense µs | " + " | ".join(variants) + " |", flush=True)
    for zero in (0.5, 0.66, 0.8):
        hs = []
        for _ in range(S.copies):
            h = torch.randn(1, n, generator=g)
            h[torch.rand(1, n, generator=g) < zero] = 0.0
            hs.append(h.to(dev, torch.bfloat16))
        dense = gk.time_graph([lambda i=i: F.linear(hs[i], S.W[i]) for i in range(S.copies)])
        row = {"zero_units": zero, "dense_us": dense}
        ref = G.gemv_ex(hs[0], S.WT[0], None, None, None, m, mask_mode=G.MASK_NONZERO, compact=False).float()
        for name, cfg in variants.items():
            if cfg is None:
                fn = lambda i, c=None: G.gemv_ex(hs[i], S.WT[i], None, None, None, m,  # noqa: E731
                                                 mask_mode=G.MASK_NONZERO, compact=False)
            else:
                cc = C.compact_config(n, m, m, dev, **cfg)
                fn = lambda i, c=cc: C.gemv_compact(hs[i], S.WT[i], None, None, None, m,  # noqa: E731
                                                    mask_mode=C.MASK_NONZERO, config=c)
            err = float((fn(0).float() - ref).norm() / ref.norm().clamp_min(1e-30))
            assert err <= 2e-2, f"{name}: relative error {err:.3g} vs the masked-load kernel"
            row[name] = gk.time_graph([lambda i=i, f=fn: f(i) for i in range(S.copies)])
        out["rows"].append(row)
        print(f"| {zero:.0%} | {dense:.2f} | " + " | ".join(f"{row[k]:.2f}" for k in variants) + " |", flush=True)
    print(gk.dumps(out))
    return out


UPDOWN_SWEEP = [dict(), dict(block_s=4), dict(block_s=4, num_warps=8), dict(block_s=4, copies=4),
                dict(block_s=4, num_stages=2), dict(block_u=64, block_s=4), dict(block_u=16, block_s=4, copies=8),
                dict(block_s=4, pipe=True), dict(block_s=4, pipe=True, num_warps=8), dict(block_s=2, pipe=True),
                dict(block_s=2, pipe=True, num_warps=4), dict(block_s=8, pipe=True), dict(block_s=8, pipe=True,
                num_warps=16), dict(block_u=64, block_s=4, pipe=True, num_warps=8),
                dict(block_u=64, block_s=8, pipe=True), dict(block_u=16, block_s=4, pipe=True, num_warps=8)]


def ffn_updown(gk, G, dev):
    """The FFN's up + down projections for one token as the engine runs them after the gate: a (1, F)
    gated activations with a fraction of exact zeros (units off), h = (W_up x) ⊙ a, y = hᵀ W_downᵀ +
    residual. Fused kernel (tile sweep) vs the two-kernel path (ffn_up + compacted down) vs cuBLAS
    (F.linear up, ⊙ a, addmm down). Weight copies cycled as in gpu_kernels.py. Table + last-line JSON."""
    import torch
    import torch.nn.functional as F
    from cwic_kernels.gpu import ffn_fused as FF
    tuned = dict(FF.TUNED_UPDOWN)          # the sweep's {} is the heuristic, not the tuned tiles
    FF.TUNED_UPDOWN.clear()
    d, F_ = (128, 512) if gk.DRY_RUN else (2048, 8192)
    l2 = 1 << 20 if gk.DRY_RUN else getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    SU, SD = gk.Shape(F_, d, dev, l2 // 2), gk.Shape(F_, d, dev, l2 // 2)   # W[i] (d, F): .WT[i] (F, d)
    ups = [S.contiguous() for S in SU.WT]                 # (F, d): row j = unit j's input weights
    downs = SD.WT                                         # (F, d): row j = unit j's output weights
    downs_dense = SD.W                                    # (d, F) for cuBLAS
    cp = min(SU.copies, SD.copies)
    g = torch.Generator(device="cpu").manual_seed(0)
    xs = [torch.randn(1, d, generator=g).to(dev, torch.bfloat16) for _ in range(cp)]
    res = [torch.randn(1, d, generator=g).to(dev, torch.bfloat16) for _ in range(cp)]
    out = {"shape": [d, F_], "copies": cp, "rows": [], "sweep": []}
    variants = {"two-kernel": None}
    names = []

    def fused(i, a, c):
        return FF.ffn_updown(xs[i], ups[i], downs[i], a[i], residual=res[i], config=c)

    def two(i, a):
        h = G.ffn_up(xs[i], ups[i], a[i])
        return G.gemv_ex(h, downs[i], None, None, None, d, mask_mode=G.MASK_NONZERO, residual=res[i],
                         out_dtype=xs[i].dtype)

    def acts(zero):
        a = []
        for _ in range(cp):
            v = torch.randn(1, F_, generator=g)
            v[torch.rand(1, F_, generator=g) < zero] = 0.0
            a.append(v.to(dev))
        return a

    a66 = acts(0.66)
    ref = two(0, a66).float()
    print("tile sweep at 66% zero units:", flush=True)
    for c in UPDOWN_SWEEP:
        try:
            cfg = FF.ffn_updown_config(d, F_, **c)
            err = float((fused(0, a66, cfg).float() - ref).norm() / ref.norm())
            assert err <= 2e-2, f"relative error {err:.3g} vs the two-kernel path"
            us = gk.time_graph([lambda i=i: fused(i, a66, cfg) for i in range(cp)], reps_target_ms=10, repeats=3)
        except Exception as e:  # a config the compiler rejects is skipped
            print(f"  {c} failed: {type(e).__name__}: {e}"[:300], flush=True)
            continue
        tiles = {k: cfg[k] for k in ("BLOCK_U", "BLOCK_S", "BLOCK_D", "COPIES", "PIPE", "num_warps", "num_stages")}
        out["sweep"].append(dict(config=c, tiles=tiles, us=us, err=err))
        print(f"  {str(c):45s} {tiles} {us:7.2f} µs (err {err:.1e})", flush=True)
    best = min(out["sweep"], key=lambda r: r["us"])["config"] if out["sweep"] else {}
    variants = {"two-kernel": None, f"fused {best}": best}
    t = tuned.get((d, F_))
    if t is not None and t != best:
        variants[f"fused tuned {t}"] = t
    print("| zero units | dense µs | " + " | ".join(variants) + " | fused speedup vs two-kernel | vs dense |",
          flush=True)
    for zero in (0.5, 0.66, 0.8):
        a = a66 if zero == 0.66 else acts(zero)
        dense = gk.time_graph([lambda i=i: torch.addmm(res[i], F.linear(xs[i], ups[i]) * a[i].to(xs[i].dtype),
                                                      downs_dense[i].t()) for i in range(cp)])
        row = {"zero_units": zero, "dense_us": dense}
        for name, cfg in variants.items():
            if cfg is None:
                fn = lambda i, a=a: two(i, a)  # noqa: E731
            else:
                cc = FF.ffn_updown_config(d, F_, **cfg)
                fn = lambda i, a=a, cc=cc: fused(i, a, cc)  # noqa: E731
            row[name] = gk.time_graph([lambda i=i, f=fn: f(i) for i in range(cp)])
        fb = row[f"fused {best}"]
        row["fused_vs_two"] = row["two-kernel"] / fb
        row["fused_vs_dense"] = dense / fb
        out["rows"].append(row)
        print(f"| {zero:.0%} | {dense:.2f} | " + " | ".join(f"{row[k]:.2f}" for k in variants)
              + f" | {row['fused_vs_two']:.2f}× | {row['fused_vs_dense']:.2f}× |", flush=True)
    # load balance: the same density with exactly the same number of active units in every block of 32
    # (what a global compaction would give every program) against the random placement above
    bal = []
    for _ in range(cp):
        v = torch.randn(1, F_, generator=g)
        keep = torch.zeros(F_ // 32, 32, dtype=torch.bool)
        k = round(32 * 0.34)
        keep[torch.arange(F_ // 32)[:, None], torch.rand(F_ // 32, 32, generator=g).argsort(1)[:, :k]] = True
        bal.append((v * keep.reshape(1, F_)).to(dev))
    cfg = FF.ffn_updown_config(d, F_, **best)
    t_rand = gk.time_graph([lambda i=i: fused(i, a66, cfg) for i in range(cp)])
    t_bal = gk.time_graph([lambda i=i: fused(i, bal, cfg) for i in range(cp)])
    out["balance"] = dict(random_us=t_rand, balanced_us=t_bal, active_per_block=round(32 * 0.34))
    print(f"66% zero units, fused {best}: random placement {t_rand:.2f} µs, exactly "
          f"{round(32 * 0.34)} active units in every block of 32: {t_bal:.2f} µs", flush=True)
    out["best"] = best
    print(gk.dumps(out))
    return out
