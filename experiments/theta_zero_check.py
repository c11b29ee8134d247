"""θ = 0 equals the dense model: max |logit difference| between a teacher and its CWIC conversion with
θ = 0, after one statistics pass (so x̄ and σ are not trivial), on single chat prompts in fp32.

    python experiments/theta_zero_check.py [--model smollm2-135m-instruct] [--stripe 192]

Prints a line per prompt and a last-line JSON with the maximum.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain photosynthesis to a child in three sentences."]


def main(argv=None) -> int:
    import cwic_exp
    from cwic_exp.files import dumps as json_dumps
    from cwic_exp.modeling.modeling_cwic import cwic_context
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--stripe", type=int, default=192)
    a = p.parse_args(argv)
    model, tok = cwic_exp.load_teacher(a.model, dtype=torch.float32)
    model.eval()
    encs = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                        add_generation_prompt=True), return_tensors="pt") for q in PROMPTS]
    with torch.no_grad():
        refs = [model(**e).logits for e in encs]
        cwic_exp.to_cwic(model, stripe_size=a.stripe)
        for e in encs:
            with cwic_context(model, token_mask=e["attention_mask"], update_stats=True):
                model(**e)
        diffs = []
        print(f"{'prompt':<40} {'tokens':>6} {'max|Δlogit|':>12} {'max|logit|':>10}")
        for q, e, r in zip(PROMPTS, encs, refs):
            d = (model(**e).logits - r).abs().max().item()
            diffs.append(d)
            print(f"{q[:40]:<40} {e['input_ids'].shape[1]:>6} {d:>12.3e} {r.abs().max().item():>10.1f}")
    print(json_dumps({"model": a.model, "stripe": a.stripe, "max_abs_logit_diff": max(diffs),
                      "per_prompt": diffs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
