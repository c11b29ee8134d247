"""python -m cwic_exp.eval [overrides]: one model on the benchmarks; JSON + Table-3 markdown.

    python -m cwic_exp.eval limit=20                                   # dense SmolLM2, quick
    python -m cwic_exp.eval method=teal sparsity=0.4 teal.mode=uniform
    python -m cwic_exp.eval method=cwic checkpoint=<folder> tasks=[arc_easy,arc_challenge]

Config: conf/eval/config.yaml. The last stdout line is JSON (`cli_summary`): each task's Table 3 metric (acc_norm;
WinoGrande's acc), `all`, `apr`, and the chat's `kl` / `ppl` when measured.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ..files import dumps as json_dumps, write_text_atomic

CONF = Path(__file__).resolve().parents[3] / "conf" / "eval"
log = logging.getLogger("cwic_exp.eval")


def check_config(c: dict) -> None:
    """ConfigError (one line) for what would fail late or run something else than asked, before anything loads."""
    import torch
    from ..config import ConfigError
    from ..teacher import check_checkpoint
    from .lm import resolve_tasks
    from .run import check_method
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))
    extra = sorted(set(c) - set(defaults)) + sorted(f"{g}.{k}" for g in ("teal", "chat") if isinstance(c.get(g), dict)
                                                   for k in set(c[g]) - set(defaults[g]))
    if extra:
        raise ConfigError(f"unknown key(s) {', '.join(extra)}: not in conf/eval/config.yaml, so nothing would read "
                          f"them")
    try:
        check_method(c["method"], c["sparsity"], c["teal"], c["checkpoint"])
        resolve_tasks(c["tasks"])
        if c["method"] == "cwic":
            check_checkpoint(c["checkpoint"], "checkpoint=")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    lim = c["limit"]   # lm-eval's own meaning: a count of questions, or below 1 a fraction of each task
    number = isinstance(lim, (int, float)) and not isinstance(lim, bool)
    if lim is not None and not (number and (0 < lim < 1 or (lim >= 1 and float(lim).is_integer()))):
        raise ConfigError(f"limit must be a number of questions ≥ 1, a fraction of each task in (0, 1), or null "
                          f"(the full sets), got {lim!r}")
    dt = getattr(torch, str(c["dtype"]), None)
    if not (isinstance(dt, torch.dtype) and dt.is_floating_point):
        raise ConfigError(f"dtype must name a torch floating-point type (float32, bfloat16, float16, ...), got "
                          f"{c['dtype']!r}")
    dev = str(c["device"])
    if dev != "auto":
        try:
            kind = torch.device(dev).type
        except (RuntimeError, ValueError):
            raise ConfigError(f"device must be auto or a torch device (cpu, cuda, cuda:N, mps), got {dev!r}") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={dev} but no CUDA device is visible; use device=cpu (or auto)")


def default_name(c: dict) -> str:
    """The output files' stem: the method, what it ran on and any limit, so that two evaluations do not share one
    (every CWIC checkpoint wrote cwic.json, every dense model dense.json)."""
    from ..config import folder_name
    head = {"dense": "dense", "cwic": "cwic", "teal": f"teal-{c['teal']['mode']}-{int(round(c['sparsity'] * 100))}"}
    return folder_name(f"{head[c['method']]}-{model_label(c)}" + (f"-limit{c['limit']}" if c["limit"] else ""))


def model_label(c: dict) -> str:
    """What was evaluated: the model's folder or hub name; a training export runs/<run>/hf/<name> as <run>-<name>."""
    if c["method"] != "cwic":
        return Path(str(c["model"])).name
    p = Path(str(c["checkpoint"])).resolve()    # hf/final from inside the run's folder names the run too
    return f"{p.parent.parent.name}-{p.name}" if p.parent.name == "hf" else p.name


def main(cfg: DictConfig) -> dict:
    import torch
    from ..teal import teal_disabled
    from .run import build_model, evaluate_model
    from .table import compute_table, table3
    c = OmegaConf.to_container(cfg, resolve=True)
    check_config(c)
    torch.manual_seed(0)
    model, tok, info = build_model(c["model"], c["method"], c["sparsity"], c["checkpoint"],
                                   c["teal"],
                                   c["device"], c["dtype"])
    teacher = model if c["method"] == "dense" else None     # the dense model is the teacher: its KL is 0
    if c["method"] == "teal":
        def teacher(ids, am):
            with teal_disabled(model):
                return model(input_ids=ids, attention_mask=am).logits
    elif c["method"] == "cwic":
        from .. import load_teacher
        # teacher= if given; else the teacher the checkpoint was distilled from (its config.json names it) where
        # that name resolves here (a local path from the training machine may not); else `model`
        from ..teacher import resolve_model_source
        name, named = c.get("teacher"), getattr(model.config, "cwic_teacher", None)
        if not name and named:
            try:
                resolve_model_source(named)
                name = named
            except (FileNotFoundError, ValueError):
                log.warning("the checkpoint names its teacher %s, which is not here: KL against model=%s "
                            "(teacher=... names another)", named, c["model"])
        name = name or c["model"]
        teacher = load_teacher(name, dtype=next(model.parameters()).dtype,
                               device=next(model.parameters()).device)[0]
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the teacher {name} has a vocabulary of {teacher.config.vocab_size}, the checkpoint "
                             f"{model.config.vocab_size}: pass teacher=<the model it was distilled from>")
        info["teacher"] = name
    res = evaluate_model(model, tok, c["tasks"], c["limit"], c["batch_tokens"], c["row_tokens"],
                         c["chat"], teacher, c["progress"])
    res.update(info)
    res["config"] = c
    technique = {"dense": "", "teal": f"TEAL ({c['teal']['mode']})", "cwic": "CWIC"}[c["method"]]
    row = {"model": model_label(c), "technique": technique, "step": "_", **res}
    if c["method"] == "teal":
        row["target_sparsity"] = c["sparsity"]
    name = c["name"] or default_name(c)
    out = Path(c["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{name}.json", json_dumps(res, indent=1, default=str))
    md = [f"# {name}", "", f"limit: {c['limit'] or 'full sets'}; device {info['device']}, {info['dtype']}", "",
          table3([row]), "", compute_table([row]), ""]
    write_text_atomic(out / f"{name}.md", "\n".join(md))
    print(table3([row]))
    print(f"wrote {out / name}.json and .md", file=sys.stderr)
    summary = cli_summary(res)
    print(json_dumps(summary))
    return summary


def cli_summary(res: dict) -> dict:
    """The CLI's last JSON line: each task's Table 3 metric (acc_norm, WinoGrande's acc), all, APR, chat KL/PPL."""
    from .table import metric_of
    summary = {t: v.get(metric_of(t, "acc_norm")) for t, v in res["tasks"].items()}
    summary.update({"all": res["all"], "apr": res["apr"]})
    if "chat" in res:
        summary.update({"kl": res["chat"].get("kl_fwd"), "ppl": res["chat"]["ppl"]})
    return summary


@hydra.main(config_path=str(CONF), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    from ..config import ConfigError
    try:
        main(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not CONF.is_dir():   # a non-editable install: the configs stay in the project's clone
        raise SystemExit(f"python -m cwic_exp.eval reads its configs from the project's conf/eval ({CONF} is "
                         f"missing): run it from a clone, installed with `pip install -e .` (make setup does)")
    _hydra_main()
