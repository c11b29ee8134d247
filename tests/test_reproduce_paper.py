"""experiments/reproduce_paper.py: its runs compose to the paper's recipes, the dry run runs nothing, the eval stage
takes only complete exports and continues where it stopped, the table sets ours beside the paper's rows."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import reproduce_paper as R  # noqa: E402


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from cwic_exp.config import register_schema, unknown_keys
    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    assert unknown_keys(cfg) == []
    return cfg


def test_each_run_composes_to_its_recipe(tmp_path):
    names = set()
    for run, (overrides, run_name, size, _) in R.RUNS.items():
        cfg = _compose([*overrides, f"out_dir={tmp_path}"])
        assert cfg.run_name == run_name and cfg.data.source == "paper_mix" and cfg.model.name == R.teacher_of(size)
        assert cfg.trainer.sequences_per_step == 64 and cfg.cwic.apr_warmup_steps == 15000
        names.add(cfg.run_name)
        striped = run != "1b_nostripes"
        assert (cfg.cwic.stripe_size == 512) is striped and (cfg.cwic.stripe_size is None) is not striped
        assert cfg.cwic.ste is (run != "1b_noste")
        assert (cfg.cwic.mse_weight > 0) is (run == "1b_mse")
    assert len(names) == len(R.RUNS)                                       # no two runs share a folder
    assert _compose(R.RUNS["1b"][0]).trainer.max_steps == 18000             # Table 3's 18,000-step row
    assert "-Instruct" in R.teacher_of("3b") and "3B" in R.teacher_of("3b")


def test_the_dry_run_prints_every_command_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(R.subprocess, "call", lambda *a, **k: pytest.fail("the dry run ran a command"))
    R.main(["all", "--dry-run", "--out", str(tmp_path), "--runs", "1b,1b_mse", "--teal", "0.5,0.7"])
    cmds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    assert [c.split("train.py ")[1] for c in cmds if "train.py" in c] == [
        f"+experiment=paper_1b trainer.max_steps=18000 out_dir={tmp_path}",
        f"+experiment=paper_1b cwic=mse run_name=paper_1b_mse out_dir={tmp_path}"]
    evals = [c for c in cmds if "cwic_exp.eval" in c]
    assert len(evals) == 3 and "name=1b-teal-70" in evals[2] and "sparsity=0.7" in evals[2]   # dense, 2 × TEAL
    assert not list(tmp_path.iterdir())


def _fake_eval(out_all: dict):
    """subprocess.call standing in for `python -m cwic_exp.eval`: writes the JSON it would, scores from out_all."""
    calls = []

    def call(cmd, cwd, env):
        kw = dict(a.split("=", 1) for a in cmd[3:] if "=" in a)
        calls.append(kw["name"])
        if kw["name"] in out_all.get("fail", ()):
            return 1
        a = out_all.get(kw["name"], 0.40)
        res = {"tasks": {t: {"acc" if t == "winogrande" else "acc_norm": a} for t in R.COLS[1:]}, "all": a,
               "apr": out_all.get("apr", 2.07), "config": {"limit": int(kw["limit"]) if "limit" in kw else None}}
        Path(kw["out_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(kw["out_dir"]) / f"{kw['name']}.json").write_text(json.dumps(res))
        return 0
    return call, calls


def _export(run_dir: Path, name: str, step: int | None, **meta):
    """An export as training writes it: a milestone's meta says "step", final's (the run summary) "steps"."""
    d = run_dir / "hf" / name
    d.mkdir(parents=True)
    if step is not None:
        (d / "cwic_train_meta.json").write_text(json.dumps({"steps" if name == "final" else "step": step, **meta}))


def test_eval_takes_complete_exports_continues_and_the_table_compares(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "runs" / "paper_1b"
    _export(run_dir, "apr_2.05x", 3000)
    _export(run_dir, "apr_3.05x", None)            # still being written: no meta yet
    args = ["--out", str(tmp_path / "runs"), "--runs", "1b", "--teal", "0.5", "--results", str(tmp_path / "res")]
    call, calls = _fake_eval({"fail": ["1b-apr_2.05x"]})
    monkeypatch.setattr(R.subprocess, "call", call)
    with pytest.raises(SystemExit, match="exited with 1"):
        R.main(["eval", *args])
    assert calls == ["1b-dense", "1b-teal-50", "1b-apr_2.05x"]
    call, calls = _fake_eval({"1b-apr_2.05x": 0.492, "apr": 2.05})
    monkeypatch.setattr(R.subprocess, "call", call)
    R.main(["eval", *args])
    assert calls == ["1b-apr_2.05x"]                # the two done before are not run again
    index = json.loads((tmp_path / "runs" / "eval" / "index.json").read_text())
    assert index["1b-apr_2.05x"] == {"model": "llama-3.2-1B", "technique": "CWIC", "step": 3000, "run": "1b",
                                     "export": "apr_2.05x"}
    capsys.readouterr()
    R.main(["table", *args])
    md = (tmp_path / "res" / "README.md").read_text()
    row = [line for line in md.splitlines() if "| CWIC |" in line]
    assert len(row) == 1 and "| 3000 | 2.05× | 49.2 |" in row[0] and "| 3000, 2.05×, 49.2 | +0.0 |" in row[0]
    teal = [line for line in md.splitlines() if "| TEAL |" in line][0]
    assert "| _, 2.11×, 39.1 | +0.9 |" in teal     # the paper's TEAL row nearest our APR (2.05), all 40.0 - 39.1
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["rows"] == 3
    assert (tmp_path / "res" / "all_vs_apr.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "res" / "results.json").read_text())["paper"]) == len(R.PAPER) == 33


@pytest.mark.parametrize("argv, match", [
    (["train", "--runs", "1b,2b"], "unknown run.*2b"),
    (["eval", "--teal", ""], "--teal: a comma-separated list"),
    (["eval", "--teal", "0.5,1.5"], "sparsity must lie in"),
    (["table", "--out", "/nonexistent/x"], "run the eval stage first"),
])
def test_bad_arguments_are_refused_by_name(argv, match):
    with pytest.raises(SystemExit, match=match):
        R.main(argv)


def test_final_is_evaluated_once_and_only_when_the_run_finished(tmp_path):
    """hf/final is the 15k-step runs' apr_6.05x again (linked): not evaluated twice; the 1B run's 18k-step final is
    (Table 3's last row); a run stopped early by a time limit has a final that is not the run's."""
    import argparse
    args = argparse.Namespace(out=str(tmp_path), runs=["1b", "3b", "1b_mse"], teal=[], limit=None)
    _export(tmp_path / "paper_1b", "apr_6.05x", 15000)
    _export(tmp_path / "paper_1b", "final", 18000, finished=True)
    _export(tmp_path / "paper_3b", "apr_6.05x", 15000)
    _export(tmp_path / "paper_3b", "final", 15000, finished=True)
    _export(tmp_path / "paper_1b_mse", "final", 7000, finished=False)
    rows = {name: row for name, _, row in R.eval_jobs(args) if "run" in row}
    assert sorted(rows) == ["1b-apr_6.05x", "1b-final", "3b-apr_6.05x"]
    assert rows["1b-final"]["step"] == 18000
    assert R.paper_match(dict(rows["1b-final"], apr=6.05))["all"] == 44.5
    args.limit = 200                                   # a quicker run's files are its own
    assert {n for n, *_ in R.eval_jobs(args)} == {"1b-apr_6.05x-limit200", "1b-final-limit200", "3b-apr_6.05x-limit200",
                                                 "1b-dense-limit200", "3b-dense-limit200"}


def test_a_limited_evaluation_is_not_taken_for_the_full_one(tmp_path, monkeypatch):
    args = ["--out", str(tmp_path), "--runs", "1b", "--teal", "0.5", "--results", str(tmp_path / "res")]
    call, calls = _fake_eval({})
    monkeypatch.setattr(R.subprocess, "call", call)
    R.main(["eval", *args, "--limit", "20"])
    R.main(["eval", *args])
    assert calls == ["1b-dense-limit20", "1b-teal-50-limit20", "1b-dense", "1b-teal-50"]
    R.main(["table", *args, "--limit", "20"])       # each table from its own evaluations, headed by their limit
    assert "first 20 questions a task" in (tmp_path / "res" / "README.md").read_text()
    assert len(json.loads((tmp_path / "res" / "results.json").read_text())["rows"]) == 2
