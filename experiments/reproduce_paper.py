#!/usr/bin/env python
"""`make reproduce-paper`: the paper's Tables 3 and 4 at full scale (Llama-3.2-1B and 3B, the paper mix).

Needs the Hugging Face hub (the models, the paper mix, lm-eval's tasks) and GPUs: the paper trained its 1B run in
52 hours on one H100. Each stage skips what is done, so the same command continues after an interruption.

  train   the runs, one after the other (`python train.py +experiment=paper_1b ...`; a finished run returns at
          once, an interrupted one resumes from its last checkpoint). Each exports its 2.05×, 3.05×, ... models.
  eval    `python -m cwic_exp.eval` on the seven tasks, full sets: each teacher (dense), TEAL (greedy) at each
          --teal sparsity, and every export of every run found so far (it can run while later runs train).
  table   the paper-layout tables, ours beside the paper's numbers, and a plot of "all" against the APR, into
          --results (markdown, JSON, PNG).
  all     the three in turn.

    python experiments/reproduce_paper.py all --dry-run            # the commands, nothing run
    python experiments/reproduce_paper.py train --runs 1b          # only the main 1B run
    python experiments/reproduce_paper.py eval --limit 200         # quicker: the first 200 questions a task
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
from cwic_exp.files import dumps as json_dumps, write_text_atomic  # noqa: E402
from experiments.cli import at_least, parse_list  # noqa: E402

# run -> (Hydra overrides, run_name, size, technique as the paper's tables name it)
RUNS = {
    "1b": (["+experiment=paper_1b", "trainer.max_steps=18000"], "paper_1b", "1b", "CWIC"),   # Table 3's 18k row
    "1b_nostripes": (["+experiment=paper_1b", "cwic=nostripes", "run_name=paper_1b_nostripes"],
                     "paper_1b_nostripes", "1b", "No Stripes"),
    "1b_mse": (["+experiment=paper_1b", "cwic=mse", "run_name=paper_1b_mse"], "paper_1b_mse", "1b", "MSE"),
    "1b_noste": (["+experiment=paper_1b", "cwic=noste", "run_name=paper_1b_noste"], "paper_1b_noste", "1b",
                 "No STE"),
    "3b": (["+experiment=paper_3b"], "paper_3b", "3b", "CWIC"),
}
DEFAULT_RUNS = "1b,1b_nostripes,1b_mse,3b"      # the paper's tables (its Table 5 lists a noSTE run it reports nowhere)
SIZES = {"1b": ("llama-3.2-1B", "llama3_2_1b"), "3b": ("llama-3.2-3B", "llama3_2_3b")}
COLS = ("all", "mmlu", "winogrande", "arc_challenge", "hellaswag", "arc_easy", "openbookqa", "piqa")

# The paper's Tables 3 and 4 (acc_norm, WinoGrande acc; in COLS' order): (model, technique, step, APR) -> scores.
# Its "No MSE" rows are the ablation that adds the MSE term (§4.2.3: "including MSE on the last hidden states"), which
# the tables here call "MSE".
_PAPER = """
llama-3.2-1B|dense|_|1.00|53.1 38.6 57.9 36.9 64.2 61.7 37.2 74.9
llama-3.2-1B|CWIC|3000|2.05|49.2 27.7 56.0 33.5 58.4 60.2 35.8 72.9
llama-3.2-1B|CWIC|6000|3.05|47.5 26.7 55.7 33.1 53.6 58.0 34.8 70.4
llama-3.2-1B|CWIC|9000|4.05|46.1 26.4 53.3 30.2 50.3 56.9 36.2 69.2
llama-3.2-1B|CWIC|12000|5.05|44.2 25.2 51.6 29.2 48.3 52.8 33.4 68.8
llama-3.2-1B|CWIC|15000|6.05|43.8 24.9 52.2 30.6 46.6 53.4 30.8 68.1
llama-3.2-1B|CWIC|18000|6.05|44.5 26.0 53.4 31.0 48.0 53.9 31.4 68.0
llama-3.2-3B|dense|_|1.00|61.7 55.2 65.1 46.3 74.1 72.1 40.8 78.1
llama-3.2-3B|CWIC|3000|2.05|57.2 47.4 60.1 42.2 68.3 69.1 38.0 75.6
llama-3.2-3B|CWIC|6000|3.05|54.7 38.3 58.3 39.5 64.3 69.4 39.4 73.9
llama-3.2-3B|CWIC|9000|4.05|52.5 32.3 57.0 38.6 61.5 67.1 37.0 74.3
llama-3.2-3B|CWIC|12000|5.05|49.8 28.8 53.6 35.2 59.1 62.6 37.4 71.7
llama-3.2-3B|CWIC|15000|6.05|49.4 27.6 53.8 34.3 57.7 62.2 38.2 72.0
llama-3.2-1B|TEAL|_|1.65|48.1 28.1 55.3 34.0 55.2 56.6 35.6 71.7
llama-3.2-1B|TEAL|_|2.11|39.1 24.1 51.3 24.7 39.0 43.0 30.0 61.9
llama-3.2-1B|TEAL|_|2.44|34.0 22.9 48.0 22.7 28.9 32.8 28.0 55.0
llama-3.2-1B|TEAL|_|2.70|33.2 22.9 48.5 24.9 26.3 29.0 28.4 52.0
llama-3.2-1B|TEAL|_|2.91|32.8 23.0 49.4 25.1 26.0 26.6 29.8 50.1
llama-3.2-3B|TEAL|_|1.78|57.4 48.3 58.6 42.4 69.8 69.1 38.4 75.6
llama-3.2-3B|TEAL|_|2.41|48.5 30.7 54.5 35.2 55.4 58.3 36.0 69.4
llama-3.2-3B|TEAL|_|2.92|37.6 23.2 50.1 26.6 34.5 41.7 26.0 61.3
llama-3.2-3B|TEAL|_|3.35|32.4 23.0 50.4 23.6 26.4 26.4 26.6 50.7
llama-3.2-3B|TEAL|_|3.71|32.2 23.1 49.4 24.1 26.4 26.6 24.6 51.5
llama-3.2-1B|No Stripes|3000|2.05|48.0 27.3 54.8 30.7 56.9 57.1 35.8 73.3
llama-3.2-1B|No Stripes|6000|3.05|45.8 26.2 54.1 30.9 51.4 56.3 32.6 69.1
llama-3.2-1B|No Stripes|9000|4.05|45.2 26.5 53.1 30.2 49.5 55.7 33.2 68.3
llama-3.2-1B|No Stripes|12000|5.05|43.9 26.9 51.9 30.7 46.6 52.0 31.6 67.7
llama-3.2-1B|No Stripes|15000|6.05|42.4 23.6 51.4 28.7 44.6 50.0 31.6 66.7
llama-3.2-1B|No MSE|3000|2.05|48.3 26.8 54.4 34.0 56.3 59.8 35.2 71.8
llama-3.2-1B|No MSE|6000|3.05|45.9 24.7 52.2 30.7 51.4 57.4 34.4 70.5
llama-3.2-1B|No MSE|9000|4.05|45.6 25.8 53.5 29.8 48.9 57.2 35.8 68.1
llama-3.2-1B|No MSE|12000|5.05|45.0 26.3 56.3 29.2 46.6 53.8 34.0 68.8
llama-3.2-1B|No MSE|15000|6.05|44.4 24.9 53.2 29.7 46.5 55.1 33.4 68.2
"""
PAPER = [dict(model=m, technique="MSE" if t == "No MSE" else t, step=s, apr=float(a),
              **dict(zip(COLS, map(float, v.split()))))
         for m, t, s, a, v in (line.split("|") for line in _PAPER.strip().splitlines())]


def teacher_of(size: str) -> str:
    from omegaconf import OmegaConf
    return OmegaConf.load(ROOT / "conf" / "model" / f"{SIZES[size][1]}.yaml").model.name


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)] + ([env["PYTHONPATH"]] if env.get(
        "PYTHONPATH") else []))
    return env


def _call(cmd: list[str], dry: bool) -> None:
    print("+ " + " ".join(cmd), flush=True)
    if not dry:
        rc = subprocess.call(cmd, cwd=ROOT, env=_env())
        if rc:
            raise SystemExit(f"stopped: {cmd[1] if len(cmd) > 1 else cmd[0]} exited with {rc} (the same command "
                             f"again continues from here)")


def train(args) -> None:
    for run in args.runs:
        _call([sys.executable, "train.py", *RUNS[run][0], f"out_dir={args.out}", *args.extra], args.dry_run)


def eval_jobs(args) -> list[tuple[str, list[str], dict]]:
    """(name, overrides, row) of every evaluation that can run now: teachers, TEAL, the exports found."""
    jobs = []
    for size in dict.fromkeys(RUNS[r][2] for r in args.runs):
        label, teacher = SIZES[size][0], teacher_of(size)
        jobs.append((f"{size}-dense", ["method=dense", f"model={teacher}"],
                     dict(model=label, technique="dense", step="_")))
        for s in args.teal:
            jobs.append((f"{size}-teal-{round(s * 100)}", ["method=teal", f"model={teacher}", f"sparsity={s}"],
                         dict(model=label, technique="TEAL", step="_", sparsity=s)))
    for run in args.runs:
        _, run_name, size, technique = RUNS[run]
        hf = Path(args.out) / run_name / "hf"
        steps = set()
        for export in sorted(hf.glob("apr_*x")) + [hf / "final"]:
            meta_file = export / "cwic_train_meta.json"
            if not meta_file.exists():   # an export is renamed into place with its meta: absent, or incomplete
                continue
            meta = json.loads(meta_file.read_text())
            step = meta.get("step", meta.get("steps"))     # a milestone's meta says step, final's (the summary) steps
            if export.name == "final" and (step in steps or not meta.get("finished")):
                continue   # final is a milestone's weights again (the 15k-step runs), or a run stopped early
            steps.add(step)
            jobs.append((f"{run}-{export.name}", ["method=cwic", f"checkpoint={export}", f"model={teacher_of(size)}"],
                         dict(model=SIZES[size][0], technique=technique, step=step, run=run, export=export.name)))
    return [(name + (f"-limit{args.limit}" if args.limit else ""), over, row) for name, over, row in jobs]


def _done(path: Path) -> bool:
    try:
        return "tasks" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def evaluate(args) -> None:
    out = Path(args.out) / "eval"
    index_file = out / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    jobs = eval_jobs(args)
    print(f"eval: {len(jobs)} models ({sum(_done(out / f'{n}.json') for n, *_ in jobs)} done)", flush=True)
    for name, overrides, row in jobs:
        if not _done(out / f"{name}.json"):
            limit = [f"limit={args.limit}"] if args.limit else []
            _call([sys.executable, "-m", "cwic_exp.eval", *overrides, f"name={name}", f"out_dir={out}", *limit,
                   "progress=true"], args.dry_run)
        if not args.dry_run:
            index[name] = row
            write_text_atomic(index_file, json_dumps(index, indent=1))


def our_rows(eval_dir: Path, limit: int | None = None) -> list[dict]:
    """The evaluations of index.json run with `limit` as flat rows: model, technique, step, apr and COLS (percent)."""
    from cwic_exp.eval.table import metric_of
    index_file = eval_dir / "index.json"
    if not index_file.exists():
        raise SystemExit(f"table: no {index_file}: run the eval stage first")
    rows = []
    for name, row in json.loads(index_file.read_text()).items():
        f = eval_dir / f"{name}.json"
        if not _done(f):
            continue
        res = json.loads(f.read_text())
        if (res.get("config") or {}).get("limit") != limit:   # a quicker --limit run's rows stay out of a full table
            continue
        scores = {t: 100 * v[metric_of(t, "acc_norm")] for t, v in res["tasks"].items()
                  if v.get(metric_of(t, "acc_norm")) is not None}
        rows.append(dict(row, name=name, apr=res.get("apr") or 1.0, all=100 * res["all"] if res.get("all")
                         is not None else None, **scores))
    return rows


def paper_match(row: dict) -> dict | None:
    """The paper's row for one of ours: same model and technique, and the same step (CWIC) or the nearest APR."""
    same = [p for p in PAPER if p["model"] == row["model"] and p["technique"] == row["technique"]]
    if row["technique"] not in ("TEAL", "dense"):
        same = [p for p in same if str(p["step"]) == str(row["step"])]
    return min(same, key=lambda p: abs(p["apr"] - row["apr"])) if same else None


def _cell(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def table_md(rows: list[dict]) -> str:
    head = ("| Model | Technique | Step | APR | " + " | ".join(COLS) + " | paper: step, APR, all | Δ all |\n"
            "|---|---|---|---|" + "---|" * len(COLS) + "---|---|")
    lines = [head]
    for r in rows:
        p = paper_match(r)
        ref = f"{p['step']}, {p['apr']:.2f}×, {p['all']:.1f}" if p else "–"
        delta = f"{r['all'] - p['all']:+.1f}" if p and r.get("all") is not None else "–"
        lines.append(f"| {r['model']} | {r['technique']} | {r['step']} | {r['apr']:.2f}× | "
                     + " | ".join(_cell(r.get(c)) for c in COLS) + f" | {ref} | {delta} |")
    return "\n".join(lines)


def _order(r: dict):
    return (r["model"], ["dense", "CWIC", "TEAL", "No Stripes", "MSE", "No STE"].index(r["technique"]),
            r["apr"], str(r["step"]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for k, technique in enumerate(("CWIC", "TEAL", "No Stripes", "MSE", "No STE")):
            for src, data, style in (("ours", rows, "-o"), ("paper", PAPER, ":x")):   # a colour a technique
                pts = sorted((r["apr"], r["all"]) for r in data if r["model"] == model
                             and r["technique"] == technique and r.get("all") is not None)
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{k}", label=f"{technique} ({src})")
        for src, data, ls in (("ours", rows, "-"), ("paper", PAPER, ":")):
            dense = [r["all"] for r in data if r["model"] == model and r["technique"] == "dense"]
            if dense:
                ax.axhline(dense[0], color="grey", ls=ls, label=f"dense ({src})")
        ax.set(title=model, xlabel="active-parameter reduction (APR, ×)", ylabel="mean of the seven tasks (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(args) -> None:
    rows = sorted(our_rows(Path(args.out) / "eval", args.limit), key=_order)
    if not rows:
        raise SystemExit(f"table: no finished evaluation yet{f' with --limit {args.limit}' if args.limit else ''}")
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    limit = "full sets" if not args.limit else f"first {args.limit} questions a task"
    md = ["# The paper's Tables 3 and 4 at full scale (`experiments/reproduce_paper.py`)", "",
          f"acc_norm (WinoGrande: acc), percent; {limit}. \"paper\" is the paper's row of the same model and "
          "technique at the same step (CWIC) or the nearest APR (TEAL); Δ all = ours − paper.", "",
          table_md(rows), "", "![all against APR](all_vs_apr.png)", ""]
    write_text_atomic(res / "README.md", "\n".join(md))
    write_text_atomic(res / "results.json", json_dumps({"rows": rows, "paper": PAPER}, indent=1))
    plot(rows, res / "all_vs_apr.png")
    print(table_md(rows))
    print(json_dumps({"rows": len(rows), "results": str(res)}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["train", "eval", "table", "all"])
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated, of: {', '.join(RUNS)}")
    p.add_argument("--teal", default="0.4,0.5,0.6,0.65,0.7", help="TEAL sparsities to evaluate (greedy)")
    p.add_argument("--out", default=str(ROOT / "runs" / "paper"), help="runs and evaluations")
    p.add_argument("--results", default=str(ROOT / "experiments" / "results" / "paper"))
    p.add_argument("--limit", type=at_least(1), default=None, help="questions a task (default: the full sets)")
    p.add_argument("--extra", nargs="*", default=[], help="extra Hydra overrides for every training run")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    args.runs, args.teal = parse_list(args.runs, str, "--runs"), parse_list(args.teal, float, "--teal")
    if any(r not in RUNS for r in args.runs):
        raise SystemExit(f"--runs: unknown run(s) in {','.join(args.runs)!r}; expected some of {', '.join(RUNS)}")
    if any(not 0 < s < 1 for s in args.teal):
        raise SystemExit(f"--teal: every sparsity must lie in (0, 1), got {args.teal}")
    if args.stage in ("train", "all"):
        train(args)
    if args.stage in ("eval", "all"):
        evaluate(args)
    if args.stage in ("table", "all") and not args.dry_run:
        table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
