"""Results in the paper's Table 3 layout (acc_norm × 100, acc for WinoGrande; "all" = mean of the seven tasks)."""
from __future__ import annotations

import math

ORDER = ("mmlu", "winogrande", "arc_challenge", "hellaswag", "arc_easy", "openbookqa", "piqa")
HEAD = {"mmlu": "mmlu", "winogrande": "wg", "arc_challenge": "arc:c", "hellaswag": "HS",
        "arc_easy": "arc:e", "openbookqa": "obqa", "piqa": "piqa"}


# lm-eval reports acc alone for WinoGrande (the paper's column); its acc_norm here would divide each choice's
# log-likelihood by the length of the filled-in context, and the two contexts differ in 1,039 of 1,267 documents
TASK_METRIC = {"winogrande": "acc"}


def metric_of(task: str, metric: str) -> str:
    """The metric a Table 3 column reads: `metric`, except WinoGrande's acc where acc_norm is asked."""
    return TASK_METRIC.get(task, metric) if metric == "acc_norm" else metric


def _f(x, scale=100.0, nd=1):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * scale:.{nd}f}"


def table3(rows: list[dict], metric: str = "acc_norm") -> str:
    """rows: {model, technique, step, apr, tasks: {name: {acc_norm, ...}}, all}. Markdown."""
    lines = ["| Model | Technique | Step | Multiplier | all | " + " | ".join(HEAD[t] for t in ORDER) + " |",
             "|---|---|---|---|---|" + "---|" * len(ORDER)]
    for r in rows:
        cells = [r.get("model", ""), r.get("technique", ""), str(r.get("step", "_")),
                 f"{r['apr']:.2f}x" if r.get("apr") else "–", _f(r.get("all"))]
        cells += [_f(r["tasks"][t].get(metric_of(t, metric))) if t in r["tasks"] else "–" for t in ORDER]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compute_table(rows: list[dict]) -> str:
    """Measured compute per task (APR over each task's processed tokens), TEAL's realised sparsity
    on its calibration rows, and KL / perplexity on held-out chat data."""
    lines = ["| Technique | target | sparsity (calib) | APR all | " + " | ".join(HEAD[t] for t in ORDER)
             + " | KL(teacher‖model) | ½(FKL+RKL) | PPL |",
             "|---|---|---|---|" + "---|" * len(ORDER) + "---|---|---|"]
    for r in rows:
        chat = r.get("chat") or {}
        cells = [r.get("technique", ""), _f(r.get("target_sparsity"), 100, 0) + "%" if r.get("target_sparsity") is not None else "–",
                 _f(r.get("calib_sparsity"), 100, 1) + "%" if r.get("calib_sparsity") is not None else "–",
                 f"{r['apr']:.3f}" if r.get("apr") else "–"]
        cells += [f"{r['tasks'][t]['apr']:.3f}" if t in r["tasks"] and r["tasks"][t].get("apr") else "–"
                  for t in ORDER]
        cells += [_f(chat.get("kl_fwd"), 1, 4), _f(chat.get("kl_sym"), 1, 4), _f(chat.get("ppl"), 1, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_all(tasks: dict, metric: str = "acc_norm") -> float | None:
    """Mean over the tasks present (the paper's "all" when all seven are there)."""
    vals = [tasks[t].get(metric_of(t, metric)) for t in ORDER if t in tasks]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None
