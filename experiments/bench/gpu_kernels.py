"""GPU kernel benchmark: the granular sparse GEMV against dense `F.linear` (cuBLAS), batch 1.

    python experiments/bench_kernels.py --device cuda                     # full table
    python experiments/bench_kernels.py --device cuda --quick             # 1B shapes, 3 densities
    python experiments/bench_kernels.py --device cuda --out experiments/results

Shapes: the decode matrices of Llama-3.2-1B and 3B (q, k/v, o, gate/up, down, head) and 4096×14336,
stripe 512, random bf16 weights. Inputs are heavy-tailed (x = x̄ + σ·t₃, per-feature x̄ and σ);
thresholds θ[r,i]·σ_i with a per-(stripe, input) jitter, scaled per stripe so that each stripe keeps the
target density on calibration tokens. The density reported is the one measured on the timed tokens
(weighted by stripe rows): the fraction of the weights actually read.

Timing: every call reads its weights from HBM, not L2 — each measurement cycles through enough copies
of the matrix (each with its own token) to exceed the L2 several times, inside one CUDA graph; the
graph is replayed and timed with CUDA events; median of 5. Dense and sparse use the same protocol.
Prints a table; the LAST line is one JSON object.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {  # model -> [(name, n_in, m_out, count per layer)]
    "1B": [("q", 2048, 2048, 1), ("k,v", 2048, 512, 2), ("o", 2048, 2048, 1), ("gate,up", 2048, 8192, 2),
           ("down", 8192, 2048, 1), ("head", 2048, 128256, 0), ("q,k,v fused", 2048, 3072, 0)],
    "3B": [("q", 3072, 3072, 1), ("k,v", 3072, 1024, 2), ("o", 3072, 3072, 1), ("gate,up", 3072, 8192, 2),
           ("down", 8192, 3072, 1), ("head", 3072, 128256, 0)],
    "4096x14336": [("up", 4096, 14336, 1), ("down", 14336, 4096, 1)],
}
SPARSITIES = [0.0, 0.1, 0.25, 0.5, 0.66, 0.75, 0.9]
STRIPE = 512
DRY_RUN = False     # --dry-run: tiny shapes on the CPU (Triton interpreter), to check the script itself


def dumps(obj, **kw) -> str:
    """Strict JSON (`cwic_exp.files.dumps`): a missing figure (NaN) is written as null, which every parser reads."""
    from cwic_exp.files import dumps as strict
    return strict(obj, **kw)


def save_outputs(out: str | None, stem: str, markdown: str, result: dict) -> None:
    """<out>/<stem>.md and <stem>.json of a GPU benchmark (nothing without --out)."""
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{stem}.md"), "w") as f:
            f.write(markdown + "\n")
        with open(os.path.join(out, f"{stem}.json"), "w") as f:
            f.write(dumps(result, indent=1))


def ensure_imports():
    """cwic_kernels / cwic_exp from the checkout when the package is not installed (GPU box)."""
    try:
        import cwic_kernels  # noqa: F401
    except ImportError:
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "cwic_kernels", os.path.join(ROOT, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(ROOT, "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["cwic_kernels"] = mod
        spec.loader.exec_module(mod)
    if os.path.join(ROOT, "src") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "src"))


def make_inputs(n: int, m: int, copies: int, density: float, dev, seed: int = 0, share: float = 0.0,
                group: int = 1):
    """Heavy-tailed tokens (one per copy), their mean, and thresholds hitting `density` per stripe.
    share, group: consecutive groups of `group` tokens share their sparsity as real neighbouring tokens do: each
    input of a token takes its group's common value with probability `share`, else its own (the same marginal
    distribution, so the same density a token; 0: independent tokens)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share: a probability in [0, 1], got {share}")
    g = torch.Generator(device=dev).manual_seed(seed)
    k = math.ceil(m / STRIPE)
    mean = torch.randn(n, device=dev, generator=g) * 0.1
    sigma = torch.exp(torch.randn(n, device=dev, generator=g) * 0.5)
    t3 = torch.distributions.StudentT(3.0)

    def tokens(T):
        z = t3.sample((T, n)).to(dev) / math.sqrt(3.0)        # unit variance
        return mean + sigma * z, z
    x, _ = tokens(copies)
    if share > 0.0:
        if copies % group:
            raise ValueError(f"share: {copies} tokens are not whole groups of {group}")
        _, z = tokens(copies)
        _, zg = tokens(copies // group)
        z = torch.where(torch.rand(copies, n, device=dev, generator=g) < share, zg.repeat_interleave(group, 0), z)
        x = mean + sigma * z
    if density >= 1.0:
        return x.bfloat16(), mean, torch.zeros(k, n, device=dev)
    jitter = torch.exp(torch.randn(k, n, device=dev, generator=g) * 0.3)
    _, zc = tokens(256)
    # per stripe: active iff |z_i| ≥ c_r · jitter[r, i]; c_r = (1 - density) quantile of |z| / jitter
    c = torch.empty(k, device=dev)
    q = int((1 - density) * zc.numel())
    for r0 in range(0, k, 16):
        ratio = zc.abs()[None] / jitter[r0:r0 + 16, None, :]          # (kk, T, n)
        c[r0:r0 + 16] = ratio.flatten(1).kthvalue(max(q, 1), dim=1).values
    thr = (c[:, None] * jitter * sigma[None, :]).contiguous()
    return x.bfloat16(), mean, thr


def measured_density(x, mean, thr, m):
    k = thr.shape[0]
    rows = torch.full((k,), float(STRIPE), device=x.device)
    rows[-1] = m - STRIPE * (k - 1)
    g = ((x.float() - mean).abs()[:, None, :] >= thr[None]).float()      # (copies, k, n)
    return float((g * rows[None, :, None]).sum() / (g.shape[0] * m * thr.shape[1]))


def pdl_note(pdl: bool) -> str:
    """The tables' sentence on programmatic dependent launch."""
    if pdl:
        return ("PDL on (the default on Hopper): in the timed graph each Triton kernel launches while the previous "
                "call still runs, cuBLAS's do not; CWIC_PDL=0 times the kernels alone.")
    return "PDL off (CWIC_PDL=0 or not Hopper): every call launches after the previous one ends."


def time_graph(fn_list, reps_target_ms: float = 20.0, repeats: int = 5) -> float:
    """Median µs per call of a CUDA graph that runs every fn in fn_list once."""
    if DRY_RUN:                         # CPU smoke test of the script: plain wall clock, one pass
        t0 = time.perf_counter()
        for f in fn_list:
            f()
        return (time.perf_counter() - t0) * 1e6 / len(fn_list)
    for f in fn_list:                   # compile + warm
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fn_list:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_list:
            f()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-5)
    reps = max(1, int(reps_target_ms / 1e3 / one))
    times = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / reps / len(fn_list))
    del g
    return statistics.median(times)


class Shape:
    """Weight copies of one (n, m) matrix in both layouts, enough to defeat the L2."""

    def __init__(self, n, m, dev, l2_bytes):
        self.n, self.m = n, m
        nbytes = n * m * 2
        self.copies = 2 if DRY_RUN else max(2, min(64, math.ceil(4 * l2_bytes / nbytes)))
        self.W = [torch.randn(m, n, device=dev, dtype=torch.bfloat16) * n ** -0.5 for _ in range(self.copies)]
        self.WT = [w.t().contiguous() for w in self.W]
        self.bias = torch.randn(m, device=dev) * 0.01


def bench_shape(S: Shape, sparsities, dev, config=None, seed=0):
    from cwic_kernels.gpu import gemv as G
    rows = []
    x0, _, _ = make_inputs(S.n, S.m, S.copies, 1.0, dev, seed)
    xs = [x0[i:i + 1] for i in range(S.copies)]
    dense_us = time_graph([lambda i=i: F.linear(xs[i], S.W[i]) for i in range(S.copies)])
    for sp in sparsities:
        x, mean, thr = make_inputs(S.n, S.m, S.copies, 1.0 - sp, dev, seed)
        xs = [x[i:i + 1] for i in range(S.copies)]
        dens = measured_density(x, mean, thr, S.m)
        cfg = None
        if config:
            cfg = G.gemv_config(1, S.n, S.m, STRIPE, x.device, **config)
        us = time_graph([lambda i=i: G.gemv_ex(xs[i], S.WT[i], mean, thr, S.bias, STRIPE, config=cfg,
                                                    compact=False)
                         for i in range(S.copies)])
        wbytes = S.n * S.m * 2
        speed = dense_us / us
        rows.append(dict(sparsity=sp, density=dens, dense_us=dense_us, sparse_us=us, speedup=speed,
                         ideal=1 / max(dens, 1e-9), pct_ideal=100 * speed * dens,
                         dense_gbps=wbytes / dense_us / 1e3, sparse_gbps=dens * wbytes / us / 1e3))
    return rows


def sweep_configs(S: Shape, dev, sparsity=0.66):
    """Time a few tile/split choices at one sparsity; returns [(config, µs)] best first."""
    from cwic_kernels.gpu import gemv as G
    x, mean, thr = make_inputs(S.n, S.m, S.copies, 1.0 - sparsity, dev, 1)
    xs = [x[i:i + 1] for i in range(S.copies)]
    out = []
    for c in [dict(), dict(num_warps=8), dict(pipe=True), dict(pipe=True, waves=1), dict(pipe=True, num_warps=8),
              dict(block_n=128, waves=4), dict(block_n=128, pipe=True),
              dict(waves=8, max_split=128), dict(block_m=128, block_n=128, waves=8, max_split=128),
              # more programs, fewer blocks each (the large shapes gained most from waves 8 over 2)
              dict(waves=16, max_split=256), dict(waves=32, max_split=256), dict(block_n=128, waves=16, max_split=256)]:
        cfg = G.gemv_config(1, S.n, S.m, STRIPE, x.device, **c)
        try:
            us = time_graph([lambda i=i: G.gemv_ex(xs[i], S.WT[i], mean, thr, S.bias, STRIPE, config=cfg,
                                                    compact=False)
                             for i in range(S.copies)], reps_target_ms=10, repeats=3)
        except Exception as e:  # a config the compiler rejects is just skipped
            print(f"  config {c} failed: {type(e).__name__}: {e}"[:200])
            continue
        out.append((c, cfg["grid"], us))
    return sorted(out, key=lambda t: t[2])


def batch_inputs(S: Shape, B: int, density: float, dev, share: float = 0.0):
    """One batch of B heavy-tailed tokens per weight copy (`make_inputs` at this per-token density; `share`: how
    much a batch's tokens share their sparsity), and the union density: the share of the (stripe, input) pairs that
    some token of its batch uses, the rows a batched kernel must read."""
    x, mean, thr = make_inputs(S.n, S.m, S.copies * B, density, dev, 2, share=share, group=B)
    xs = [x[i * B:(i + 1) * B] for i in range(S.copies)]
    g = ((x.float() - mean).abs()[:, None, :] >= thr[None]).view(S.copies, B, thr.shape[0], S.n)
    return xs, mean, thr, float(g.any(1).float().mean())


def bench_batches(S: Shape, dev, sparsity=0.66, batches=(1, 2, 4, 8, 16)):
    from cwic_kernels.gpu import gemv as G
    rows = []
    for B in batches:
        xs, mean, thr, union = batch_inputs(S, B, 1.0 - sparsity, dev)
        dense_us = time_graph([lambda i=i: F.linear(xs[i], S.W[i]) for i in range(S.copies)], 10, 3)
        us = time_graph([lambda i=i: G.gemv_ex(xs[i], S.WT[i], mean, thr, S.bias, STRIPE, compact=False)
                         for i in range(S.copies)], 10, 3)
        rows.append(dict(batch=B, union_density=union, dense_us=dense_us, sparse_us=us, speedup=dense_us / us,
                         ideal=1 / union))
    return rows


def main(argv=None):
    global DRY_RUN, SHAPES
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1B shapes, sparsities 0/50/66/90%%")
    ap.add_argument("--models", default=None, help="comma list of " + ",".join(SHAPES))
    ap.add_argument("--no-sweep", action="store_true", help="no tile sweep (every shape on the current tiles)")
    ap.add_argument("--sweep", default="1B", help="comma list of the models whose shapes are timed on the best "
                    "tiles of a sweep at 66%% sparsity (default 1B); the others run the current tiles")
    ap.add_argument("--out", default=None, help="folder for gpu_kernels.json / gpu_kernels.md")
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        DRY_RUN = True
        SHAPES = {"1B": [("q", 128, 1024, 1), ("down", 96, 512, 1), ("head", 64, 1500, 0)],
                  "3B": [("q", 64, 1024, 1)]}
    models = args.models.split(",") if args.models else (["1B"] if args.quick else list(SHAPES))
    if not models or any(m not in SHAPES for m in models):   # before any work, as the CPU benchmarks do
        raise SystemExit(f"--models: a comma-separated list of {', '.join(SHAPES)}; got {args.models!r}")
    swept = set() if args.no_sweep else {m for m in args.sweep.split(",") if m}
    if any(m not in SHAPES for m in swept):
        raise SystemExit(f"--sweep: a comma-separated list of {', '.join(SHAPES)}; got {args.sweep!r}")
    ensure_imports()
    if not (DRY_RUN or torch.cuda.is_available()):
        raise SystemExit("no CUDA device visible: pass --device cpu for the CPU benchmark")
    dev = torch.device("cpu" if DRY_RUN else "cuda")
    torch.manual_seed(0)
    if DRY_RUN:
        l2, gpu = 1 << 20, "cpu (dry run)"
    else:
        props = torch.cuda.get_device_properties(dev)
        l2 = getattr(props, "L2_cache_size", 50 << 20)
        gpu = torch.cuda.get_device_name(dev)
    sparsities = [0.0, 0.5, 0.66, 0.9] if args.quick else SPARSITIES
    import triton

    from cwic_kernels.gpu import gemv as G
    pdl = (not DRY_RUN) and G.use_pdl(torch.device("cuda"))
    result = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, stripe=STRIPE, batch=1,
                  l2_bytes=l2, pdl=pdl, models={}, sweep={}, batches={}, tuned=[])
    lines = [f"# GPU granular GEMV vs cuBLAS F.linear — {gpu}, torch {torch.__version__}, "
             f"triton {triton.__version__}, bf16, stripe {STRIPE}, batch 1", "",
             "Times per call with weights streamed from HBM (copies cycled inside one CUDA graph); density = "
             "fraction of the weights actually read; % of ideal = speedup × density. "
             + (f"The shapes of {', '.join(sorted(swept))} use the best tiles of the sweep below, the others "
                if swept else "Every shape uses ")
             + "the current tiles (`gemv.TUNED`, else the default heuristic). " + pdl_note(pdl), ""]
    cache = {}
    for model in models:
        result["models"][model] = {}
        for name, n, m, cnt in SHAPES[model]:
            key = (n, m)
            if key not in cache:
                S = Shape(n, m, dev, l2)
                t0 = time.time()
                best = None
                if model in swept:
                    sw = sweep_configs(S, dev)
                    result["sweep"][f"{n}x{m}"] = [dict(config=c, grid=list(gr), us=u) for c, gr, u in sw]
                    best = sw[0][0] if sw else None
                    if best:
                        result["tuned"].append(dict(n=n, m=m, bb=1, config=best))
                cache[key] = bench_shape(S, sparsities, dev, config=best)
                for r in cache[key]:
                    r["config"] = best or "default"
                if (n, m) == (2048, 8192) or (DRY_RUN and name == "q" and model == "1B"):
                    result["batches"][f"{n}x{m}"] = bench_batches(S, dev)
                del S
                if not DRY_RUN:
                    torch.cuda.empty_cache()
                print(f"[{model} {name} {n}x{m}] {time.time() - t0:.1f}s", flush=True)
            result["models"][model][name] = dict(n=n, m=m, per_layer=cnt, rows=cache[key])
    # aggregate: one decoder layer (sum of its matrices' times) and the head
    for model, shapes in result["models"].items():
        agg = []
        for j, sp in enumerate(sparsities):
            layer = [(v["rows"][j], v["per_layer"]) for v in shapes.values() if v["per_layer"] > 0]
            if not layer:
                continue
            d = sum(r["dense_us"] * c for r, c in layer)
            s = sum(r["sparse_us"] * c for r, c in layer)
            w = sum(v["n"] * v["m"] * v["per_layer"] for v in shapes.values() if v["per_layer"] > 0)
            dens = sum(r["density"] * c * v["n"] * v["m"] for (r, c), v in
                       zip(layer, [v for v in shapes.values() if v["per_layer"] > 0])) / w
            agg.append(dict(sparsity=sp, density=dens, dense_us=d, sparse_us=s, speedup=d / s,
                            pct_ideal=100 * d / s * dens))
        result["models"][model]["_layer"] = agg
    # table
    for model, shapes in result["models"].items():
        lines += [f"## {model}", "",
                  "| matrix | n×m | sparsity | density read | dense µs | sparse µs | speedup | % of ideal | dense GB/s | sparse GB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, v in shapes.items():
            if name == "_layer":
                continue
            for r in v["rows"]:
                lines.append(f"| {name} | {v['n']}×{v['m']} | {r['sparsity']:.0%} | {r['density']:.3f} | "
                             f"{r['dense_us']:.2f} | {r['sparse_us']:.2f} | {r['speedup']:.2f}× | "
                             f"{r['pct_ideal']:.0f}% | {r['dense_gbps']:.0f} | {r['sparse_gbps']:.0f} |")
        if shapes.get("_layer"):
            lines += ["", f"**{model} decoder layer** (q, k, v, o, gate, up, down as separate GEMVs; sum of times):", "",
                      "| sparsity | density | dense µs | sparse µs | speedup | % of ideal |", "|---|---|---|---|---|---|"]
            for r in shapes["_layer"]:
                lines.append(f"| {r['sparsity']:.0%} | {r['density']:.3f} | {r['dense_us']:.1f} | {r['sparse_us']:.1f} | "
                             f"{r['speedup']:.2f}× | {r['pct_ideal']:.0f}% |")
        lines.append("")
    if result["batches"]:
        lines += ["## Small batches (2048×8192, 66% per-token sparsity; a stripe is skipped only if every token skips it)", "",
                  "| batch | union density | dense µs | sparse µs | speedup | ideal |", "|---|---|---|---|---|---|"]
        for key, rows in result["batches"].items():
            for r in rows:
                lines.append(f"| {r['batch']} | {r['union_density']:.3f} | {r['dense_us']:.2f} | {r['sparse_us']:.2f} | "
                             f"{r['speedup']:.2f}× | {r['ideal']:.2f}× |")
        lines.append("")
    if result["sweep"]:
        lines += [f"## Tile / split-K sweep at 66% sparsity ({', '.join(sorted(swept))} shapes; {{}} = the current tiles)",
                  "", "| n×m | best config | grid | µs | current µs |", "|---|---|---|---|---|"]
        for key, rows in result["sweep"].items():
            dflt = [r for r in rows if r["config"] == {}]
            lines.append(f"| {key} | {rows[0]['config']} | {rows[0]['grid']} | {rows[0]['us']:.2f} | "
                         f"{dflt[0]['us'] if dflt else float('nan'):.2f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    save_outputs(args.out, "gpu_kernels", text, result)
    summary = {"bench": "gpu_kernels", "gpu": gpu}
    for model, shapes in result["models"].items():
        for r in shapes.get("_layer", []):
            if abs(r["sparsity"] - 0.66) < 1e-9:
                summary[f"{model}_layer_speedup_at_66"] = round(r["speedup"], 3)
        if "head" in shapes:
            for r in shapes["head"]["rows"]:
                if abs(r["sparsity"] - 0.66) < 1e-9:
                    summary[f"{model}_head_speedup_at_66"] = round(r["speedup"], 3)
    from cwic_exp.files import dumps
    print(dumps(summary))
    return result


if __name__ == "__main__":
    main()
