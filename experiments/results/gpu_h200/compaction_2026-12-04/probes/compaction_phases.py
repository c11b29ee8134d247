"""What the one-launch FFN's input compaction costs, phase by phase (H200): kernels that stop after each phase of
`ffn_fused._ffn_gate_updown_kernel`'s compaction, timed as whole launches in a CUDA graph of dependent launches
(256 programs of 4 warps, d = 2048, as the 1B FFN runs), so that each phase's latency is the difference to the
kernel that stops one phase earlier.

    python experiments/results/gpu_h200/compaction_2026-12-04/probes/compaction_phases.py [--out DIR]

Variants (each ends by storing what its last phase produced, so that nothing is optimised away):
  0 empty: one scalar store a program
  1 + load x (bf16) and the o sum (fp32), round their sum to bf16, store it (a vector store)
  2 + the RMS scale (block reduction), normalise, the mask against the thresholds, store the centred values
  3 + the exclusive prefix count (tl.cumsum) and the scattered stores of the active indices and values
  4 + the block barrier and the load of the first 512 compacted slots back (what the gate loop reads first)
  5 = 4 with the prefix count from a (16, 128) reshape: the cumsum along 128 and the 16 row offsets
  6 = 2 + the prefix count alone (its values summed into one scalar; no scattered store)
  7 = 2 + the masked stores of indices and values at the inputs' own rows (no prefix count)
  8, 9 = 4 on the inputs as a (16, 128) / (64, 32) tile (`_probe2d`): neighbouring lanes hold neighbouring inputs
  10, 11 = 8, 9 with each slot's index and value packed into one int64 store
  12 = 4 storing only the indices; each slot's value is recomputed from x, the o sum, the norm weight and the mean
       gathered at its index (loads that depend only on the index, as the weight rows do)
Prints a table (µs a launch, and the difference to the previous variant) and a last-line JSON.
"""
import argparse
import json
import os
import statistics

import torch
import triton
import triton.language as tl


@triton.jit
def _probe(X, XACC, MU, THR, NW, OUT, GIDX, GVAL, D, eps, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
           VARIANT: tl.constexpr):
    p = tl.program_id(0)
    rows = tl.arange(0, BLOCK_D)
    mu = tl.load(MU + rows)
    t = tl.load(THR + rows)
    w = tl.load(NW + rows).to(tl.float32)
    if VARIANT == 0:
        tl.store(OUT + p, p.to(tl.float32))
    else:
        x = (tl.load(XACC + rows) + tl.load(X + rows).to(tl.float32)).to(tl.bfloat16)
        if VARIANT == 1:
            tl.store(OUT + p * BLOCK_D + rows, x.to(tl.float32))
        else:
            xf = x.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
            xn = (xf * rstd * w).to(tl.bfloat16).to(tl.float32)
            xc = xn - mu
            on = tl.abs(xc) >= t
            if VARIANT == 2:
                tl.store(OUT + p * BLOCK_D + rows, tl.where(on, xc, 0.0))
            else:
                on_i = on.to(tl.int32)
                if VARIANT == 7:   # the scattered stores without the prefix count: at the inputs' own rows
                    base = p.to(tl.int64) * BLOCK_D
                    tl.store(GIDX + base + rows, rows, mask=on)
                    tl.store(GVAL + base + rows, xc, mask=on)
                    tl.store(OUT + p, tl.sum(on_i, axis=0).to(tl.float32))
                    return
                if VARIANT == 5:
                    o2 = tl.reshape(on_i, (16, BLOCK_D // 16))
                    inner = tl.cumsum(o2, axis=1)
                    rs = tl.sum(o2, axis=1)
                    roff = tl.cumsum(rs, axis=0) - rs
                    pos = tl.reshape(inner + roff[:, None], (BLOCK_D,)) - on_i
                else:
                    pos = tl.cumsum(on_i, axis=0) - on_i
                cnt = tl.sum(on_i, axis=0)
                if VARIANT == 6:   # the prefix count alone: its values summed, no scattered store
                    tl.store(OUT + p, tl.sum(tl.where(on, pos, 0), axis=0).to(tl.float32) + cnt.to(tl.float32))
                    return
                base = p.to(tl.int64) * BLOCK_D
                tl.store(GIDX + base + pos, rows, mask=on)
                if VARIANT == 12:   # only the indices go out; the values are recomputed from x at each slot
                    tl.debug_barrier()
                    slots = tl.arange(0, BLOCK_G)
                    sm = slots < cnt
                    idx = tl.load(GIDX + base + slots, mask=sm, other=0)
                    xs = (tl.load(XACC + idx, mask=sm, other=0.0)
                          + tl.load(X + idx, mask=sm, other=0.0).to(tl.float32)).to(tl.bfloat16).to(tl.float32)
                    ws = tl.load(NW + idx, mask=sm, other=0.0).to(tl.float32)
                    v = (xs * rstd * ws).to(tl.bfloat16).to(tl.float32) - tl.load(MU + idx, mask=sm, other=0.0)
                    tl.store(OUT + p, tl.sum(tl.where(sm, v, 0.0) + idx.to(tl.float32), axis=0))
                    return
                tl.store(GVAL + base + pos, xc, mask=on)
                if VARIANT == 3:
                    tl.store(OUT + p, cnt.to(tl.float32))
                else:
                    tl.debug_barrier()
                    slots = tl.arange(0, BLOCK_G)
                    sm = slots < cnt
                    idx = tl.load(GIDX + base + slots, mask=sm, other=0)
                    v = tl.load(GVAL + base + slots, mask=sm, other=0.0)
                    tl.store(OUT + p, tl.sum(v + idx.to(tl.float32), axis=0))


@triton.jit
def _probe2d(X, XACC, MU, THR, NW, OUT, GIDX, GVAL, D, eps, R: tl.constexpr, C: tl.constexpr, BLOCK_G: tl.constexpr,
             PACK: tl.constexpr):
    """Variant 4's whole chain on the inputs laid out as an (R, C) tile (row-major: input r * C + c), so that
    neighbouring lanes hold neighbouring inputs and a warp's compacted slots lie close together. PACK: the index
    and the value go out as one int64 (index in the high half), one store instead of two."""
    p = tl.program_id(0)
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    mu = tl.load(MU + offs)
    t = tl.load(THR + offs)
    w = tl.load(NW + offs).to(tl.float32)
    x = (tl.load(XACC + offs) + tl.load(X + offs).to(tl.float32)).to(tl.bfloat16)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(xf * xf, axis=1), axis=0) / D + eps)
    xc = (xf * rstd * w).to(tl.bfloat16).to(tl.float32) - mu
    on = tl.abs(xc) >= t
    on_i = on.to(tl.int32)
    rs = tl.sum(on_i, axis=1)
    pos = tl.cumsum(on_i, axis=1) - on_i + (tl.cumsum(rs, axis=0) - rs)[:, None]
    cnt = tl.sum(rs, axis=0)
    base = p.to(tl.int64) * R * C
    slots = tl.arange(0, BLOCK_G)
    sm = slots < cnt
    if PACK:
        packed = (offs.to(tl.int64) << 32) | (xc.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)
        tl.store(GIDX.to(tl.pointer_type(tl.int64)) + base + pos, packed, mask=on)
        tl.debug_barrier()
        q = tl.load(GIDX.to(tl.pointer_type(tl.int64)) + base + slots, mask=sm, other=0)
        idx = (q >> 32).to(tl.int32)
        v = (q & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        tl.store(GIDX + base + pos, offs, mask=on)
        tl.store(GVAL + base + pos, xc, mask=on)
        tl.debug_barrier()
        idx = tl.load(GIDX + base + slots, mask=sm, other=0)
        v = tl.load(GVAL + base + slots, mask=sm, other=0.0)
    tl.store(OUT + p, tl.sum(v + idx.to(tl.float32), axis=0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--launches", type=int, default=200)
    args = ap.parse_args()
    dev = torch.device("cuda")
    D, P, G = 2048, 256, 512
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(D, generator=g) * 2).to(torch.bfloat16).to(dev)
    xacc = torch.randn(D, generator=g).to(dev)
    mu = (torch.randn(D, generator=g) * 0.1).to(dev)
    nw = torch.ones(D, dtype=torch.bfloat16, device=dev)
    thr = torch.full((D,), 0.97, device=dev)          # about a third of the inputs on (|N(0,1)-ish| >= 0.97)
    out = torch.zeros(P * D, device=dev)
    gidx = torch.zeros(P * D, dtype=torch.int32, device=dev)
    gidx2 = torch.zeros(2 * P * D, dtype=torch.int32, device=dev)   # room for the packed int64 slots
    gval = torch.zeros(P * D, device=dev)
    res = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
           "programs": P, "d": D, "warps": 4, "launches_per_graph": args.launches, "us_per_launch": {}}

    two_d = {8: (16, 128, False), 9: (64, 32, False), 10: (16, 128, True), 11: (64, 32, True)}

    def launch(v):
        if v in two_d:
            r, c, pack = two_d[v]
            _probe2d[(P,)](x, xacc, mu, thr, nw, out, gidx2, gval, D, 1e-5, R=r, C=c, BLOCK_G=G, PACK=pack,
                           num_warps=4)
        else:
            _probe[(P,)](x, xacc, mu, thr, nw, out, gidx, gval, D, 1e-5, BLOCK_D=D, BLOCK_G=G, VARIANT=v, num_warps=4)

    names = ["0 empty", "1 + load x and the o sum", "2 + RMS scale, mask", "3 + prefix count, scattered stores",
             "4 + barrier, load 512 slots back", "5 = 4, prefix count by (16, 128)", "6 = 2 + prefix count alone",
             "7 = 2 + masked stores at own rows", "8 = 4 as a (16, 128) tile", "9 = 4 as a (64, 32) tile",
             "10 = 8, index and value packed in one int64", "11 = 9, packed",
             "12 = 4, indices only, values recomputed from x at each slot"]
    graphs = {}
    for v in range(13):
        launch(v)
        torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            with torch.cuda.graph(gr):
                for _ in range(args.launches):
                    launch(v)
        torch.cuda.synchronize()
        graphs[v] = gr
    times = {v: [] for v in range(13)}
    for r in range(7):                                  # variants alternated, 7 rounds
        for v in range(13):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graphs[v].replay()
            b.record()
            torch.cuda.synchronize()
            times[v].append(a.elapsed_time(b) * 1e3 / args.launches)
    launch(3)
    torch.cuda.synchronize()
    cnt_on = int(out[:1].item())
    med = {v: statistics.median(times[v]) for v in range(13)}
    res["active_inputs"] = cnt_on
    print(f"{res['gpu']}, torch {res['torch']}, triton {res['triton']}; {P} programs x 4 warps, d {D}, "
          f"{cnt_on} of {D} inputs on; {args.launches} dependent launches a graph, median of 7\n")
    print("| variant | µs a launch | minus the previous |\n|---|---|---|")
    for v in range(13):
        prev = med[v - 1] if 0 < v < 5 else {0: None, 5: med[4], 6: med[2], 7: med[2]}.get(v, med[4])
        d = "" if prev is None else f"{med[v] - prev:+.3f}"
        print(f"| {names[v]} | {med[v]:.3f} | {d} |")
        res["us_per_launch"][names[v]] = round(med[v], 3)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compaction_phases.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
