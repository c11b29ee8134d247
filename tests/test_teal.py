"""TEAL baseline: exactness at 0%, requested sparsity on calibration data, greedy search, accounting."""
from __future__ import annotations

import pytest
import torch
from conftest import rand_batch, tiny_model

from cwic_exp.teal import (PROJS, MagnitudeHistogram, TealLinear, apply_teal, calibrate_teal, fit_thresholds,
                           remove_teal, teal_active_parameters, teal_disabled, teal_thresholds)


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = tiny_model(num_hidden_layers=3)
    ids = torch.randint(0, 96, (8, 40), generator=torch.Generator().manual_seed(3))
    cal = calibrate_teal(model, ids, greedy=True, max_sparsity=0.72, greedy_rows=2)
    return model, ids, cal


def test_zero_sparsity_is_dense_bit_for_bit():
    dense = tiny_model()
    ids, mask = rand_batch()
    want = dense(input_ids=ids, attention_mask=mask).logits
    model = tiny_model()
    apply_teal(model, None)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    cal = calibrate_teal(model, calib, greedy=True, max_sparsity=0.3)
    for mode in ("greedy", "uniform"):
        for refit in (None, calib):
            th = teal_thresholds(model, cal, 0.0, mode, refit_ids=refit)
            assert all(t == 0.0 for t in th.values())
            apply_teal(model, th)
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)
    assert teal_active_parameters(model, ids, mask)["apr"] == pytest.approx(1.0)


def test_zero_sparsity_scores_exactly_as_dense_in_the_harness():
    from cwic_exp.eval.scoring import Request, score_requests
    reqs = [Request([1, 2, 3, 4, 5], [6, 7], ("a", 0), ("a", 0, 0)), Request([1, 2, 3, 4, 5], [8], ("a", 0), ("a", 0, 1))]
    dense = score_requests(tiny_model(), reqs)
    teal = score_requests(apply_teal(tiny_model(), None), reqs)
    assert dense.logprob == teal.logprob and dense.greedy == teal.greedy and teal.apr == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["greedy", "uniform"])
@pytest.mark.parametrize("target", [0.25, 0.4, 0.5, 0.66])
def test_calibration_hits_the_requested_sparsity(calibrated, mode, target):
    model, ids, cal = calibrated
    th = teal_thresholds(model, cal, target, mode, refit_ids=ids)
    apply_teal(model, th)
    got = teal_active_parameters(model, ids)
    assert got["sparsity"] == pytest.approx(target, abs=0.02)
    assert got["apr"] > 1.0 and got["density"]["head"] == 1.0
    if mode == "uniform":
        for k in ("q", "k", "v", "o", "gate", "up+down"):
            assert got["density"][k] == pytest.approx(1 - target, abs=0.03)


def test_dense_histogram_thresholds_alone_are_close(calibrated):
    """TEAL's own thresholds (no re-fit) land near the target on this model too."""
    model, ids, cal = calibrated
    apply_teal(model, cal.thresholds(0.4, "uniform"))
    assert teal_active_parameters(model, ids)["sparsity"] == pytest.approx(0.4, abs=0.05)


def test_greedy_search_path(calibrated):
    model, _, cal = calibrated
    w = cal.weights
    assert w["q"] == 1.0 and w["k"] == pytest.approx(0.5) and w["gate"] == pytest.approx(80 / 48)
    assert len(cal.greedy) == 3
    wsum = sum(w.values())
    for rows in cal.greedy:
        assert rows[0][0] == 0.0 and rows[-1][0] >= 0.72 - 1e-9
        for (f0, s0), (f1, s1) in zip(rows, rows[1:]):
            raised = [p for p in PROJS if s1[p] > s0[p] + 1e-12]
            assert len(raised) == 1 and f1 > f0                       # one projection per step
            assert s1[raised[0]] - s0[raised[0]] == pytest.approx(min(0.05 / w[raised[0]], 1 - s0[raised[0]]))
            assert f1 == pytest.approx(sum(w[p] * s1[p] for p in PROJS) / wsum)
    sp = cal.sparsities(0.5, "greedy")
    for i in range(3):
        f = sum(w[p] * sp[f"{i}.{p}"] for p in PROJS) / wsum
        assert f == pytest.approx(0.5, abs=0.05 / wsum + 1e-9)
    with pytest.raises(ValueError):
        cal.sparsities(0.9, "greedy")


def _layer_input(model, ids):
    """(hidden states, kwargs) that decoder layer 0 receives in a dense forward."""
    layer, cap = model.model.layers[0], {}

    def grab(mod, args, kwargs):
        cap["x"] = args[0] if args else kwargs["hidden_states"]
        cap["kw"] = {k: v for k, v in kwargs.items()
                     if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache")}
    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return cap["x"], cap["kw"]


def test_greedy_step_raises_the_projection_that_hurts_least():
    """test_greedy_search_path checks bookkeeping only: a greedy step that raised the projection whose step hurts
    MOST (err.argmax()) passed every TEAL test. (1) Constructed: the MLP's output is scaled by 1e-3, so sparsifying
    gate/up/down barely changes the layer output while any attention step does; up to 60% layer sparsity (the MLP
    holds 62.5% of the parameters) the greedy search must sparsify the MLP only. (2) Directly: each of the first
    steps on a plain 1-layer model (float64) raises the projection whose one-step error, recomputed here one
    projection at a time (L2 over the last 25% of positions, mean over batch and features), is the smallest."""
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_model(num_hidden_layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e-3)
    rows = calibrate_teal(model, ids, greedy=True, max_sparsity=0.6).greedy[0]
    assert rows[-1][0] >= 0.6 - 1e-9
    assert all(rows[-1][1][p] == 0.0 for p in ("q", "k", "v", "o")), rows[-1]

    model = tiny_model(num_hidden_layers=1).double()
    cal = calibrate_teal(model, ids, greedy=True, max_sparsity=0.15)
    layer = model.model.layers[0]
    x, kw = _layer_input(model, ids)
    run = lambda: (lambda o: o[0] if isinstance(o, (tuple, list)) else o)(layer(x, **kw))  # noqa: E731
    with torch.no_grad():
        apply_teal(model, None)
        target = run()
        for (_, s0), (_, s1) in zip(cal.greedy[0], cal.greedy[0][1:]):
            err = {}
            for p in PROJS:
                s = dict(s0, **{p: s0[p] + 0.05 / cal.weights[p]})
                apply_teal(model, {f"0.{q}": cal.threshold(0, q, s[q]) for q in PROJS})
                err[p] = float(torch.linalg.vector_norm((run() - target)[:, 24:], dim=1).mean())
            raised = [p for p in PROJS if s1[p] > s0[p]]
            assert err[raised[0]] <= min(err.values()) * (1 + 1e-6), (raised, err)
            assert max(err.values()) > 2 * min(err.values())          # a real choice, not a tie
    assert len(cal.greedy[0]) > 3


def test_greedy_search_feeds_each_layer_the_dense_models_input():
    """TEAL's greedy search goes layer by layer on the dense model's activations: layer 1's steps are chosen on
    layer 1's dense input, the output of the dense layer 0. (Feeding layer 1 the embeddings again passed every test:
    the direct check above has one layer.)"""
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_model(num_hidden_layers=2).double()
    cal = calibrate_teal(model, ids, greedy=True, max_sparsity=0.15)
    x0, kw = _layer_input(model, ids)
    first = (lambda o: o[0] if isinstance(o, (tuple, list)) else o)     # noqa: E731
    layer = model.model.layers[1]
    with torch.no_grad():
        apply_teal(model, None)
        x1 = first(model.model.layers[0](x0, **kw))
        target = first(layer(x1, **kw))
        checked = 0
        for (_, s0), (_, s1) in zip(cal.greedy[1], cal.greedy[1][1:]):
            err = {}
            for p in PROJS:
                s = dict(s0, **{p: s0[p] + 0.05 / cal.weights[p]})
                apply_teal(model, {f"1.{q}": cal.threshold(1, q, s[q]) for q in PROJS})
                err[p] = float(torch.linalg.vector_norm((first(layer(x1, **kw)) - target)[:, 24:], dim=1).mean())
            raised = [p for p in PROJS if s1[p] > s0[p]]
            assert err[raised[0]] <= min(err.values()) * (1 + 1e-6), (raised, err)
            checked += 1
    assert checked > 3


def test_accounting_counts_active_inputs_times_outputs():
    model = tiny_model()
    ids, mask = rand_batch()
    th = {f"{i}.{p}": 0.5 for i in range(2) for p in PROJS}
    apply_teal(model, th)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(id(m), a[0].detach()))
             for m in model.modules() if isinstance(m, TealLinear)]
    out = teal_active_parameters(model, ids, mask, per_token=True)
    for h in hooks:
        h.remove()
    real = mask.reshape(-1).bool()
    want = torch.zeros(real.shape[0], dtype=torch.float64)
    for m in model.modules():
        if isinstance(m, TealLinear):
            x = seen[id(m)].reshape(-1, m.in_features)
            want += (x.abs() > 0.5).sum(-1).double() * m.out_features
    head = model.lm_head.weight.numel()
    want = (want + head) * real
    assert torch.allclose(out["per_token"].reshape(-1).double(), want.float().double(), rtol=1e-6)
    assert out["active"] == pytest.approx(float(want.sum()) / int(real.sum()))
    from cwic_exp import active_parameters, to_cwic
    core = active_parameters(to_cwic(tiny_model(), stripe_size=16), ids, mask, per_token=True)
    assert set(core) <= set(out) | {"note"} and set(core["density"]) == set(out["density"])
    assert set(out["density"]) == {"q", "k", "v", "o", "gate", "up+down", "head"}
    assert out["dense"] == sum(m.weight.numel() for n, m in model.named_modules()
                               if n.endswith(("_proj", "lm_head")))


def test_apply_remove_keep_the_state_dict_and_teacher_mode():
    model = tiny_model()
    ids, mask = rand_batch()
    want = model(input_ids=ids, attention_mask=mask).logits
    keys = list(model.state_dict())
    apply_teal(model, {f"{i}.{p}": 0.3 for i in range(2) for p in PROJS})
    assert list(model.state_dict()) == keys
    sparse = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(sparse, want)
    with teal_disabled(model):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)
    remove_teal(model)
    assert not any(isinstance(m, TealLinear) for m in model.modules())
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)


def test_fit_thresholds_realise_each_projection_level():
    model = tiny_model()
    ids = torch.randint(0, 96, (6, 40), generator=torch.Generator().manual_seed(5))
    levels = {f"{i}.{p}": 0.1 + 0.1 * j for i in range(2) for j, p in enumerate(PROJS)}
    th = fit_thresholds(model, ids, levels)
    apply_teal(model, th)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(f"{m.teal_layer}.{m.teal_proj}", a[0]))
             for m in model.modules() if isinstance(m, TealLinear)]
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    for k, s in levels.items():
        assert float((seen[k].abs() <= th[k]).float().mean()) == pytest.approx(s, abs=0.01)


def test_histogram_quantiles():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 3
    h = MagnitudeHistogram()
    h.add(x[:100_000])
    h.add(x[100_000:])
    for q in (0.1, 0.25, 0.5, 0.66, 0.9):
        assert h.quantile(q) == pytest.approx(float(torch.quantile(x.abs(), q)), rel=0.005)
    assert h.quantile(0.0) == 0.0


def test_histogram_quantiles_interpolate_inside_a_bin():
    """Within a bin the quantile moves linearly in log|x| with the count (a bin is 0.23 %: the test above cannot see
    it): one count in bin i and three in bin i+1 put the quantiles 0.25 / 0.5 / 1 at bin i's end, a third into
    bin i+1, and its end."""
    i, w = 9000, (MagnitudeHistogram.HI - MagnitudeHistogram.LO) / MagnitudeHistogram.BINS
    counts = torch.zeros(MagnitudeHistogram.BINS)
    counts[i], counts[i + 1] = 1, 3
    h = MagnitudeHistogram(counts)
    at = lambda pos: 10 ** (MagnitudeHistogram.LO + pos * w)   # noqa: E731
    assert h.quantile(0.125) == pytest.approx(at(i + 0.5), rel=1e-9)
    assert h.quantile(0.25) == pytest.approx(at(i + 1), rel=1e-9)
    assert h.quantile(0.5) == pytest.approx(at(i + 1 + 1 / 3), rel=1e-9)
    assert h.quantile(1.0) == pytest.approx(at(i + 2), rel=1e-9)
    assert h.quantile(1.5) == h.quantile(1.0)


def test_teal_sparsity_ignores_padding():
    """TEAL's sparsity and per-layer density count real tokens only. A mutant that broke it passed every test
    before."""
    from cwic_exp.teal import PROJS, apply_teal, teal_active_parameters
    model = tiny_model()
    apply_teal(model, {f"{i}.{p}": 0.5 for i in range(2) for p in PROJS})
    ids, mask = rand_batch(b=2, t=12, pad_last=6)
    out = teal_active_parameters(model, ids, mask)
    # the same real tokens without padding: row 0 alone, row 1 cut to its real part
    n_on, n_all = 0.0, 0.0
    for r in range(2):
        L = int(mask[r].sum())
        o = teal_active_parameters(model, ids[r:r + 1, :L])
        n_on += (1 - o["sparsity"]) * L
        n_all += L
    assert out["sparsity"] == pytest.approx(1 - n_on / n_all, rel=1e-6)
    assert all(0 < v <= 1 for v in out["density_per_layer"].values())


def test_histograms_count_real_tokens_only():
    """collect_histograms with (ids, mask): padding positions are not counted. The same rows without their
    trailing padding give the same histograms at every site (causal attention: real tokens never see it)."""
    from cwic_exp.teal import collect_histograms
    model = tiny_model()
    ids, mask = rand_batch()                          # the last row ends in 3 padding positions
    got = collect_histograms(model, [(ids, mask)])
    ref = collect_histograms(model, [(ids[:1], mask[:1]), (ids[1:, :-3], mask[1:, :-3])])
    assert got["0.q"].total == int(mask.sum()) * model.config.hidden_size
    assert set(got) == set(ref) and len(got) >= 4
    for k in got:
        torch.testing.assert_close(got[k].counts, ref[k].counts)


def test_calibration_info_names_the_rows_the_greedy_search_used():
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    cal = calibrate_teal(tiny_model(), ids, greedy=False, greedy_rows=5)    # asks for more rows than there are
    assert cal.info["greedy_rows"] == 2 and cal.info["calib_rows"] == 2


# Tests from a mutant audit of teal.py (helper)

def test_teal_disabled_restores_the_sparse_model():
    """eval's KL to the dense model runs inside teal_disabled: afterwards the model must be sparse again (a
    context that did not re-enable it would score every later question dense)."""
    model = apply_teal(tiny_model(), {f"{i}.{p}": 0.3 for i in range(2) for p in PROJS})
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sparse = model(input_ids=ids).logits
        with teal_disabled(model):
            dense = model(input_ids=ids).logits
        assert not torch.equal(dense, sparse)
        assert torch.equal(model(input_ids=ids).logits, sparse)


def test_the_greedy_lookup_takes_the_closest_row_and_the_search_stops_at_its_target():
    """A target of 0.32 between rows at 0.30 and 0.50 takes the 0.30 row (the closer one), and the greedy search
    stops at the first row that reaches max_sparsity."""
    from cwic_exp.teal import TealCalibration
    rows = [(0.0, dict.fromkeys(PROJS, 0.0)), (0.30, dict(dict.fromkeys(PROJS, 0.0), gate=0.3)),
            (0.50, dict(dict.fromkeys(PROJS, 0.0), gate=0.5))]
    assert TealCalibration({}, greedy=[rows], num_layers=1).sparsities(0.32, "greedy")["0.gate"] == 0.3
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    found = calibrate_teal(tiny_model(num_hidden_layers=1), ids, max_sparsity=0.3).greedy[0]
    assert found[-1][0] >= 0.3 - 1e-9 and found[-2][0] < 0.3 - 1e-9


def test_histograms_count_every_calibration_row_and_ignore_thresholds_already_set():
    """10 rows in batches of 8: the partial last batch counts too. A model with TEAL thresholds already set gives
    the dense model's histograms, and keeps its thresholds."""
    from cwic_exp.teal import collect_histograms
    ids = torch.randint(0, 96, (10, 16), generator=torch.Generator().manual_seed(0))
    assert calibrate_teal(tiny_model(), ids, greedy=False, batch_rows=8).hists["0.q"].total == 10 * 16 * 48
    want = collect_histograms(tiny_model(), [ids[:2]])
    model = apply_teal(tiny_model(), {f"{i}.{p}": 0.5 for i in range(2) for p in PROJS})
    got = collect_histograms(model, [ids[:2]])
    for k in want:
        torch.testing.assert_close(got[k].counts, want[k].counts)
    assert all(m.teal_threshold == 0.5 for m in model.modules() if hasattr(m, "teal_proj"))


def test_a_histograms_quantile_follows_data_added_after_a_query():
    h = MagnitudeHistogram()
    h.add(torch.ones(1000))
    assert h.quantile(0.5) == pytest.approx(1.0, rel=0.01)
    h.add(torch.full((3000,), 100.0))
    assert h.quantile(0.5) == pytest.approx(100.0, rel=0.01)
