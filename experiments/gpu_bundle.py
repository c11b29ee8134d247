#!/usr/bin/env python
"""`make gpu-bundle`: everything an offline GPU box needs for training and reproduce-mini, in parts
of at most 56 MiB with checksums (see ../shared/gpu/README.md for the transport).

Writes into .gpu/ (git-ignored):
  teacher.NN/   the SmolLM2-135M-Instruct GGUF, split; `bash .gpu/teacher.NN/stash.sh` on the box,
                the last part verifies and unpacks into /root/stash/teacher/
  data/         packed, tokenised ShareGPT rows (uint16) for the GPU schedule (seq_len 1024)
  evalbundle/   the seven tasks' lm-eval requests (full sets), TEAL calibration rows and the held-out
                chat rows, from `experiments/eval_table.py prepare` (skipped when present)
  whl/          wheels the box lacks (hydra-core, omegaconf, antlr4 runtime, gguf), Python 3.12
  run_env.sh    `source .gpu/run_env.sh` on the box: installs the wheels, sets PYTHONPATH and caches
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ["hydra-core==1.3.2", "omegaconf==2.3.0", "gguf==0.17.1", "PyYAML==6.0.2"]


def wheels(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plat = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
            for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(out), *WHEELS],
                   check=True)
    if not list(out.glob("antlr4_python3_runtime-*.whl")):   # sdist only on PyPI: build the pure wheel
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                        "antlr4-python3-runtime==4.9.3"], check=True)


def data(out: Path, seq_len: int) -> Path:
    from cwic_exp.data import build_packed, save_packed
    from cwic_exp.teacher import load_teacher
    _, tok = load_teacher("smollm2-135m-instruct")
    train, val = build_packed(tok, source="sharegpt", seq_len=seq_len)
    return save_packed(out / f"sharegpt-{seq_len}.pt", train, val, tok)


def evalbundle(out: Path) -> None:
    if (out / "meta.json").exists():
        print(f"{out}: present, kept (delete it to rebuild)", file=sys.stderr)
        return
    subprocess.run([sys.executable, str(ROOT / "experiments" / "eval_table.py"), "prepare", "--out", str(out)],
                   check=True)


def teacher(gpu: Path) -> None:
    from cwic_exp.teacher import resolve_model_source
    gguf = resolve_model_source("smollm2-135m-instruct")["path"]
    pack = ROOT.parent / "shared" / "gpu" / "pack"
    if not pack.exists():
        raise SystemExit(f"{pack} not found: the transport script lives in ../shared/gpu/")
    subprocess.run(["bash", str(pack), "teacher", str(gpu), gguf], check=True)


RUN_ENV = r"""# source me on the GPU box (from the repository root)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site @BUNDLE@/whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD:${PYTHONPATH:-}
export CWIC_CACHE=/tmp/cwic_cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export CWIC_TEACHER=$(ls /root/stash/teacher/*.gguf 2>/dev/null | head -1)
export CWIC_DATA=@DATA@
"""


def run_env(gpu: Path, data_file: Path) -> str:
    """run_env.sh for a bundle in `gpu` holding `data_file`, its paths as the box's shell sees them from the
    repository root, where it is sourced (a bundle outside the repository: absolute paths)."""
    root = ROOT.resolve()

    def at(p: Path) -> str:
        p = Path(p).resolve()
        return f"$PWD/{p.relative_to(root)}" if p.is_relative_to(root) else str(p)
    return RUN_ENV.replace("@BUNDLE@", at(gpu)).replace("@DATA@", at(data_file))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / ".gpu"))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--skip-teacher", action="store_true")
    ap.add_argument("--skip-eval", action="store_true", help="no evaluation bundle (training only)")
    ap.add_argument("--skip-wheels", action="store_true", help="no wheels (a machine that has the packages)")
    a = ap.parse_args(argv)
    gpu = Path(a.out)
    gpu.mkdir(parents=True, exist_ok=True)
    if not a.skip_wheels:
        wheels(gpu / "whl")
    d = data(gpu / "data", a.seq_len)
    if not a.skip_eval:
        evalbundle(gpu / "evalbundle")
    if not a.skip_teacher:
        teacher(gpu)
    (gpu / "run_env.sh").write_text(run_env(gpu, Path(d)))
    sizes = {str(p.relative_to(gpu)): p.stat().st_size for p in sorted(gpu.rglob("*")) if p.is_file()}
    print(json.dumps({"bundle": str(gpu), "data": str(d), "files": len(sizes),
                      "mib": round(sum(sizes.values()) / 2**20, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
