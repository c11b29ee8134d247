"""Training: packing/masking, data recovery, resume, gradient accumulation, config errors, smoke."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import cwic_exp
from cwic_exp import cwic_context, to_cwic
from cwic_exp.data import (StepSampler, iter_json_records, model_inputs, pack_sequences)
from cwic_exp.modeling.layers import KINDS
from conftest import IdTok, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from cwic_exp.config import register_schema
    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=overrides)


def test_packed_conversations_never_attend_to_each_other():
    model = to_cwic(tiny_model(), stripe_size=16)
    a, b, c = [5, 6, 7, 8, 9], [10, 11, 12], [1, 2, 3, 4]
    p1 = pack_sequences([a, b, c], 16, 0)
    with torch.no_grad():
        with cwic_context(model, update_stats=True):
            model(**model_inputs(vars(p1)))
        for mod in cwic_exp.iter_cwic_modules(model):
            (mod.theta if hasattr(mod, "theta") else mod.phi).fill_(0.3)
    a2 = [45, 46, 47, 48, 49]                          # change the conversation packed first (the longest)
    p2 = pack_sequences([a2, b, c], 16, 0)
    assert torch.equal(p1.segment_ids, p2.segment_ids)
    with torch.no_grad():
        l1 = model(**model_inputs(vars(p1))).logits
        l2 = model(**model_inputs(vars(p2))).logits
    changed = (p1.input_ids != p2.input_ids)[0]
    seg = p1.segment_ids[0]
    assert changed.any() and set(seg[changed].tolist()) == {1}
    later = seg > 1            # after it in the row: plain causal masking alone would let them see it
    assert later.sum() == len(b) + len(c)
    torch.testing.assert_close(l1[0, later], l2[0, later], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(l1[0, seg == 1], l2[0, seg == 1])
    # and every packed conversation, the last ones too, equals the same conversation run alone
    for s in seg.unique().tolist():
        if s == 0:
            continue
        pos = (seg == s).nonzero().flatten()
        alone = torch.tensor([p1.input_ids[0, pos].tolist()])
        with torch.no_grad():
            la = model(input_ids=alone).logits
        torch.testing.assert_close(l1[0, pos], la[0], atol=1e-5, rtol=1e-5)


def test_packing_positions_and_padding():
    p = pack_sequences([[1] * 5, [2] * 3, [3] * 7, [4] * 12], 12, 0)
    for r in range(len(p)):
        seg, pos = p.segment_ids[r], p.position_ids[r]
        for s in seg.unique().tolist():
            if s == 0:
                continue
            idx = (seg == s).nonzero().flatten()
            assert pos[idx].tolist() == list(range(len(idx)))
    assert int((p.segment_ids > 0).sum()) == 5 + 3 + 7 + 12


def test_truncated_json_records_are_recovered(tmp_path):
    recs = [{"id": i, "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
            for i in range(5)]
    text = json.dumps(recs, indent=1)
    f = tmp_path / "trunc.json"
    f.write_text(text[: text.rindex('"value": "a"') - 3])   # cut inside the last record
    stats = {}
    got = list(iter_json_records(f, stats))
    assert [r["id"] for r in got] == [0, 1, 2, 3]
    assert stats["records"] == 4 and stats["broken_tail_chars"] > 0


def test_training_never_sees_the_heldout_tail(tmp_path, monkeypatch):
    from cwic_exp import data as D
    monkeypatch.setattr(D, "_cache_root", lambda: tmp_path / "cache")
    recs = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
            for i in range(200)]
    f = tmp_path / "sg.json"
    f.write_text(json.dumps(recs))
    train, val = D.build_packed(IdTok(), path=str(f), seq_len=16, val_fraction=0.1, progress=False)
    seen = {int(t) - 1000 for d in (train, val) for t in d.input_ids.flatten().tolist() if t >= 1000}
    held = {int(m[0]["content"][1:]) for m in D.heldout_conversations(f, D.HELDOUT_TAIL)}
    assert len(held) == D.HELDOUT_TAIL and held == set(range(200 - D.HELDOUT_TAIL, 200))
    assert seen == set(range(200 - D.HELDOUT_TAIL)) and not seen & held
    assert train.info["sharegpt_heldout_tail_excluded"] == D.HELDOUT_TAIL


def test_step_sampler_resumes_exactly():
    full = list(StepSampler(10, 4, 8, seed=3))
    resumed = list(StepSampler(10, 4, 8, seed=3, start_step=5))
    assert full[5:] == resumed
    assert sorted(sum(full[:5], [])[:10]) == list(range(10))        # a pass covers every row once
    r0 = list(StepSampler(10, 4, 8, seed=3, rank=0, world=2))
    r1 = list(StepSampler(10, 4, 8, seed=3, rank=1, world=2))
    assert [a + b for a, b in zip(r0, r1)] == full


def _module(micro, lam=10.0):
    from cwic_exp.lit import CwicDistillModule
    teacher = tiny_model()
    student = to_cwic(copy.deepcopy(teacher), stripe_size=16)
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "segment_ids": torch.ones(4, 24, dtype=torch.int16),
             "position_ids": torch.arange(24).repeat(4, 1)}
    batch["segment_ids"][3, 20:] = 0
    with torch.no_grad():
        with cwic_context(student, token_mask=batch["segment_ids"] > 0, update_stats=True):
            student(**model_inputs(batch))
        for m in cwic_exp.iter_cwic_modules(student):
            (m.theta if hasattr(m, "theta") else m.phi).uniform_(0, 0.5)
        for p in student.model.layers[0].mlp.up_proj.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = {"cwic": {"apr_start": 1.05, "lambda_ap": lam, "mse_weight": 0.0, "eta_theta": 1.0},
           "optim": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.0, "warmup_steps": 0,
                     "schedule_steps": 10, "grad_clip": None},
           "trainer": {"micro_batch_size": micro}}
    return CwicDistillModule(student, teacher, cfg), batch


def _grads(mod):
    return {n: p.grad.clone() for n, p in mod.student.named_parameters() if p.grad is not None}


def test_distillation_losses_against_their_definitions():
    """FKL = KL(p_t‖p_s) and RKL = KL(p_s‖p_t) summed over real tokens only (METHOD.md §6), as torch's kl_div
    computes them; ½(FKL+RKL) per real token; the MSE ablation's per-token mean squared error. (Before this test
    an RKL computed as FKL, or padding counted in, passed every test.)"""
    import torch.nn.functional as F
    from cwic_exp.distill import hidden_mse, kl_parts, symmetric_kl
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g) * 2, torch.randn(2, 5, 11, generator=g) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    sel = mask.bool()
    ls, lt = s[sel].log_softmax(-1), t[sel].log_softmax(-1)
    fkl, rkl, n = kl_parts(s, t, mask, chunk=3)
    assert int(n) == 7
    torch.testing.assert_close(fkl, F.kl_div(ls, lt, log_target=True, reduction="sum"))
    torch.testing.assert_close(rkl, F.kl_div(lt, ls, log_target=True, reduction="sum"))
    assert abs(float(fkl - rkl)) > 0.1 * float(fkl)           # the two directions differ here
    torch.testing.assert_close(symmetric_kl(s, t, mask), 0.5 * (fkl + rkl) / 7)
    s2, t2 = s.clone(), t.clone()                              # padding positions do not count
    s2[~sel], t2[~sel] = 50 * torch.randn(3, 11, generator=g), -50 * torch.randn(3, 11, generator=g)
    for a, b in zip(kl_parts(s2, t2, mask), (fkl, rkl, n)):
        torch.testing.assert_close(a, b)
    hs, ht = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    torch.testing.assert_close(hidden_mse(hs, ht, mask), ((hs - ht) ** 2).mean(-1)[sel].sum())


def test_the_training_loss_is_the_distillation_of_the_teacher():
    """The step's FKL/RKL sums are those of the student's and the teacher's logits over the batch's real tokens."""
    import torch.nn.functional as F
    mod, batch = _module(4, lam=0.0)
    parts = mod.accumulate_gradients(batch, 3.0, update_stats=False)
    real = batch["segment_ids"] > 0
    with torch.no_grad():
        s = mod._student(batch, real, update_stats=False)[0].logits[real].log_softmax(-1)
        t = mod.teacher(**model_inputs(batch)).logits[real].log_softmax(-1)
    assert parts["n_real"] == int(real.sum()) == 4 * 24 - 4
    assert parts["fkl"] == pytest.approx(float(F.kl_div(s, t, log_target=True, reduction="sum")), rel=1e-4)
    assert parts["rkl"] == pytest.approx(float(F.kl_div(t, s, log_target=True, reduction="sum")), rel=1e-4)
    assert parts["fkl"] > 0


@pytest.mark.parametrize("mse_w", [0.0, 0.5])
def test_a_step_backpropagates_the_symmetric_kl_per_real_token_and_the_mse(mse_w):
    """The step's gradient is that of ½(FKL + RKL) over the real tokens, divided by their number (METHOD.md §6), plus
    with the MSE ablation mse_weight × the per-token MSE of the last hidden states, computed here from the logits
    and hidden states directly. (FKL alone, a dropped ½, or the MSE on another layer passed every test.)"""
    import torch.nn.functional as F
    mod, batch = _module(4, lam=0.0)                      # one micro-batch
    mod.cfg["cwic"]["mse_weight"] = mse_w
    parts = mod.accumulate_gradients(batch, 3.0, update_stats=False)
    got = _grads(mod)
    mod.student.zero_grad(set_to_none=True)
    real = batch["segment_ids"] > 0
    s_out, _ = mod._student(batch, real, update_stats=False, hidden=True)
    t_out = mod._teacher(batch, hidden=True)
    ls, lt = s_out.logits[real].log_softmax(-1), t_out.logits[real].log_softmax(-1)
    n = int(real.sum())
    loss = 0.5 * (F.kl_div(ls, lt, log_target=True, reduction="sum")
                  + F.kl_div(lt, ls, log_target=True, reduction="sum")) / n
    if mse_w:
        mse = ((s_out.hidden_states[-1] - t_out.hidden_states[-1]) ** 2).mean(-1)[real].sum()
        assert parts["mse"] == pytest.approx(float(mse), rel=1e-4) and float(mse) > 0
        loss = loss + mse_w * mse / n
    loss.backward()
    ref = _grads(mod)
    assert set(got) == set(ref) and len(ref) > 5
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-8, msg=k)


def test_one_micro_batch_step_differentiates_the_ap_loss():
    """One micro-batch on one process: the AP loss is λ·L_AP(APR) of that batch, differentiated (not a constant)."""
    g = {}
    for lam in (10.0, 0.0):
        mod, batch = _module(4, lam=lam)
        mod.accumulate_gradients(batch, 3.0, update_stats=False)
        g[lam] = _grads(mod)
    mod, batch = _module(4, lam=0.0)
    _, st = mod._student(batch, batch["segment_ids"] > 0, update_stats=False)
    (10.0 * torch.clamp(st.apr - 3.0, max=0.0) ** 2).backward()     # L_AP written out, not the library's
    ref = _grads(mod)
    thresholds = [n for n in ref if "theta" in n or "phi" in n]
    assert len(thresholds) > 5 and sum(float(ref[n].abs().sum()) for n in thresholds) > 0
    for n in thresholds:
        torch.testing.assert_close(g[10.0][n] - g[0.0][n], ref[n], atol=1e-6, rtol=1e-3, msg=n)


def test_ap_loss_uses_the_whole_step_under_accumulation():
    """With micro-batches, the AP gradient is L_AP'(A_tot)·Σ_j ∇A_j (step-level APR), not Σ_j L_AP'(A_j)∇A_j."""
    target = 3.0
    mod, batch = _module(2, lam=10.0)
    mod.accumulate_gradients(batch, target, update_stats=False)
    with_ap = _grads(mod)
    mod.student.zero_grad(set_to_none=True)
    mod.cfg["cwic"]["lambda_ap"] = 0.0
    mod.accumulate_gradients(batch, target, update_stats=False)
    without = _grads(mod)
    # reference: ∇A_j of each micro-batch alone, and the coefficient at the step's total
    mod.student.zero_grad(set_to_none=True)
    tot_active, dense, tokens, per_chunk = 0.0, None, 0, []
    for ch in mod._chunks(batch, 2):
        _, st = mod._student(ch, ch["segment_ids"] > 0, update_stats=False)
        st.active.backward()
        per_chunk.append(_grads(mod))
        mod.student.zero_grad(set_to_none=True)
        tot_active += float(st.active.detach())
        dense, tokens = st.dense, tokens + st.tokens
    a = torch.tensor(tot_active, dtype=torch.float64, requires_grad=True)
    (c,) = torch.autograd.grad(torch.clamp(dense * tokens / a - target, max=0.0) ** 2, a)   # L_AP written out
    assert float(c) > 0                      # denser than the target: each active parameter costs
    checked = 0
    for n, g in with_ap.items():
        ref = 10.0 * float(c) * sum(pc[n] for pc in per_chunk if n in pc)
        if isinstance(ref, torch.Tensor) and "theta" in n:
            torch.testing.assert_close(g - without.get(n, 0), ref, atol=1e-6, rtol=1e-3)
            checked += 1
    assert checked > 5


def test_head_cap_is_decided_once_per_step():
    """The head's cap (METHOD.md §11) is decided on the whole step's head reduction, as one forward over all its
    rows decides it. With the step under the cap and some micro-batches over it, one- and two-row micro-batches
    give the head's θ the same gradient. (It was decided per micro-batch: the AP gradient of the micro-batches over
    the cap was dropped, a different part for each split.)"""
    mod, batch = _module(2)
    red = lambda st: st.dense_by_kind["head"] * st.tokens / float(st.by_kind["head"])  # noqa: E731
    with torch.no_grad():
        whole = red(mod._student(batch, batch["segment_ids"] > 0, update_stats=False)[1])
        pairs = [red(mod._student(ch, ch["segment_ids"] > 0, update_stats=False)[1]) for ch in mod._chunks(batch, 2)]
    assert min(pairs) < whole < max(pairs) and max(pairs) - whole > 1e-4 * whole, (whole, pairs)
    grads = {}
    for micro in (1, 2):
        mod, batch = _module(micro)
        mod.student.config.cwic["head_max_reduction"] = (whole + max(pairs)) / 2   # the step under it
        mod.accumulate_gradients(batch, 3.0, update_stats=True)
        grads[micro] = mod.student.lm_head.theta.grad.clone()
    assert float(grads[1].abs().sum()) > 0
    torch.testing.assert_close(grads[1], grads[2], rtol=1e-4, atol=1e-6)

    def ap_part(cap):       # the head θ's gradient from the AP loss: with λ minus without
        g = {}
        for lam in (10.0, 0.0):
            mod, batch = _module(2, lam=lam)
            mod.student.config.cwic["head_max_reduction"] = cap
            mod.accumulate_gradients(batch, 3.0, update_stats=True)
            g[lam] = mod.student.lm_head.theta.grad.clone()
        return g[10.0] - g[0.0]
    assert float(ap_part((whole + max(pairs)) / 2).abs().sum()) > 0     # the step under the cap: pushed
    assert float(ap_part(1.0).abs().max()) < 1e-9                         # the step past it: not pushed


def _stats(mod):
    return {n: b.clone() for n, b in mod.student.named_buffers() if n.endswith(("ema_mean", "ema_std", "stat_steps"))}


def test_statistics_move_once_per_step_under_accumulation():
    """METHOD.md §2/§11: the running statistics take one step per optimizer step, from the whole step's batch,
    whatever the micro-batch size (they used to move once per micro-batch: β^8 a step with 8 of them)."""
    runs = {}
    for micro in (4, 2, 1):
        mod, batch = _module(micro)
        before = _stats(mod)
        mod.accumulate_gradients(batch, 3.0, update_stats=True)
        runs[micro] = (before, _stats(mod), _grads(mod))
    for micro, (before, after, _) in runs.items():
        steps = [n for n in after if n.endswith("stat_steps")]
        assert steps and all(float(after[n]) == float(before[n]) + 1 for n in steps), micro
    # two and four micro-batches pool the same tokens: the same statistics and the same gradients
    for n in runs[2][1]:
        torch.testing.assert_close(runs[1][1][n], runs[2][1][n], rtol=1e-5, atol=1e-7)
    for n in runs[2][2]:
        torch.testing.assert_close(runs[1][2][n], runs[2][2][n], rtol=1e-4, atol=1e-6)
    # the first layer's q input does not depend on any statistic: pooled = one batch of all the rows
    q0 = "model.layers.0.self_attn.q_proj."
    for b in ("ema_mean", "ema_std"):
        torch.testing.assert_close(runs[1][1][q0 + b], runs[4][1][q0 + b], rtol=1e-5, atol=1e-7)
        assert not torch.equal(runs[4][0][q0 + b], runs[4][1][q0 + b])      # they did move


def _spawn_two_ranks(worker, *args):
    """worker(rank, 2, *args) in two processes; each joins a gloo group with `_gloo_group`."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ["CWIC_TEST_PORT"] = str(sock.getsockname()[1])
    mp.spawn(worker, args=(2, *args), nprocs=2, join=True)


@contextlib.contextmanager
def _gloo_group(rank, world):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["CWIC_TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank, world, path, cap):
    with _gloo_group(rank, world) as dist:
        mod, batch = _module(1)
        mod.student.config.cwic["head_max_reduction"] = cap
        half = {k: v[2 * rank:2 * rank + 2] for k, v in batch.items()}
        mod.accumulate_gradients(half, 3.0, update_stats=True)
        grads = _grads(mod)
        for g in grads.values():       # what DistributedDataParallel does: the ranks' mean
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            torch.save({"grads": grads, "stats": _stats(mod)}, path)


def _val_data():
    """Five packed validation rows (an odd count: one rank's share is topped up with a padding row)."""
    from cwic_exp.data import PackedData
    g = torch.Generator().manual_seed(1)
    seg = torch.ones(5, 24, dtype=torch.int16)
    seg[1, 15:] = 0
    seg[4, 9:] = 2
    return PackedData(torch.randint(0, 96, (5, 24), generator=g, dtype=torch.int32), seg,
                      torch.arange(24, dtype=torch.int16).repeat(5, 1), {})


def _val_worker(rank, world, path):
    from torch.utils.data import DataLoader
    from cwic_exp.data import PackedDataset, collate, shard_rows
    with _gloo_group(rank, world):
        mod, _ = _module(1)
        data = _val_data()
        rows = shard_rows(len(data), rank, world)
        for i, b in enumerate(DataLoader(PackedDataset(data, rows), batch_size=2, collate_fn=collate)):
            mod.validation_step(b, i)
        got = mod.val_sums.compute()
        torch.save({"rows": rows, "metrics": got, "own_tokens": float(mod.val_sums.tokens)}, f"{path}{rank}.pt")


def test_data_parallel_validation_sums_every_ranks_rows(tmp_path):
    """Under DDP each rank validates its own rows (the last rank's share topped up with a padding row, so both run
    the same batches) and `ValidationSums` adds the ranks: each rank's KL, APR and token count are those of one
    process over all the rows (every rank used to validate every row), and so are the kinds' densities."""
    from cwic_exp.data import PackedDataset, collate
    _spawn_two_ranks(_val_worker, str(tmp_path / "r"))
    mod, _ = _module(1)
    data = _val_data()
    mod.validation_step(collate([PackedDataset(data)[i] for i in range(5)]), 0)
    ref = mod.val_sums.compute()
    assert ref["val/tokens"] == float((data.segment_ids > 0).sum()) == 111 and ref["val/kl"] > 0
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    assert [r["rows"] for r in ranks] == [[0, 2, 4], [1, 3, -1]]
    assert sum(r["own_tokens"] for r in ranks) == ref["val/tokens"] and all(r["own_tokens"] < 111 for r in ranks)
    kinds = set(KINDS)
    assert set(ref) == {"val/kl", "val/fkl", "val/tokens", "val/apr"} | {f"val/density/{k}" for k in kinds}
    # the kinds' densities weighted by their dense counts are the active parameters a token: dense / APR
    st = mod.val_sums
    active = sum(ref[f"val/density/{k}"] * st.dense_by_kind[k] for k in kinds)
    assert active == pytest.approx(st.dense / ref["val/apr"], rel=1e-9)
    assert all(0 < ref[f"val/density/{k}"] < 1 for k in kinds)
    for r in ranks:
        assert set(r["metrics"]) == set(ref)
        for k in ref:
            assert r["metrics"][k] == pytest.approx(ref[k], rel=1e-5), k


def test_data_parallel_step_equals_one_process_on_the_whole_batch(tmp_path):
    """Two gloo ranks, each with half the rows: the averaged gradients and every rank's statistics are those of
    one process on all the rows (global APR for the AP loss, global token count, statistics pooled over ranks, the
    head's cap decided on the global head reduction: the cap sits at 1.5× it, under the 2× that one rank's head
    count over the global tokens would give)."""
    mod, batch = _module(1)
    with torch.no_grad():
        st = mod._student(batch, batch["segment_ids"] > 0, update_stats=False)[1]
    cap = 1.5 * st.dense_by_kind["head"] * st.tokens / float(st.by_kind["head"])
    _spawn_two_ranks(_ddp_worker, str(tmp_path / "r0.pt"), cap)
    got = torch.load(tmp_path / "r0.pt")
    mod, batch = _module(1)
    mod.student.config.cwic["head_max_reduction"] = cap
    mod.accumulate_gradients(batch, 3.0, update_stats=True)
    ref_g, ref_s = _grads(mod), _stats(mod)
    assert set(got["grads"]) == set(ref_g) and len(ref_g) > 5
    for n in ref_g:
        torch.testing.assert_close(got["grads"][n], ref_g[n], rtol=1e-4, atol=1e-6)
    for n in ref_s:
        torch.testing.assert_close(got["stats"][n], ref_s[n], rtol=1e-5, atol=1e-7)


def _fit(mod, batch, steps):
    import lightning as L
    from cwic_exp.callbacks import ThetaClamp

    class Loop(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(steps):
                yield batch
    seen = []

    class Grab(L.Callback):
        def on_train_batch_end(self, tr, pl, *a):
            seen.append(dict(pl.last_metrics))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[ThetaClamp(), Grab()])
    trainer.fit(mod, train_dataloaders=torch.utils.data.DataLoader(Loop(), batch_size=None))
    return seen


def test_training_steps_lower_the_distillation_loss():
    mod, batch = _module(2, lam=0.0)
    with torch.no_grad():
        for p in mod.student.model.layers[1].mlp.down_proj.parameters():
            p.add_(0.3 * torch.randn_like(p))
    seen = _fit(mod, batch, 8)
    assert seen[-1]["train/kl"] < 0.7 * seen[0]["train/kl"]


def test_training_steps_move_the_apr_towards_its_target():
    mod, batch = _module(2, lam=10.0)
    mod.cfg["optim"]["lr"] = 3e-3
    mod.apr_target = 2.0
    with torch.no_grad():
        for m in cwic_exp.iter_cwic_modules(mod.student):
            (m.theta if hasattr(m, "theta") else m.phi).zero_()
    seen = _fit(mod, batch, 8)
    assert seen[-1]["train/apr"] > seen[0]["train/apr"] + 0.05
    assert all(float((m.theta if hasattr(m, "theta") else m.phi).min()) >= 0
               for m in cwic_exp.iter_cwic_modules(mod.student))


def test_optimizer_groups_and_schedule():
    """AdamW groups: θ/φ at LR × η_θ × √n without weight decay (n = the gated layer's input width: in_features, the
    FFN's hidden size for φ), matrices with weight decay, norms without; every trainable student parameter once,
    no teacher parameter. LR: linear warm-up, then a cosine to 0 at the schedule's end."""
    import math
    from cwic_exp.modeling.layers import CwicGatedMLP, CwicLinear
    mod, _ = _module(2, lam=0.0)
    mod.cfg["optim"].update(lr=1e-3, weight_decay=0.01, warmup_steps=5, schedule_steps=25)
    mod.cfg["cwic"]["eta_theta"] = 2.0
    out = mod.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(where) == sum(len(g["params"]) for g in opt.param_groups)           # none twice
    assert set(where) == {id(p) for p in mod.student.parameters() if p.requires_grad}
    assert not {id(p) for p in mod.teacher.parameters()} & set(where)
    for m in cwic_exp.iter_cwic_modules(mod.student):
        p, n = (m.theta, m.in_features) if isinstance(m, CwicLinear) else (m.phi, m.hidden_size)
        assert isinstance(m, (CwicLinear, CwicGatedMLP))
        g = where[id(p)]
        assert g["weight_decay"] == 0.0 and g["initial_lr"] == pytest.approx(1e-3 * 2.0 * math.sqrt(n))
    for name, p in mod.student.named_parameters():
        if "theta" in name or "phi" in name:
            continue
        want = 0.0 if (p.ndim < 2 or "norm" in name) else 0.01
        assert where[id(p)]["weight_decay"] == want, name
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)                # optim.beta1, beta2
    f = sched.lr_lambdas[0]
    assert [f(s) for s in (0, 4, 5)] == pytest.approx([0.2, 1.0, 1.0])
    assert f(15) == pytest.approx(0.5) and f(25) == pytest.approx(0.0) and f(40) == pytest.approx(0.0)


def test_each_step_moves_the_learning_rate_on():
    """The schedule steps once per optimizer step: the logged rate (the one each step used) warms up linearly over
    2 steps, then follows the cosine."""
    import math
    mod, batch = _module(2, lam=0.0)
    mod.cfg["optim"].update(lr=1e-3, warmup_steps=2, schedule_steps=10)
    seen = _fit(mod, batch, 4)
    want = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 8))]
    assert [m["train/lr"] for m in seen] == pytest.approx([1e-3 * w for w in want])


def test_thresholds_are_clamped_at_zero_after_each_step():
    """θ ← max(0, θ) after every optimizer step (METHOD.md §2): started just above 0 with the distillation alone
    pulling them denser, Adam steps would take some below 0; the clamp holds them at exactly 0."""
    mod, batch = _module(2, lam=0.0)
    mod.cfg["optim"]["lr"] = 1e-2
    with torch.no_grad():
        for m in cwic_exp.iter_cwic_modules(mod.student):
            (m.theta if hasattr(m, "theta") else m.phi).fill_(0.005)
    _fit(mod, batch, 3)
    vals = torch.cat([(m.theta if hasattr(m, "theta") else m.phi).detach().flatten()
                      for m in cwic_exp.iter_cwic_modules(mod.student)])
    assert float(vals.min()) == 0.0 and int((vals == 0).sum()) > 10 and float(vals.max()) > 0.005


@pytest.mark.parametrize("override,needle", [
    ("cwic.stripe_size=0", "stripe_size"),
    ("cwic.apr_final=0.5", "apr_final"),
    ("model.name=/no/such/model", "model.name"),
    ("data.path=/no/such/file.json", "data.path"),
    ("trainer.micro_batch_size=3", "multiple"),
    ("trainer.ckpt_every=0", "ckpt_every"),
    ("trainer.max_minutes=-1", "max_minutes"),
    ("optim.grad_clip=-1", "grad_clip"),
    ("trainer.precision=bf16_mixed", "precision"),
    ("trainer.accelerator=tpu", "accelerator"),
    ("trainer.strategy=ddpp", "strategy"),
    ("model.teacher_dtype=bf16", "teacher_dtype"),
    ("data.val_rows=0", "val_rows"),
    ("data.val_fraction=1", "val_fraction"),
    ("trainer.strategy=fsdp", "fsdp is not supported: it flattens the frozen bf16 teacher"),
    ("trainer.strategy=ddp_spawn", "ddp_spawn is not supported"),
    ("trainer.strategy=deepspeed", "deepspeed is not supported"),
    ("cwic.apr_final=nan", "apr_final must be a finite"),
    ("cwic.apr_final=inf", "apr_final must be a finite"),
    ("optim.lr=nan", "optim.lr"),
    ("cwic.apr_start=3 cwic.apr_final=2", "apr_start"),
    ("cwic.apr_start=1.2 cwic.apr_final=1", "apr_start"),
    ("run_name=../../escape", "run_name"),
    ("cwic.head_max_reduction=0", "head_max_reduction"),
    ("optim.warmup_steps=-5", "warmup_steps"),
    ("trainer.threads=-1", "threads"),
    ("trainer.devices=0", "devices"),
    ("trainer.devices=two", "devices"),          # a traceback from Lightning after the data loaded
    ("trainer.devices=2.5", "devices"),
    ("trainer.devices=-1", "devices"),          # on the CPU Lightning takes a count only
    ("trainer.devices=[0,1]", "devices"),
    ("data.max_conversations=0", "max_conversations"),
    ("+cwic.lamda_ap=3", r"unknown config key\(s\) cwic\.lamda_ap: .*did you mean cwic\.lamda_ap → cwic\.lambda_ap"),
    ("++trainer.max_step=9", "did you mean trainer.max_step → trainer.max_steps"),
    ("+seeds=1", "did you mean seeds → seed"),
    ("+cwic.foo=???", r"unknown config key\(s\) cwic\.foo"),          # named, not resolved (a traceback)
    ("+cwic.foo=${nope}", r"unknown config key\(s\) cwic\.foo"),
    ("+warp_speed=9", r"key\(s\) warp_speed: not in the schema \(src/cwic_exp/config.py\), so nothing would read them$"),
    ("cwic.eta_theta=0", "eta_theta"),                 # θ's learning rate 0: nothing would sparsify
    ("optim.weight_decay=nan", "weight_decay"),        # AdamW would make every weight NaN
    ("cwic.beta_dist=1", "beta_dist"),
    ("cwic.alpha_eps=0", "alpha_eps"),
    ("data.source=packed", "data.path"),
    ("cwic.apr_final=1e9", r"apr_final must be in \[1, 100\], got 1000000000.0: the run exports"),   # OOM before
    ("optim.beta1=1.5", r"optim.beta1 must be in \[0, 1\) \(AdamW\), got 1.5"),   # torch's error after loading
    ("optim.beta2=-0.1", "optim.beta2"),
    ("optim.schedule_steps=0", "schedule_steps must be ≥ 1"),                  # was clamped to 1 silently
    ("data.max_len=-1", "data.max_len must be ≥ 1 or null"),
    ("data.num_workers=-1", "data.num_workers must be ≥ 0"),
    ("trainer.max_steps=-1", "must be ≥ 1, got -1, "),
    (f"out_dir={__file__}", "out_dir must be a folder, and .*test_train.py is a file"),
])
def test_config_errors_are_one_line_and_early(override, needle):
    from cwic_exp.config import ConfigError, validate
    cfg = _compose(["run_name=x", *override.split()])
    with pytest.raises(ConfigError, match=needle) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_a_gpu_trainer_without_a_gpu_is_a_config_error_naming_the_accelerator(monkeypatch):
    """trainer=ddp on a CPU machine said "trainer=gpu ..." (ddp builds on gpu) and exited 1, not a config error's 2."""
    from cwic_exp import train as T
    from cwic_exp.config import ConfigError
    monkeypatch.setattr(T.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu \(trainer=gpu, trainer=ddp\) but no CUDA"):
        T._accelerator(_compose(["trainer=ddp"]))
    assert T._accelerator(_compose(["trainer.accelerator=auto"])) == "cpu"


def test_devices_are_checked_as_the_cpu_takes_them_under_accelerator_auto(monkeypatch):
    """accelerator=auto without a GPU runs on the CPU, where devices must be a count: -1 (all GPUs) is refused there
    as with accelerator=cpu, and allowed where a GPU is visible."""
    from cwic_exp import config as C
    cfg = lambda: _compose(["run_name=x", "trainer.accelerator=auto", "trainer.devices=-1"])   # noqa: E731
    monkeypatch.setattr(C, "_cuda", lambda: False)
    with pytest.raises(C.ConfigError, match="devices .* on the CPU"):
        C.validate(cfg())
    monkeypatch.setattr(C, "_cuda", lambda: True)
    try:
        C.validate(cfg())
    except C.ConfigError as e:
        assert "devices" not in str(e), e


@pytest.mark.parametrize("name", ["..", "."])
def test_run_name_cannot_point_at_out_dir_or_above(name):
    """run_name=.. made the run folder out_dir's parent: a fresh start there deletes checkpoints/, hf/ and LATEST."""
    from cwic_exp.config import ConfigError, validate
    with pytest.raises(ConfigError, match="run_name"):
        validate(_compose([f"run_name={name}"]))


def test_the_paper_mix_without_the_hub_is_a_config_error(monkeypatch):
    """It stopped with a traceback once the data module started; a config error is one line (train.py). Checked
    where the mix loads, not up front: a cached mix needs no hub."""
    from cwic_exp import data
    from cwic_exp.config import ConfigError

    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'teknium/OpenHermes-2.5' on the Hub (LocalEntryNotFoundError)\nmore")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ConfigError, match=r"needs the Hugging Face hub: loading teknium/OpenHermes-2.5 failed "
                                          r"\(Couldn't reach .*LocalEntryNotFoundError\)\)\. Offline, use data=sharegpt$"):
        next(data.paper_mix_conversations())


def test_paper_recipes_get_table_5_where_they_do_not_say(tmp_path):
    """What the paper recipes leave to the defaults is Table 5's: λ_AP 10, β 0.99, α_ε 0.1, AdamW (0.9, 0.95)."""
    cfg = _compose(["+experiment=paper_1b"])
    assert (cfg.cwic.lambda_ap, cfg.cwic.beta_dist, cfg.cwic.alpha_eps) == (10.0, 0.99, 0.1)
    assert (cfg.optim.beta1, cfg.optim.beta2) == (0.9, 0.95)


def test_teacher_dtype_auto_and_resume_changes(monkeypatch):
    """teacher_dtype=auto: fp32 on the CPU, bf16 on GPUs. A resume that changes the data's sequence length is
    named as a changed setting (only micro-batch size, precision and attention may change)."""
    from cwic_exp import train as T
    cfg = _compose(["run_name=x"])
    cfg.model.teacher_dtype = "auto"
    assert T._teacher_dtype(cfg, "cpu") is torch.float32 and T._teacher_dtype(cfg, "gpu") is torch.bfloat16
    old = _compose(["run_name=x", "data.seq_len=64"])
    new = _compose(["run_name=x", "data.seq_len=128"])
    from omegaconf import OmegaConf
    as_dict = lambda c: OmegaConf.to_container(c, resolve=False)   # noqa: E731
    assert [c for c in T.config_changes(as_dict(old), as_dict(new)) if c.startswith("data.")] == ["data.seq_len: 64 → 128"]


def test_train_help_says_what_it_does_and_sets_eval_apart():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("train.py: distil a CWIC student from its dense teacher")
    assert "experiment: ablation_mse" in r.stdout and 'The group "eval" is the config of' in r.stdout


def test_config_error_from_the_command_line():
    r = subprocess.run([sys.executable, "train.py", "cwic.stripe_size=-4"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("config error: cwic.stripe_size")
    assert "Loading weights" not in r.stderr


def test_a_command_line_run_prints_lightnings_messages_once(tmp_path):
    """Hydra's handlers and Lightning's own both printed every Lightning message; warnings that do not apply to this
    loop (manual optimisation checkpoints, the teacher in eval mode) and an advertisement are gone."""
    r = subprocess.run([sys.executable, "train.py", "+experiment=smoke", f"out_dir={tmp_path}", "trainer.max_steps=1",
                        "data.seq_len=64", "export_milestones=false"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert out.count("GPU available") == 1, out[-3000:]
    assert "ModelCheckpoint with manual optimization" not in out and "in eval mode" not in out
    assert "litlogger" not in out
    assert (tmp_path / "smoke" / "train.log").read_text().count("GPU available") == 1


def test_multirun_sweep_gets_one_folder_per_member(tmp_path):
    """`python train.py -m ...` used to stop before any job (the sweep folder named by ${run_name}, whose ${hydra:...}
    parts cannot resolve there), and members differing only in their experiment shared one folder (and would
    resume each other's checkpoints). A config error in the first member shows that the jobs now start, in a
    folder named by every override."""
    r = subprocess.run([sys.executable, "train.py", "-m", "cwic.stripe_size=-4,-8", "+experiment=ablation_mse",
                        f"out_dir={tmp_path}", "data.path=/no/such/x%.json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1].startswith("config error: cwic.stripe_size"), r.stderr[-2000:]
    # a path among the overrides is one folder name, not nested folders
    assert [p.name for p in (tmp_path / "sweeps").iterdir() if p.is_dir()] == [
        "+experiment=ablation_mse,cwic.stripe_size=-4,data.path=%2Fno%2Fsuch%2Fx%25.json"]


def test_sweep_folder_names_stay_one_short_name_and_earlier_runs_are_named(tmp_path):
    """A member's overrides make one folder name: '/', '\\', ':' and '%' escaped, and past 200 bytes a head plus a
    hash of the whole (a long data path hit "File name too long"). A run in the folder the raw overrides named
    before (nested folders) is pointed to, not silently started over."""
    from cwic_exp.config import folder_name
    from cwic_exp.train import earlier_sweep_folder
    assert folder_name("a=C:\\x/y%z") == "a=C%3A%5Cx%2Fy%25z"
    long_a, long_b = "data.path=/" + "d" * 300 + "/a.json", "data.path=/" + "d" * 300 + "/b.json"
    na, nb = folder_name(long_a), folder_name(long_b)
    assert len(na.encode()) <= 200 and na != nb and na == folder_name(long_a) and na.startswith("data.path=%2Fddd")
    raw = "cwic.apr_final=2.0,data.path=/d/x.json"
    out = tmp_path / "sweeps" / folder_name(raw)
    assert earlier_sweep_folder(tmp_path / "sweeps", raw, out) is None
    (tmp_path / "sweeps" / raw / "checkpoints").mkdir(parents=True)
    assert earlier_sweep_folder(tmp_path / "sweeps", raw, out) == tmp_path / "sweeps" / raw
    (out / "checkpoints").mkdir(parents=True)                   # moved or resumed already
    assert earlier_sweep_folder(tmp_path / "sweeps", raw, out) is None
    assert earlier_sweep_folder(tmp_path / "sweeps", "cwic.apr_final=2.0", out) is None


def test_ranks_with_different_configs_stop_together():
    """Every rank gathers every rank's config hash, so all of them raise, with the same message (one raising alone
    would leave the others waiting in their next collective)."""
    from types import SimpleNamespace
    from cwic_exp.callbacks import SameConfigOnEveryRank

    def gathered(*texts):   # what all_gather returns on each rank: every rank's digest
        return lambda t: torch.tensor([[SameConfigOnEveryRank(x).digest] for x in texts])
    same = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu"),
                                                                    all_gather=gathered("a: 1", "a: 1")))
    SameConfigOnEveryRank("a: 1").setup(same, None, "fit")
    other = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu"),
                                                                     all_gather=gathered("a: 1", "a: 2")))
    for text in ("a: 1", "a: 2"):
        with pytest.raises(RuntimeError, match="different configs"):
            SameConfigOnEveryRank(text).setup(other, None, "fit")
    alone = SimpleNamespace(world_size=1, strategy=None)     # one process: nothing gathered
    SameConfigOnEveryRank("a: 1").setup(alone, None, "fit")


def test_a_multirun_sweep_with_ddp_runs_each_member_on_both_ranks(tmp_path):
    """Lightning starts rank 1 with the parent's command line, `-m` and the sweep included: rank 1 runs the whole
    sweep itself, in step with rank 0, and keeps its process group from member to member. Each member folder then
    has both ranks' logs, and the ranks' config hashes agree (`SameConfigOnEveryRank`), member after member."""
    from cwic_exp.callbacks import apr_target_at
    r = subprocess.run([sys.executable, "train.py", "-m", "+experiment=smoke", "trainer.devices=2",
                        "trainer.strategy=ddp", "cwic.apr_final=2.0,3.0", "trainer.max_steps=2", "data.seq_len=64",
                        "export_milestones=false", f"out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for apr in ("2.0", "3.0"):
        (run,) = (tmp_path / "sweeps").glob(f"+experiment=smoke,cwic.apr_final={apr},*")
        summary = json.loads((run / "summary.json").read_text())
        # the last step's target, 1.05 → final + 0.05 over the smoke's 4 warm-up steps: each member kept its own
        assert summary["finished"] and summary["apr_target"] == pytest.approx(apr_target_at(1, 1.05, float(apr), 4),
                                                                              abs=1e-4), summary
        assert (run / "train_ddp_process_1.log").read_text().count("data:") >= 1
        # one validation row: rank 0 validates it, rank 1 a padding row; the sum over both is the row's figures
        assert math.isfinite(summary["kl"]) and summary["kl"] > 0 and summary["apr"] > 1, summary


def test_experiments_compose():
    for exp in ("smoke", "mini", "paper_1b", "paper_3b", "ablation_nostripes", "ablation_noste",
                "ablation_mse"):
        cfg = _compose(["run_name=x", f"+experiment={exp}"])
        assert cfg.trainer.sequences_per_step % cfg.trainer.micro_batch_size == 0
    assert _compose(["run_name=x", "+experiment=ablation_nostripes"]).cwic.stripe_size is None
    assert _compose(["run_name=x", "+experiment=ablation_noste"]).cwic.ste is False
    assert _compose(["run_name=x", "+experiment=ablation_mse"]).cwic.mse_weight > 0
    assert _compose(["run_name=x", "+experiment=paper_1b"]).cwic.stripe_size == 512
    # Table 5's learning rates: the model's own rate wins over the trainer's generic one (it used to lose)
    assert _compose(["run_name=x", "+experiment=paper_1b"]).optim.lr == pytest.approx(5e-5)
    assert _compose(["run_name=x", "+experiment=paper_3b"]).optim.lr == pytest.approx(3e-5)
    assert _compose(["run_name=x", "+experiment=mini"]).optim.lr == pytest.approx(1e-4)   # SmolLM2: the trainer's
    assert _compose(["run_name=x", "model=llama3_2_1b", "cwic=nostripes"]).cwic.stripe_size is None
    assert _compose(["run_name=x", "+experiment=paper_1b", "optim.lr=2e-5"]).optim.lr == pytest.approx(2e-5)


def test_a_data_groups_own_lengths_win_over_the_trainers():
    """trainer/cpu.yaml sets seq_len 256 and val_rows 8 for the default data; data/tiny.yaml's 128 and 4 (the
    smoke run's) and paper_mix's 1024 used to be overwritten by it, since the trainer group came after data."""
    for extra, want in (([], (256, 8)), (["+experiment=smoke"], (128, 4)), (["data=paper_mix"], (1024, 8))):
        d = _compose(["run_name=x"] + extra).data
        assert (d.seq_len, d.val_rows) == want, extra


def test_an_ablation_with_another_cwic_choice_is_named_by_it():
    """`+experiment=ablation_noste cwic=mse` runs the MSE ablation: it used to be filed as ablation_noste."""
    out = subprocess.run([sys.executable, "train.py", "+experiment=ablation_noste", "cwic=mse", "--cfg", "job",
                          "--resolve"], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert "run_name: ablation_mse" in out and "ste: true" in out and "mse_weight: 1.0" in out


def test_paper_mix_rows_map_to_conversations(monkeypatch):
    from cwic_exp import data
    arc = {"id": "x", "question": "Which is a gas?", "answerKey": "B",
           "choices": {"text": ["iron", "oxygen"], "label": ["A", "B"]}}
    assert data._to_messages(arc) == [{"role": "user", "content": "Which is a gas?\nA. iron\nB. oxygen"},
                                      {"role": "assistant", "content": "B"}]
    mmlu = {"question": "2+2?", "subject": "", "choices": ["3", "4", "5", "6"], "answer": 1}
    assert data._to_messages(mmlu)[1]["content"] == "B"
    assert data._to_messages({"train": mmlu}) == data._to_messages(mmlu)     # auxiliary_train's nested rows
    wino = {"sentence": "The cup _ fell.", "option1": "A", "option2": "B", "answer": "2"}
    assert data._to_messages(wino)[1]["content"] == "B"

    class FakeDatasets:   # a source whose schema nothing maps must stop the run, not vanish from the mix
        @staticmethod
        def load_dataset(name, cfg, split, streaming):
            rows = [{"unknown": 1}, {"unknown": 2}] if "arc" in name else [arc]
            return rows if split else {"all": rows}     # split None: every split, {split: rows}
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    with pytest.raises(RuntimeError, match="ai2_arc.*row keys \\['unknown'\\]"):
        list(data.paper_mix_conversations())
    monkeypatch.setattr(data, "PAPER_MIX", [("allenai/ai2_arc", "ARC-Easy", "train", 5)])
    monkeypatch.setitem(sys.modules, "datasets", type("D", (), {"load_dataset": staticmethod(
        lambda name, cfg, split, streaming: [arc])}))
    assert len(list(data.paper_mix_conversations())) == 5


def _smoke_cfg(tmp, steps, extra=()):
    return _compose(["+experiment=smoke", "run_name=t", f"out_dir={tmp}", f"trainer.max_steps={steps}",
                     "data.seq_len=64", "trainer.ckpt_every=3", "trainer.val_every=100", *extra])


def test_smoke_run_and_resume_continue_the_same_trajectory(tmp_path, capsys):
    from cwic_exp.train import run
    import pandas  # noqa: F401  (lightning's CSV logger needs nothing else)
    a = run(_smoke_cfg(tmp_path / "a", 6), tmp_path / "a" / "t")
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    for key in ("apr", "apr_target", "kl", "steps", "tokens", "checkpoint"):
        assert key in last
    assert last["steps"] == 6 and os.path.exists(os.path.join(last["checkpoint"], "config.json"))
    with open(os.path.join(last["checkpoint"], "config.json")) as f:   # evaluation's KL reads its teacher there
        assert json.load(f)["text_config"]["cwic_teacher"] == "tiny-random-llama"
    # interrupted after 3 steps, then the same command again (longer horizon) resumes
    run(_smoke_cfg(tmp_path / "b", 3), tmp_path / "b" / "t")
    b = run(_smoke_cfg(tmp_path / "b", 6), tmp_path / "b" / "t")
    assert b["steps"] == 6 and b["tokens"] == a["tokens"]
    assert b["train_kl"] == pytest.approx(a["train_kl"], rel=1e-3, abs=1e-6)
    assert b["train_apr"] == pytest.approx(a["train_apr"], rel=1e-4)
    from safetensors.torch import load_file
    sa = load_file(Path(a["checkpoint"]) / "model.safetensors")
    sb = load_file(Path(b["checkpoint"]) / "model.safetensors")
    for k in ("model.layers.0.self_attn.q_proj.theta", "model.layers.1.mlp.gate_proj.ema_std"):
        torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=1e-4)


def test_time_limit_stop_saves_and_resumes_the_same_trajectory(tmp_path, capsys):
    from cwic_exp.train import run
    import pandas  # noqa: F401
    a = run(_smoke_cfg(tmp_path / "a", 5, ["trainer.ckpt_every=100"]), tmp_path / "a" / "t")
    # stopped by the time limit long before the periodic checkpoint: the stop itself saves last.ckpt
    s = run(_smoke_cfg(tmp_path / "b", 5, ["trainer.ckpt_every=100", "trainer.max_minutes=0.0001"]),
            tmp_path / "b" / "t")
    assert 0 < s["steps"] < 5 and not s["finished"]
    assert f"NOT FINISHED: stopped by trainer.max_minutes at step {s['steps']} of 5" in capsys.readouterr().out
    assert (tmp_path / "b" / "t" / "checkpoints" / "last.ckpt").exists()
    wall = torch.load(tmp_path / "b" / "t" / "checkpoints" / "last.ckpt", weights_only=False)["cwic_wall_s"]
    assert 0 < wall <= s["wall_s_total"] + 0.1 and s["wall_s_total"] == pytest.approx(s["wall_s"], abs=0.2)
    # the same command again makes progress: the limit counts from each start (Lightning's own timer restored the
    # time already spent, and the rerun stopped at once)
    s2 = run(_smoke_cfg(tmp_path / "b", 5, ["trainer.ckpt_every=100", "trainer.max_minutes=0.0001"]),
             tmp_path / "b" / "t")
    assert s2["steps"] > s["steps"]
    assert s2["wall_s_total"] == pytest.approx(wall + s2["wall_s"], abs=0.3)   # the earlier start counts too
    b = run(_smoke_cfg(tmp_path / "b", 5, ["trainer.ckpt_every=100"]), tmp_path / "b" / "t")
    assert b["steps"] == 5 and b["finished"] and b["tokens"] == a["tokens"]
    assert b["train_kl"] == pytest.approx(a["train_kl"], rel=1e-3, abs=1e-6)
    assert b["train_apr"] == pytest.approx(a["train_apr"], rel=1e-4)


def test_a_wandb_run_ends_cleanly_offline(tmp_path, monkeypatch):
    """logger=wandb without credentials: offline, and the run ends with its summary (wandb 0.31's finish() has no
    `quiet`: the call that passed it raised after the export, without the summary line)."""
    pytest.importorskip("wandb")
    from cwic_exp import train as T
    import pandas  # noqa: F401
    monkeypatch.setattr(T, "_wandb_credentials", lambda: False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    s = T.run(_smoke_cfg(tmp_path, 2, ["logger=wandb"]), tmp_path / "t")
    assert s["finished"] and s["steps"] == 2
    assert list((tmp_path / "t" / "wandb").glob("offline-run-*"))              # `wandb sync` uploads it later


def test_an_interrupted_run_exits_non_zero(monkeypatch):
    from cwic_exp import train as T
    for summary, code in (({"interrupted": "SIGINT", "finished": False}, 130), ({"finished": True}, None)):
        monkeypatch.setattr(T, "run", lambda cfg, out, sweep_member=None, s=summary: s)
        if code is None:
            T.main_from_hydra(None)
        else:
            with pytest.raises(SystemExit) as e:
                T.main_from_hydra(None)
            assert e.value.code == code


def test_ctrl_c_stops_after_the_step_and_the_rerun_loses_nothing(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a run: the step finishes, last.ckpt holds it (it used to keep only the last periodic one), no
    export; the same command resumes there, finishes at a max_steps that is no multiple of ckpt_every with a
    checkpoint of that very step, and metrics.csv keeps the rows from before the resume. A different command on the
    same folder is refused instead of resuming a run with other settings."""
    import signal
    from cwic_exp import callbacks
    from cwic_exp.config import ConfigError
    from cwic_exp.train import run
    import pandas
    sent = []
    orig = callbacks.ThetaClamp.on_train_batch_end

    def ctrl_c_at_step_2(self, trainer, *a):
        orig(self, trainer, *a)
        if trainer.global_step == 2 and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(callbacks.ThetaClamp, "on_train_batch_end", ctrl_c_at_step_2)
    before = signal.getsignal(signal.SIGINT)
    s = run(_smoke_cfg(tmp_path, 5), tmp_path / "t")
    assert s["interrupted"] == "SIGINT" and s["steps"] == 2 and not s["finished"]
    assert signal.getsignal(signal.SIGINT) is before                    # the handler is put back
    ck = tmp_path / "t" / "checkpoints" / "last.ckpt"
    assert torch.load(ck, weights_only=False)["global_step"] == 2
    assert not (tmp_path / "t" / "hf" / "final").exists()
    # stopped exactly at its max_steps: the rerun validates and exports (the interrupted summary is not a finished one)
    f2 = run(_smoke_cfg(tmp_path, 2), tmp_path / "t")
    assert f2["finished"] and f2["steps"] == 2 and math.isfinite(f2["apr"]) and (tmp_path / "t" / "hf" / "final").is_dir()
    b = run(_smoke_cfg(tmp_path, 5), tmp_path / "t")
    assert b["steps"] == 5 and b["finished"]
    assert torch.load(ck, weights_only=False)["global_step"] == 5      # 5: no multiple of ckpt_every=3
    log = pandas.read_csv(tmp_path / "t" / "logs" / "metrics.csv")
    steps = set(log["step"].dropna().astype(int))
    assert {0, 1, 2, 3, 4} <= steps, steps
    # the summary's APR is the final validation's, not the last training step's
    assert b["apr"] == round(float(log["val/apr"].dropna().iloc[-1]), 4) and b["apr"] != b["train_apr"]
    # the same command once more: the finished run's records stand (no step ran: they used to become NaN), and
    # runs/LATEST points at its export again
    (tmp_path / "LATEST").unlink()
    again = run(_smoke_cfg(tmp_path, 5), tmp_path / "t")
    assert again["train_kl"] == b["train_kl"] and again["wall_s"] == b["wall_s"]
    with pytest.raises(ConfigError, match="cwic.lambda_ap: 10.0 → 1.0"):
        run(_smoke_cfg(tmp_path, 6, ["cwic.lambda_ap=1"]), tmp_path / "t")
    # resume=false starts over in the same folder: the old run's log, checkpoint and exports go rather than mix in,
    # and runs/LATEST with them when it pointed there (seen here by stopping the start at the teacher's load)
    from cwic_exp import teacher as T
    assert (tmp_path / "LATEST").read_text().strip() == str((tmp_path / "t" / "hf" / "final").resolve())
    load = T.load_teacher
    monkeypatch.setattr(T, "load_teacher", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stopped here")))
    (tmp_path / "t" / "wandb_id").write_text("old-run")
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="stopped here"):
        run(_smoke_cfg(tmp_path, 2, ["cwic.lambda_ap=1", "resume=false"]), tmp_path / "t")
    assert "resume=false: removed the earlier run's checkpoints, hf, summary.json in" in capsys.readouterr().err
    assert not (tmp_path / "LATEST").exists() and not (tmp_path / "t" / "hf").exists()
    # nor its checkpoints (the new run would resume them) or its wandb run
    assert not (tmp_path / "t" / "checkpoints").exists() and not (tmp_path / "t" / "wandb_id").exists()
    monkeypatch.setattr(T, "load_teacher", load)
    (tmp_path / "t" / "hf" / "apr_9.05x").mkdir(parents=True)
    c = run(_smoke_cfg(tmp_path, 2, ["cwic.lambda_ap=1", "resume=false"]), tmp_path / "t")
    assert c["steps"] == 2 and not (tmp_path / "t" / "hf" / "apr_9.05x").exists()
    assert set(pandas.read_csv(tmp_path / "t" / "logs" / "metrics.csv")["step"].dropna().astype(int)) <= {0, 1, 2}
    assert torch.load(ck, weights_only=False)["global_step"] == 2


def _every2(tmp, steps):
    """The smoke run with a checkpoint and a validation every 2 steps, no milestone exports."""
    return _smoke_cfg(tmp, steps, ["trainer.ckpt_every=2", "trainer.val_every=2", "export_milestones=false"])


def test_a_diverged_run_writes_strict_json(tmp_path, monkeypatch, capsys):
    """A run whose validation gives NaN (a diverged student) writes its summary.json and its last stdout line as
    JSON that strict parsers read (json.dumps wrote NaN, which JSON.parse and jq refuse): the figure is null."""
    from lightning.pytorch import Trainer
    from cwic_exp.train import run
    import pandas  # noqa: F401

    def nan_validation(self, model, datamodule=None, verbose=True):
        model.val_metrics = {"val/apr": float("nan"), "val/kl": float("nan")}
    monkeypatch.setattr(Trainer, "validate", nan_validation)
    from conftest import strict_json
    run(_smoke_cfg(tmp_path, 2), tmp_path / "t")
    for text in ((tmp_path / "t" / "summary.json").read_text(), capsys.readouterr().out.strip().splitlines()[-1]):
        s = strict_json(text)
        assert s["apr"] is None and s["kl"] is None and s["steps"] == 2


def test_a_summary_older_than_the_checkpoint_is_not_taken_for_the_result(tmp_path):
    """Killed after last.ckpt was written at the end but before summary.json: the rerun finds the previous run's
    (finished, older) summary beside a newer checkpoint, and measures and exports the checkpoint's step instead of
    returning the old figures."""
    from cwic_exp.train import run
    run(_every2(tmp_path, 3), tmp_path / "t")
    old = (tmp_path / "t" / "summary.json").read_text()
    run(_every2(tmp_path, 5), tmp_path / "t")
    (tmp_path / "t" / "summary.json").write_text(old)                  # as if killed before the new one was written
    s = run(_every2(tmp_path, 5), tmp_path / "t")
    assert s["steps"] == 5 and s["finished"] and json.loads(old)["steps"] == 3
    assert json.loads((tmp_path / "t" / "hf" / "final" / "cwic_train_meta.json").read_text())["steps"] == 5


def test_a_rerun_after_a_kill_logs_each_step_once(tmp_path):
    """Killed after logging steps its last checkpoint does not hold: the rerun drops those rows before logging the
    steps again; and the final validation is not run (and logged) twice when the last step was just validated."""
    import shutil
    import pandas
    from cwic_exp.train import run
    cfg = lambda n: _every2(tmp_path, n)  # noqa: E731
    run(cfg(2), tmp_path / "t")
    ck = tmp_path / "t" / "checkpoints" / "last.ckpt"
    shutil.copy(ck, tmp_path / "step2.ckpt")
    run(cfg(4), tmp_path / "t")
    shutil.copy(tmp_path / "step2.ckpt", ck)        # as if killed after logging steps 2 and 3, before saving them
    run(cfg(4), tmp_path / "t")
    df = pandas.read_csv(tmp_path / "t" / "logs" / "metrics.csv")
    assert sorted(df.loc[df["train/kl"].notna(), "step"].astype(int)) == [0, 1, 2, 3]
    assert df["val/kl"].notna().sum() == 2          # after steps 2 and 4, once each
    ck.write_bytes(b"cut short")                    # a checkpoint that cannot be read: one line naming it
    from cwic_exp.config import ConfigError
    with pytest.raises(ConfigError, match="last.ckpt cannot be read.*resume=false"):
        run(cfg(6), tmp_path / "t")


def test_extending_a_finished_run_keeps_its_final_validation_and_exports(tmp_path):
    """The final validation logged one step past the last training row, so a resume from there dropped it as a
    row of a step to be logged again; a rerun without a checkpoint (deleted to free disk) deleted the exports."""
    import shutil
    import pandas
    from cwic_exp.train import run
    cfg = lambda n: _every2(tmp_path, n)  # noqa: E731
    run(cfg(3), tmp_path / "t")
    run(cfg(5), tmp_path / "t")
    df = pandas.read_csv(tmp_path / "t" / "logs" / "metrics.csv")
    # validations after 2, 3 (final), 4 and 5 (final) steps, each at the step of its last training row
    assert sorted(df.loc[df["val/kl"].notna(), "step"].astype(int)) == [1, 2, 3, 4]
    (tmp_path / "t" / "hf" / "apr_9.05x").mkdir()
    shutil.rmtree(tmp_path / "t" / "checkpoints")
    run(cfg(1), tmp_path / "t")                     # resume=true, nothing to resume: a fresh start
    assert (tmp_path / "t" / "hf" / "apr_9.05x").exists()


def test_devices_as_lightning_takes_them_on_cpu_and_gpu():
    from cwic_exp.config import _devices_ok
    assert all(_devices_ok(v, cpu=True) for v in (1, 2, "auto", "2"))
    assert not any(_devices_ok(v, cpu=True) for v in (0, -1, "-1", "0,1", [0], 2.5, "two", True))
    assert all(_devices_ok(v, cpu=False) for v in (1, -1, "-1", "auto", "0,1", "0,", [0, 1]))
    assert not any(_devices_ok(v, cpu=False) for v in (0, -2, "0", "", ",", [], [-1], "0,x", 2.5))


def test_hub_ids_that_cannot_load_here_stop_at_once(monkeypatch, tmp_path):
    """Offline, an uncached hub id took transformers about 30 s of retries and ended in a traceback; it is now a
    one-line config error before anything loads. A cached repo loads offline, and behind a proxy nothing is
    checked (a direct connection says nothing there)."""
    import socket
    import huggingface_hub.constants
    from types import SimpleNamespace
    import cwic_exp.teacher as T
    from cwic_exp.config import ConfigError, check_model_loadable
    tried = []

    def unreachable(addr, timeout=None):
        tried.append(addr)
        raise OSError("network is unreachable")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
              "HF_ENDPOINT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(ConfigError, match="model.name=org/model is a hub id, but huggingface.co cannot be reached"):
        check_model_loadable("org/model")
    assert tried == [("huggingface.co", 443)]
    check_model_loadable("smollm2-135m-instruct")                                  # not a hub id: not checked
    assert len(tried) == 1
    repo = tmp_path / "hub" / "models--org--model"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    assert T.hub_unreachable_reason("org/model") is None                          # cached: loads offline
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example:8443")
    assert "mirror.example cannot be reached" in T.hub_unreachable_reason("org/other")
    assert tried[-1] == ("mirror.example", 8443)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local")                      # a plain-http mirror: port 80
    T.hub_unreachable_reason("org/other")
    assert tried[-1] == ("mirror.local", 80)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")                         # not the http endpoint's proxy
    assert T.hub_unreachable_reason("org/other") is not None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert T.hub_unreachable_reason("org/other") is None
    monkeypatch.delenv("HF_ENDPOINT")
    monkeypatch.delenv("HTTP_PROXY")
    assert T.hub_unreachable_reason("org/other") is None                          # https behind HTTPS_PROXY
    monkeypatch.delenv("HTTPS_PROXY")
    n = len(tried)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert "TRANSFORMERS_OFFLINE is set" in T.hub_unreachable_reason("org/other") and len(tried) == n
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")          # read first, as huggingface_hub reads them: online
    assert "cannot be reached" in T.hub_unreachable_reason("org/other")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in T.hub_unreachable_reason("org/other")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", lambda addr, timeout=None: SimpleNamespace(close=lambda: None))
    assert T.hub_unreachable_reason("org/other") is None                          # the hub answers
    import threading
    release = threading.Event()
    monkeypatch.setattr(socket, "create_connection", 
                        lambda addr, timeout=None: release.wait(30) and SimpleNamespace(close=lambda: None))  # hung
    t0 = time.monotonic()
    reason = T.hub_unreachable_reason("org/other", timeout=0.1, lookup_timeout=0.2)
    release.set()
    assert reason is None and time.monotonic() - t0 < 5       # no answer in time: not known unreachable, not waited on


def test_a_flat_apr_schedule_is_valid():
    from cwic_exp.config import validate
    validate(_compose(["run_name=x", "cwic.apr_final=1"]))    # 1.05 → 1.05: start = final + 0.05


def test_milestones_are_the_papers_checkpoints_at_3k_to_15k_steps(monkeypatch, tmp_path):
    """METHOD.md §4: 1.05 → 6.05 over 15k steps, the checkpoints at 3k/6k/9k/12k/15k steps are the 2.05× … 6.05×
    models. The paper recipes train exactly 15,000 steps, so the 6.05× export must come after the last one (it
    was never written while an export waited for a step trained at ≥ 6.05: the last is trained at 6.0497)."""
    from types import SimpleNamespace
    import cwic_exp.callbacks as cb
    seen = []
    monkeypatch.setattr(cb, "export_hf", lambda student, tok, path, meta: seen.append((path.name, meta["step"])))
    ex = cb.MilestoneExport(tmp_path, None, 1.05, 6.0, 15000)
    mod = SimpleNamespace(student=None, last_metrics={})
    for step in range(1, 15001):                   # global_step after each training step
        ex.on_train_batch_end(SimpleNamespace(global_rank=0, global_step=step), mod, None, None, 0)
    assert seen == [("apr_2.05x", 3000), ("apr_3.05x", 6000), ("apr_4.05x", 9000), ("apr_5.05x", 12000),
                    ("apr_6.05x", 15000)]


def test_final_links_the_last_milestone_exported_after_the_same_step(tmp_path):
    """The paper recipes end where their warm-up does, so `apr_6.05x` and `final` hold the same weights: final's
    weight file is the milestone's (one copy on disk), with its own meta. After more steps, final is a new export."""
    from types import SimpleNamespace
    import cwic_exp.callbacks as cb
    mod = SimpleNamespace(student=to_cwic(tiny_model(), stripe_size=16), last_metrics={})
    ex = cb.MilestoneExport(tmp_path, None, 1.05, 2.0, 4)
    for step in range(1, 5):
        ex.on_train_batch_end(SimpleNamespace(global_rank=0, global_step=step), mod, None, None, 0)
    ms, final = tmp_path / "hf" / "apr_2.05x", tmp_path / "hf" / "final"
    ex.export_final(mod, {"apr": 2.1}, step=4)
    weights = sorted(p.name for p in ms.glob("*.safetensors"))
    assert weights and sorted(p.name for p in final.iterdir()) == sorted(p.name for p in ms.iterdir())
    assert all((final / w).samefile(ms / w) for w in weights)
    assert not (final / "config.json").samefile(ms / "config.json")        # small files copied: an edit stays put
    assert (final / "config.json").read_text() == (ms / "config.json").read_text()
    assert json.loads((final / "cwic_train_meta.json").read_text()) == {"apr": 2.1}
    assert json.loads((ms / "cwic_train_meta.json").read_text())["step"] == 4          # the milestone's meta kept
    ex.export_final(mod, {"apr": 2.2}, step=5)
    assert not any((final / w).samefile(ms / w) for w in weights)
    assert json.loads((final / "cwic_train_meta.json").read_text()) == {"apr": 2.2}


def test_milestones_export_once_on_rank_zero_and_keep_their_list_over_a_resume(monkeypatch, tmp_path):
    """Rank 1 never exports; the meta's target is the last trained step's; a resumed run does not export a
    milestone again (with later weights over the paper's checkpoint)."""
    from types import SimpleNamespace
    import cwic_exp.callbacks as cb
    seen = []
    monkeypatch.setattr(cb, "export_hf", lambda student, tok, path, meta: seen.append((path.name, meta)) or path)
    mod = SimpleNamespace(student=None, last_metrics={})
    at = lambda rank, step: SimpleNamespace(global_rank=rank, global_step=step)     # noqa: E731
    ex = cb.MilestoneExport(tmp_path, None, 1.05, 3.0, 4)        # 1.05 → 3.05 over 4 steps: 2.05 after step 2
    ex.on_train_batch_end(at(1, 2), mod, None, None, 0)
    assert seen == []
    ex.on_train_batch_end(at(0, 2), mod, None, None, 0)
    assert [(n, m["step"]) for n, m in seen] == [("apr_2.05x", 2)]
    assert seen[0][1]["apr_target"] == pytest.approx(cb.apr_target_at(1, 1.05, 3.0, 4)) == pytest.approx(1.55)
    resumed = cb.MilestoneExport(tmp_path, None, 1.05, 3.0, 4)
    resumed.load_state_dict(ex.state_dict())
    resumed.on_train_batch_end(at(0, 3), mod, None, None, 0)
    assert len(seen) == 1


def test_a_ctrl_c_on_any_rank_stops_every_rank():
    """CheckpointOnStop asks every rank (any, not all): this rank saw no Ctrl-C, another did, so all stop."""
    from types import SimpleNamespace
    from cwic_exp.callbacks import CheckpointOnStop
    other_rank_pressed = SimpleNamespace(reduce_boolean_decision=lambda mine, all=True: mine and True if all else True)
    trainer = SimpleNamespace(strategy=other_rank_pressed, should_stop=False, limit_val_batches=1.0)
    stop = CheckpointOnStop("last.ckpt")
    stop.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.should_stop and stop.interrupted == "SIGINT" and trainer.limit_val_batches == 0


def test_config_changes_compare_the_old_runs_settings_only():
    from cwic_exp.train import config_changes
    old = {"cwic": {"lambda_ap": 10.0}, "trainer": {"max_steps": 5, "micro_batch_size": 8}}
    new = {"cwic": {"lambda_ap": 10.0, "added_later": 3}, "trainer": {"max_steps": 9, "micro_batch_size": 4}}
    assert config_changes(old, new) == []                  # a longer horizon, a memory knob, a newer schema key
    assert config_changes(old, {**new, "cwic": {"lambda_ap": 1.0}}) == ["cwic.lambda_ap: 10.0 → 1.0"]


def test_atomic_checkpoint_removes_what_a_killed_write_left(tmp_path):
    from cwic_exp.callbacks import AtomicCheckpointIO
    stale = tmp_path / ".last.ckpt.tmp-99999999"      # no such process
    stale.write_bytes(b"x" * 10)
    live = tmp_path / f".last.ckpt.tmp-{os.getppid()}"  # another process's write in progress: left to it
    live.write_bytes(b"y")
    AtomicCheckpointIO().save_checkpoint({"a": 1}, tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt")["a"] == 1 and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", live.name])


def test_sigterm_saves_the_step_it_stopped_at(tmp_path, monkeypatch):
    """SIGTERM (a scheduler's preemption): Lightning raises between steps, and last.ckpt then holds that step, not
    the last periodic checkpoint."""
    import signal
    from cwic_exp import callbacks
    from cwic_exp.train import run
    orig = callbacks.ThetaClamp.on_train_batch_end

    def sigterm_at_step_2(self, trainer, *a):
        orig(self, trainer, *a)
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(callbacks.ThetaClamp, "on_train_batch_end", sigterm_at_step_2)
    with pytest.raises(SystemExit) as e:
        run(_smoke_cfg(tmp_path, 5, ["trainer.ckpt_every=100"]), tmp_path / "t")
    assert e.value.code == 143                      # not 0: a wrapper must not take the stop for a success
    assert torch.load(tmp_path / "t" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert s["interrupted"] == "SIGTERM" and s["steps"] == 2 and not s["finished"]


@pytest.mark.slow
def test_sigkill_then_rerun_resumes(tmp_path):
    import signal
    import time
    cmd = [sys.executable, "train.py", "+experiment=smoke", "run_name=kill", f"out_dir={tmp_path}",
           "trainer.max_steps=12", "trainer.ckpt_every=2", "data.seq_len=64"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ck = tmp_path / "kill" / "checkpoints" / "last.ckpt"
    t0 = time.time()
    while not ck.exists() and time.time() - t0 < 300:
        time.sleep(0.5)
    time.sleep(3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ck.exists()
    state = torch.load(ck, weights_only=False)
    done = state["global_step"]
    assert 0 < done < 12
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 12


# Tests from a mutant audit of callbacks.py (helper): the warm-up callback's own value and StatisticsMode were
# never checked (the tests called apr_target_at directly, and smoke runs validate once, at the end)

def test_the_warmup_callback_sets_the_steps_target_and_holds_it_after_the_warmup():
    from types import SimpleNamespace
    import cwic_exp.callbacks as cb
    assert cb.apr_target_at(4, 1.05, 2.0, 4) == pytest.approx(2.05)
    assert cb.apr_target_at(40, 1.05, 2.0, 4) == pytest.approx(2.05)
    w, pl = cb.AprWarmup(1.05, 3.0, 4), SimpleNamespace(apr_target=None)
    w.on_train_batch_start(SimpleNamespace(global_step=2), pl, None, 0)     # resumed at step 2, first batch
    assert pl.apr_target == pytest.approx(2.05)


def test_statistics_move_in_training_and_stand_still_in_validation():
    from types import SimpleNamespace
    import cwic_exp.callbacks as cb
    s, pl = cb.StatisticsMode(), SimpleNamespace()
    s.on_train_start(None, pl)
    assert pl.update_stats is True
    s.on_validation_start(None, pl)
    assert pl.update_stats is False
    s.on_validation_end(None, pl)
    assert pl.update_stats is True
