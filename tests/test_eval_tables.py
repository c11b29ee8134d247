"""The evaluation's compute figures and the scripts that build the results tables (eval/compute.py, eval/table.py,
experiments/eval_table.py, experiments/reproduce_mini.py): per-token and per-kind compute, the tables' columns, the
requests' packing, per-task APRs, TEAL's APR bisection and its stage's document selection, and how `finish` merges
score files into full and paired tables. From a mutant audit (helper): 21 of 30 mutants passed every test before.
lm-eval, the bundle and the teacher are stubbed where a test only checks the glue."""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
pytest.importorskip("lm_eval")   # a machine without lm-eval (the GPU box) skips this file instead of failing collection

import eval_table as ET  # noqa: E402
import reproduce_mini as RM  # noqa: E402
from cwic_exp.eval import table as TB  # noqa: E402
from cwic_exp.eval.compute import summarize  # noqa: E402
from cwic_exp.eval.lm import CwicLM as _CwicLM  # noqa: E402

_REAL_COMPUTE_BY_TASK = _CwicLM.compute_by_task


# ----------------------------------------------------------------------------- compute.py

def _small_llama(layers=2, teal=None):
    """A random Llama (hidden 16, FFN 40, 2 heads, 1 kv head); with `teal`, that TEAL sparsity on every matrix."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from cwic_exp.teal import PROJS, apply_teal
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).eval()
    return model if teal is None else apply_teal(model, {f"{i}.{p}": teal for i in range(layers) for p in PROJS})


def test_summarize_active_is_per_token_and_density_covers_the_head():
    by_kind = {"q": 30.0, "head": 40.0}
    dense_by_kind = {"q": 10.0, "head": 10.0}
    s = summarize(active=70.0, dense=20.0, tokens=4, by_kind=by_kind, dense_by_kind=dense_by_kind)
    assert s["apr"] == pytest.approx(20.0 * 4 / 70.0)
    assert s["active"] == pytest.approx(70.0 / 4)
    assert s["density"] == {"q": pytest.approx(0.75), "head": pytest.approx(1.0)}


def test_dense_meter_counts_only_real_tokens_and_each_kind():
    from cwic_exp.eval.compute import ComputeMeter
    model = _small_llama()
    meter = ComputeMeter(model)
    real = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    with meter.track(model, real):
        pass
    kinds = {k: float(v) for k, v in meter.by_kind().items()}
    # gate: 2 layers x 16 x 40; up+down: 2 layers x 2 x 16 x 40; 4 real tokens
    assert meter.dense_by_kind["gate"] == 2 * 16 * 40
    assert meter.dense_by_kind["up+down"] == 2 * 2 * 16 * 40
    assert kinds["gate"] == pytest.approx(4 * 2 * 16 * 40)


def test_teal_meter_ignores_padding_and_sums_kinds_over_layers():
    from cwic_exp.teal import teal_active_parameters
    torch.manual_seed(0)
    model = _small_llama(teal=0.3)
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]])
    padded = teal_active_parameters(model, ids, mask)
    # the same tokens without padding: row 0 whole, row 1 its first two tokens
    a = teal_active_parameters(model, ids[:1])
    b = teal_active_parameters(model, ids[1:, :2])
    want_active = (a["active"] * 6 + b["active"] * 2) / 8
    assert padded["tokens"] == 8
    assert padded["active"] == pytest.approx(want_active, rel=1e-6)
    assert padded["density"]["head"] == pytest.approx(1.0)
    # a kind's density is a fraction of all layers' matrices of that kind: at most 1, and the q density
    # is the parameter-weighted mean of the two rows' q densities
    for k, v in padded["density"].items():
        assert 0.0 <= v <= 1.0 + 1e-9, (k, v)
    want_q = (a["density"]["q"] * 6 + b["density"]["q"] * 2) / 8
    assert padded["density"]["q"] == pytest.approx(want_q, rel=1e-6)


# ----------------------------------------------------------------------------- table.py

def test_table3_columns_in_the_papers_order():
    header = TB.table3([]).splitlines()[0]
    cols = [c.strip() for c in header.split("|")][1:-1]
    assert cols[5:] == ["mmlu", "wg", "arc:c", "HS", "arc:e", "obqa", "piqa"]


def _row(**kw):
    tasks = {t: {"acc": 0.3, "acc_norm": 0.4, "apr": 1.5 + 0.1 * i} for i, t in enumerate(TB.ORDER)}
    r = {"technique": "TEAL (greedy)", "target_sparsity": 0.25, "calib_sparsity": 0.251, "apr": 2.0,
         "tasks": tasks, "chat": {"kl_fwd": 0.1234, "kl_sym": 0.5678, "ppl": 9.87}}
    r.update(kw)
    return r


def test_compute_table_reads_each_tasks_apr_and_kl_columns():
    header, _, line = TB.compute_table([_row()]).splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in line.split("|")]))
    for i, t in enumerate(TB.ORDER):
        assert cells[TB.HEAD[t]] == f"{1.5 + 0.1 * i:.3f}"
    assert cells["APR all"] == "2.000"
    assert cells["KL(teacher‖model)"] == "0.1234" and cells["½(FKL+RKL)"] == "0.5678" and cells["PPL"] == "9.87"


def test_nan_scores_print_as_a_dash():
    tasks = {"piqa": {"acc_norm": float("nan")}}
    md = TB.table3([{"model": "m", "technique": "", "apr": 1.0, "tasks": tasks, "all": float("nan")}])
    assert "nan" not in md.lower()


def test_mean_all_is_the_mean_of_all_seven():
    tasks = {t: {"acc": 0.1 * (i + 1), "acc_norm": 0.1 * (i + 1)} for i, t in enumerate(TB.ORDER)}
    assert TB.mean_all(tasks) == pytest.approx(sum(0.1 * (i + 1) for i in range(7)) / 7)


def test_metric_of_maps_only_acc_norm_for_winogrande():
    assert TB.metric_of("winogrande", "acc_norm") == "acc"
    assert TB.metric_of("piqa", "acc_norm") == "acc_norm"
    assert TB.metric_of("piqa", "acc") == "acc" and TB.metric_of("winogrande", "acc") == "acc"
    tasks = {"winogrande": {"acc": 0.5, "acc_norm": 0.6}, "piqa": {"acc": 0.7, "acc_norm": 0.8}}
    assert TB.mean_all(tasks, "acc") == pytest.approx(0.6)


# ----------------------------------------------------------------------------- eval_table.py

def test_pack_unpack_round_trip():
    from cwic_exp.eval.scoring import Request
    reqs = []
    for task, doc, ctx in (("piqa", 0, [5, 6, 7]), ("piqa", 1, [8, 9]), ("arc_easy", 0, [5, 6, 7])):
        for ch in range(2):
            k = (task, doc, ch)
            reqs.append(Request(list(ctx), [100 + ch, 200 + doc], group=k[:2], key=k))
    reqs.append(Request([8, 9], [1], group=("piqa", 1), key=("piqa", 1, 2)))   # an earlier context again
    arrays, keys = ET.pack_requests(reqs)
    back = ET.unpack_requests(arrays, keys)
    assert [(r.context, r.continuation, r.group, r.key) for r in back] == \
           [(r.context, r.continuation, tuple(r.group), tuple(r.key)) for r in reqs]


def _doc(rows):
    return {"limit": None, "calibration": {"rows": 4, "seq_len": 8, "source": "x"},
            "chat_eval": {"conversations": 2, "seq_len": 8}, "where": "here", "requests": 1, "tree_tokens": 1,
            "timing": {"load": 1.0}, "check": {"max_abs_logprob_diff_vs_unpacked_fp32": 0.0}}


def test_eval_table_arc_ratio_is_easy_over_challenge():
    tasks = {"arc_easy": {"per_question_active": {0: 10.0, 1: 30.0}},
             "arc_challenge": {"per_question_active": {0: 40.0}}}
    md = ET._markdown(_doc([]), [{"technique": "", "target_sparsity": None, "tasks": tasks, "dense_params": 100.0,
                                  "apr": 1.0, "all": 0.5, "chat": {}}])
    line = [ln for ln in md.splitlines() if ln.startswith("| dense |")][0]
    assert line == "| dense | – | 0.2000 | 0.4000 | 0.5000 |"


class _FakeLM:
    """Stands in for CwicLM: compute_by_task from the ReplayScorer's group figures."""

    def __init__(self, tokenizer=None, scorer=None):
        self.scorer = scorer

    def compute_by_task(self):
        lm = types.SimpleNamespace(group_active=self.scorer.ga, group_tokens=self.scorer.gt, dense=self.scorer.dense)
        return _REAL_COMPUTE_BY_TASK(lm)


class _FakeScorer:
    def __init__(self, results, ga, gt, dense):
        self.ga, self.gt, self.dense = ga, gt, dense


def _fake_lm_eval(monkeypatch):
    import cwic_exp.eval.lm as L
    monkeypatch.setattr(L, "CwicLM", _FakeLM)
    monkeypatch.setattr(L, "ReplayScorer", _FakeScorer)
    monkeypatch.setattr(L, "run_lm_eval", lambda lm, tasks, limit: {n: {"acc": 0.5, "acc_norm": 0.5} for n in tasks})


def _config(groups, active, tokens, dense=100.0):
    n = len(groups)
    return {"logprob": np.zeros(n), "greedy": np.zeros(n, bool), "group_active": np.asarray(active, np.float64),
            "group_tokens": np.asarray(tokens, np.int64), "dense": dense, "apr": 99.0, "tokens": int(sum(tokens)),
            "by_kind": {}, "dense_by_kind": {}, "chat": {"kl_fwd": 0.1, "kl_sym": 0.1, "ppl": 2.0}, "seconds": 1.0,
            "method": "teal", "mode": "greedy", "sparsity": 0.5}


def test_eval_table_finish_reads_each_tasks_own_apr(monkeypatch, tmp_path):
    _fake_lm_eval(monkeypatch)
    groups = [("cwic_piqa", 0), ("cwic_arc_easy", 0)]
    scores = {"groups": groups, "configs": {"teal-greedy-50": _config(groups, [50.0, 25.0], [1, 1])},
              "device": "cpu", "dtype": "float32", "timing": {}, "check": {"max_abs_logprob_diff_vs_unpacked_fp32": 0},
              "tree_tokens": 2}
    meta = {"keys": [], "tasks": ["piqa", "arc_easy"], "limit": None, "model": "x", "requests": 0, "calib_rows": 1,
            "calib_seq_len": 1, "chat_conversations": 1, "chat_seq_len": 1}
    monkeypatch.setattr(ET, "_load_bundle", lambda b: (meta, {}))
    monkeypatch.setattr(ET, "_load_scores", lambda f: scores)
    monkeypatch.setattr(ET, "_tokenizer", lambda m: None)
    ET.finish(argparse.Namespace(bundle=str(tmp_path), scores=str(tmp_path), results=str(tmp_path / "r")))
    doc = json.loads((tmp_path / "r.json").read_text())
    t = doc["rows"][0]["tasks"]
    assert t["piqa"]["apr"] == pytest.approx(2.0) and t["arc_easy"]["apr"] == pytest.approx(4.0)


# ----------------------------------------------------------------------------- reproduce_mini.py

def test_rows_apr_is_token_weighted_over_all_tasks(monkeypatch):
    _fake_lm_eval(monkeypatch)
    groups = [("cwic_piqa", 0), ("cwic_arc_easy", 0)]
    c = dict(_config(groups, [50.0 * 3, 25.0], [3, 1]), method="cwic", technique="CWIC")
    (row,) = RM._rows([("x", c, groups)], [], None, ["piqa", "arc_easy"], None)
    assert row["apr"] == pytest.approx(100.0 * 4 / 175.0)


def test_teal_for_apr_bisects_towards_the_target(monkeypatch):
    import cwic_exp.teal as T
    monkeypatch.setattr(T, "teal_thresholds", lambda model, cal, s, mode, refit_ids=None: s)
    monkeypatch.setattr(T, "apply_teal", lambda model, th: setattr(model, "s", th))
    monkeypatch.setattr(T, "teal_active_parameters", lambda model, calib: {"apr": 1.0 / (1.0 - model.s)})
    m = types.SimpleNamespace(s=0.0)
    s, th, got = RM.teal_for_apr(m, None, None, 2.0)
    assert got == pytest.approx(2.0, rel=1e-3) and s == pytest.approx(0.5, abs=1e-3)


def _teal_stage_env(monkeypatch, tmp_path, keys, prev=None):
    meta = {"keys": keys, "pad_id": 0}
    arrays = {"heldout": np.zeros((2, 4), np.uint16), "heldout_mask": np.ones((2, 4), np.uint8),
              "calib": np.zeros((2, 4), np.uint16)}
    import eval_table
    monkeypatch.setattr(eval_table, "_load_bundle", lambda b: (meta, arrays))
    monkeypatch.setattr(eval_table, "unpack_requests", lambda a, k: list(range(len(k))))
    import cwic_exp.teacher as TT
    import cwic_exp.teal as T
    monkeypatch.setattr(TT, "load_teacher", lambda name, dtype=None: (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(T, "calibrate_teal", lambda *a, **k: None)
    monkeypatch.setattr(T, "apply_teal", lambda *a, **k: None)
    monkeypatch.setattr(RM, "teal_for_apr", lambda model, cal, calib, apr, mode="greedy": (0.5, {}, apr))
    seen = []

    def score_config(model, reqs, sel, groups, teacher, hid, hmask, args, autocast):
        seen.append(sel)
        return {"apr": 2.0, "chat": {"kl_sym": 0.1}}, [("g", 0)]
    monkeypatch.setattr(RM, "score_config", score_config)
    (tmp_path / "ms.json").write_text(json.dumps({"apr_2.05x": 2.0}))
    if prev is not None:
        torch.save(prev, RM.teal_file(tmp_path, "uniform", None))
    return seen


def _teal_args(tmp_path, mode, limit):
    return argparse.Namespace(scores=str(tmp_path), milestones=str(tmp_path / "ms.json"), dtype="float32",
                              bundle=str(tmp_path), limit=limit, threads=None, chat_rows=None, calib_rows=None,
                              teacher="x", greedy_rows=2, mode=mode)


def test_teal_stage_limit_selects_the_first_n_documents(monkeypatch, tmp_path):
    keys = [["piqa", d, c] for d in range(4) for c in range(2)]
    seen = _teal_stage_env(monkeypatch, tmp_path, keys)
    RM.teal_stage(_teal_args(tmp_path, "greedy", 2))
    assert seen == [[0, 1, 2, 3]]


def test_teal_stage_does_not_skip_a_milestone_scored_in_the_other_mode(monkeypatch, tmp_path):
    # a uniform file (possibly older, mixed) holding a greedy entry under the same name
    prev = {"device": "cpu", "groups": None, "runs": {}, "limit": None,
            "configs": {"teal/apr_2.05x": {"mode": "greedy", "apr": 2.0}}}
    seen = _teal_stage_env(monkeypatch, tmp_path, [["piqa", 0, 0]], prev)
    RM.teal_stage(_teal_args(tmp_path, "uniform", None))
    assert seen == [None]


def _finish_env(monkeypatch, tmp_path, files, prev=None, meta_limit=None):
    meta = {"keys": [], "tasks": ["piqa"], "limit": meta_limit, "model": "x"}
    import eval_table
    import cwic_exp.teacher as TT
    monkeypatch.setattr(eval_table, "_load_bundle", lambda b: (meta, {"heldout": np.zeros((3, 4))}))
    monkeypatch.setattr(TT, "load_teacher", lambda name, dtype=None: (None, None))

    def rows(configs, keys, tok, tasks, limit):
        return RM._sorted([{"name": n, "technique": c.get("technique", ""), "apr": c["apr"], "all": c["all"],
                            "limit": limit, "run": c.get("run")} for n, c, _ in configs])
    monkeypatch.setattr(RM, "_rows", rows)
    got = {}
    monkeypatch.setattr(RM, "render", lambda doc, res_dir: got.update(doc))
    sc = tmp_path / "scores"
    sc.mkdir()
    for name, d in files.items():
        torch.save(d, sc / name)
    args = argparse.Namespace(bundle=str(tmp_path), scores=str(sc), limit=None, results=str(tmp_path / "res"),
                              previous=None)
    if prev is not None:
        (tmp_path / "prev.json").write_text(json.dumps(prev))
        args.previous = str(tmp_path / "prev.json")
    return args, got


def test_finish_full_table_leaves_out_subset_scores(monkeypatch, tmp_path):
    files = {"scores_main.pt": {"device": "gpu", "groups": [], "runs": {},
                                "configs": {"dense": {"technique": "", "apr": 1.0, "all": 0.4, "method": "dense"}}},
             "scores_teal_greedy_first2.pt": {"device": "cpu", "groups": [], "runs": {}, "limit": 2,
                                              "configs": {"teal/apr_2.05x": {"technique": "TEAL (greedy)", "apr": 2.0,
                                                                             "all": 0.3, "limit": 2}}}}
    args, got = _finish_env(monkeypatch, tmp_path, files)
    RM.finish(args)
    assert [r["name"] for r in got["rows"]] == ["dense"]
    assert {r["name"] for r in got["paired_rows"]} == {"dense", "teal/apr_2.05x"}


def test_finish_rescored_config_replaces_the_previous_row(monkeypatch, tmp_path):
    files = {"scores_main.pt": {"device": "gpu", "groups": [], "runs": {},
                                "configs": {"dense": {"technique": "", "apr": 1.0, "all": 0.45, "method": "dense"}}}}
    prev = {"limit": None, "rows": [{"name": "dense", "technique": "", "apr": 1.0, "all": 0.40}], "runs": {},
            "devices": ["old"]}
    args, got = _finish_env(monkeypatch, tmp_path, files, prev)
    RM.finish(args)
    assert [r["all"] for r in got["rows"]] == [0.45]


def test_finish_refuses_previous_results_of_another_limit(monkeypatch, tmp_path):
    files = {"scores_main.pt": {"device": "gpu", "groups": [], "runs": {},
                                "configs": {"dense": {"technique": "", "apr": 1.0, "all": 0.45, "method": "dense"}}}}
    prev = {"limit": 50, "rows": [], "runs": {}}
    args, _ = _finish_env(monkeypatch, tmp_path, files, prev)
    with pytest.raises(SystemExit):
        RM.finish(args)


def test_cwic_milestones_ordered_by_apr_not_by_name(tmp_path):
    cfg = lambda ms, apr: {"run": "mini_cwic", "milestone": ms, "apr": apr}  # noqa: E731
    torch.save({"configs": {"a": cfg("apr_10.05x", 8.0), "b": cfg("apr_2.05x", 2.0)}, "groups": []},
               tmp_path / "scores_main.pt")
    ms, _ = RM.cwic_milestones(tmp_path, None)
    assert [m for m, _ in ms] == ["apr_2.05x", "apr_10.05x"]


def test_retable_recomputes_paired_rows_too(monkeypatch, tmp_path):
    tasks = {"piqa": {"acc_norm": 0.6}, "winogrande": {"acc": 0.5, "acc_norm": 0.9}}
    doc = {"rows": [{"tasks": tasks, "all": 0.75}], "paired_rows": [{"tasks": tasks, "all": 0.75}], "chat_rows": 3}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    got = {}
    monkeypatch.setattr(RM, "render", lambda d, res_dir: got.update(d))
    RM.retable(argparse.Namespace(results=str(tmp_path)))
    assert got["rows"][0]["all"] == pytest.approx(0.55) and got["paired_rows"][0]["all"] == pytest.approx(0.55)


def test_arc_compute_ratio_is_challenge_over_easy():
    r = {"method": "cwic", "technique": "CWIC", "milestone": "apr_2.05x",
         "tasks": {"arc_easy": {"per_question_active": [10.0, 30.0]}, "arc_challenge": {"per_question_active": [30.0]}}}
    assert RM.arc_compute([r])[-1] == "| CWIC | apr_2.05x | 20 | 30 | 1.5000 |"


def test_score_all_matches_teal_to_the_measured_apr(monkeypatch, tmp_path):
    import cwic_exp.teal as T
    for sub in ("apr_2.05x",):
        d = tmp_path / "mini_cwic" / "hf" / sub
        d.mkdir(parents=True)
        (d / "cwic_train_meta.json").write_text(json.dumps({"step": 10, "apr_target": 2.05}))
    monkeypatch.setattr(T, "calibrate_teal", lambda *a, **k: object())
    monkeypatch.setattr(T, "apply_teal", lambda *a, **k: None)
    monkeypatch.setattr(T, "remove_teal", lambda *a, **k: None)
    targets = []
    monkeypatch.setattr(RM, "teal_for_apr", lambda model, cal, calib, apr, mode="greedy": (targets.append(apr) or
                                                                                           (0.5, {}, apr)))
    RM.score_all(argparse.Namespace(group="main"), tmp_path, lambda n, m, i: 1.93, None, None, "cpu", set())
    assert targets == [1.93]


def test_same_config_does_not_merge_nearby_aprs():
    rows = [{"technique": "TEAL (greedy)", "apr": a, "all": 0.33, "milestone": m}
            for a, m in ((3.98, "apr_5.05x"), (4.01, "apr_6.05x"))]
    assert RM.same_config(rows) == []


def test_teal_meter_kinds_add_up_to_the_per_token_total():
    from cwic_exp.eval.compute import ComputeMeter
    torch.manual_seed(0)
    model = _small_llama(3, teal=0.3)
    ids = torch.randint(0, 64, (2, 6))
    real = torch.ones(2, 6, dtype=torch.bool)
    meter = ComputeMeter.for_model(model)
    with torch.no_grad(), meter.track(model, real):
        model(input_ids=ids)
    kinds = {k: float(v) for k, v in meter.by_kind().items()}
    assert sum(kinds.values()) == pytest.approx(float(meter.per_token().sum()), rel=1e-9)
    assert sum(meter.layer_active.values()) == pytest.approx(sum(v for k, v in kinds.items() if k != "head"), rel=1e-9)


def test_finish_refuses_subset_scores_of_different_limits(monkeypatch, tmp_path):
    """Subset TEAL files scored on the first 50 and the first 100 documents cannot share one paired table: the
    paired limit came from whichever file sorted last, and the 50-document configuration's missing scores entered
    lm-eval as NaN (argmax took choice 0): a plausible, wrong row."""
    teal = lambda tech, lim: {"technique": tech, "apr": 2.0, "all": 0.3, "limit": lim}  # noqa: E731
    files = {"scores_main.pt": {"device": "gpu", "groups": [], "runs": {},
                                "configs": {"dense": {"technique": "", "apr": 1.0, "all": 0.4, "method": "dense"}}},
             "scores_teal_greedy_first50.pt": {"device": "cpu", "groups": [], "runs": {}, "limit": 50,
                                               "configs": {"teal/apr_2.05x": teal("TEAL (greedy)", 50)}},
             "scores_teal_uniform_first100.pt": {"device": "cpu", "groups": [], "runs": {}, "limit": 100,
                                                 "configs": {"teal/apr_2.05x": teal("TEAL (uniform)", 100)}}}
    args, _ = _finish_env(monkeypatch, tmp_path, files)
    with pytest.raises(SystemExit, match="first 50.*first 100"):
        RM.finish(args)
