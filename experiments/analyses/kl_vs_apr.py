"""KL to the teacher vs APR over the training milestones.

    python experiments/analyses/kl_vs_apr.py --checkpoint runs/<run>/hf/final --threads 1
    python experiments/analyses/kl_vs_apr.py --checkpoints a/ b/ c/ --teacher smollm2-135m-instruct

The milestones are the run's HF exports runs/<run>/hf/apr_*x (written as the APR target passes 2.05×,
3.05×, …) plus hf/final. Each is measured on the same held-out rows (the held-out tail of the ShareGPT file, `common.heldout_rows`):
APR over the real tokens and ½(FKL + RKL) per token against the dense teacher named in the run's config
(FKL and RKL are kept too). The dense teacher is the point (1×, 0). When the run logged validation
metrics (logs/metrics.csv: val/apr, val/kl) they are drawn as the training trajectory.
Writes fig_kl_vs_apr.png and kl_vs_apr.csv / .json.
"""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import torch

from common import NOTE, add_common_args, dumps, heldout_rows, load_cwic, log, packed_batches, plt, positive_int, run_config, run_dir, save_json, setup


def milestones(final) -> list[Path]:
    """The run's exported APR milestones beside `final`, in APR order (the order training reached them), then `final`
    itself. `final` may be a milestone: the trajectory then stops there (the later ones, and hf/final, are left out)."""
    final = Path(final).resolve()
    ms = [p for p in final.parent.glob("apr_*x") if re.fullmatch(r"apr_\d+(\.\d+)?x", p.name)]
    ms.sort(key=lambda p: float(p.name[4:-1]))
    out = [p for p in ms if (p / "config.json").exists()]
    return (out[:out.index(final)] if final in out else out) + [final]


@torch.no_grad()
def measure(model, teacher, batches):
    import cwic_exp
    from cwic_exp.distill import kl_parts
    stats, fkl, rkl, n = None, 0.0, 0.0, 0
    for kw, mask in batches:
        with cwic_exp.cwic_context(model, token_mask=mask, track_ap=True):
            s_logits = model(**kw).logits
        st = cwic_exp.gather_active(model, mask)
        stats = st if stats is None else stats + st
        t_logits = teacher(**kw).logits
        f, r, c = kl_parts(s_logits, t_logits, mask)
        fkl, rkl, n = fkl + float(f), rkl + float(r), n + int(c)
    return {"apr": float(stats.apr), "kl": 0.5 * (fkl + rkl) / n, "fkl": fkl / n, "rkl": rkl / n, "tokens": n}


def training_log(ckpt) -> list[dict]:
    rd = run_dir(ckpt)
    f = rd / "logs" / "metrics.csv" if rd else None
    if not f or not f.exists():
        return []
    rows = []
    with open(f) as fh:
        for r in csv.DictReader(fh):
            if r.get("val/apr") and r.get("val/kl"):
                rows.append({"step": int(float(r.get("step") or 0)), "apr": float(r["val/apr"]),
                             "kl": float(r["val/kl"])})
    return rows


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--checkpoints", nargs="*", default=None, help="explicit list instead of the run's milestones")
    p.add_argument("--teacher", default=None, help="default: the run config's model.name, else SmolLM2")
    p.add_argument("--rows", type=positive_int, default=8)
    p.add_argument("--batch-size", type=positive_int, default=2)
    args = p.parse_args(argv)
    if args.checkpoints:
        args.checkpoint = args.checkpoint or args.checkpoints[-1]
    out = setup(args)
    import cwic_exp
    ckpts = [Path(c) for c in args.checkpoints] if args.checkpoints else milestones(args.checkpoint)
    cfg = run_config(ckpts[-1]) or {}
    teacher_name = args.teacher or cfg.get("model", {}).get("name") or "smollm2-135m-instruct"
    teacher, _ = cwic_exp.load_teacher(teacher_name, device=args.device)
    rows = [{"checkpoint": f"teacher ({teacher_name})", "apr": 1.0, "kl": 0.0, "fkl": 0.0, "rkl": 0.0}]
    data = None
    for c in ckpts:
        model, tok = load_cwic(c, args.device)
        if data is None:
            data, data_kw = heldout_rows(tok, args.rows)
            batches = list(packed_batches(data, args.batch_size, args.device))
        r = {"checkpoint": c.name, **measure(model, teacher, batches)}
        log(dumps(r))
        rows.append(r)
        del model
    with open(out / "kl_vs_apr.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["checkpoint", "apr", "kl", "fkl", "rkl", "tokens"])
        w.writeheader()
        w.writerows(rows)
    traj = training_log(ckpts[-1])
    save_json(out / "kl_vs_apr.json", {"teacher": teacher_name, "data": data_kw, "points": rows,
                                       "training_log": traj, "note": NOTE})
    P = plt()
    fig, ax = P.subplots(figsize=(7, 4.4))
    if traj:
        ax.plot([t["apr"] for t in traj], [t["kl"] for t in traj], color="#bbbbbb", marker=".", lw=1,
                label="training log (val/apr, val/kl)")
    ax.plot([r["apr"] for r in rows], [r["kl"] for r in rows], marker="o", color="#1f77b4",
            label="½(FKL+RKL), measured here")
    ax.scatter([r["apr"] for r in rows[1:]], [r["fkl"] for r in rows[1:]], marker="v", s=14, color="#2ca02c",
               label="FKL")
    ax.scatter([r["apr"] for r in rows[1:]], [r["rkl"] for r in rows[1:]], marker="^", s=14, color="#d62728",
               label="RKL")
    for r in rows:
        ax.annotate(r["checkpoint"].split(" ")[0], (r["apr"], r["kl"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("APR (active-parameter reduction, ×)")
    ax.set_ylabel("KL to the teacher per token (nats)")
    run = run_dir(ckpts[-1])
    ax.set_title(f"KL to the teacher vs APR · {run.name if run else ckpts[-1]} · {rows[-1].get('tokens', 0)} "
                 f"held-out tokens", fontsize=9)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, NOTE, fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "fig_kl_vs_apr.png", dpi=150)
    return rows


if __name__ == "__main__":
    main()
