"""Compute per token over a chat (paper Fig. 5 / 9), and the chat capture PNG.

    python experiments/analyses/token_compute.py --checkpoint runs/<run>/hf/final --threads 1
    python experiments/analyses/token_compute.py --transcript chat.json    # a saved `cwic_exp.chat --json`

Runs a scripted multi-turn chat through the same `ChatSession` as `python -m cwic_exp.chat` (greedy,
KV cache kept, figures from the generation itself), then writes: the transcript (JSON) and its HTML page,
`chat_capture.png` (the coloured conversation drawn with matplotlib, same colours as the terminal),
`fig9_token_compute.png` (active parameters of every token along the conversation, by token category:
template/special, role names, system prompt, user text, assistant reply) and the category means (CSV).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from common import NOTE, add_common_args, describe, dumps, load_cwic, log, plt, setup

PROMPTS = [
    "What is the distance between the points (5,8) and (9,9)?",
    "Write a haiku about the sea.",
    "Name three uses of copper and explain one of them in a sentence.",
]
CATS = ["special", "role", "system", "user", "assistant"]
CAT_COLOURS = {"special": "#999999", "role": "#8c564b", "system": "#9467bd", "user": "#2ca02c",
               "assistant": "#1f77b4"}


ROLES = ("system", "user", "assistant")


def special_ids(tok) -> set[int]:
    """The ids categorised as template: the tokenizer's special tokens and every added token flagged special (an
    added <|im_end|> that is not bos, eos or pad is missing from `all_special_ids`)."""
    added = getattr(tok, "added_tokens_decoder", None) or {}
    return set(tok.all_special_ids) | {i for i, a in added.items() if getattr(a, "special", False)}


def categorise(tr: dict, special: set[int]) -> list[tuple[dict, str]]:
    """Every token of the conversation with its category. Role headers are read as ChatML's
    `<|im_start|>role\\n` and Llama 3's `<|start_header_id|>role<|end_header_id|>\\n\\n`: the header's text tokens are
    "role" (a name split over several tokens too), the content up to the closing special token (`<|im_end|>`,
    `<|eot_id|>`) takes the role's category, and what follows that token until the next header is template."""
    out = []
    for k, t in enumerate(tr["turns"]):
        # a later turn's prompt starts where the cache stopped: inside the previous reply
        role, in_role, name = ("user" if k == 0 else "assistant"), False, ""
        for tok in t["prompt"]:
            text = tok["text"]
            if tok["id"] in special:
                out.append((tok, "special"))
                if "end_header" in text:     # Llama 3: the role name is behind, its newline ahead
                    continue
                in_role = ("im_start" in text or "start_header" in text
                           or text.strip() in ("<s>", "<|begin_of_text|>"))
                name = ""
                if "im_end" in text or "eot" in text:
                    role = None          # template glue until the next role header
                continue
            if in_role:
                out.append((tok, "role"))
                name += text
                if "\n" in text:        # the header ends: its name, whole
                    role = name.strip() if name.strip() in ROLES else role
                    in_role, name = False, ""
                continue
            out.append((tok, role or "special"))
        out += [(tok, "assistant") for tok in t["reply"]]
    return out


def run_chat(ckpt, prompts, max_new_tokens, device):
    from cwic_exp.chat import ChatSession, HFBackend
    model, tok = load_cwic(ckpt, device)
    chat = ChatSession(HFBackend(model, device), tok, max_new_tokens=max_new_tokens, temperature=0.0,
                       notice=log)
    chat.calibrate()
    for p in prompts:
        t = chat.turn(p)
        log(f"turn: {t.reply_text[:80]!r}… {t.summary['tokens']} tokens, APR {t.summary['apr']:.2f}")
    return chat.transcript(str(ckpt)), special_ids(tok)


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--transcript", default=None, help="render this chat JSON instead of chatting")
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--width", type=int, default=110)
    p.add_argument("--tokenizer", default=None,
                   help="with --transcript: the tokenizer whose special tokens are template (default: the transcript's "
                        "model, which may be a path on another machine)")
    args = p.parse_args(argv)
    if args.transcript:
        args.checkpoint = args.checkpoint or "(transcript)"
    out = setup(args)
    from cwic_exp.chat import _YLGNBU, fmt_params, to_html
    from render import render_png, transcript_segments
    if args.transcript:
        tr = json.loads(Path(args.transcript).read_text())
        from transformers import AutoTokenizer
        special = special_ids(AutoTokenizer.from_pretrained(args.tokenizer or tr["model"]))
        label = tr["model"]
    else:
        tr, special = run_chat(args.checkpoint, args.prompt or PROMPTS, args.max_new_tokens, args.device)
        label = describe(args.checkpoint)
        (out / "chat_transcript.json").write_text(dumps(tr, ensure_ascii=False, indent=1))
        (out / "chat_transcript.html").write_text(to_html(tr, f"CWIC chat — {label}"), encoding="utf-8")
    sc = tr["scale"]
    segs, foot = transcript_segments(tr)
    render_png(segs, out / "chat_capture.png", width=args.width, title=f"CWIC chat · {label}",
               legend=(f"little compute {fmt_params(sc['lo'])}", _YLGNBU,
                       f"{fmt_params(sc['hi'])} much compute  (dense {fmt_params(sc['dense'])})"),
               footer=foot + [NOTE, "token colour = active parameters of the forward pass that processed it"])

    toks = categorise(tr, special)
    dense = tr["dense"]
    rows = []
    for c in CATS:
        v = [t["ap"] for t, cat in toks if cat == c]
        if v:
            rows.append({"category": c, "tokens": len(v), "mean_active": sum(v) / len(v),
                         "apr": dense * len(v) / sum(v)})
    with open(out / "token_compute_by_category.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["category", "tokens", "mean_active", "apr"])
        w.writeheader()
        w.writerows(rows)
    with open(out / "token_compute_tokens.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "id", "text", "category", "active"])
        for i, (t, c) in enumerate(toks):
            w.writerow([i, t["id"], t["text"], c, t["ap"]])

    P = plt()
    fig, (ax, bx) = P.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [4, 1]})
    xs = range(len(toks))
    ax.plot(xs, [t["ap"] / 1e6 for t, _ in toks], color="#cccccc", lw=0.6, zorder=1)
    for c in CATS:
        pts = [(i, t["ap"] / 1e6) for i, (t, cat) in enumerate(toks) if cat == c]
        if pts:
            ax.scatter(*zip(*pts), s=7, color=CAT_COLOURS[c], label=c, zorder=2)
    ax.axhline(dense / 1e6, color="k", ls="--", lw=0.8, label="dense")
    ax.set_xlabel("token position in the conversation")
    ax.set_ylabel("active parameters (M)")
    ax.set_title(f"compute per token · {label}", fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    bx.bar([r["category"] for r in rows], [r["mean_active"] / 1e6 for r in rows],
           color=[CAT_COLOURS[r["category"]] for r in rows])
    bx.set_ylabel("mean active parameters (M)")
    bx.tick_params(axis="x", rotation=45)
    fig.text(0.01, 0.01, NOTE, fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "fig9_token_compute.png", dpi=150)
    log(dumps(rows))
    return rows


if __name__ == "__main__":
    main()
