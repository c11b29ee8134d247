"""Activation frequencies of the learned masks (paper Fig. 4, 7, 8), from one pass over held-out chat.

    python experiments/analyses/activation_frequency.py --checkpoint runs/<run>/hf/final --threads 1
    python experiments/analyses/activation_frequency.py --checkpoint runs/<run>/hf/final \
        --compare runs/<run>/hf/apr_2.05x          # Fig. 7 at two points of training

For every CWIC matrix the masks G[r, i] = H(|x_i - x̄_i| - θ[r,i]σ_i) (and the FFN unit masks M) are
recomputed from the layer's own inputs and thresholds on the real tokens of the held-out rows (the tail of
the ShareGPT file, `common.heldout_rows`: the same rows for every checkpoint), and counted; the totals are checked against the layers' own active-parameter counts.

Writes
- fig4_activation_frequency.png / .csv: active fraction of each matrix kind across layers (q, k, v, o,
  gate, up+down), plus the LM head's active fraction per vocabulary stripe;
- fig7_gate_heatmap.png / .json: stripe × input activation frequency of W_gate for a few layers
  (one column of panels per checkpoint with --compare);
- fig8_o_heads.png / .json: W_o stripe × input frequency for every layer, heads outlined, and the
  mean frequency per (layer, head).
"""
from __future__ import annotations

import argparse
import csv

import torch

from common import (NOTE, add_common_args, describe, dumps, heldout_rows, load_cwic, log, MaskRecorder,
                    packed_batches, plt, positive_int, save_json, setup)

KIND_ORDER = ["q", "k", "v", "o", "gate", "up+down"]
KIND_COLOURS = {"q": "#1f77b4", "k": "#ff7f0e", "v": "#2ca02c", "o": "#d62728", "gate": "#9467bd",
                "up+down": "#8c564b"}


def record(ckpt, rows, batch_size, device):
    model, tok = load_cwic(ckpt, device)
    data, data_kw = heldout_rows(tok, rows)
    rec = MaskRecorder(model)
    with rec:
        for kw, mask in packed_batches(data, batch_size, device):
            rec.run(kw, mask)
    gap = rec.check()
    log(f"{ckpt}: {rec.tokens} tokens; masks agree with the layers' counts (max rel. gap {gap:.1e})")
    return model, rec, data_kw


def per_kind_layer(rec) -> list[dict]:
    out = []
    for i, m in enumerate(rec.mods):
        out.append({"kind": m.kind, "layer": m.layer_idx, "density": rec.density(i),
                    "dense_params": m.dense_params})
    return out


def fig4(rec, label, out):
    rows = per_kind_layer(rec)
    with open(out / "fig4_activation_frequency.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["kind", "layer", "density", "dense_params"])
        w.writeheader()
        w.writerows(rows)
    P = plt()
    head = [i for i, m in enumerate(rec.mods) if m.kind == "head"]
    fig, axes = P.subplots(1, 2 if head else 1, figsize=(13 if head else 8, 4.2), squeeze=False,
                           gridspec_kw={"width_ratios": [3, 2]} if head else None)
    ax = axes[0, 0]
    for k in KIND_ORDER:
        pts = sorted((r["layer"], r["density"]) for r in rows if r["kind"] == k)
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label={"up+down": "FFN (up/down units)",
                                                          "gate": "FFN gate"}.get(k, k.upper()),
                    color=KIND_COLOURS[k])
    ax.set_xlabel("layer")
    ax.set_ylabel("activation frequency (active fraction)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"activation frequency per matrix type · {label}", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    if head:
        m = rec.mods[head[0]]
        f = rec.freq(head[0])                                   # (k, n)
        per_stripe = f.mean(1).numpy()
        bx = axes[0, 1]
        bx.plot(range(len(per_stripe)), per_stripe, color="#333")
        bx.set_xlabel(f"LM head stripe ({m.stripe_size} vocabulary rows each, vocabulary order)")
        bx.set_ylabel("activation frequency")
        bx.set_ylim(0, 1.02)
        bx.set_title(f"LM head: overall {rec.density(head[0]):.3f}", fontsize=10)
        save_json(out / "fig4_head_stripes.json", {"stripe_size": m.stripe_size, "freq": per_stripe.tolist()})
    fig.text(0.01, 0.01, NOTE, fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "fig4_activation_frequency.png", dpi=150)
    P.close(fig)
    return rows


def pick_layers(n_layers: int, n: int = 4) -> list[int]:
    return sorted(set(round(i * (n_layers - 1) / max(n - 1, 1)) for i in range(n)))


def fig7(recs, labels, out, layers=None):
    gates = [{m.layer_idx: i for i, m in enumerate(r.mods) if m.kind == "gate"} for r in recs]
    layers = layers or pick_layers(len(gates[0]))
    P = plt()
    fig, axes = P.subplots(len(layers), len(recs), figsize=(7.5 * len(recs), 1.3 * len(layers) + 0.8),
                           squeeze=False)
    data = {}
    for c, (r, g, lab) in enumerate(zip(recs, gates, labels)):
        data[lab] = {}
        for rr, L in enumerate(layers):
            f = r.freq(g[L]).numpy()
            data[lab][str(L)] = f.round(3).tolist()
            ax = axes[rr, c]
            im = ax.imshow(f, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax.set_yticks(range(f.shape[0]))
            ax.tick_params(labelsize=6)
            ax.set_ylabel(f"layer {L}\nstripe", fontsize=7)
            if rr == 0:
                ax.set_title(f"W_gate activation frequency · {lab}", fontsize=9)
            if rr == len(layers) - 1:
                ax.set_xlabel("input (residual-stream channel)", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="frequency an input passes its stripe threshold")
    fig.savefig(out / "fig7_gate_heatmap.png", dpi=150, bbox_inches="tight")
    P.close(fig)
    save_json(out / "fig7_gate_heatmap.json", {"layers": layers, "freq": data})


def fig8(model, rec, label, out):
    cfg = model.config
    H = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    o = {m.layer_idx: i for i, m in enumerate(rec.mods) if m.kind == "o"}
    layers = sorted(o)
    mats = [rec.freq(o[L]) for L in layers]                     # (k, H*hd) each
    k = mats[0].shape[0]
    img = torch.cat(mats, 0).numpy()
    per_head = torch.stack([m.view(k, H, hd).mean((0, 2)) for m in mats]).numpy()   # (L, H)
    P = plt()
    fig, (ax, bx) = P.subplots(1, 2, figsize=(15, 0.22 * len(layers) * k + 2),
                               gridspec_kw={"width_ratios": [4, 1]})
    im = ax.imshow(img, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    for h in range(1, H):
        ax.axvline(h * hd - 0.5, color="white", lw=0.6)
    for L in range(1, len(layers)):
        ax.axhline(L * k - 0.5, color="white", lw=0.6)
    ax.set_yticks([i * k + (k - 1) / 2 for i in range(len(layers))], [str(L) for L in layers], fontsize=6)
    ax.set_ylabel(f"layer ({k} output stripes each)")
    ax.set_xticks([h * hd + hd / 2 for h in range(H)], [f"head {h}" for h in range(H)], fontsize=7)
    ax.set_title(f"W_o activation frequency, stripe × input, heads outlined · {label}", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.5)
    im2 = bx.imshow(per_head, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    bx.set_xlabel("head")
    bx.set_ylabel("layer")
    bx.set_yticks(range(len(layers)), [str(L) for L in layers], fontsize=6)
    bx.set_title("mean per head", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "fig8_o_heads.png", dpi=150)
    P.close(fig)
    # how uniform is a head inside: mean over heads of the std of its channels' frequencies
    within = torch.stack([m.view(k, H, hd).std(2).mean() for m in mats]).tolist()
    across = [float(per_head[i].std()) for i in range(len(layers))]
    save_json(out / "fig8_o_heads.json", {"heads": H, "head_dim": hd, "stripes": k,
                                          "per_head_mean": per_head.round(3).tolist(),
                                          "within_head_std": within, "across_head_std": across,
                                          "freq": {str(L): m.numpy().round(3).tolist() for L, m in zip(layers, mats)}})


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--compare", nargs="*", default=[], help="more checkpoints for Fig. 7 (e.g. a milestone)")
    p.add_argument("--rows", type=positive_int, default=8, help="held-out rows (of 512 tokens: common.heldout_rows)")
    p.add_argument("--batch-size", type=positive_int, default=2)
    args = p.parse_args(argv)
    out = setup(args)
    model, rec, data_kw = record(args.checkpoint, args.rows, args.batch_size, args.device)
    label = describe(args.checkpoint)
    rows = fig4(rec, label, out)
    fig8(model, rec, label, out)
    # earlier checkpoints (e.g. milestones) on the left, this one on the right
    recs = [record(c, args.rows, args.batch_size, args.device)[1] for c in args.compare] + [rec]
    fig7(recs, [describe(c) for c in args.compare] + [label], out)
    summary = {"checkpoint": str(args.checkpoint), "tokens": rec.tokens, "data": data_kw,
               "density_by_kind": {k: sum(r["density"] * r["dense_params"] for r in rows if r["kind"] == k)
                                   / sum(r["dense_params"] for r in rows if r["kind"] == k)
                                   for k in KIND_ORDER + ["head"] if any(r["kind"] == k for r in rows)}}
    save_json(out / "activation_frequency_summary.json", summary)
    log(dumps(summary["density_by_kind"]))
    return summary


if __name__ == "__main__":
    main()
