"""GPU: what the uneven spread of a token's active FFN units over the programs costs the up/down part.

    python experiments/bench/gpu_ffn_balance.py            # H100 / H200
    python experiments/bench/gpu_ffn_balance.py --dry-run  # tiny shapes on the CPU (Triton interpreter): the script

`ffn_fused.ffn_updown` (the up/down body of the engine's one-launch FFN: a program owns BLOCK_U units and walks its
active ones) for one token, d = 2048, F = 8192 (Llama-3.2-1B), bf16, tuned tiles, weight copies cycled inside one
CUDA graph as in gpu_kernels.py. For each fraction p of active units:
  random    p·F units active at random (as a token's units fall): the busiest program has more than the mean;
  even      the same number spread evenly, ⌊p·F / programs⌋ or one more in every block: what balancing would give;
"busiest" is the most active units any program holds, over all the weight copies' tokens (the worst token).
and, as bounds, no unit active and every unit active. Table + last-line JSON.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_kernels as gk  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--fractions", default="0.25,0.34,0.5")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gk.DRY_RUN = args.dry_run
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    gk.ensure_imports()
    from cwic_kernels.gpu import ffn_fused as FF
    dev = torch.device("cpu" if args.dry_run else "cuda")
    d, F_ = (128, 256) if args.dry_run else (2048, 8192)
    cfg = FF.ffn_updown_config(d, F_)
    bu, nprog = cfg["BLOCK_U"], cfg["grid"][0]
    l2 = 1 << 20 if args.dry_run else getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    SU, SD = gk.Shape(F_, d, dev, l2 // 2), gk.Shape(F_, d, dev, l2 // 2)
    ups, downs = SU.WT, SD.WT                           # (F, d) each
    cp = min(SU.copies, SD.copies)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, d, generator=g).to(dev, torch.bfloat16) for _ in range(cp)]
    res = [torch.randn(1, d, generator=g).to(dev, torch.bfloat16) for _ in range(cp)]

    def acts(kind: str, p: float):
        out, busiest = [], []
        for _ in range(cp):
            v = torch.randn(F_, generator=g).abs() + 0.1
            if kind == "random":
                on = torch.zeros(F_, dtype=torch.bool)
                on[torch.randperm(F_, generator=g)[:round(p * F_)]] = True
            elif kind == "even":
                total, on = round(p * F_), torch.zeros(nprog, bu, dtype=torch.bool)
                per = torch.full((nprog,), total // nprog)
                per[torch.randperm(nprog, generator=g)[:total - int(per.sum())]] += 1
                for b in range(nprog):
                    on[b, torch.randperm(bu, generator=g)[:int(per[b])]] = True
                on = on.flatten()[:F_]
            else:
                on = torch.full((F_,), kind == "all")
            busiest.append(int(on[:nprog * bu].reshape(nprog, bu).sum(1).max()) if F_ == nprog * bu else -1)
            out.append(torch.where(on, v, 0.0)[None].to(dev))
        return out, max(busiest)

    def time_it(a):
        return gk.time_graph([lambda i=i: FF.ffn_updown(xs[i], ups[i], downs[i], a[i], residual=res[i], config=cfg)
                              for i in range(cp)])

    rows = []
    for kind, p in [("none", 0.0)] + [(k, float(p)) for p in args.fractions.split(",") for k in ("random", "even")] \
            + [("all", 1.0)]:
        a, busiest = acts(kind, p)
        us = time_it(a)
        rows.append(dict(kind=kind, active=p, us=round(us, 2), busiest=busiest, mean=round(p * bu, 2)))
        print(f"{kind:>7} {p:5.2f} active: {us:8.2f} µs   busiest program {busiest} units (mean {p * bu:.1f})",
              flush=True)
    dev_name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(dev)
    md = [f"# FFN up/down (one launch), active units at random vs spread evenly — {dev_name}, torch "
          f"{torch.__version__}, d={d}, F={F_}, BLOCK_U={bu} ({nprog} programs), {cp} weight copies", "",
          "| active units | random µs | even µs | random / even | busiest program (random) |", "|---|---|---|---|---|"]
    by = {(r["kind"], r["active"]): r for r in rows}
    for p in [float(x) for x in args.fractions.split(",")]:
        r, e = by[("random", p)], by[("even", p)]
        md.append(f"| {p:.0%} | {r['us']:.2f} | {e['us']:.2f} | {r['us'] / e['us']:.2f}× | {r['busiest']} of {bu} "
                  f"(mean {r['mean']}) |")
    md.append(f"\nBounds: no unit active {by[('none', 0.0)]['us']:.2f} µs, every unit {by[('all', 1.0)]['us']:.2f} µs.")
    print("\n".join(md))
    result = {"bench": "gpu_ffn_balance", "gpu": dev_name, "rows": rows}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_ffn_balance.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        with open(os.path.join(args.out, "gpu_ffn_balance.json"), "w") as f:
            f.write(gk.dumps(result, indent=1))
    print(gk.dumps(result))


if __name__ == "__main__":
    main()
