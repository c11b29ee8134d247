"""Build the model to evaluate (dense / TEAL / CWIC) and run the whole evaluation in process."""
from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from pathlib import Path

import torch

from .table import mean_all

log = logging.getLogger(__name__)


def pick_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _dtype(name) -> torch.dtype:
    return name if isinstance(name, torch.dtype) else getattr(torch, str(name))


def _weights_stamp(model_name: str) -> list | None:
    """(name, content fingerprint) of a local model's weight files, as `load_teacher` would read them; None for a
    hub id."""
    from ..teacher import resolve_model_source
    try:
        src = Path(resolve_model_source(model_name)["path"]).expanduser()
    except (FileNotFoundError, ValueError):
        return None
    if src.is_file():                       # a .gguf
        files = [src]
    elif src.is_dir():
        files = sorted(src.glob("*.safetensors")) + sorted(src.glob("*.bin"))
    else:
        files = []
    from ..files import fingerprint
    return [(f.name, fingerprint(f)) for f in files] or None


def teal_calibration(model, tok, model_name: str, calib_rows: int = 64, calib_seq_len: int = 512,
                     greedy: bool = True, greedy_rows: int = 16, max_sparsity: float = 0.7,
                     path: str | None = None, cache: bool = True):
    """TEAL calibration on ShareGPT head rows, cached under $CWIC_CACHE/teal keyed by its settings.
    `path`: load a calibration saved elsewhere (e.g. by the GPU run of experiments/eval_table.py)."""
    from ..teacher import cache_dir
    from ..teal import TealCalibration, apply_teal, calibrate_teal
    from .chat import calibration_rows
    rows = calibration_rows(tok, calib_rows, calib_seq_len)
    if path:
        calib = TealCalibration.from_state_dict(torch.load(path, weights_only=False))
        apply_teal(model)
        return calib, rows
    key = [model_name, calib_rows, calib_seq_len, greedy, greedy_rows, max_sparsity,
           str(next(model.parameters()).dtype), 1]
    stamp = _weights_stamp(model_name)      # a local model (folder, GGUF, the embedded one): its files' contents
    key = json.dumps(key + [stamp] if stamp else key)
    f = cache_dir() / "teal" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if cache and f.exists():
        log.info("TEAL: cached calibration %s", f)
        apply_teal(model)
        return TealCalibration.from_state_dict(torch.load(f, weights_only=False)), rows
    t0 = time.time()
    calib = calibrate_teal(model, rows, greedy=greedy, max_sparsity=max_sparsity, greedy_rows=greedy_rows)
    log.info("TEAL: calibrated in %.0f s", time.time() - t0)
    if cache:   # atomically: a cut file here broke every later evaluation
        from ..files import save_atomic
        save_atomic(calib.state_dict(), f)
    return calib, rows


def check_method(method: str, sparsity: float, teal: dict | None, checkpoint: str | None) -> None:
    """ValueError for a method, TEAL setting or missing checkpoint that cannot run, before anything loads (they used
    to raise after the teacher's load, the TEAL mode after a whole calibration)."""
    if method not in ("dense", "teal", "cwic"):
        raise ValueError(f"unknown method {method!r}: expected dense, teal or cwic")
    if method == "teal":
        mode = (teal or {}).get("mode", "greedy")
        if mode not in ("greedy", "uniform"):
            raise ValueError(f"unknown teal.mode {mode!r}: expected greedy or uniform")
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1) for method=teal, got {sparsity}")
    if method == "cwic" and not checkpoint:
        raise ValueError("method=cwic needs checkpoint=<folder saved by training>")


def build_model(model: str = "smollm2-135m-instruct", method: str = "dense", sparsity: float = 0.5,
                checkpoint: str | None = None, teal: dict | None = None, device: str = "auto",
                dtype: str = "float32"):
    """-> (model, tokenizer, info). method: dense | teal | cwic (a CWIC checkpoint folder)."""
    from .. import load_teacher
    check_method(method, sparsity, teal, checkpoint)
    device, dt = pick_device(device), _dtype(dtype)
    info = {"method": method, "model": model, "device": device, "dtype": str(dt).replace("torch.", "")}
    if method == "cwic":
        from ..teacher import check_checkpoint
        check_checkpoint(checkpoint, "checkpoint=")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        net = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dt).to(device).eval()
        try:
            tok = AutoTokenizer.from_pretrained(checkpoint)
        except (OSError, ValueError):   # a checkpoint saved without its tokenizer: the teacher's, if it fits
            tok = load_teacher(model, dtype=dt)[1]
            if len(tok) > net.config.vocab_size or net.config.vocab_size - len(tok) > 1024:
                raise ValueError(f"{checkpoint} has no tokenizer, and model={model}'s ({len(tok)} tokens) does not "
                                 f"fit its vocabulary ({net.config.vocab_size}): pass model=<the teacher it was "
                                 f"trained from>")
            warnings.warn(f"{checkpoint} has no tokenizer: using model={model}'s", stacklevel=2)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        info["checkpoint"] = checkpoint
        return net, tok, info
    net, tok = load_teacher(model, dtype=dt, device=device)
    if method == "dense":
        return net, tok, info
    from ..teal import apply_teal, teal_active_parameters, teal_thresholds
    t = dict(teal or {})
    mode, refit = t.pop("mode", "greedy"), t.pop("refit", True)
    calib, rows = teal_calibration(net, tok, model, greedy=(mode == "greedy"),
                                   max_sparsity=max(t.pop("max_sparsity", 0.7), sparsity + 0.02), **t)
    rows = rows.to(device)
    th = teal_thresholds(net, calib, sparsity, mode, refit_ids=rows if refit else None)
    apply_teal(net, th)
    meas = teal_active_parameters(net, rows)
    info.update({"teal_mode": mode, "target_sparsity": sparsity, "refit": refit,
                 "calib_sparsity": meas["sparsity"], "calib_apr": meas["apr"], "calib": calib.info})
    return net, tok, info


def evaluate_model(model, tok, tasks, limit=None, batch_tokens: int = 8192, row_tokens: int = 512,
                   chat: dict | None = None, teacher=None, progress: bool = False) -> dict:
    """Benchmarks (lm-eval, offline) + compute per task and question + chat KL / PPL.

    `teacher`: for the KL, a dense model, or a callable (ids, mask) -> logits; None: no KL.
    """
    from .lm import CwicLM, resolve_tasks, run_lm_eval
    t0 = time.time()
    names = resolve_tasks(tasks)
    lm = CwicLM(model, tok, batch_tokens=batch_tokens, row_tokens=row_tokens, progress=progress)
    metrics = run_lm_eval(lm, names, limit)
    compute = lm.compute_by_task()
    from .lm import TASKS
    out_tasks, act, ntok = {}, 0.0, 0
    for n in names:
        c = compute.get(TASKS[n], {})
        out_tasks[n] = dict(metrics[n])
        out_tasks[n].update({"apr": c.get("apr"), "active": c.get("active"), "tokens": c.get("tokens")})
        if n in ("arc_easy", "arc_challenge"):
            out_tasks[n]["per_question_active"] = c.get("per_question")
        act += c.get("active_sum", 0.0)
        ntok += c.get("tokens", 0)
    res = {"tasks": out_tasks, "all": mean_all(out_tasks), "apr": lm.dense * ntok / act if act else None,
           "dense_params": lm.dense, "limit": limit, "seconds": None}
    if chat and chat.get("enabled", True):
        from .chat import heldout_rows
        from .scoring import token_ppl_kl
        ids, mask = heldout_rows(tok, chat.get("conversations", 64), chat.get("seq_len", 1024))
        # no teacher: perplexity only (the model against itself would report a KL of 0)
        res["chat"] = token_ppl_kl(model, teacher if teacher is not None else model, ids, mask,
                                   batch_rows=chat.get("batch_rows", 4))
        if teacher is None:
            res["chat"] = {k: v for k, v in res["chat"].items() if not k.startswith("kl")}
        res["chat"]["conversations"] = int(ids.shape[0])
    res["seconds"] = time.time() - t0
    return res
