"""The benchmark scripts' command lines parse (`--help` exits 0): a broken help string or argument
definition would otherwise only show on the GPU box. Nothing is timed here."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import strict_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [
    ["experiments/bench_kernels.py", "--device", "cpu", "--help"],
    ["experiments/bench_kernels.py", "--device", "cuda", "--help"],
    ["experiments/bench_kernels.py", "--device", "cuda", "--compact", "--help"],
    ["experiments/bench_decode.py", "--device", "cpu", "--help"],
    ["experiments/bench_decode.py", "--device", "cuda", "--help"],
    ["-m", "experiments.bench.cpu_ab", "--help"],
    ["-m", "experiments.bench.cpu_cost_model", "--help"],
    ["experiments/bench/gpu_cost_model.py", "--help"],
    ["experiments/bench/gpu_tune_decode.py", "--help"],
    ["experiments/bench/gpu_profile_step.py", "--help"],
    ["experiments/bench/gpu_prefill.py", "--help"],
    ["experiments/bench/gpu_ffn_balance.py", "--help"],
    ["experiments/bench/sass_stats.py", "--help"],
    ["experiments/bench/gpu_ffn_clock.py", "--help"],
    ["experiments/bench/gpu_batch_tiles.py", "--help"],
])
def test_bench_help_parses(argv):
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_gpu_prefill_dry_run():
    """The prefill benchmark end to end on a tiny model on the CPU: every path timed, its logits compared."""
    r = subprocess.run([sys.executable, "experiments/bench/gpu_prefill.py", "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = strict_json(r.stdout.strip().splitlines()[-1])
    assert res["bench"] == "gpu_prefill" and [row["tokens"] for row in res["rows"]] == [4, 20]
    for row in res["rows"]:
        for k in ("dense", "kernels", "gemm", "gemm_once"):
            assert row[f"{k}_ms"] > 0
        # the CPU computes both CWIC paths in fp32: the same logits up to summation order
        assert abs(row["gemm_err"] - row["kernels_err"]) <= 0.05 * row["kernels_err"] + 1e-4, row


def test_gpu_batch_tiles_dry_run(tmp_path):
    """The small-batch tile sweep on tiny shapes on the CPU (Triton interpreter): every config timed at every batch
    size against dense and the prefill GEMMs; the least-total config is the one whose times sum the least."""
    r = subprocess.run([sys.executable, "experiments/bench/gpu_batch_tiles.py", "--dry-run", "--shapes", "64x96",
                        "--batches", "2,5", "--configs", "current,nopipe,w8", "--share", "0.5", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = strict_json(r.stdout.strip().splitlines()[-1])
    sh = res["shapes"]["64x96"]
    assert set(sh["speedup_current"]) == {"2", "5"} and all(v > 0 for v in sh["speedup_current"].values())
    full = strict_json((tmp_path / "gpu_batch_tiles.json").read_text())["shapes"]["64x96"]
    totals = {c: sum(t.values()) for c, t in full["configs"].items()}
    assert set(totals) == {"current", "nopipe", "w8"} and sh["best_total"] == min(totals, key=totals.get)
    assert 0 < full["union"]["2"] <= full["union"]["5"] <= 1                 # more tokens: a larger union


@pytest.mark.parametrize("argv,needle", [
    (["--batches", "1,4"], "--batches"), (["--batches", "x"], "--batches"),
    (["--configs", "current,bogus"], "--configs"), (["--shapes", "64by96"], "--shapes"), (["--share", "2"], "--share"),
])
def test_gpu_batch_tiles_checks_its_arguments_first(argv, needle):
    r = subprocess.run([sys.executable, "experiments/bench/gpu_batch_tiles.py", *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(needle) and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_gpu_persistent_probe_checks_its_kernel_against_its_reference(monkeypatch):
    """The persistent-kernel probe on a tiny model, CPU interpreter: one program runs every phase of two layers with
    its grid-wide hand-offs, and each phase as its own launch over three programs; both match the probe's PyTorch
    reference (which a wrong o bias misses by far), at density 0.5, nothing on and everything on, and write the
    cache at pos. A density out of (0, 1] and more programs than can be resident are refused by name."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    try:
        import gpu_persistent as P
    finally:
        sys.path.pop(0)
    import torch
    m = P.make_model("tiny", 2, 48, torch.device("cpu"))
    for dens in (0.5, None, 1.0):
        P.set_density(m, dens)
        assert P.check(m, 40, phased=False, nprog=1) < 1e-5
        assert P.check(m, 40, phased=True, nprog=3) < 1e-5
    P.set_density(m, 0.5)
    m["bo"] += 0.05                      # the reference sees another o bias than the kernel: caught
    h = torch.randn(m["d"], generator=torch.Generator().manual_seed(7))
    ref = P.reference(m, h, 40)
    m["bo"] -= 0.05
    st = P.Step(m, 40, nprog=1)
    st.set_input(h)
    st.run()
    assert ((st.output() - ref).abs().max() / ref.abs().max()).item() > 1e-3
    for argv, needle in ((["--densities", "off,2"], "--densities"), (["--programs", "9"], "--programs")):
        r = subprocess.run([sys.executable, "experiments/bench/gpu_persistent.py", "--tiny", "--check-only", *argv],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "1"})
        assert r.returncode != 0 and needle in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr


def test_gpu_ffn_balance_dry_run():
    """The balance benchmark on tiny shapes on the CPU: the even spread puts the mean number of active units (rounded
    down, or one more) in every program, the random one the same total unevenly; every case timed."""
    r = subprocess.run([sys.executable, "experiments/bench/gpu_ffn_balance.py", "--dry-run", "--fractions", "0.3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = strict_json(r.stdout.strip().splitlines()[-1])
    rows = {row["kind"]: row for row in res["rows"]}
    assert set(rows) == {"none", "random", "even", "all"} and all(row["us"] > 0 for row in res["rows"])
    assert rows["even"]["busiest"] <= int(rows["even"]["mean"]) + 1 < rows["random"]["busiest"] <= 32
    assert rows["none"]["busiest"] == 0 and rows["all"]["busiest"] == 32


def test_gpu_chat_engine_dry_run():
    """The chat-backend benchmark on a tiny model on the CPU: every way timed, the engine backend's figures comparable
    with the HF backend's (sums within 1 %: bf16, so single figures may differ where a threshold flips)."""
    r = subprocess.run([sys.executable, "experiments/bench/gpu_chat_engine.py", "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = strict_json(r.stdout.strip().splitlines()[-1])
    assert [row["way"] for row in res["rows"]] == ["engine, graph, no count", "engine backend (counts)",
                                                    "engine feed, count off", "hf backend"]
    assert all(row["tokens_per_s"] > 0 for row in res["rows"])
    assert res["figures_sum_rel_diff"] < 0.01 and 0 < res["mean_figure_engine"] < res["dense_per_token"]


def test_sass_stats_reads_the_compiled_ffn():
    """The offline SASS count of the one-launch FFN (no GPU: Triton's own ptxas): the registers, the two step loops
    (gate, up/down) with their instructions, and the programs an SM that the registers allow; 8 warps a program
    spread the same tile over twice the threads, so each step's body is shorter; the weight tiles' layouts are read off
    the TTGIR. Bad overrides are refused."""
    import math
    import os
    triton = pytest.importorskip("triton")
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(tools, t)) for t in ("ptxas", "cuobjdump", "nvdisasm")):
        pytest.skip("this Triton install has no NVIDIA tools")
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    from sass_stats import programs_per_sm
    # register-limited occupancy (256-register allocation a warp, 4 × 16384 registers, ≤ 64 warps, ≤ 32 programs)
    assert [programs_per_sm(r, w) for r, w in ((245, 4), (128, 8), (160, 8), (100, 4), (32, 1))] == [2, 2, 1, 4, 32]

    def run(*tiles):
        r = subprocess.run([sys.executable, "experiments/bench/sass_stats.py", *tiles], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return strict_json(r.stdout.strip().splitlines()[-1])

    four, eight = run(), run("num_warps=8")
    for res, warps in ((four, 4), (eight, 8)):
        assert res["bench"] == "sass_stats" and 0 < res["registers"] <= 255
        assert res["programs_per_sm"] == programs_per_sm(res["registers"], warps) >= 1
        assert len(res["loops"]) >= 2 and all(lp["instructions"] > 0 for lp in res["loops"])
        assert res["instructions"] > sum(lp["instructions"] for lp in res["loops"])
        # the weight tiles' layouts: the gate's (gate step × units) and the up/down's (units a step × d) tiles, each
        # spread over all of the program's warps
        lay = {tuple(t["shape"]): t for t in res["weight_layouts"]}
        assert set(lay) == {(512, 32), (4, 2048)}, lay
        assert all(math.prod(t["warpsPerCTA"]) == warps and math.prod(t["threadsPerWarp"]) == 32 for t in lay.values())
    assert eight["overrides"] == {"num_warps": 8}
    assert max(lp["instructions"] for lp in eight["loops"]) < max(lp["instructions"] for lp in four["loops"])
    bad = subprocess.run([sys.executable, "experiments/bench/sass_stats.py", "num_warps"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "key=value" in bad.stderr


def test_decode_apr_correction_steps():
    """The decode benchmarks (CPU and GPU) move their calibration target until the decode reads 1/APR: proportional after one
    try, then secant steps in log space, which land on a log-linear relation in one step; a flat pair of tries
    does not send the target to infinity, a falling pair does not send it far, and a bracket of the APR is kept."""
    import math
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    from apr_correction import closest_try
    from apr_correction import next_calibration_target as nxt
    assert closest_try([(2.0, 2.5), (2.4, 3.3), (2.2, 2.8)], 3.0) == (2.2, 2.8)
    assert math.isclose(nxt([(3.0, 3.43)], 3.0), 3.0 * 3.0 / 3.43)
    law = lambda t: 1.2 * t ** 1.9                                  # noqa: E731  decode APR of a calibration target
    t1 = 2.5
    t2 = nxt([(t1, law(t1))], 3.0)
    t3 = nxt([(t1, law(t1)), (t2, law(t2))], 3.0)
    assert math.isclose(law(t3), 3.0, rel_tol=1e-9)
    assert math.isclose(nxt([(2.0, 2.5), (2.5, 2.5)], 3.0), 3.0)           # flat: proportional again
    assert math.isclose(nxt([(2.0, 2.5), (2.0, 2.7)], 3.0), 2.0 * 3.0 / 2.7)
    assert math.isclose(nxt([(2.0, 2.0), (2.1, 3.0 * 0.9)], 3.0), 2.1 * math.exp(math.log(3.0 / 2.7) / 4.0))  # clamped
    # the decode APR need not rise with the target (the text changes): a falling pair steps proportionally ...
    assert math.isclose(nxt([(2.0, 2.6), (2.2, 2.4)], 3.0), 2.2 * 3.0 / 2.4)
    # ... and once tries bracket the APR, the next target stays between the highest one below and the lowest above
    # (a SmolLM2 run's tries: the old rule sent the fourth target to 4.76)
    tries = [(3.0, 3.3799), (2.6628, 2.8723), (2.7491, 2.6147)]
    t4 = nxt(tries, 3.0)
    assert 2.7491 < t4 < 3.0
    lo, hi = (2.7491, 2.6147), (3.0, 3.3799)                           # the tightest bracket: interpolated inside
    assert math.isclose(t4, lo[0] * math.exp(math.log(hi[0] / lo[0]) * math.log(3.0 / lo[1]) / math.log(hi[1] / lo[1])))
    # inside a bracket the interpolation is not clamped: a steep pair lands inside it, a flat one too
    assert math.isclose(nxt([(2.0, 2.0), (2.1, 30.0)], 3.0), 2.0 * (2.1 / 2.0) ** (math.log(1.5) / math.log(15.0)))
    flat = 2.0 * 2.0 ** (math.log(3.0 / 2.99) / math.log(3.01 / 2.99))
    assert math.isclose(nxt([(2.0, 2.99), (4.0, 3.01)], 3.0), flat)
    # a bracket among earlier tries counts even when the highest target below lies above the lowest one above
    t = nxt([(2.0, 2.5), (2.2, 3.2), (2.5, 2.8)], 3.0)
    assert 2.0 < t < 2.2
    assert math.isclose(nxt([(3.0, 2.7), (3.3, 3.0)], 3.0), 3.3 * math.exp(0.0))   # an exact hit: stays


def test_gpu_ffn_clock_analysis(tmp_path):
    """The FFN phase-clock analysis on clocks whose answer is known: each phase's duration, when the launch's programs
    reach each point, the bytes a phase reads over its wall time, the SM and counts packed in the spare slot; a
    recording saved as the probe saves it reloads through --load into the same table."""
    import json
    import numpy as np
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    from gpu_ffn_clock import analyse
    S, L, P = 2, 3, 8
    dur = np.array([100, 2000, 5000, 700, 4000, 300])                  # ns a phase, every program
    T = np.zeros((S, L, P, 16), np.int64)
    start = 10_000 + 50 * np.arange(P)                                  # program p enters 50·p ns after the first
    T[..., 0] = start
    T[..., 1:7] = start[:, None] + np.cumsum(dur)[None, :]
    T[..., 8:15] = 2 * (T[..., 0:7] - 10_000)                           # a 2 GHz clock64
    T[..., 7] = (np.arange(P) // 2) * 65536 + 800                       # two programs an SM, 800 active inputs
    T[..., 15] = 10                                                     # 10 active units a program
    meta = dict(model="1B", d=2048, F=8192, layers=L, programs=P, apr_calibration=3.0, config=dict(BLOCK_U=32),
                gpu="synthetic", torch="-", triton="-", pdl=True)
    r = analyse(meta, T)
    assert r["sm_clock_ghz"] == 2.0 and r["programs_per_sm"] == 2
    assert [v["median_us"] for v in r["phases"].values()] == [0.1, 2.0, 5.0, 0.7, 4.0, 0.3]
    assert all(v["median_us_from_cycles"] == v["median_us"] for v in r["phases"].values())
    ev = r["events_from_first_entry"]
    assert ev["entry"]["first_us"] == 0.0 and ev["entry"]["last_us"] == 0.35
    assert ev["atomics issued"]["first_us"] == 12.1 and r["launch_us"] == 12.45
    gate = r["bandwidth"]["gate"]                                       # 8 programs × 800 rows × 32 units × 2 B
    assert gate["mb_per_launch"] == round(8 * 800 * 64 / 1e6, 3)
    assert math.isclose(gate["tb_s_over_launch_wall"], round(8 * 800 * 64 / (5000 + 350) / 1e3, 3))
    ud = r["bandwidth"]["up/down loop"]                                 # 8 × 10 units × (W_up + W_downᵀ rows)
    assert ud["mb_per_launch"] == round(8 * 10 * 2 * 2048 * 2 / 1e6, 3)
    assert r["active_inputs_median"] == 800 and r["active_units_median"] == 10
    np.savez_compressed(tmp_path / "ffn_clock.npz", times=T, meta=json.dumps(meta))
    out = subprocess.run([sys.executable, "experiments/bench/gpu_ffn_clock.py", "--load", str(tmp_path / "ffn_clock.npz"),
                          "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert strict_json(out.stdout.strip().splitlines()[-1])["phases"] == r["phases"]
    assert "| up/down loop | 4.0 |" in (tmp_path / "o" / "ffn_clock.md").read_text()


def test_gpu_decode_dry_run_corrects_the_apr(tmp_path):
    """The GPU decode benchmark (tiny model, CPU, interpreter) corrects each target's thresholds on the engine's own
    decode: every CWIC row keeps its tries (1 / density, decode APR), at most 1 + apr_correction.STEPS (five), and
    times the closest one; its kernel breakdowns (dense, 3×) take their steps without passing the engine's max_len."""
    from experiments.bench.apr_correction import STEPS
    r = subprocess.run([sys.executable, "experiments/bench_decode.py", "--device", "cuda", "--dry-run", "--aprs", "2,3",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = strict_json((tmp_path / "gpu_decode.json").read_text())
    # the kernel breakdowns' steps fit the engine (they overran its max_len after the timed decodes before)
    bd = (res["breakdown_dense"], res["breakdown_cwic_3x"])
    assert bd == ({}, {}), bd
    rows = [x for x in res["rows"] if "apr_target" in x]
    assert [x["apr_target"] for x in rows] == [2.0, 3.0]
    for x in rows:
        tries = x["apr_corrections"]
        assert 1 <= len(tries) <= 1 + STEPS and all(t > 1.0 and a > 1.0 for t, a in tries)
        best = min(abs(math.log(a / x["apr_target"])) for _, a in tries)
        assert abs(math.log(x["apr"] / x["apr_target"])) <= best + 1e-3, (x["apr"], tries)


def test_cost_model_fit_recovers_a_line():
    from experiments.bench.cpu_cost_model import fit
    a, b, r2 = fit([0.0, 10.0, 20.0, 40.0], [0.5 + 0.25 * x for x in (0.0, 10.0, 20.0, 40.0)])
    assert abs(a - 0.5) < 1e-12 and abs(b - 0.25) < 1e-12 and abs(r2 - 1.0) < 1e-12
    a, b, r2 = fit([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert abs(b - 0.5) < 1e-12 and r2 < 0.5


def test_gpu_cost_model_dry_run(tmp_path):
    """The GPU cost model end to end on a tiny model on the CPU: every configuration timed, 'off' reads nothing, and
    the first density's thresholds come back after 'off'."""
    r = subprocess.run([sys.executable, "experiments/bench/gpu_cost_model.py", "--dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = strict_json((tmp_path / "cost_model_gpu.json").read_text())
    assert set(res["us_per_step"]) == {"dense", "d=0.5", "d=0.333", "d=0.25", "d=0.167", "off"}
    assert res["active_off"] == 0.0                      # HF's accounting of the engine's 'off' tokens: nothing on
    assert res["apr_recheck"] == res["apr"]["d=0.5"]      # set_density undoes set_off exactly
    assert all(res["apr"][k] > 1.0 for k in ("d=0.5", "d=0.333", "d=0.25", "d=0.167"))
    assert res["apr"]["d=0.167"] > res["apr"]["d=0.5"]
    assert strict_json(r.stdout.strip().splitlines()[-1])["bench"] == "gpu_cost_model"


@pytest.mark.parametrize("argv,needle", [
    (["experiments/bench_decode.py", "--device", "cpu", "--aprs", "abc"], "--aprs"),
    (["experiments/bench_decode.py", "--device", "cpu", "--aprs", "0.5"], "--aprs"),
    (["experiments/bench_decode.py", "--device", "cpu", "--models", "smollm2,bogus"], "--models"),
    (["experiments/bench_kernels.py", "--device", "cpu", "--dtypes", "bf16,fp16"], "--dtypes"),
    (["experiments/bench_kernels.py", "--device", "cpu", "--sparsities", "0.5,1.5"], "--sparsities"),
])
def test_bench_arguments_are_checked_before_any_work(argv, needle):
    """A bad name or number is one line before anything is built or timed: `--models smollm2,bogus` used to time
    SmolLM2 in full and then die without writing it, `--aprs abc` was a ValueError traceback."""
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(needle) and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "loaded" not in r.stdout and "CPU decode:" not in r.stdout and "CPU kernels:" not in r.stdout
