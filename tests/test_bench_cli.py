"""The benchmark scripts' command lines parse (`--help` exits 0): a broken help string or argument
definition would otherwise only show on the GPU box. Nothing is timed here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [
    ["experiments/bench_kernels.py", "--device", "cpu", "--help"],
    ["experiments/bench_kernels.py", "--device", "cuda", "--help"],
    ["experiments/bench_kernels.py", "--device", "cuda", "--compact", "--help"],
    ["experiments/bench_decode.py", "--device", "cpu", "--help"],
    ["experiments/bench_decode.py", "--device", "cuda", "--help"],
    ["-m", "experiments.bench.cpu_ab", "--help"],
    ["experiments/bench/gpu_tune_decode.py", "--help"],
    ["experiments/bench/gpu_profile_step.py", "--help"],
])
def test_bench_help_parses(argv):
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
