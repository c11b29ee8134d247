"""A stand-in CWIC checkpoint without training: SmolLM2 + statistics + one uniform threshold.

    python experiments/analyses/make_calibrated.py --apr 1.4 --threads 1

SmolLM2-135M-Instruct converted with stripe 192, running statistics gathered on ShareGPT training rows,
then θ = φ = c everywhere (the LM head: c × --head-scale) with c found by bisection so that the APR
on held-out rows is --apr. Untrained thresholds cost a lot of quality (measured before 2026-12-04, on the
old 256-token validation rows: APR 1.2× gives ½(FKL+RKL) ≈ 0.12, 1.4× ≈ 0.5, 2.5× ≈ 5.8 nats, the last one
gibberish). This is a magnitude threshold in whitened units (TEAL-like, uniform over matrices and stripes): it exercises the
chat and the analyses on the real model before a trained checkpoint exists. It is NOT a CWIC-trained
model; its per-stripe patterns are flat by construction. Writes the checkpoint (default
$CWIC_CACHE/calibrated/smollm2-apr<APR>) with `cwic_calibration.json` beside the weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import DEFAULT_DATA, add_common_args, dumps, heldout_rows, log, packed_batches, setup


@torch.no_grad()
def measure(model, batches, teacher_logits=None):
    import cwic_exp
    from cwic_exp.distill import kl_parts
    stats, fkl, rkl, n = None, 0.0, 0.0, 0
    for j, (kw, mask) in enumerate(batches):
        with cwic_exp.cwic_context(model, token_mask=mask, track_ap=True):
            out = model(**kw)
        s = cwic_exp.gather_active(model, mask)
        stats = s if stats is None else stats + s
        if teacher_logits is not None:
            f, r, c = kl_parts(out.logits, teacher_logits[j], mask)
            fkl, rkl, n = fkl + float(f), rkl + float(r), n + int(c)
    res = {"apr": float(stats.apr)}
    if teacher_logits is not None:
        res.update(kl=0.5 * (fkl + rkl) / n, fkl=fkl / n, rkl=rkl / n)
    return res


@torch.no_grad()
def set_threshold(model, c: float, head_scale: float = 1.0):
    import cwic_exp
    for m in cwic_exp.iter_cwic_modules(model):
        (m.theta if isinstance(m, cwic_exp.CwicLinear) else m.phi).fill_(c * (head_scale if m.kind == "head" else 1))


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), checkpoint=False)
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--apr", type=float, default=2.5)
    p.add_argument("--head-scale", type=float, default=0.5,
                   help="θ of the LM head = this × c (the head costs the most KL per APR gained)")
    p.add_argument("--stripe-size", type=int, default=192)
    p.add_argument("--stat-rows", type=int, default=16)
    p.add_argument("--eval-rows", type=int, default=4)
    p.add_argument("--save", default=None)
    args = p.parse_args(argv)
    setup(args)
    import cwic_exp
    from cwic_exp.data import build_packed
    from cwic_exp.teacher import cache_dir
    save = Path(args.save or cache_dir() / "calibrated" / f"smollm2-apr{args.apr:g}")
    model, tok = cwic_exp.load_teacher(args.teacher)
    teacher, _ = cwic_exp.load_teacher(args.teacher)
    cwic_exp.to_cwic(model, stripe_size=args.stripe_size)
    val, data_kw = heldout_rows(tok, rows=args.eval_rows)
    train, _ = build_packed(tok, path=None, cache=True, progress=False, **DEFAULT_DATA)
    log(f"statistics over {args.stat_rows} training rows of {DEFAULT_DATA['seq_len']} tokens")
    with torch.no_grad():
        for kw, mask in packed_batches(train.subset(slice(0, args.stat_rows)), 2):
            with cwic_exp.cwic_context(model, token_mask=mask, update_stats=True):
                model(**kw)
    batches = list(packed_batches(val, 2))
    with torch.no_grad():
        t_logits = [teacher(**kw).logits for kw, _ in batches]
    lo, hi = 0.0, 3.0
    for it in range(8):
        c = (lo + hi) / 2
        set_threshold(model, c, args.head_scale)
        apr = measure(model, batches)["apr"]
        log(f"θ = {c:.4f}: APR {apr:.3f}")
        lo, hi = (c, hi) if apr < args.apr else (lo, c)
        if abs(apr - args.apr) < 0.02:
            break
    res = measure(model, batches, t_logits)
    model.save_pretrained(save)
    tok.save_pretrained(save)
    meta = {"theta": c, "head_theta": c * args.head_scale, "target_apr": args.apr, **res, "stripe_size": args.stripe_size,
            "stat_rows": args.stat_rows, "eval_rows": args.eval_rows,
            "data": {"eval": data_kw, "statistics": DEFAULT_DATA},
            "note": "not trained: uniform threshold in whitened units after gathering statistics; "
                    "kl = ½(FKL+RKL) per token to the dense teacher on held-out rows"}
    (save / "cwic_calibration.json").write_text(dumps(meta, indent=1))
    log(dumps(meta))
    print(save)


if __name__ == "__main__":
    main()
