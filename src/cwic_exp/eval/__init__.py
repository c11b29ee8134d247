"""Evaluation: lm-eval benchmarks offline on our own model objects, compute per task and question,
KL / perplexity on held-out chat data; the TEAL baseline lives in cwic_exp.teal.

    python -m cwic_exp.eval method=teal sparsity=0.5 limit=50        # Hydra CLI, conf/eval/
    from cwic_exp.eval import evaluate_model                          # the same, from Python

Modules: data (offline benchmark files), tasks/ (lm-eval task YAMLs), lm (the lm-eval LM wrapper;
imports lm-eval), scoring (batched prefix-tree scoring; torch only), compute (active-parameter
meters), chat (ShareGPT calibration / held-out rows), table (the paper's Table 3 layout), run
(model building and the whole evaluation).
"""
from .compute import ComputeMeter, summarize
from .scoring import Request, ScoreResult, score_requests, token_ppl_kl


def __getattr__(name):  # lm-eval is heavy and absent on the GPU box: import it on first use
    if name in ("CwicLM", "run_lm_eval", "TASKS", "COLUMNS"):
        from . import lm
        return getattr(lm, name)
    if name in ("evaluate_model", "build_model"):
        from . import run
        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["ComputeMeter", "CwicLM", "Request", "ScoreResult", "build_model", "evaluate_model",
           "run_lm_eval", "score_requests", "summarize", "token_ppl_kl"]
