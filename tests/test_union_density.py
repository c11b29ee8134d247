"""experiments/analyses/union_density.py: the share of the CWIC weights that B tokens read together (the union of
their masks), pinned on hand-made masks and, end to end, against `cwic_exp.active_parameters` on a tiny checkpoint."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import strict_json, tiny_cwic_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "analyses"))

import union_density as U  # noqa: E402


def test_union_reads_counts_each_pair_once_per_group_weighted_by_its_rows():
    """Two matrices (weights 1, 2, 4 and 7 a pair, 14 in all); group {0, 1} reads pairs a0, a1 and b0 (10), group
    {2, 0} the same (10): 10/14 on average; a pair two tokens use is counted once."""
    masks = {"a": torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.bool),
             "b": torch.tensor([[1], [0], [0]], dtype=torch.bool)}
    weights = {"a": torch.tensor([1.0, 2.0, 4.0]), "b": torch.tensor([7.0])}
    got = U.union_reads(masks, weights, [torch.tensor([0, 1]), torch.tensor([2, 0])])
    assert got == pytest.approx(10 / 14)
    assert U.union_reads(masks, weights, [torch.tensor([2])]) == pytest.approx(3 / 14)       # one token: its own
    assert U.union_reads(masks, weights, [torch.tensor([1]), torch.tensor([2])]) == pytest.approx((2 + 3) / 28)


def test_union_reads_of_packed_masks_equal_the_bool_masks():
    """TokenMasks keeps 8 pairs a byte: the union of packed masks (OR of the bytes, unpacked for the weights) gives
    the bool masks' figure, with a pair count that is not a multiple of 8 and groups of 1, 3 and 5 tokens."""
    import numpy as np
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(40, 21, generator=g) < 0.3, "b": torch.rand(40, 8, generator=g) < 0.5}
    weights = {"a": torch.rand(21, generator=g) + 0.5, "b": torch.full((8,), 3.0)}
    packed = {k: torch.from_numpy(np.packbits(v.numpy(), axis=1)) for k, v in masks.items()}
    assert packed["a"].shape == (40, 3) and packed["a"].dtype == torch.uint8
    for B in (1, 3, 5):
        groups = U.independent_groups(40, B, 7, seed=B)
        assert U.union_reads(packed, weights, groups) == pytest.approx(U.union_reads(masks, weights, groups), abs=1e-12)


def test_consecutive_windows_stay_inside_a_conversation_and_independent_groups_are_distinct_tokens():
    assert [g.tolist() for g in U.consecutive_groups([3, 5], 2)] == [[0, 1], [3, 4], [5, 6]]
    assert [g.tolist() for g in U.consecutive_groups([3, 5], 1)] == [[i] for i in range(8)]
    assert U.consecutive_groups([3], 4) == []
    groups = U.independent_groups(10, 4, 50, seed=1)
    assert len(groups) == 50 and all(len(set(g.tolist())) == 4 and 0 <= int(g.min()) and int(g.max()) < 10
                                     for g in groups)


def test_one_token_is_the_accountings_density_and_unions_grow_with_the_batch(tmp_path, monkeypatch):
    """On a tiny trained-like checkpoint (--checkpoint: its own thresholds): B = 1 read in windows of one token is
    exactly the token-weighted density of `cwic_exp.active_parameters` on the same conversations (q, k, v, o, gate,
    up+down and the CWIC head); the union only grows with B and stays at most 1; the files are written."""
    import cwic_exp
    import cwic_exp.data as D
    from common import load_cwic
    ckpt = tiny_cwic_checkpoint(tmp_path / "ckpt")
    rng = random.Random(0)
    convs = [[{"role": "user", "content": "".join(rng.choice("abc def ghi.") for _ in range(rng.randint(40, 90)))}]
             for _ in range(4)]
    monkeypatch.setattr(D, "heldout_conversations", lambda *a, **k: convs)
    res = U.main(["--checkpoint", str(ckpt), "--batches", "1,2,4", "--max-len", "64", "--out", str(tmp_path / "o")])
    rows = res["aprs"]["trained"]["rows"]
    assert res["stripe"] == 16                                   # the checkpoint's own, not the --stripe default
    model, tok = load_cwic(ckpt)
    act = tokens = 0.0
    for c in convs:
        st = cwic_exp.active_parameters(model, torch.tensor(D.render_ids(tok, c)[:64])[None])
        act += st["active"] * st["tokens"]
        tokens += st["tokens"]
    assert rows[0]["consecutive"] == pytest.approx(act / tokens / st["dense"], rel=1e-9)
    for kind in ("consecutive", "independent"):
        seq = [r[kind] for r in rows]
        assert seq == sorted(seq) and seq[-1] <= 1.0 and seq[0] > 0
    assert rows[1]["consecutive"] > rows[0]["consecutive"]
    out = tmp_path / "o"
    assert strict_json((out / "union_density.json").read_text())["aprs"]["trained"]["rows"][2]["batch"] == 4
    assert (out / "union_density.png").stat().st_size > 0 and "| 4 |" in (out / "union_density.md").read_text()


def test_dry_run_calibrates_each_apr_and_ends_with_json():
    """Calibration path on a tiny random model: at B = 1 the densities follow the APRs asked for."""
    r = subprocess.run([sys.executable, "experiments/analyses/union_density.py", "--dry-run", "--apr", "2,4",
                        "--batches", "1,3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = strict_json(r.stdout.strip().splitlines()[-1])
    d2, d4 = res["rows"]["2.0"]["1"][0], res["rows"]["4.0"]["1"][0]
    assert 0.35 < d2 < 0.65 and 0.15 < d4 < 0.35 and res["rows"]["4.0"]["3"][0] > d4


@pytest.mark.parametrize("argv,needle", [(["--apr", "0.5"], "--apr"), (["--batches", "0,2"], "--batches"),
                                         (["--apr", "x"], "--apr")])
def test_bad_arguments_are_refused_first(argv, needle):
    r = subprocess.run([sys.executable, "experiments/analyses/union_density.py", *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(needle), r.stderr[-1000:]
