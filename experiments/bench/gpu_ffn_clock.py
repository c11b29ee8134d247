"""Where the one-launch FFN's time goes, program by program: phase clocks read inside the decode engine.

    python experiments/bench/gpu_ffn_clock.py --out DIR                 # on a GPU: record, then print the table
    python experiments/bench/gpu_ffn_clock.py --load DIR/ffn_clock.npz  # anywhere: the table and the plot again

The per-kernel tables say the one-launch FFN (`ffn_fused.ffn_gate_updown`) takes half of a CWIC decode step, and the
step-time estimates say its up/down steps already move about 2.8 TB/s while they run, so the time is lost somewhere
between its phases. This reads where. With `times=` the kernel stores, per program, `%globaltimer` (ns, one clock
for the whole GPU) and `%clock64` (the SM's cycles) at seven points:

    0 entry · 1 after the PDL wait · 2 the stripe's active inputs compacted · 3 the gate done (a stored) ·
    4 the active units compacted · 5 the up/down loop done · 6 the product's atomics issued

and the SM, the stripe's active inputs and the program's active units. The same 1B-shaped random model and 3x-APR
calibration as `gpu_tune_decode.py`; the engine runs its CUDA graph, each layer's FFN writing its own rows, and
`--steps` decode steps are kept. Without `times=` the kernel is compiled as before (a constexpr switch).

Prints, per phase, the median / 10th / 90th percentile over programs, layers and steps (µs), when each phase ends
across a launch's programs (from the first program's entry), and the bytes each phase reads over the wall time the
launch's programs spend in it; the LAST line is JSON. Writes `ffn_clock.npz` (the raw clocks), `ffn_clock.json`
and, where matplotlib is installed, `ffn_clock.png`: one launch as a bar per program, coloured by phase.
`--timed-vs-plain` also times the decode with and without the clocks (their cost)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PHASES = ["PDL wait", "inputs compacted", "gate", "units compacted", "up/down loop", "atomics"]
EVENTS = ["entry", "after PDL wait", "inputs compacted", "gate done", "units compacted", "loop done", "atomics issued"]


def record(args) -> tuple[dict, np.ndarray]:
    import torch
    from gpu_decode import calibrated_model, ffn_tile_overrides, measure_apr, time_step
    from gpu_kernels import ensure_imports
    ensure_imports()
    import triton
    from cwic_exp.engine import DecodeEngine
    from cwic_kernels.gpu import ffn_fused
    if not torch.cuda.is_available():
        raise SystemExit("gpu_ffn_clock: recording needs a CUDA GPU (use --load to analyse a recording)")
    ffn_tile_overrides(args.model, args.ffn)
    dev = torch.device("cuda")
    model, prompt, calib = calibrated_model(args.model, dev, args.apr)
    cfg = model.config
    d, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    apr = measure_apr(model, calib)["apr"]
    fcfg = ffn_fused.ffn_updown_config(d, F)
    P = fcfg["grid"][0]
    times = torch.zeros((L, P, 16), dtype=torch.int64, device=dev)
    orig = ffn_fused.ffn_gate_updown
    calls = [0]

    def timed(*a, **k):   # each launch (a layer, in call order) gets its own rows; the graph keeps the pointers
        i = calls[0] % L
        calls[0] += 1
        return orig(*a, times=times[i], **k)

    res = dict(model=args.model, d=d, F=F, layers=L, programs=P, apr_calibration=apr,
               config={k: v for k, v in fcfg.items() if k != "grid"}, gpu=torch.cuda.get_device_name(),
               torch=torch.__version__, triton=triton.__version__,
               pdl=os.environ.get("CWIC_PDL", "1") != "0", ffn_overrides=args.ffn)
    if args.timed_vs_plain:
        eng = DecodeEngine(model, max_len=len(prompt) + 128)
        res["tok_s_plain"] = time_step(eng, prompt, 100, 5)
        del eng
    ffn_fused.ffn_gate_updown = timed
    try:
        eng = DecodeEngine(model, max_len=len(prompt) + 128)
        eng.generate(prompt, 8)                      # capture (whole steps: the layers' rows stay aligned)
        if args.timed_vs_plain:
            res["tok_s_timed"] = time_step(eng, prompt, 100, 5)
        eng.prefill(prompt)
        steps = []
        for _ in range(args.steps):
            times.zero_()
            eng.decode(1)
            torch.cuda.synchronize()
            steps.append(times.cpu().numpy().copy())
    finally:
        ffn_fused.ffn_gate_updown = orig
    res["calls_captured"] = calls[0]
    return res, np.stack(steps)                      # (S, L, P, 16)


def analyse(meta: dict, T: np.ndarray) -> dict:
    """The table's figures from clocks (S, L, P, 16)."""
    S, L, P, _ = T.shape
    gt = T[..., :7].astype(np.float64)               # ns
    ck = T[..., 8:15].astype(np.float64)             # cycles
    info = T[..., 7]
    smid, n_in = info // 65536, info % 65536
    n_units = T[..., 15]
    d, bu = meta["d"], meta["config"]["BLOCK_U"]
    out = dict(meta)
    dur = np.diff(gt, axis=-1) / 1e3                 # (S, L, P, 6) µs
    cyc = np.diff(ck, axis=-1)
    ghz = float(np.median((ck[..., 6] - ck[..., 0]) / np.maximum(gt[..., 6] - gt[..., 0], 1)))
    out["sm_clock_ghz"] = round(ghz, 3)
    ph = {}
    for j, name in enumerate(PHASES):
        v, c = dur[..., j].ravel(), cyc[..., j].ravel() / ghz / 1e3
        ph[name] = dict(median_us=round(float(np.median(v)), 3), p10_us=round(float(np.percentile(v, 10)), 3),
                        p90_us=round(float(np.percentile(v, 90)), 3), median_us_from_cycles=round(float(np.median(c)), 3))
    out["phases"] = ph
    t0 = gt[..., 0].min(axis=-1)[..., None, None]    # the launch's first entry
    rel = (gt - t0) / 1e3
    ev = {}
    for e, name in enumerate(EVENTS):
        r = rel[..., e]
        ev[name] = dict(first_us=round(float(np.median(r.min(-1))), 3), median_us=round(float(np.median(np.median(r, -1))), 3),
                        last_us=round(float(np.median(r.max(-1))), 3))
    out["events_from_first_entry"] = ev
    out["launch_us"] = round(float(np.median(rel[..., 6].max(-1))), 3)
    # bytes a phase reads (bf16 weights), over the wall time from the phase's first start to its last end
    gate_b = n_in.astype(np.float64) * bu * 2
    ud_b = n_units.astype(np.float64) * 2 * d * 2
    bw = {}
    for name, b, (s, e) in (("gate", gate_b, (2, 3)), ("up/down loop", ud_b, (4, 5))):
        wall = (gt[..., e].max(-1) - gt[..., s].min(-1))           # (S, L) ns
        busy = (gt[..., e] - gt[..., s]).mean(-1)                  # a program's own time in it
        tot = b.sum(-1)
        bw[name] = dict(mb_per_launch=round(float(np.median(tot)) / 1e6, 3),
                        tb_s_over_launch_wall=round(float(np.median(tot / wall)) / 1e3, 3),
                        tb_s_over_program_time=round(float(np.median(tot / busy)) / 1e3, 3))
    out["bandwidth"] = bw
    out["active_inputs_median"] = float(np.median(n_in))
    out["active_units_median"] = float(np.median(n_units))
    out["programs_per_sm"] = float(np.median([np.bincount(smid[s, l].ravel()).max() for s in range(S) for l in range(L)]))
    return out


def table(r: dict) -> str:
    lines = [f"# One-launch FFN phase clocks — {r['gpu']}, torch {r['torch']}, triton {r['triton']}, "
             f"{r['model']} d={r['d']} F={r['F']}, {r['programs']} programs, APR {r['apr_calibration']:.2f}",
             "", f"SM clock {r['sm_clock_ghz']} GHz; launch (first entry to last atomics) {r['launch_us']} µs; "
             f"{r['active_inputs_median']:.0f} active inputs a stripe, {r['active_units_median']:.0f} active units a "
             f"program (median); up to {r['programs_per_sm']:.0f} programs an SM", "",
             "| phase | median µs | p10 | p90 | from clock64 |", "|---|---|---|---|---|"]
    for k, v in r["phases"].items():
        lines.append(f"| {k} | {v['median_us']} | {v['p10_us']} | {v['p90_us']} | {v['median_us_from_cycles']} |")
    lines += ["", "| event | first program µs | median | last |", "|---|---|---|---|"]
    for k, v in r["events_from_first_entry"].items():
        lines.append(f"| {k} | {v['first_us']} | {v['median_us']} | {v['last_us']} |")
    lines += ["", "| phase | MB a launch | TB/s over its wall time | TB/s if the programs' phases all overlapped (bytes / mean phase time) |", "|---|---|---|---|"]
    for k, v in r["bandwidth"].items():
        lines.append(f"| {k} | {v['mb_per_launch']} | {v['tb_s_over_launch_wall']} | {v['tb_s_over_program_time']} |")
    if "tok_s_plain" in r:
        lines += ["", f"decode tok/s without clocks {r['tok_s_plain']:.1f}, with {r['tok_s_timed']:.1f}"]
    return "\n".join(lines)


def plot(T: np.ndarray, path: str, step: int = -1, layer: int = 5) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layer = min(max(layer, 0), T.shape[1] - 1)
    gt = T[step, layer, :, :7].astype(np.float64)
    gt = (gt - gt[:, 0].min()) / 1e3
    order = np.argsort(gt[:, 1])
    fig, ax = plt.subplots(figsize=(10, 6))
    colors = ["#cccccc", "#fdae61", "#2b83ba", "#d7191c", "#1a9641", "#7b3294"]
    for y, p in enumerate(order):
        for j in range(6):
            ax.barh(y, gt[p, j + 1] - gt[p, j], left=gt[p, j], color=colors[j], height=1.0, linewidth=0)
    ax.set_xlabel("µs from the first program's entry")
    ax.set_ylabel("program (sorted by the end of its PDL wait)")
    ax.set_title(f"One-launch FFN, layer {layer}: phases of each program")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors], labels=PHASES, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1B")
    ap.add_argument("--apr", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ffn", default=None,
                    help='JSON overrides of the one-launch FFN tiles (ffn_updown_config keys), e.g. \'{"num_warps": 8}\'')
    ap.add_argument("--timed-vs-plain", action="store_true", help="also time the decode with and without clocks")
    ap.add_argument("--plot-layer", type=int, default=5, help="the layer whose last recorded launch is plotted")
    ap.add_argument("--load", default=None, help="an ffn_clock.npz to analyse instead of recording")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.load:
        z = np.load(args.load, allow_pickle=False)
        meta, T = json.loads(str(z["meta"])), z["times"]
    else:
        meta, T = record(args)
    r = analyse(meta, T)
    print(table(r))
    from gpu_kernels import dumps   # strict JSON: a missing figure (NaN) is null
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        if not args.load:
            np.savez_compressed(os.path.join(args.out, "ffn_clock.npz"), times=T, meta=json.dumps(meta))
        with open(os.path.join(args.out, "ffn_clock.json"), "w") as f:
            f.write(dumps(r, indent=1))
        with open(os.path.join(args.out, "ffn_clock.md"), "w") as f:
            f.write(table(r) + "\n")
        if plot(T, os.path.join(args.out, "ffn_clock.png"), layer=args.plot_layer):
            print(f"plot: {os.path.join(args.out, 'ffn_clock.png')}")
    print(dumps(r))


if __name__ == "__main__":
    main()
