#!/usr/bin/env python
"""`make reproduce-mini`: the paper's central claims at small scale (SmolLM2-135M, stripe 192).

Stages (each skipped when its output exists, so a re-run continues):

  gpu     on a GPU machine: the main CWIC run (APR warm-up to 6.05×, HF exports at 2.05/3.05/...),
          the ablations (no stripes, no STE, MSE) to 3.05×, then scoring of the dense teacher, every
          CWIC export and TEAL (greedy) at the APR each CWIC milestone measured, on the evaluation
          requests of `experiments/eval_table.py prepare` (lm-eval's own requests), plus KL to the
          teacher and per-question compute. Writes <out>/scores_<group>.pt.
  teal    TEAL (greedy or uniform) at each CWIC milestone's measured APR, on the same requests: the full sets
          on a GPU, or the first --limit documents of every task on a CPU (`gpu --then-teal` runs it after gpu).
  finish  here: lm-eval metrics from the stored log-likelihoods (ReplayScorer), the paper-layout
          table, the ablation table, plots (score vs APR, KL vs APR, ARC-Easy vs ARC-Challenge
          compute) into experiments/results/mini/.
  retable here: the same README, tables and plots again from results.json alone (after a change of
          the tables' metrics), each row's "all" recomputed.

    # on the offline GPU box (see README "On an offline GPU machine"):
    python3 experiments/reproduce_mini.py gpu --group main --out $OUT
    python3 experiments/reproduce_mini.py gpu --group ablations --out $OUT
    # here:
    python experiments/reproduce_mini.py finish --scores <dir with scores_*.pt>
    python experiments/reproduce_mini.py retable
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))
from cwic_exp.files import dumps as json_dumps, save_atomic  # noqa: E402

log = logging.getLogger("reproduce_mini")

# name -> (overrides, role). Schedules sized for about 20 GPU-minutes in all on an H100.
JOBS = {
    "main": {"mini_cwic": ["+experiment=mini"]},
    "ablations": {"ablation_nostripes": ["+experiment=ablation_nostripes"],
                  "ablation_noste": ["+experiment=ablation_noste"],
                  "ablation_mse": ["+experiment=ablation_mse"]},
}
JOBS["all"] = {**JOBS["main"], **JOBS["ablations"]}
CHOICES = {"winogrande": 2, "piqa": 2}   # answer options per task for the chance line (others: 4)
LABELS = {"mini_cwic": "CWIC", "ablation_nostripes": "CWIC no stripes", "ablation_noste": "CWIC no STE",
          "ablation_mse": "CWIC + MSE"}


# ----------------------------------------------------------------------------- gpu stage

def train_jobs(jobs: dict, work: Path, teacher: str, data: str, minutes: float, extra: list[str],
               parallel: bool) -> dict:
    """Run (or resume, or skip) each training job; with `parallel` all at once on the one GPU (a 135M
    student leaves most of an H100 idle, so concurrent runs add throughput). Returns name -> summary."""
    done, procs = {}, {}
    for name, overrides in jobs.items():
        summ = work / name / "summary.json"
        if summ.exists() and json.loads(summ.read_text()).get("finished", True):
            log.info("%s: done already", name)
            done[name] = json.loads(summ.read_text())
            continue
        # an unfinished run (stopped by --minutes) resumes from its last checkpoint; --minutes caps each call
        # (trainer.max_minutes counts from each start), so a resumed run gets the full budget again
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"run_name={name}", f"out_dir={work}",
               f"model.name={teacher}", "data.source=packed", f"data.path={data}",
               f"trainer.max_minutes={minutes}", "logger.csv=true", *extra]
        log.info("train: %s", " ".join(cmd))
        f = open(work / f"{name}.log", "a")
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT), f,
                       time.time())
        if not parallel:
            done[name] = _wait(name, *procs.pop(name), work)
    for name, (p, f, t0) in procs.items():
        done[name] = _wait(name, p, f, t0, work)
    return {n: done[n] for n in jobs}


def _wait(name, p, f, t0, work: Path) -> dict:
    stdout, _ = p.communicate()
    f.close()
    if p.returncode != 0:
        raise RuntimeError(f"training {name} failed ({p.returncode}); see {work / f'{name}.log'}")
    out = json.loads(stdout.strip().splitlines()[-1])
    out["wall_s_call"] = round(time.time() - t0, 1)
    return out


def teal_for_apr(model, cal, calib, target_apr: float, mode: str = "greedy"):
    """The TEAL sparsity whose measured APR on the calibration rows matches `target_apr` (bisection)."""
    from cwic_exp.teal import apply_teal, teal_active_parameters, teal_thresholds
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (lo + hi) / 2
        th = teal_thresholds(model, cal, mid, mode, refit_ids=calib)
        apply_teal(model, th)
        apr = teal_active_parameters(model, calib)["apr"]
        best = (mid, th, apr) if best is None or abs(apr - target_apr) < abs(best[2] - target_apr) else best
        if apr < target_apr:
            lo = mid
        else:
            hi = mid
    return best


def scoring_autocast(dev: str, dtype: str):
    """(amp on?, a context factory): scoring under `dtype` autocast on a GPU (fp32 weights), none on a CPU."""
    amp = dev == "cuda" and dtype != "float32"
    return amp, lambda: torch.autocast("cuda", dtype=getattr(torch, dtype), enabled=amp)


def gpu(args) -> None:
    if args.group == "all" and not args.parallel:
        # one group after the other, each trained then scored: what finishes first is usable first
        for sub in ("main", "ablations"):   # the main group runs TEAL greedy itself (score_all)
            gpu(argparse.Namespace(**{**vars(args), "group": sub, "then_teal": None}))
        return
    from eval_table import _load_bundle, unpack_requests
    from cwic_exp.teal import apply_teal
    from cwic_exp.teacher import load_teacher
    import cwic_exp  # noqa: F401  (registers the CWIC model type)

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # --skip-scored: configs scored elsewhere ({milestone: APR} of the main run, e.g. cwic_milestones.json):
    # dense, those exports and their TEAL are not scored again; results go to a file of their own
    skip = json.loads(Path(args.skip_scored).read_text()) if args.skip_scored else {}
    score_file = out / (f"scores_{args.group}_more.pt" if skip else f"scores_{args.group}.pt")
    prev = torch.load(score_file, weights_only=False) if score_file.exists() else {}
    runs = dict(prev.get("runs", {}))
    runs.update(train_jobs(JOBS[args.group], work, args.teacher, args.data, args.minutes, args.extra or [],
                           args.parallel))
    for name in JOBS[args.group]:
        print(json_dumps({"trained": name, **{k: runs[name].get(k) for k in ("apr", "kl", "steps", "tokens",
                                                                             "wall_s")}}), flush=True)
        for f in ("summary.json", "logs/metrics.csv"):
            src = work / name / f
            if src.exists():
                (out / f"{name}_{Path(f).name}").write_bytes(src.read_bytes())
    unfinished = [n for n in JOBS[args.group] if not runs[n].get("finished", True)]
    if unfinished:
        save_atomic({**prev, "runs": runs}, score_file)
        print(json_dumps({"unfinished": unfinished, "hint": "run the same command again with a larger --minutes"}),
              flush=True)
        return
    if args.train_only:
        save_atomic({**prev, "runs": runs}, score_file) if prev else None
        print(json_dumps({"trained": list(runs), "seconds": round(time.time() - t_start, 1)}))
        return
    meta, arrays = _load_bundle(Path(args.bundle))
    reqs = unpack_requests(arrays, meta["keys"])
    args.pad_id = meta["pad_id"] or 0
    hid = torch.from_numpy(arrays["heldout"].astype(np.int64))
    hmask = torch.from_numpy(arrays["heldout_mask"].astype(np.int64))
    calib = torch.from_numpy(arrays["calib"].astype(np.int64)).to(dev)
    teacher, _ = load_teacher(args.teacher, dtype=torch.float32)
    teacher = teacher.to(dev).eval()
    apply_teal(teacher)                      # TEAL modules present but off: dense until thresholds are set
    amp, autocast = scoring_autocast(dev, args.dtype)
    results = {"meta": {k: v for k, v in meta.items() if k != "keys"}, "device":
               torch.cuda.get_device_name() if dev == "cuda" else "cpu", "configs": dict(prev.get("configs", {})),
               "runs": runs, "timing": dict(prev.get("timing", {})),
               "dtype": f"{args.dtype} autocast (fp32 weights, θ and statistics)" if amp else "float32"}
    groups = prev.get("groups")
    deadline = t_start + args.deadline if args.deadline else None

    skipped = {"dense": 1.0, **{f"mini_cwic/{k}": v for k, v in skip.items()},
               **{f"teal/{k}": v for k, v in skip.items()}}

    def record(name, model, info):
        nonlocal groups
        if name in skipped:
            log.info("%s: scored elsewhere (--skip-scored)", name)
            return skipped[name]
        if name in results["configs"]:
            log.info("%s: scored already", name)
            return results["configs"][name]["apr"]
        if deadline and time.time() > deadline:
            raise TimeoutError(name)
        t0 = time.time()
        if not isinstance(model, torch.nn.Module):
            model = model()                  # a loader: only configs not scored yet are loaded
        entry, groups = score_config(model, reqs, None, groups, teacher, hid, hmask, args, autocast)
        results["configs"][name] = {**info, **entry, "seconds": time.time() - t0}
        res, chat = entry, entry["chat"]
        save_atomic({**results, "groups": groups}, score_file)
        print(json_dumps({"scored": name, "apr": round(res["apr"], 3), "kl_sym": round(chat["kl_sym"], 4),
                          "s": round(time.time() - t0, 1)}), flush=True)
        return res["apr"]

    try:
        score_all(args, work, record, teacher, calib, dev, results["configs"].keys() | skipped.keys())
    except TimeoutError as e:
        print(json_dumps({"deadline": True, "next": str(e), "hint": "run the same command again"}), flush=True)
    results["timing"][f"call_{len(results['timing'])}"] = time.time() - t_start
    save_atomic({**results, "groups": groups}, score_file)
    print(json_dumps({"done": args.group, "configs": len(results["configs"]),
                      "seconds": round(time.time() - t_start, 1)}))
    if args.then_teal:
        torch.cuda.empty_cache() if dev == "cuda" else None
        teal_stage(argparse.Namespace(**{**vars(args), "scores": str(out), "mode": args.then_teal, "limit": None}))


def score_config(model, reqs, sel, groups, teacher, hid, hmask, args, autocast):
    """Log-likelihoods, per-question compute and held-out KL of one configuration. `sel`: indices of
    the requests to score (None: all); the others get NaN. `groups` fixes the order of the per-group
    arrays (None: taken from this result). Returns (entry, groups)."""
    from cwic_exp.eval.scoring import score_requests, token_ppl_kl
    from cwic_exp.teal import teal_disabled
    sub = reqs if sel is None else [reqs[i] for i in sel]
    with autocast():
        res = score_requests(model, sub, row_tokens=args.row_tokens, batch_tokens=args.batch_tokens,
                             pad_id=args.pad_id, progress=getattr(args, "progress", False))
    if groups is None:
        groups = sorted(res.group_active, key=lambda g: (str(g[0]), int(g[1])))

    def tlogits(ids, am):
        with teal_disabled(teacher):
            return teacher(input_ids=ids, attention_mask=am).logits
    with autocast():
        chat = token_ppl_kl(model, tlogits, hid, hmask, batch_rows=8)
    lp, gr = np.asarray(res.logprob, np.float64), np.asarray(res.greedy, bool)
    if sel is not None:
        full_lp, full_gr = np.full(len(reqs), np.nan), np.zeros(len(reqs), bool)
        full_lp[sel], full_gr[sel] = lp, gr
        lp, gr = full_lp, full_gr
    entry = {"logprob": lp, "greedy": gr,
             "group_active": np.asarray([res.group_active.get(g, 0.0) for g in groups], np.float64),
             "group_tokens": np.asarray([res.group_tokens.get(g, 0) for g in groups], np.int64),
             "apr": res.apr, "dense": res.dense, "tokens": res.tokens, "by_kind": res.by_kind,
             "dense_by_kind": res.dense_by_kind, "chat": chat}
    return entry, groups


def score_all(args, work: Path, record, teacher, calib, dev, done) -> None:
    from transformers import AutoModelForCausalLM
    from cwic_exp.teal import apply_teal, calibrate_teal, remove_teal
    if args.group in ("main", "all"):
        record("dense", teacher, {"method": "dense", "technique": "", "step": "_"})
    milestones = []
    for name in JOBS[args.group]:
        hf = work / name / "hf"
        for sub in sorted(p for p in hf.iterdir() if p.is_dir() and not p.name.endswith((".tmp", ".old"))):
            if name != "mini_cwic" and sub.name != "final":
                continue
            meta_f = sub / "cwic_train_meta.json"
            tm = json.loads(meta_f.read_text()) if meta_f.exists() else {}
            label = LABELS[name]
            load = lambda sub=sub: AutoModelForCausalLM.from_pretrained(sub, dtype=torch.float32).to(dev).eval()
            apr = record(f"{name}/{sub.name}", load, {"method": "cwic", "technique": label,
                                                       "step": tm.get("step", "_"), "run": name,
                                                       "milestone": sub.name,
                                                       "apr_target": tm.get("apr_target")})
            if name == "mini_cwic" and sub.name != "final":
                milestones.append((sub.name, apr))
            torch.cuda.empty_cache() if dev == "cuda" else None
    if milestones:
        cal = None
        for ms, apr in milestones:
            if f"teal/{ms}" in done:
                continue
            cal = cal or calibrate_teal(teacher, calib, greedy=True, max_sparsity=0.95, greedy_rows=16,
                                        batch_rows=16)
            s, th, got = teal_for_apr(teacher, cal, calib, apr)
            apply_teal(teacher, th)
            record(f"teal/{ms}", teacher, {"method": "teal", "mode": "greedy", "technique": "TEAL (greedy)",
                                          "step": "_", "sparsity": s, "calib_apr": got, "matched_to": ms,
                                          "matched_apr": apr})
        if cal is not None:
            remove_teal(teacher)


def teal_file(scores: Path, mode: str, limit) -> Path:
    return scores / (f"scores_teal_{mode}.pt" if limit is None else f"scores_teal_{mode}_first{limit}.pt")


def cwic_milestones(scores: Path, fallback: Path | None) -> tuple[list, list | None]:
    """(milestone, measured APR) of the main run's scored exports, from <scores>/scores_main.pt or, where
    that is not at hand (a GPU box that did not score the main run), from a JSON {milestone: apr};
    and the per-question group order of scores_main.pt (None without it)."""
    f = scores / "scores_main.pt"
    if f.exists():
        main = torch.load(f, weights_only=False)
        ms = [(c["milestone"], c["apr"]) for c in main["configs"].values()
              if c.get("run") == "mini_cwic" and c.get("milestone") not in (None, "final")]
        return sorted(ms, key=lambda m: m[1]), [tuple(g) for g in main["groups"]]
    if fallback is not None and fallback.exists():
        return sorted(json.loads(fallback.read_text()).items(), key=lambda m: m[1]), None
    return [], None


def teal_stage(args) -> None:
    """TEAL (--mode greedy or uniform) at each CWIC milestone's measured APR: on the full sets (on a GPU),
    or on the first --limit documents of every task (sized for a CPU), so `finish` compares dense, CWIC
    and TEAL on the same questions. Writes <scores>/scores_teal_<mode>[_first<limit>].pt."""
    from eval_table import _load_bundle, unpack_requests
    from cwic_exp.teal import apply_teal, calibrate_teal
    from cwic_exp.teacher import load_teacher
    scores = Path(args.scores)
    scores.mkdir(parents=True, exist_ok=True)
    ms, groups = cwic_milestones(scores, Path(args.milestones) if args.milestones else None)
    if not ms:
        raise SystemExit(f"no scored CWIC milestone to match: neither {scores / 'scores_main.pt'} nor "
                         f"--milestones {args.milestones}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    amp, autocast = scoring_autocast(dev, args.dtype)
    meta, arrays = _load_bundle(Path(args.bundle))
    reqs = unpack_requests(arrays, meta["keys"])
    sel = None if args.limit is None else [i for i, k in enumerate(meta["keys"]) if k[1] < args.limit]
    args.pad_id = meta["pad_id"] or 0
    torch.set_num_threads(args.threads or torch.get_num_threads())
    hid = torch.from_numpy(arrays["heldout"].astype(np.int64))[:args.chat_rows]
    hmask = torch.from_numpy(arrays["heldout_mask"].astype(np.int64))[:args.chat_rows]
    calib = torch.from_numpy(arrays["calib"].astype(np.int64))[:args.calib_rows].to(dev)
    out_f = teal_file(scores, args.mode, args.limit)
    doc = torch.load(out_f, weights_only=False) if out_f.exists() else \
        {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "configs": {}, "groups": groups,
         "runs": {}, "limit": args.limit}
    teacher, _ = load_teacher(args.teacher, dtype=torch.float32)
    teacher = teacher.to(dev).eval()
    log.info("TEAL %s on %s: %d of %d requests (first %s documents per task), %d milestones", args.mode, dev,
             len(reqs) if sel is None else len(sel), len(reqs), args.limit, len(ms))
    t0 = time.time()
    greedy = args.mode == "greedy"
    cal = calibrate_teal(teacher, calib, greedy=greedy, max_sparsity=0.95, greedy_rows=args.greedy_rows,
                         batch_rows=16)
    log.info("TEAL %s calibration on %d rows: %.0f s", args.mode, calib.shape[0], time.time() - t0)
    for name, apr in ms:
        if f"teal/{name}" in doc["configs"] and doc["configs"][f"teal/{name}"]["mode"] == args.mode:
            continue
        t0 = time.time()
        s, th, got = teal_for_apr(teacher, cal, calib, apr, args.mode)
        apply_teal(teacher, th)
        entry, groups = score_config(teacher, reqs, sel, doc["groups"] and [tuple(g) for g in doc["groups"]],
                                     teacher, hid, hmask, args, autocast)
        doc["groups"] = groups
        doc["configs"][f"teal/{name}"] = {"method": "teal", "mode": args.mode, "technique": f"TEAL ({args.mode})",
                                          "step": "_", "sparsity": s, "calib_apr": got, "matched_to": name,
                                          "matched_apr": apr, "limit": args.limit, "chat_rows": int(hid.shape[0]),
                                          "calib_rows": int(calib.shape[0]), "greedy_rows": args.greedy_rows,
                                          **entry, "seconds": time.time() - t0,
                                          "dtype": f"{args.dtype} autocast" if amp else "float32"}
        save_atomic(doc, out_f)
        print(json_dumps({"scored": f"teal/{name}", "sparsity": round(s, 3), "apr": round(entry["apr"], 3),
                          "matched_apr": round(apr, 3), "kl_sym": round(entry["chat"]["kl_sym"], 4),
                          "s": round(time.time() - t0, 1)}), flush=True)


# ----------------------------------------------------------------------------- finish (here)

def _rows(configs, keys, tok, tasks, limit) -> list[dict]:
    """lm-eval metrics of stored configs ((name, config, groups) triples) on the first `limit`
    documents of each task (None: full sets); the APR is re-measured on exactly those documents."""
    from cwic_exp.eval.lm import TASKS, CwicLM, ReplayScorer, run_lm_eval
    from cwic_exp.eval.table import mean_all
    rows = []
    for name, c, groups in configs:
        res = {k: (float(lp), bool(g)) for k, lp, g in zip(keys, c["logprob"], c["greedy"])}
        lm = CwicLM(tokenizer=tok, scorer=ReplayScorer(res, dict(zip(groups, c["group_active"].tolist())),
                                                       dict(zip(groups, c["group_tokens"].tolist())), c["dense"]))
        metrics = run_lm_eval(lm, tasks, limit)
        comp = lm.compute_by_task()
        out = {}
        for n in tasks:
            ct = comp[TASKS[n]]
            out[n] = {**metrics[n], "apr": ct["apr"]}
            if n in ("arc_easy", "arc_challenge"):
                out[n]["per_question_active"] = [float(v) for _, v in sorted(ct["per_question"].items())]
        act, ntok = sum(t["active_sum"] for t in comp.values()), sum(t["tokens"] for t in comp.values())
        rows.append({"name": name, "model": "SmolLM2-135M", "technique": c.get("technique", ""),
                     "step": c.get("step", "_"), "apr": c["dense"] * ntok / max(act, 1e-9), "tasks": out,
                     "all": mean_all(out), "chat": c["chat"], "method": c["method"], "run": c.get("run"),
                     "milestone": c.get("milestone") or c.get("matched_to"), "sparsity": c.get("sparsity"),
                     "dense_params": c["dense"], "limit": limit, "chat_rows": c.get("chat_rows")})
    return _sorted(rows)


def _sorted(rows: list[dict]) -> list[dict]:
    order = {"": 0, "CWIC": 1, "TEAL (greedy)": 2, "TEAL (uniform)": 3}
    return sorted(rows, key=lambda r: (order.get(r["technique"], 3), r["technique"], r["apr"]))


def _merge(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of an earlier results.json with the newly scored ones; a config scored again replaces its row.
    A config is its name and technique (TEAL greedy and uniform matched to one milestone share a name)."""
    rows = {_key(r): r for r in old}
    rows.update({_key(r): r for r in new})
    return _sorted(list(rows.values()))


def _key(row: dict) -> tuple:
    return row["name"], row["technique"]


def finish(args) -> None:
    from eval_table import _load_bundle
    from cwic_exp.teacher import load_teacher
    meta, arrays = _load_bundle(Path(args.bundle))
    n_chat = int(arrays["heldout"].shape[0])
    tok = load_teacher(meta["model"])[1]
    keys = [tuple(k) for k in meta["keys"]]
    configs, runs, devices, sub_limit, limits = [], {}, set(), args.limit, {}
    for f in sorted(Path(args.scores).glob("scores_*.pt")):
        sc = torch.load(f, weights_only=False)
        devices.add(sc["device"])
        runs.update(sc.get("runs", {}))
        if sc.get("limit"):
            limits[f.name] = sub_limit = sc["limit"]
        configs += [(n, c, [tuple(g) for g in sc["groups"]]) for n, c in sc["configs"].items()]
    if len(set(limits.values())) > 1:   # a config scored on fewer documents would enter the table with NaNs
        raise SystemExit("subset scores of different document limits cannot share one paired table: "
                         + ", ".join(f"{n}: first {v}" for n, v in limits.items()))
    for _, c, _ in configs:          # a run's final export: its step is the run's last
        if c.get("milestone") == "final" and c.get("step") in (None, "_"):
            c["step"] = runs.get(c.get("run"), {}).get("steps", "_")
    prev = json.loads(Path(args.previous).read_text()) if args.previous else {}
    if prev and prev.get("limit") != meta["limit"]:
        raise SystemExit(f"{args.previous} was scored with limit {prev.get('limit')}, this bundle has {meta['limit']}")
    if prev.get("paired_limit") and sub_limit and prev["paired_limit"] != sub_limit:
        raise SystemExit(f"{args.previous} pairs the first {prev['paired_limit']} documents, these scores "
                         f"{sub_limit}: one paired table cannot hold both")
    sub_limit = sub_limit or prev.get("paired_limit")
    if not configs and not prev:
        raise SystemExit(f"nothing to tabulate: no scores_*.pt in {args.scores} and no --previous results.json")
    earlier = {}                               # a run trained again on a later box: keep both entries, and
    for n, s in prev.get("runs", {}).items():  # say which run the earlier rows come from
        if n in runs and s != runs[n]:
            earlier[n] = runs[f"{n} (earlier box)"] = s
        else:
            runs.setdefault(n, s)
    for r in prev.get("rows", []) + (prev.get("paired_rows") or []):
        if r.get("run") in earlier:
            r["run_entry"] = f"{r['run']} (earlier box)"
    full = [x for x in configs if not x[1].get("limit")]
    rows = _merge(prev.get("rows", []), _rows(full, keys, tok, meta["tasks"], meta["limit"]))
    paired = _rows(configs, keys, tok, meta["tasks"], sub_limit) if sub_limit else []
    paired = _merge(prev.get("paired_rows") or [], paired) if sub_limit else []
    devices |= set(prev.get("devices", []))
    doc = {"devices": sorted(devices), "limit": meta["limit"], "paired_limit": sub_limit, "tasks": meta["tasks"],
           "runs": runs, "rows": rows, "paired_rows": paired, "chat_rows": n_chat}
    render(doc, Path(args.results))


def retable(args) -> None:
    """The README, the tables and the plots again from results.json alone (no bundle, no scores, no lm-eval):
    each row's "all" recomputed from its tasks with `cwic_exp.eval.table`'s metrics."""
    from cwic_exp.data import HELDOUT_TAIL
    from cwic_exp.eval.table import mean_all
    res_dir = Path(args.results)
    doc = json.loads((res_dir / "results.json").read_text())
    for r in doc["rows"] + (doc.get("paired_rows") or []):
        r["all"] = mean_all(r["tasks"])
    doc.setdefault("chat_rows", HELDOUT_TAIL)
    render(doc, res_dir)


def render(doc: dict, res_dir: Path) -> None:
    """results.json, README.md and the plots of `finish` / `retable`."""
    from eval_table import _jsonable
    from cwic_exp.eval.table import table3
    rows, paired, runs, sub_limit, n_chat = (doc["rows"], doc.get("paired_rows") or [], doc["runs"],
                                             doc.get("paired_limit"), doc["chat_rows"])
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "results.json").write_text(json_dumps(doc, indent=1, default=_jsonable))
    md = ["# reproduce-mini: SmolLM2-135M-Instruct, stripe 192", "",
          f"Scored on {', '.join(doc['devices'])}; metrics by lm-eval here from the stored log-likelihoods. "
          f"acc_norm × 100 (acc for WinoGrande); APR measured on the benchmark tokens (q,k,v,o,gate,up+down,"
          f"head; not embeddings or attention scores).", "",
          f"## Full sets ({doc['limit'] or 'no limit'})", "", table3(rows), "", *provenance(rows), *same_config(rows)]
    if paired:
        md += [f"## Paired with TEAL: the first {sub_limit} documents of each task", "",
               "Every row scored on the same questions (CWIC and dense from their full-set log-likelihoods; "
               "TEAL, matched by bisection to each CWIC milestone's measured APR, scored on those "
               "documents only). APR re-measured on these documents.", "", table3(paired), ""]
    md += ["## KL to the teacher on held-out chat (½(FKL+RKL) per token)", "",
           "| technique | milestone | APR | KL sym | PPL | chat rows |", "|---|---|---|---|---|---|"]
    order = {"dense": 0, "cwic": 1, "teal": 2}
    keys = {_key(r) for r in rows}        # the chat KL does not depend on the task limit: one line per config
    for r in sorted(rows + [r for r in paired if _key(r) not in keys],
                    key=lambda r: (order.get(r["method"], 3), r["technique"], r["chat"]["apr"])):
        md.append(f"| {r['technique'] or 'dense'} | {r['milestone'] or ''} | {r['chat']['apr']:.2f} | "
                  f"{r['chat']['kl_sym']:.4f} | {r['chat']['ppl']:.2f} | {r.get('chat_rows') or n_chat} |")
    md += ["", *ablation_table(rows), "", "## Training runs", "",
           "| run | steps | tokens | APR (val) | KL (val) | wall s |", "|---|---|---|---|---|---|"]
    for n, s in runs.items():
        md.append(f"| {n} | {s.get('steps')} | {s.get('tokens')} | {s.get('apr')} | {s.get('kl')} | {s.get('wall_s')} |")
    md += ["", *arc_compute(rows), ""]
    (res_dir / "README.md").write_text("\n".join(md) + "\n")
    plots(rows, res_dir / "score_kl_vs_apr.png", "full sets")
    if paired:
        plots(paired, res_dir / f"score_kl_vs_apr_first{sub_limit}.png", f"first {sub_limit} documents per task")
    arc_plot(rows, res_dir)
    print("\n".join(md))
    print(json_dumps({"rows": len(rows), "paired_rows": len(paired), "results": str(res_dir)}))


def provenance(rows) -> list[str]:
    """Which training-run entry the rows of a run trained on two boxes come from (`finish --previous`)."""
    out = []
    for entry in sorted({r["run_entry"] for r in rows if r.get("run_entry")}):
        run = entry.split(" (")[0]
        old = [f"{r['technique']} {r['milestone']}" for r in rows if r.get("run_entry") == entry]
        new = [f"{r['technique']} {r['milestone']}" for r in rows if r["run"] == run and not r.get("run_entry")]
        out += [f"Run `{run}` was trained on two boxes: {', '.join(old)} from the entry '{entry}' of the "
                f"training runs below; {', '.join(new) or 'nothing'} from '{run}'.", ""]
    return out


def same_config(rows) -> list[str]:
    """Rows of one technique with the same APR and scores: one configuration matched to several milestones
    (TEAL cannot reach an APR beyond its cap, so the search ends at the same allocation)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["technique"], round(r["apr"], 6), r["all"]), []).append(r["milestone"])
    return [f"{tech} matched to {', '.join(ms)}: one configuration (its APR cannot go past {apr:.2f}×), listed "
            f"once per milestone.\n" for (tech, apr, _), ms in groups.items() if len(ms) > 1]


def ablation_table(rows) -> list[str]:
    """Tables 2 and 4 analogue: each ablation's final export against the main run at the same step."""
    ref = next((r for r in rows if r["run"] == "mini_cwic" and r["milestone"] == "apr_3.05x"), None)
    abl = [r for r in rows if (r["run"] or "").startswith("ablation_")]
    out = ["## Ablations at the 3.05× milestone (same steps, one switch flipped)", ""]
    if not abl:
        return out + ["No ablation run was scored (see the training runs below and the README)."]
    out += ["| technique | step | APR | all | KL sym |", "|---|---|---|---|---|"]
    for r in ([ref] if ref else []) + abl:
        out.append(f"| {r['technique']} | {r['step']} | {r['apr']:.2f} | {100 * r['all']:.1f} | "
                   f"{r['chat']['kl_sym']:.4f} |")
    return out


def arc_compute(rows) -> list[str]:
    out = ["## Compute per question: ARC-Easy vs ARC-Challenge (mean active parameters per token)", "",
           "| technique | milestone | ARC-Easy | ARC-Challenge | ratio C/E |", "|---|---|---|---|---|"]
    for r in rows:
        if r["method"] != "cwic":
            continue
        e = r["tasks"].get("arc_easy", {}).get("per_question_active")
        c = r["tasks"].get("arc_challenge", {}).get("per_question_active")
        if e and c:
            me, mc = float(np.mean(e)), float(np.mean(c))
            out.append(f"| {r['technique']} | {r['milestone']} | {me:,.0f} | {mc:,.0f} | {mc / me:.4f} |")
    return out


def arc_plot(rows, res_dir: Path) -> None:
    """Fig. 6 analogue: per-question compute (active parameters per token) on ARC-Easy vs ARC-Challenge."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cw = [r for r in rows if r["method"] == "cwic" and r["tasks"].get("arc_easy", {}).get("per_question_active")]
    if not cw:
        return
    fig, ax = plt.subplots(1, len(cw), figsize=(3.2 * len(cw), 3.2), squeeze=False)
    for a, r in zip(ax[0], cw):
        e = np.asarray(r["tasks"]["arc_easy"]["per_question_active"]) / 1e6
        c = np.asarray(r["tasks"]["arc_challenge"]["per_question_active"]) / 1e6
        bins = np.linspace(min(e.min(), c.min()), max(e.max(), c.max()), 30)
        a.hist(e, bins, alpha=0.55, density=True, label=f"Easy (mean {e.mean():.2f}M)")
        a.hist(c, bins, alpha=0.55, density=True, label=f"Challenge (mean {c.mean():.2f}M)")
        a.set(title=f"{r['technique']} {r['milestone']}", xlabel="active params / token (M)")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(res_dir / "arc_easy_vs_challenge.png", dpi=110)


def plots(rows, path: Path, scope: str) -> None:
    """Fig. 1 analogue: score vs measured APR per technique (dense as a line), and KL to the teacher."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    dense = [r for r in rows if r["method"] == "dense"]
    for tech, mk in (("CWIC", "o-"), ("TEAL (greedy)", "s--"), ("TEAL (uniform)", "x--"), ("CWIC no stripes", "^"),
                     ("CWIC no STE", "v"), ("CWIC + MSE", "D")):
        rs = sorted((r for r in rows if r["technique"] == tech), key=lambda r: r["apr"])
        if rs:
            ax[0].plot([r["apr"] for r in rs], [100 * (r["all"] or 0) for r in rs], mk, label=tech)
            rk = sorted(rs, key=lambda r: r["chat"]["apr"])
            ax[1].plot([r["chat"]["apr"] for r in rk], [r["chat"]["kl_sym"] for r in rk], mk, label=tech)
    if dense:
        ax[0].axhline(100 * dense[0]["all"], color="gray", lw=1, label="dense")
    # chance: 1/choices per task (WinoGrande and PIQA 2, the others 4), averaged like "all"
    chance = 100 * float(np.mean([1 / CHOICES.get(t, 4) for t in rows[0]["tasks"]])) if rows else None
    if chance:
        ax[0].axhline(chance, color="gray", lw=1, ls=":", label=f"chance ({chance:.1f})")
    ax[0].set(xlabel="measured APR (×)", ylabel="mean acc_norm (wg: acc), 7 tasks (%)",
              title=f"Score vs APR (Fig. 1 analog), {scope}")
    ax[1].set(xlabel="measured APR on the held-out chat (×)", ylabel="½(FKL+RKL) per token",
              title="KL to the teacher vs APR (held-out chat)",
              yscale="log")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["gpu", "teal", "finish", "retable"])
    p.add_argument("--group", choices=list(JOBS), default="main")
    p.add_argument("--bundle", default=str(ROOT / ".gpu" / "evalbundle"))
    p.add_argument("--teacher", default=os.environ.get("CWIC_TEACHER", "smollm2-135m-instruct"))
    p.add_argument("--data", default=os.environ.get("CWIC_DATA", str(ROOT / ".gpu" / "data" / "sharegpt-1024.pt")))
    p.add_argument("--work", default="/tmp/cwic_mini")
    p.add_argument("--out", default=str(ROOT / "runs" / "mini_scores"))
    p.add_argument("--scores", default=str(ROOT / "runs" / "mini_scores"))
    p.add_argument("--results", default=str(ROOT / "experiments" / "results" / "mini"))
    p.add_argument("--minutes", type=float, default=6.0, help="wall-time cap of each training run")
    p.add_argument("--row-tokens", dest="row_tokens", type=int, default=512)
    p.add_argument("--batch-tokens", dest="batch_tokens", type=int, default=32768)
    p.add_argument("--extra", nargs="*", help="extra Hydra overrides for every training run")
    p.add_argument("--parallel", action="store_true", help="train the group's runs concurrently on one GPU")
    p.add_argument("--train-only", dest="train_only", action="store_true", help="train, do not score")
    p.add_argument("--dtype", default="bfloat16", help="scoring under autocast on a GPU (float32: none)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after start: stop scoring before the next config (re-run continues)")
    p.add_argument("--limit", type=int, default=None,
                   help="teal: score the first N documents of each task; finish: the paired table's limit")
    p.add_argument("--chat-rows", dest="chat_rows", type=int, default=None, help="teal: held-out chat rows for KL")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calib-rows", dest="calib_rows", type=int, default=None,
                   help="teal: calibration rows of 512 tokens (default: all 64, as the GPU stage)")
    p.add_argument("--greedy-rows", dest="greedy_rows", type=int, default=16, help="teal: rows of the greedy search")
    p.add_argument("--mode", choices=["greedy", "uniform"], default="greedy",
                   help="teal: TEAL's greedy allocation (about 100 s a layer on 2 CPU cores) or uniform")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--then-teal", dest="then_teal", choices=["greedy", "uniform"], default=None,
                   help="gpu: after the group, TEAL in this mode at the main run's milestones on the full sets")
    p.add_argument("--milestones", default=str(ROOT / "experiments" / "results" / "mini" / "cwic_milestones.json"),
                   help="teal: {milestone: measured APR} used when <scores>/scores_main.pt is absent")
    p.add_argument("--previous", default=None,
                   help="finish: an earlier results.json whose rows are kept (a config scored again replaces "
                        "its row), for when the score files behind it are gone")
    p.add_argument("--skip-scored", dest="skip_scored", default=None,
                   help="gpu: JSON {milestone: APR} of main-run exports scored in an earlier call (with dense and "
                        "their TEAL); they are skipped and the rest goes to scores_<group>_more.pt")
    a = p.parse_args(argv)
    {"gpu": gpu, "teal": teal_stage, "finish": finish, "retable": retable}[a.stage](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
