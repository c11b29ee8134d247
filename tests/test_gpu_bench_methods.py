"""The GPU benchmarks' host-side arithmetic, pinned on the CPU: how `experiments/bench/gpu_kernels.py` turns its inputs
and timings into densities, speedups, GB/s, % of ideal, the decoder-layer aggregate and the last-line JSON, how
`experiments/bench/gpu_decode.py` calibrates, times and reports a decode, and where the dispatchers
(`experiments/bench_kernels.py`, `experiments/bench_decode.py`) send each device.

Each test was written against a mutant of that code that every earlier test let through. Nothing here is timed and no
GPU is needed: the kernels, CUDA graphs, events, clocks, engines and profiler are fakes whose costs are known, so every
figure has an exact expected value (the one exception, a density hitting its target, has a tolerance far from the
wrong readings).
"""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def K(monkeypatch):
    """experiments.bench.gpu_kernels, with the globals its `main` rewrites (DRY_RUN, SHAPES) restored afterwards."""
    import experiments.bench.gpu_kernels as mod
    monkeypatch.setattr(mod, "DRY_RUN", mod.DRY_RUN)
    monkeypatch.setattr(mod, "SHAPES", mod.SHAPES)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return mod


@pytest.fixture
def D(monkeypatch):
    """experiments.bench.gpu_decode, with its DRY_RUN restored afterwards."""
    import experiments.bench.gpu_decode as mod
    monkeypatch.setattr(mod, "DRY_RUN", mod.DRY_RUN)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return mod


def read_fraction(x, mean, thr, m, stripe):
    """The fraction of an (n, m) matrix's weights the masked GEMV reads: the kernel's own mask (granular_mask: an
    input is read by a stripe unless |x - x̄| is below its threshold), each stripe weighted by its rows."""
    from cwic_kernels.reference import granular_mask
    k = thr.shape[0]
    rows = torch.tensor([min(stripe, m - r * stripe) for r in range(k)], dtype=torch.float64)
    g = granular_mask(x, mean, thr).double()                                      # (B, k, n)
    return float((g * rows[None, :, None]).sum() / (x.shape[0] * m * x.shape[1]))


# ----------------------------------------------------------------------------- gpu_kernels.py: inputs and density


def test_gpu_kernel_inputs_hit_the_target_density_in_every_stripe(K):
    """make_inputs(density): θ is the calibration tokens' (1 − density) quantile of |z| / jitter per stripe, times each
    feature's σ, so on the timed tokens every stripe (the partial last one too) reads the target fraction of its
    inputs; density 1 is exactly zero thresholds (the 0 % row reads everything, not nearly everything). The quantile
    taken at `density` or thresholds without σ miss by far more than the 0.02 allowed here."""
    from cwic_kernels.reference import granular_mask
    n, m = 64, 2 * K.STRIPE + 200
    torch.manual_seed(0)
    x1, mean1, thr1 = K.make_inputs(n, m, 8, 1.0, CPU, seed=3)
    assert thr1.shape == (3, n) and torch.equal(thr1, torch.zeros(3, n)) and x1.dtype == torch.bfloat16
    for density in (0.75, 0.34, 0.1):
        torch.manual_seed(0)
        x, mean, thr = K.make_inputs(n, m, 1024, density, CPU, seed=3)
        assert thr.shape == (3, n) and x.shape == (1024, n)
        per_stripe = granular_mask(x, mean, thr).float().mean((0, 2))
        assert (per_stripe - density).abs().max().item() < 0.02, (density, per_stripe)


def test_tokens_sharing_their_sparsity_keep_a_tokens_density_and_shrink_the_union(K):
    """make_inputs(share, group): a group's tokens take their common value for each input with probability `share`, so
    one token still reads the target density while B tokens together read less than B independent ones (share 0); at
    share 1 a group's tokens are the same token. A share outside [0, 1] or tokens that are not whole groups are
    refused."""
    from cwic_kernels.reference import granular_mask
    n, m, B = 256, 2 * K.STRIPE, 4

    def densities(share):
        torch.manual_seed(0)
        x, mean, thr = K.make_inputs(n, m, 64 * B, 0.34, CPU, seed=1, share=share, group=B)
        g = granular_mask(x, mean, thr).view(64, B, -1, n)
        return g.float().mean().item(), g.any(1).float().mean().item(), x

    tok0, union0, _ = densities(0.0)
    tok, union, _ = densities(0.55)
    tok1, union1, x1 = densities(1.0)
    assert abs(tok0 - 0.34) < 0.02 and abs(tok - 0.34) < 0.02 and abs(tok1 - 0.34) < 0.03
    assert union1 == pytest.approx(tok1) and tok1 < union < union0 - 0.05     # independent tokens: 1 - 0.66^4 ≈ 0.81
    assert torch.equal(x1.view(64, B, n)[:, 0], x1.view(64, B, n)[:, 3])
    with pytest.raises(ValueError, match="share"):
        K.make_inputs(n, m, 8, 0.34, CPU, share=1.5)
    with pytest.raises(ValueError, match="groups"):
        K.make_inputs(n, m, 6, 0.34, CPU, share=0.5, group=4)


def test_measured_density_weights_each_stripe_by_its_rows_and_reads_ties_as_the_kernel_does(K):
    """measured_density is the fraction of the weights the kernel reads: a partial last stripe counts its own rows
    (not a full stripe's), and an input exactly at its threshold is read (granular_mask's rule, `not below`)."""
    S = K.STRIPE
    m, n = S + 100, 4
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]]).bfloat16()
    mean = torch.zeros(n)
    thr = torch.tensor([[0.0] * n, [9.0] * n])                      # stripe 0 reads all, the 100-row stripe none
    assert math.isclose(K.measured_density(x, mean, thr, m), S / m, rel_tol=1e-6)
    thr = torch.tensor([[9.0] * n, [0.0] * n])                      # only the 100-row stripe
    assert math.isclose(K.measured_density(x, mean, thr, m), 100 / m, rel_tol=1e-6)
    tie = x.float().abs()[0].expand(2, n).clone()                    # every threshold exactly |x - x̄|
    assert K.measured_density(x, mean, tie, m) == 1.0 == read_fraction(x, mean, tie, m, S)


# ----------------------------------------------------------------------------- gpu_kernels.py: one matrix's rows


class FakeShape:
    def __init__(self, n, m, copies):
        self.n, self.m, self.copies = n, m, copies
        self.W = [torch.full((m, n), float(i + 1)) for i in range(copies)]
        self.WT = [w.t() for w in self.W]
        self.bias = torch.zeros(m)


def fake_gemv(monkeypatch, calls):
    """cwic_kernels.gpu.gemv's gemv_ex / gemv_config replaced by recorders (gemv_config's result names its
    overrides)."""
    from cwic_kernels.gpu import gemv as G

    def gemv_ex(x, wt, mean, thr, bias, stripe, **kw):
        calls.append(dict(kind="sparse", x=x, wt=wt, mean=mean, thr=thr, stripe=stripe, **kw))

    def gemv_config(B, n, m, stripe, device, **over):
        return dict(grid=(7, 1, 1), B=B, n=n, m=m, stripe=stripe, over=over)
    monkeypatch.setattr(G, "gemv_ex", gemv_ex)
    monkeypatch.setattr(G, "gemv_config", gemv_config)
    return G


def fake_timing(monkeypatch, K, calls, dense_us, sparse_us):
    """F.linear recorded; time_graph runs every fn once and returns dense_us or sparse_us(calls of that graph)."""
    def linear(x, w):
        calls.append(dict(kind="dense", x=x, w=w))
    monkeypatch.setattr(K, "F", types.SimpleNamespace(linear=linear))

    def time_graph(fns, reps_target_ms=20.0, repeats=5):
        start = len(calls)
        for f in fns:
            f()
        mine = calls[start:]
        assert len(mine) == len(fns) and len({c["kind"] for c in mine}) == 1
        return dense_us if mine[0]["kind"] == "dense" else sparse_us(mine)
    monkeypatch.setattr(K, "time_graph", time_graph)


def test_bench_shape_reports_speedup_density_ideal_and_bandwidth_from_its_timings(K, monkeypatch):
    """bench_shape, with a fake kernel and timer (dense 100 µs, sparse 40 µs): speedup = dense / sparse; the density
    is the fraction of the weights the timed calls read (their own tokens and thresholds), near 1 − sparsity;
    ideal = 1 / density; % of ideal = speedup × density; GB/s = bf16 bytes (2 a weight) over the time, the sparse one
    counting only the bytes read. Copy i is timed on its own token and weights (no closure left pointing at the last
    copy), with the tuned config when there is one and the masked-load (not the compacted) kernel."""
    calls = []
    G = fake_gemv(monkeypatch, calls)
    fake_timing(monkeypatch, K, calls, 100.0, lambda c: 40.0)
    S = FakeShape(128, 2 * K.STRIPE + 100, 24)
    torch.manual_seed(0)
    rows = K.bench_shape(S, [0.0, 0.25, 0.66], CPU, config=dict(num_warps=8), seed=5)
    assert [r["sparsity"] for r in rows] == [0.0, 0.25, 0.66]
    dense = [c for c in calls if c["kind"] == "dense"]
    assert len(dense) == S.copies and all(c["w"] is S.W[i] and c["x"].shape == (1, S.n) for i, c in enumerate(dense))
    sparse = [c for c in calls if c["kind"] == "sparse"]
    assert len(sparse) == 3 * S.copies
    wbytes = S.n * S.m * 2
    for j, r in enumerate(rows):
        mine = sparse[j * S.copies:(j + 1) * S.copies]
        x = torch.cat([c["x"] for c in mine])
        assert len({c["x"].data_ptr() for c in mine}) == S.copies
        for i, c in enumerate(mine):
            assert c["x"].shape == (1, S.n) and c["wt"] is S.WT[i] and c["stripe"] == K.STRIPE
            assert c["compact"] is False
            assert c["config"] == G.gemv_config(1, S.n, S.m, K.STRIPE, CPU, num_warps=8)
        dens = read_fraction(x, mine[0]["mean"], mine[0]["thr"], S.m, K.STRIPE)
        assert math.isclose(r["density"], dens, rel_tol=1e-5)
        assert abs(dens - (1 - r["sparsity"])) < 0.04, (r["sparsity"], dens)
        assert r["dense_us"] == 100.0 and r["sparse_us"] == 40.0 and r["speedup"] == 2.5
        assert math.isclose(r["ideal"], 1 / dens, rel_tol=1e-5)
        assert math.isclose(r["pct_ideal"], 100 * 2.5 * dens, rel_tol=1e-5)
        assert math.isclose(r["dense_gbps"], wbytes / 100.0 / 1e3)
        assert math.isclose(r["sparse_gbps"], dens * wbytes / 40.0 / 1e3, rel_tol=1e-5)
    calls.clear()
    K.bench_shape(S, [0.5], CPU, config=None)
    assert all(c["config"] is None for c in calls if c["kind"] == "sparse")


def test_time_graph_is_the_median_per_call_of_the_replays(K, monkeypatch):
    """time_graph on a fake CUDA whose graph replays cost, in the five timed repeats, 2, 1, 9, 3 and 2 µs a call
    (events in ms, replays cycling len(fn_list) calls): the result is µs a call, the median of the repeats (2, not
    the mean 3.4 nor the minimum 1), divided by the replays in each repeat and by the calls in the graph."""
    per_call = [2.0, 1.0, 9.0, 3.0, 2.0]
    fns = [lambda: None] * 3
    clock = dict(t=0.0, repeat=-1)                                   # seconds

    class Graph:
        def replay(self):
            if clock["repeat"] < 0:                                   # before the events: 2 ms a replay
                clock["t"] += 2e-3
            else:
                clock["t"] += per_call[clock["repeat"]] * len(fns) * 1e-6

    class Event:
        made = 0

        def __init__(self, enable_timing=False):
            Event.made += 1
            clock["repeat"] = (Event.made - 1) // 2                    # two events a repeat
            self.t = None

        def record(self):
            self.t = clock["t"]

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3                           # ms

    class Stream:
        def wait_stream(self, other):
            pass
    cuda = types.SimpleNamespace(
        synchronize=lambda: None, Stream=Stream, current_stream=lambda: Stream(),
        stream=lambda s: contextlib.nullcontext(), CUDAGraph=Graph, graph=lambda g: contextlib.nullcontext(),
        Event=Event)
    monkeypatch.setattr(K, "torch", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(K, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    monkeypatch.setattr(K, "DRY_RUN", False)
    assert math.isclose(K.time_graph(fns, reps_target_ms=20.0, repeats=5), 2.0, rel_tol=1e-9)
    assert clock["repeat"] == 4


def test_sweep_lists_the_configs_fastest_first_and_skips_a_failing_one(K, monkeypatch):
    """sweep_configs: every candidate tile is timed at the given sparsity, one the compiler rejects is skipped, and
    the list comes back fastest first (main takes the first as the 1B shapes' tuned config)."""
    calls = []
    fake_gemv(monkeypatch, calls)
    cost = {(): 30.0, (("num_warps", 8),): 12.0, (("pipe", True),): 50.0}
    timed = []

    def time_graph(fns, reps_target_ms=20.0, repeats=5):
        start = len(calls)
        for f in fns:
            f()
        timed.append(calls[start]["config"]["over"])
        over = tuple(sorted(timed[-1].items()))
        if over == (("pipe", True), ("waves", 1)):
            raise RuntimeError("out of resources")
        return cost.get(over, 20.0 + len(over))
    monkeypatch.setattr(K, "time_graph", time_graph)
    out = K.sweep_configs(FakeShape(64, K.STRIPE, 2), CPU)
    us = [u for _, _, u in out]
    assert us == sorted(us) and out[0][0] == dict(num_warps=8) and out[-1][0] == dict(pipe=True)
    assert dict(pipe=True, waves=1) in timed and dict(num_warps=8) in timed and {} in timed
    assert sorted(map(str, (c for c, _, _ in out))) == sorted(str(c) for c in timed if c != dict(pipe=True, waves=1))
    assert all(gr == (7, 1, 1) for _, gr, _ in out)


def test_small_batches_report_the_union_density_of_each_copys_tokens(K, monkeypatch):
    """bench_batches: copy i is timed on its own B tokens, and a stripe is read when ANY of them needs it, so the
    density is the union over those B tokens (above one token's), ideal = 1 / union, speedup = dense / sparse."""
    calls = []
    fake_gemv(monkeypatch, calls)
    fake_timing(monkeypatch, K, calls, 90.0, lambda c: 60.0)
    S = FakeShape(64, 2 * K.STRIPE, 16)
    torch.manual_seed(0)
    rows = K.bench_batches(S, CPU, sparsity=0.66, batches=(1, 4))
    assert [r["batch"] for r in rows] == [1, 4]
    sparse = [c for c in calls if c["kind"] == "sparse"]
    for j, (r, B) in enumerate(zip(rows, (1, 4))):
        mine = sparse[j * S.copies:(j + 1) * S.copies]
        assert all(c["x"].shape == (B, S.n) and c["wt"] is S.WT[i] for i, c in enumerate(mine))
        from cwic_kernels.reference import granular_mask
        g = torch.stack([granular_mask(c["x"], c["mean"], c["thr"]) for c in mine])      # (copies, B, k, n)
        union = float(g.any(1).float().mean())
        assert math.isclose(r["union_density"], union, rel_tol=1e-6)
        assert math.isclose(r["ideal"], 1 / union, rel_tol=1e-6) and r["speedup"] == 1.5
    assert rows[1]["union_density"] > rows[0]["union_density"] + 0.2


# ----------------------------------------------------------------------------- gpu_kernels.py: main's aggregate


def shape_figures(n, m, sp):
    """The fake bench_shape's row for an (n, m) matrix at sparsity sp: every figure differs between shapes."""
    dense = n * m / 1e4
    sparse = dense * (1 - sp * (0.5 + n / 1000))
    dens = 1 - sp * (0.4 + 0.5 * m / (m + 500))
    return dict(sparsity=sp, density=dens, dense_us=dense, sparse_us=sparse, speedup=dense / sparse,
                ideal=1 / dens, pct_ideal=100 * dense / sparse * dens, dense_gbps=1.0, sparse_gbps=1.0)


def test_kernel_main_aggregates_the_layer_and_writes_the_summary(K, monkeypatch, capsys):
    """main on a fake CUDA device and fake timings: each shape is measured once, under its own (n, m) (a shape shared
    by two models or matrices is reused, two shapes sharing n are not); the 1B shapes use the fastest sweep config;
    the decoder layer sums each matrix's times × its count per layer (k,v and gate,up twice; the head and the fused
    q,k,v, count 0, left out) and weights densities by n·m·count; the last line's JSON gives the layer's and the
    head's speedup at exactly 66 %."""
    from cwic_kernels.gpu import gemv as G
    shapes = {"1B": [("q", 128, 256, 1), ("k,v", 128, 64, 2), ("o", 128, 256, 1), ("down", 96, 128, 1),
                     ("head", 128, 1500, 0), ("q,k,v fused", 128, 384, 0)],
              "3B": [("q", 96, 96, 1), ("gate,up", 96, 512, 2), ("head", 64, 1500, 0)]}
    monkeypatch.setattr(K, "SHAPES", shapes)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace(L2_cache_size=1 << 20))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev: "fake GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(G, "use_pdl", lambda dev: False)
    seen = []

    class Shape:
        def __init__(self, n, m, dev, l2):
            self.n, self.m, self.copies = n, m, 2

    def bench_shape(S, sparsities, dev, config=None, seed=0):
        seen.append(((S.n, S.m), config))
        return [shape_figures(S.n, S.m, sp) for sp in sparsities]

    best, other = dict(num_warps=8), dict(pipe=True)
    monkeypatch.setattr(K, "Shape", Shape)
    monkeypatch.setattr(K, "bench_shape", bench_shape)
    monkeypatch.setattr(K, "sweep_configs", lambda S, dev: [(best, (4, 1, 1), 1.0), (other, (8, 1, 1), 2.0)])
    monkeypatch.setattr(K, "bench_batches", lambda S, dev: [])
    res = K.main([])
    one_b = [(128, 256), (128, 64), (96, 128), (128, 1500), (128, 384)]
    assert seen == [(nm, best) for nm in one_b] + [((96, 96), None), ((96, 512), None), ((64, 1500), None)]
    assert res["tuned"] == [dict(n=n, m=m, bb=1, config=best) for n, m in one_b]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for model, mats in shapes.items():
        for name, n, m, cnt in mats:
            got = res["models"][model][name]
            assert (got["n"], got["m"], got["per_layer"]) == (n, m, cnt)
            assert [r["dense_us"] for r in got["rows"]] == [shape_figures(n, m, sp)["dense_us"] for sp in K.SPARSITIES]
        layer = [(n, m, c) for _, n, m, c in mats if c > 0]
        agg = res["models"][model]["_layer"]
        assert [r["sparsity"] for r in agg] == K.SPARSITIES
        for r in agg:
            f = [(shape_figures(n, m, r["sparsity"]), n * m * c, c) for n, m, c in layer]
            d = sum(x["dense_us"] * c for x, _, c in f)
            s = sum(x["sparse_us"] * c for x, _, c in f)
            dens = sum(x["density"] * w for x, w, _ in f) / sum(w for _, w, _ in f)
            assert math.isclose(r["dense_us"], d) and math.isclose(r["sparse_us"], s)
            assert math.isclose(r["speedup"], d / s) and math.isclose(r["density"], dens)
            assert math.isclose(r["pct_ideal"], 100 * d / s * dens)
            if r["sparsity"] == 0.66:
                assert summary[f"{model}_layer_speedup_at_66"] == round(d / s, 3)
        n, m = [(n, m) for name, n, m, _ in mats if name == "head"][0]
        assert summary[f"{model}_head_speedup_at_66"] == round(shape_figures(n, m, 0.66)["speedup"], 3)
    assert summary["bench"] == "gpu_kernels" and summary["gpu"] == "fake GPU"
    # --sweep 3B: the 3B shapes on their sweep's best tiles, the 1B shapes on the current ones
    seen.clear()
    res = K.main(["--sweep", "3B"])
    assert seen == [(nm, None) for nm in one_b] + [(nm, best) for nm in [(96, 96), (96, 512), (64, 1500)]]
    assert [(t["n"], t["m"]) for t in res["tuned"]] == [(96, 96), (96, 512), (64, 1500)]
    seen.clear()
    K.main(["--no-sweep", "--sweep", "1B,3B"])                     # --no-sweep wins: nothing swept
    assert all(c is None for _, c in seen) and len(seen) == 8


# ----------------------------------------------------------------------------- gpu_decode.py


def test_set_density_puts_each_threshold_at_the_calibration_quantile(D):
    """set_density(z, d): θ of every CWIC matrix input (the same in every stripe) and φ of every FFN unit is the
    (1 − d) quantile of its calibration |x − x̄|/σ (|act(g)|/scale), so a fraction d of the calibration values stays
    on (up to one value, and ties); d = 1 is zero thresholds."""
    import cwic_exp
    from cwic_exp import CwicLinear

    from conftest import tiny_model
    model = tiny_model()
    cwic_exp.to_cwic(model, stripe_size=16)
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(0))
    z = D.collect_calibration(model, ids)
    assert any(isinstance(mod, CwicLinear) for mod in z) and any(not isinstance(mod, CwicLinear) for mod in z)
    for d in (0.3, 0.8):
        D.set_density(z, d)
        for mod, zz in z.items():
            thr = mod.theta[0] if isinstance(mod, CwicLinear) else mod.phi
            if isinstance(mod, CwicLinear):
                assert torch.equal(mod.theta, thr[None].expand_as(mod.theta))
            t, N = thr[None].to(zz.dtype), zz.shape[0]                 # ties (repeated tokens) sit on either side
            assert (zz >= t).float().mean(0).min().item() >= d - 1.01 / N
            assert (zz > t).float().mean(0).max().item() <= d + 1.01 / N
    D.set_density(z, 1.0)
    assert all(float((mod.theta if isinstance(mod, CwicLinear) else mod.phi).abs().max()) == 0.0 for mod in z)


def test_calibrate_density_corrects_once_by_the_calibration_apr(D, monkeypatch):
    """calibrate_density(target): density 1/target, then once scaled by (APR measured on the calibration tokens) /
    target, set, and returned with that first APR; the density never exceeds 1. A model that reads 20 % more than
    set (APR 3.6 at 1/3) ends at 0.4."""
    set_to = []
    monkeypatch.setattr(D, "set_density", lambda z, d: set_to.append(d))
    monkeypatch.setattr(D, "measure_apr", lambda model, ids: dict(apr=1.2 / set_to[-1], density={}))
    d, first = D.calibrate_density("model", {}, "calib", 3.0)
    assert math.isclose(first, 3.6) and math.isclose(d, 0.4) and len(set_to) == 2
    assert math.isclose(set_to[0], 1 / 3) and set_to[-1] == d
    set_to.clear()
    d, first = D.calibrate_density("model", {}, "calib", 1.0)
    assert d == 1.0 == set_to[-1] and math.isclose(first, 1.2)


class FakeEngine:
    """prefill, then decode(k): the clock advances by the costs given, one run after another; tokens known."""

    def __init__(self, clock, prefill_s, decode_s, tokens):
        self.clock, self.prefill_s, self.decode_s, self.tokens = clock, list(prefill_s), list(decode_s), tokens
        self.decoded, self.graph, self.captures = [], "old", 0

    def generate(self, prompt, n):
        self.warm = n

    def capture(self):
        self.captures += 1

    def prefill(self, prompt):
        self.clock["t"] += self.prefill_s.pop(0) if self.prefill_s else 0.0

    def decode(self, k):
        self.decoded.append(k)
        self.clock["t"] += self.decode_s.pop(0) if self.decode_s else 0.0


def test_time_engine_counts_the_decoded_tokens_and_takes_medians(D, monkeypatch):
    """time_engine: after a warm-up generate, each repeat times prefill (ms) and then the new_tokens − 1 decode steps
    (the prefill makes the first token): decode tokens/s = (new_tokens − 1) / decode time, median of the repeats (not
    the fastest); the tokens returned are the prompt and the new tokens."""
    clock = dict(t=0.0)
    monkeypatch.setattr(D, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    toks = torch.arange(40)
    eng = FakeEngine(clock, [0.010, 0.030, 0.020], [0.5, 0.25, 1.0], toks)
    tps, pre, out = D.time_engine(eng, torch.arange(8), 17, repeats=3)
    assert eng.warm == 17 and eng.decoded == [16, 16, 16]
    assert math.isclose(tps, 16 / 0.5) and math.isclose(pre, 20.0)
    assert torch.equal(out, toks[:25])


def test_time_step_is_the_median_rate_after_a_fresh_capture(D, monkeypatch):
    """time_step: the graph is recaptured, then `tokens` decode steps a repeat, timed without the prefill: tokens /
    time, the median of the repeats."""
    clock = dict(t=0.0)
    monkeypatch.setattr(D, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    eng = FakeEngine(clock, [5.0] * 4, [7.0, 0.4, 0.1, 0.2], None)
    tps = D.time_step(eng, torch.arange(4), 20, repeats=3)
    assert eng.graph is None and eng.captures == 1 and eng.decoded == [8, 20, 20, 20]
    assert math.isclose(tps, 20 / 0.2)


def _fake_profiler(monkeypatch, events):
    """torch.profiler.profile replaced by one whose key_averages() are `events`."""
    import torch.profiler as P

    class Prof:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def key_averages(self):
            return events
    monkeypatch.setattr(P, "profile", Prof)


def test_kernel_breakdown_is_per_token_and_keeps_the_14_longest(D, monkeypatch):
    """kernel_breakdown over n decode steps of a fake profiler: µs and launches per token (totals / n), the 14 kernels
    with the most time, longest first, and their sum; a kernel with no time is left out."""
    _fake_profiler(monkeypatch, [types.SimpleNamespace(key=f"k{i}", device_time_total=float(10 * i), count=2 * i)
                                 for i in range(18)])
    eng = types.SimpleNamespace(prefill=lambda p: None, decode=lambda k: None)
    b = D.kernel_breakdown(eng, [1, 2], n=4)
    assert list(b["kernels"]) == [f"k{i}" for i in range(17, 3, -1)]
    assert b["kernels"]["k17"] == dict(us_per_token=170 / 4, calls_per_token=34 / 4)
    assert math.isclose(b["total_us_per_token"], sum(10 * i for i in range(4, 18)) / 4)


def test_decode_main_reports_against_the_dense_engine_and_its_own_decode(D, monkeypatch, capsys):
    """gpu_decode main (--dry-run, tiny model; timings faked, everything else real): the CWIC rows' speedup and the
    JSON's speedup_at_<apr>x are against the dense ENGINE (not HF generate); the APR reported is measured on the timed
    decode's own tokens; greedy agreement counts the generated tokens only; the engine's correction starts from the
    calibrated 1 / density and each retry sets density min(1, 1 / target); the fp32 reference of each target carries
    that target's thresholds."""
    import cwic_exp
    built, gens, copies, measured, set_to, retries, starts, dens = [], {}, [], [], [], [], [], []
    real_build, real_measure, real_set, real_cal, real_cc = (D.build_model, D.measure_apr, D.set_density,
                                                            D.calibrate_density, D.correct_calibration)

    def build_model(size, dev, seed=0):
        model = real_build(size, dev, seed)
        gen = model.generate

        def generate(*a, **kw):
            out = gen(*a, **kw)
            gens[kw["max_new_tokens"]] = out
            return out
        model.generate = generate
        built.append(model)
        return model
    monkeypatch.setattr(D, "build_model", build_model)

    def deepcopy(obj):
        import copy
        c = copy.deepcopy(obj)
        copies.append(c)
        return c
    monkeypatch.setattr(D, "copy", types.SimpleNamespace(deepcopy=deepcopy))

    def measure_apr(model, ids):
        r = real_measure(model, ids)
        measured.append((ids.clone(), r))
        return r
    monkeypatch.setattr(D, "measure_apr", measure_apr)
    monkeypatch.setattr(D, "set_density", lambda z, d: (set_to.append(d), real_set(z, d))[1])
    monkeypatch.setattr(D, "calibrate_density", lambda *a: (lambda r: (dens.append(r[0]), r)[1])(real_cal(*a)))

    def correct_calibration(apr, target, decode_apr, recalibrate, **kw):
        starts.append(target)

        def recal(t):
            k = len(set_to)
            recalibrate(t)
            retries.append((t, set_to[k:]))
        return real_cc(apr, target, decode_apr, recal, tol=-1.0)     # every retry taken
    monkeypatch.setattr(D, "correct_calibration", correct_calibration)
    clock = dict(t=0.0)

    def perf_counter():
        clock["t"] += 1.0
        return clock["t"]
    monkeypatch.setattr(D, "time", types.SimpleNamespace(perf_counter=perf_counter, time=lambda: 0.0))
    cwic_tps, timed = iter([80.0, 110.0]), []

    def time_engine(eng, prompt, new_tokens, repeats=3):
        T, V = prompt.numel(), built[0].config.vocab_size
        if not timed:                                                 # the dense engine: agrees on half of HF's
            hf = gens[8][0].clone()
            hf[T + 4:] = (hf[T + 4:] + 1) % V
            toks = torch.cat([hf, torch.zeros(new_tokens - 8, dtype=hf.dtype)])
            timed.append(toks)
            return 50.0, 3.0, toks
        toks = torch.cat([prompt, (torch.arange(new_tokens) * 7 + 3 + len(timed)) % V])
        timed.append(toks)
        return next(cwic_tps), 2.0, toks
    monkeypatch.setattr(D, "time_engine", time_engine)
    res = D.main(["--dry-run", "--aprs", "2,3"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hf_row, dense_row, two, three, hf_cwic = res["rows"]
    assert hf_row["tokens_per_s"] == 8.0 and dense_row["tokens_per_s"] == 50.0
    assert dense_row["greedy_agreement_vs_hf"] == 0.5
    for row, tps, toks in ((two, 80.0, timed[1]), (three, 110.0, timed[2])):
        assert row["tokens_per_s"] == tps
        assert math.isclose(row["speedup_vs_dense_engine"], tps / 50.0)
        assert math.isclose(row["speedup_vs_hf"], tps / 8.0)
        apr = [r for ids, r in measured if ids.shape == (1, toks.numel()) and torch.equal(ids[0], toks)]
        assert len(apr) == 1 and row["apr"] == apr[0]["apr"]
        key = f"{row['apr_target']:g}x"
        assert summary[f"speedup_at_{key}"] == round(tps / 50.0, 3)
        assert summary[f"apr_measured_{key}"] == round(row["apr"], 3)
    assert len(starts) == 2 and all(math.isclose(s, 1 / d) for s, d in zip(starts, dens))
    assert len(retries) >= 6 and all(got == [min(1.0, 1.0 / t)] for t, got in retries)
    model, model32 = built[0], copies[-1]
    for a, b in zip(cwic_exp.iter_cwic_modules(model), cwic_exp.iter_cwic_modules(model32)):
        name = "theta" if hasattr(a, "theta") else "phi"
        assert torch.equal(getattr(a, name).float(), getattr(b, name).float()), name
    assert hf_cwic["tokens_per_s"] == 16.0
    stripes = {m.stripe_size for m in cwic_exp.iter_cwic_modules(model) if hasattr(m, "stripe_size")}
    assert stripes == {res["stripe"]} == {32}                         # the dry run's stripe, as its model has it


def test_decode_main_without_room_for_fp32_copies_reports_no_fp32_errors(D, monkeypatch, capsys):
    """Where the fp32 copies do not fit (an 8B shape on one 80 GB GPU), gpu_decode main makes none: no fp32 model, no
    fp32 engine, the logits-error cells empty (NaN, null in the JSON) and no fp32 exactness figure, while the timing
    rows are all there. Where they fit (the same run otherwise), the errors are finite."""
    made = []
    real_deepcopy = D.copy.deepcopy
    monkeypatch.setattr(D, "copy", types.SimpleNamespace(deepcopy=lambda o: (made.append(1), real_deepcopy(o))[1]))
    for room in (False, True):
        made.clear()
        monkeypatch.setattr(D, "_fp32_fits", lambda model, copies: room)
        res = D.main(["--dry-run", "--aprs", "3"])
        summary = capsys.readouterr().out.strip().splitlines()[-1]
        assert json.loads(summary)["speedup_at_3x"] > 0
        hf_row, dense_row, three, hf_cwic = res["rows"]
        errs = [dense_row["logits_rel_err_vs_fp32"], dense_row["hf_bf16_logits_rel_err_vs_fp32"],
                three["logits_rel_err_vs_fp32"], three["hf_bf16_logits_rel_err_vs_fp32"]]
        if room:
            assert len(made) == 2 and all(math.isfinite(e) for e in errs)
            assert math.isfinite(res["fp32_engine_vs_hf_fp32_at_3x"])
        else:
            assert made == [] and all(math.isnan(e) for e in errs)
            assert res["fp32_engine_vs_hf_fp32_at_3x"] is None
        assert three["tokens_per_s"] > 0 and math.isfinite(three["logits_rel_err_vs_hf_bf16"])


# ----------------------------------------------------------------------------- the dispatchers


@pytest.mark.parametrize("script,argv,want", [
    ("bench_kernels", ["--device", "cuda", "--quick"], ("experiments.bench.gpu_kernels", ["--quick"])),
    ("bench_kernels", ["--quick", "--device", "cpu"], ("experiments.bench.cpu_kernels", ["--quick"])),
    ("bench_kernels", ["--device", "cuda", "--compact", "--x"], ("experiments.bench.gpu_compact", ["--x"])),
    ("bench_kernels", [], ("experiments.bench.gpu_kernels", [])),
    ("bench_decode", ["--device", "cuda", "--aprs", "3"], ("experiments.bench.gpu_decode", ["--aprs", "3"])),
    ("bench_decode", ["--device", "cpu"], ("experiments.bench.cpu_decode", [])),
])
def test_dispatchers_send_each_device_to_its_script_without_the_device(script, argv, want, monkeypatch):
    """bench_kernels.py / bench_decode.py import only the asked-for device's script and hand it the remaining
    arguments (`--device` and `--compact` consumed); `--compact` is a GPU benchmark."""
    import importlib
    mod = importlib.import_module(f"experiments.{script}")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(mod, "importlib", types.SimpleNamespace(
        import_module=lambda name: types.SimpleNamespace(main=lambda rest: (name, rest))))
    assert mod.main(argv) == want
    if script == "bench_kernels":
        with pytest.raises(SystemExit, match="--compact"):
            mod.main(["--device", "cpu", "--compact"])


# ----------------------------------------------------------------------------- defects the audit found (fixed)


@pytest.mark.parametrize("argv,needle", [
    (["experiments/bench_kernels.py", "--device", "cuda", "--models", "3B,bogus"], "--models"),
    (["experiments/bench_kernels.py", "--device", "cuda", "--sweep", "1B,bogus"], "--sweep"),
    (["experiments/bench_decode.py", "--device", "cuda", "--aprs", "abc"], "--aprs"),
    (["experiments/bench_decode.py", "--device", "cuda", "--aprs", "0.5"], "--aprs"),
])
def test_gpu_bench_arguments_are_checked_before_any_work(argv, needle):
    """As for the CPU benchmarks: a bad name or APR is one line before anything is built or timed. Before,
    `--models 3B,bogus` timed every 3B matrix and then died on KeyError('bogus') without writing anything,
    `--aprs abc` died with a ValueError traceback after HF generate and the dense engine were timed, and `--aprs 0.5`
    was accepted and reported a 'speedup_at_0.5x' row measured at APR 1.0."""
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(needle) and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_kernel_breakdown_adds_kernels_whose_names_share_60_characters(monkeypatch):
    """Two kernels whose names agree in their first 60 characters (template instances such as PyTorch's
    `void at::native::vectorized_elementwise_kernel<2, at::native::…>`) are one row in the breakdown: their times and
    launches add up; the last one replaced the first before (the sum of kernels then missed a kernel)."""
    import experiments.bench.gpu_decode as D
    stem = "void at::native::vectorized_elementwise_kernel<2, at::native::"
    _fake_profiler(monkeypatch, [
        types.SimpleNamespace(key=stem + "FillFunctor<float>>", device_time_total=40.0, count=4),
        types.SimpleNamespace(key=stem + "CUDAFunctorOnSelf_add<float>>", device_time_total=80.0, count=4),
        types.SimpleNamespace(key="_gmm_kernel", device_time_total=400.0, count=8)])
    monkeypatch.setattr(D, "DRY_RUN", False)
    b = D.kernel_breakdown(types.SimpleNamespace(prefill=lambda p: None, decode=lambda k: None), [1, 2], n=4)
    assert math.isclose(b["total_us_per_token"], (40 + 80 + 400) / 4)
    assert b["kernels"][stem[:60]] == dict(us_per_token=120 / 4, calls_per_token=8 / 4)


def test_benchmark_json_is_strict(tmp_path, K):
    """The benchmarks' JSON files (save_outputs, shared by the GPU scripts) write a missing figure as null: json.dump
    wrote the token NaN, which strict parsers (JSON.parse, jq) refuse."""
    from conftest import strict_json
    K.save_outputs(str(tmp_path), "b", "| x |", {"speedup": {"0.66": float("nan"), "0.5": 2.0}, "gbs": float("inf")})
    assert strict_json((tmp_path / "b.json").read_text()) == {"speedup": {"0.66": None, "0.5": 2.0}, "gbs": None}
    assert (tmp_path / "b.md").read_text() == "| x |\n"


@pytest.mark.parametrize("size,params,name", [("1B", 1_235_814_400, "Llama-3.2-1B"),
                                              ("3B", 3_212_749_824, "Llama-3.2-3B"),
                                              ("8B", 8_030_261_248, "Llama-3.1-8B")])
def test_decode_shapes_have_the_named_models_parameter_counts(size, params, name):
    """Each decode-benchmark shape has exactly the parameter count of the model it is named after (built on the meta
    device: no memory), so a wrong width, depth, head count or head tying fails here rather than on a GPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    import experiments.bench.gpu_decode as GD
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**GD.CONFIGS[size]))
    assert sum(p.numel() for p in model.parameters()) == params
    assert GD.shape_name(size) == name
