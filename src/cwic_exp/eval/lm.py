"""lm-evaluation-harness on our own model object, in process, with compute accounting.

`CwicLM(model, tokenizer)` is an lm-eval `TemplateLM`: lm-eval builds the prompts and scores the
answers; we tokenise exactly as its HFLM does (context/continuation split of the whole string,
trailing context spaces moved to the continuation, no special tokens) and compute log-likelihoods with
`scoring.score_requests` on whatever the model is: dense, TEAL-sparsified or CWIC. Each request is
tagged with its (task, doc_id), so the active parameters come out per question and per task.

The scorer is pluggable: the GPU run of experiments/eval_table.py records the tokenised requests
here (`RecordingScorer`), scores them on a machine without lm-eval, and replays the results through
the same lm-eval tasks and metrics (`ReplayScorer`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from lm_eval.api.model import TemplateLM

from .compute import ComputeMeter
from .scoring import Request, ScoreResult, score_requests

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
# short name -> our offline lm-eval task; the paper's Table 3 column order
TASKS = {"mmlu": "cwic_mmlu", "winogrande": "cwic_winogrande", "arc_challenge": "cwic_arc_challenge",
         "hellaswag": "cwic_hellaswag", "arc_easy": "cwic_arc_easy", "openbookqa": "cwic_openbookqa",
         "piqa": "cwic_piqa"}
COLUMNS = {"mmlu": "mmlu", "winogrande": "wg", "arc_challenge": "arc:c", "hellaswag": "HS",
           "arc_easy": "arc:e", "openbookqa": "obqa", "piqa": "piqa"}


def task_manager():
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def resolve_tasks(names) -> list[str]:
    out = []
    for n in names:
        n = str(n)
        if n in TASKS:
            out.append(n)
        elif n in TASKS.values():
            out.append({v: k for k, v in TASKS.items()}[n])
        else:
            raise ValueError(f"unknown task {n!r}: expected one of {list(TASKS)}")
    return out


class ModelScorer:
    """Scores requests on a model in this process."""

    def __init__(self, model, pad_id: int = 0, row_tokens: int = 512, batch_tokens: int = 8192,
                 meter: ComputeMeter | None = None, progress: bool = False):
        self.model, self.pad_id = model, pad_id
        self.row_tokens, self.batch_tokens, self.progress = row_tokens, batch_tokens, progress
        self.meter = meter

    def __call__(self, requests: list[Request]) -> ScoreResult:
        return score_requests(self.model, requests, self.meter, self.row_tokens, self.batch_tokens,
                              self.pad_id, progress=self.progress)


class RecordingScorer:
    """Keeps the tokenised requests, returns placeholders (a dry run of lm-eval)."""

    def __init__(self):
        self.requests: list[Request] = []

    def __call__(self, requests):
        self.requests.extend(requests)
        n = len(requests)
        return ScoreResult([0.0] * n, [False] * n, {}, {}, 0.0, 1.0, 0)


class ReplayScorer:
    """Answers from results computed elsewhere: {request key: (logprob, greedy)} plus per-group
    active parameters and tokens."""

    def __init__(self, results: dict, group_active: dict, group_tokens: dict, dense: float):
        self.results, self.g_active, self.g_tokens, self.dense = results, group_active, group_tokens, dense

    def __call__(self, requests):
        missing = [r.key for r in requests if r.key not in self.results]
        if missing:
            raise KeyError(f"{len(missing)} requests have no stored result, e.g. {missing[:3]}: the "
                           f"stored run covered other tasks, limits or tokenisation")
        lp = [self.results[r.key][0] for r in requests]
        unscored = [r.key for r, v in zip(requests, lp) if v != v]
        if unscored:   # a subset run's rest (or a model's NaN): lm-eval's argmax would pick the first choice
            raise ValueError(f"{len(unscored)} requests have a NaN log-likelihood, e.g. {unscored[:3]}: the stored "
                             f"run did not score them (a subset run, --limit) or its model gave NaN")
        gr = [self.results[r.key][1] for r in requests]
        groups = {r.group for r in requests}
        ga = {g: self.g_active[g] for g in groups}
        gt = {g: self.g_tokens[g] for g in groups}
        return ScoreResult(lp, gr, ga, gt, sum(ga.values()), self.dense, sum(gt.values()))


class CwicLM(TemplateLM):
    """lm-eval LM over an in-process model object (or any scorer); records compute per question."""

    def __init__(self, model=None, tokenizer=None, scorer=None, batch_tokens: int = 8192,
                 row_tokens: int = 512, progress: bool = False):
        super().__init__()
        if tokenizer is None:
            raise ValueError("CwicLM needs the model's tokenizer")
        self.tokenizer = tokenizer
        self.model = model
        from ..data import pad_id
        pad = pad_id(tokenizer)
        self.scorer = scorer or ModelScorer(model, pad, row_tokens, batch_tokens, progress=progress)
        self._pending: list | None = None
        self.group_active: dict = {}
        self.group_tokens: dict = {}
        self.dense = None

    # --- tokenisation, as lm-eval's HFLM
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        """As HFLM.tok_encode: None leaves the tokenizer's own default (Llama 3 prepends <|begin_of_text|>, SmolLM2
        adds nothing), except for a string that already starts with the BOS text."""
        if add_special_tokens is None:
            bos = getattr(self.tokenizer, "bos_token", None)
            if bos and string.startswith(bos):
                return self.tokenizer.encode(string, add_special_tokens=False)
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, **kw) -> str:
        return self.tokenizer.decode(tokens)

    # --- scoring
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._pending = [(r.task_name, r.doc_id, r.idx) for r in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=True)
        finally:
            self._pending = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        keys = self._pending or [("_", i, 0) for i in range(len(requests))]
        reqs = []
        for (_, ctx, cont), key in zip(requests, keys):
            reqs.append(Request(list(ctx), list(cont), group=tuple(key[:2]), key=tuple(key)))
        res = self.scorer(reqs)
        for g, a in res.group_active.items():
            self.group_active[g] = self.group_active.get(g, 0.0) + a
            self.group_tokens[g] = self.group_tokens.get(g, 0) + res.group_tokens[g]
        self.dense = res.dense
        return list(zip(res.logprob, res.greedy))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("CwicLM scores multiple-choice tasks only")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("CwicLM scores multiple-choice tasks only")

    # --- compute per task / question
    def compute_by_task(self) -> dict:
        """task -> {apr, active (per token), tokens, questions, per_question: {doc_id: active/token}}."""
        out: dict = {}
        for (task, doc), a in self.group_active.items():
            t = out.setdefault(task, {"active_sum": 0.0, "tokens": 0, "per_question": {}})
            n = self.group_tokens[(task, doc)]
            t["active_sum"] += a
            t["tokens"] += n
            t["per_question"][int(doc)] = a / max(n, 1)
        for t in out.values():
            t["active"] = t["active_sum"] / max(t["tokens"], 1)
            t["apr"] = self.dense / t["active"] if t["active"] else float("nan")
            t["questions"] = len(t["per_question"])
        return out


def run_lm_eval(lm: CwicLM, tasks, limit=None, verbosity: str = "ERROR") -> dict:
    """lm-eval's simple_evaluate on our tasks (offline). Returns {short task name: metrics dict}."""
    from lm_eval import simple_evaluate
    names = resolve_tasks(tasks)
    res = simple_evaluate(model=lm, tasks=[TASKS[n] for n in names], task_manager=task_manager(),
                          limit=limit, bootstrap_iters=0, log_samples=False, verbosity=verbosity,
                          random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    out = {}
    for n in names:
        r = res["results"][TASKS[n]]
        out[n] = {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and not k.endswith("stderr,none")}
        out[n]["samples"] = res.get("n-samples", {}).get(TASKS[n], {}).get("effective")
    return out
