"""Tests from a mutant audit of the model core and its Hugging Face integration (modeling_cwic.py, layers.py, lit.py):
each pins a property that a plausible one-line bug broke without any other test failing."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch

import cwic_exp
from cwic_exp import CwicLinear, cwic_context, cwic_options, to_cwic
from cwic_exp.data import model_inputs
from conftest import rand_batch, tiny_model


def _stats_step(model, ids, mask, n=1):
    with torch.no_grad():
        for _ in range(n):
            with cwic_context(model, token_mask=mask, update_stats=True):
                model(input_ids=ids, attention_mask=mask)


def _with_thresholds(model, ids, mask, scale=0.8, seed=5):
    _stats_step(model, ids, mask)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in cwic_exp.iter_cwic_modules(model):
            p = m.theta if isinstance(m, CwicLinear) else m.phi
            p.copy_(torch.rand(p.shape, generator=g) * scale)
    return model


def _load(path, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, **kw)


# ----------------------------------------------------------------------------- save / load

def test_every_cwic_option_survives_save_and_load(tmp_path):
    """All of the checkpoint's CWIC options come back, not only the stripe sizes that shape its tensors: β_dist, α_ε,
    the STE switch and the head's cap change training and the statistics but not the logits, so a checkpoint that
    lost them (or a loader that converted with defaults) passed the round-trip test and resumed with other settings."""
    ids, mask = rand_batch()
    opts = dict(stripe_size=16, head_stripe_size=32, alpha_eps=0.2, beta_dist=0.9, ste=False, head_max_reduction=7.0)
    model = _with_thresholds(to_cwic(tiny_model(), **opts), ids, mask)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["cwic"]
    assert {k: saved[k] for k in opts} == opts
    loaded = _load(tmp_path)
    assert cwic_options(loaded) == cwic_options(model)
    mods = list(cwic_exp.iter_cwic_modules(loaded))
    assert len(mods) == len(list(cwic_exp.iter_cwic_modules(model)))
    assert all(m.beta_dist == 0.9 and m.alpha_eps == 0.2 and not m.ste for m in mods)


def test_a_checkpoint_loads_in_its_own_dtype_or_the_one_asked_for_with_exact_statistics(tmp_path):
    """A bf16 checkpoint loads in bf16 by default (as a Hugging Face model does), an fp32 one in the dtype asked for
    (`dtype=`, and the older `torch_dtype=`); either way the running statistics come back fp32 and bitwise equal (a
    loader that cast the whole state dict to the model's dtype rounded x̄ and σ to bf16 with no other test noticing)."""
    ids, mask = rand_batch()
    model = _with_thresholds(to_cwic(tiny_model(), stripe_size=16), ids, mask)
    stats = {n: b.clone() for n, b in model.named_buffers() if "ema_" in n or "stat_steps" in n}
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.float().save_pretrained(tmp_path / "fp32")
    a = _load(tmp_path / "bf16")
    b = _load(tmp_path / "fp32", dtype=torch.bfloat16)
    c = _load(tmp_path / "fp32", torch_dtype=torch.bfloat16)
    for m in (a, b, c):
        assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        bufs = dict(m.named_buffers())
        for n, s in stats.items():
            assert bufs[n].dtype == torch.float32 and torch.equal(bufs[n], s), n
    assert _load(tmp_path / "fp32").model.embed_tokens.weight.dtype == torch.float32


def test_a_loaded_checkpoint_is_in_eval_mode_and_keeps_its_generation_config(tmp_path):
    """from_pretrained returns the model in eval mode (dropout off, as Hugging Face's own loader does) with the saved
    generation_config.json, and generate() on it, which runs the CWIC forward with no cwic_context and a KV cache,
    gives the saved model's tokens; at θ = 0 the dense model's too."""
    ids, mask = rand_batch()
    dense = tiny_model()
    model = to_cwic(tiny_model(), stripe_size=16)
    _stats_step(model, ids, mask)
    g0 = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(g0, dense.generate(ids[:1], max_new_tokens=6, do_sample=False))
    _with_thresholds(model, ids, mask, scale=0.6)
    model.generation_config.max_new_tokens = 6
    model.generation_config.do_sample = False
    model.train()
    model.save_pretrained(tmp_path)
    model.eval()
    loaded = _load(tmp_path)
    assert not any(m.training for m in loaded.modules())
    assert loaded.generation_config.max_new_tokens == 6
    want = model.generate(ids[:1])
    assert want.shape[1] == ids.shape[1] + 6
    assert torch.equal(loaded.generate(ids[:1]), want)


def test_a_checkpoint_that_lacks_or_adds_a_tensor_is_refused(tmp_path):
    """A checkpoint missing one θ (it would stay 0: dense there, silently) or holding a tensor the config does not
    explain is refused with the names, not loaded half-way."""
    from safetensors.torch import load_file, save_file
    ids, mask = rand_batch()
    model = _with_thresholds(to_cwic(tiny_model(), stripe_size=16), ids, mask)
    model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    full = load_file(f)
    _load(tmp_path)                                            # whole: loads
    save_file({k: v for k, v in full.items() if k != "model.layers.1.self_attn.v_proj.theta"}, f,
              metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="v_proj.theta"):
        _load(tmp_path)
    save_file(dict(full, **{"model.layers.0.extra": torch.zeros(3)}), f, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="model.layers.0.extra"):
        _load(tmp_path)


# ----------------------------------------------------------------------------- conversion

def test_the_head_takes_the_layers_stripe_size_unless_told_otherwise():
    """head_stripe_size None means the head uses stripe_size (METHOD.md §1: one s), not whole columns; a vocabulary of
    96 at stripe 7 gives 14 stripes, the last partial (5 rows), in θ's shape and in the rows the head counts."""
    m = to_cwic(tiny_model(), stripe_size=7)
    h = m.lm_head
    assert isinstance(h, CwicLinear) and h.stripe_size == 7 and h.num_stripes == 14
    assert tuple(h.theta.shape) == (14, 48) and h._rows.tolist() == [7.0] * 13 + [5.0]
    assert to_cwic(tiny_model(), stripe_size=16).lm_head.num_stripes == 6


def test_every_module_the_head_included_gets_the_statistics_and_bandwidth_options():
    """β_dist and α_ε reach every CWIC module, the LM head too (the head's statistics moved at the default β)."""
    m = to_cwic(tiny_model(), stripe_size=16, beta_dist=0.9, alpha_eps=0.25)
    mods = list(cwic_exp.iter_cwic_modules(m))
    assert m.lm_head in mods
    assert all(x.beta_dist == 0.9 and x.alpha_eps == 0.25 for x in mods)


def test_per_layer_figures_hold_the_decoder_layers_only():
    """The head is counted in the model's totals but in no decoder layer's figures: the dense parameters of the layers
    plus the head's are the model's (the head given the last layer's index inflated that layer's density figures)."""
    ids, mask = rand_batch()
    m = to_cwic(tiny_model(), stripe_size=16)
    _stats_step(m, ids, mask)
    with torch.no_grad(), cwic_context(m, token_mask=mask, track_ap=True):
        m(input_ids=ids, attention_mask=mask)
    st = cwic_exp.gather_active(m, mask)
    per_layer = sum(x.dense_params for x in cwic_exp.iter_cwic_modules(m) if x.layer_idx == 0)
    assert set(st.dense_by_layer) == {0, 1}
    assert st.dense_by_layer[0] == st.dense_by_layer[1] == per_layer
    assert sum(st.dense_by_layer.values()) + m.lm_head.dense_params == st.dense


def test_sparsify_head_false_keeps_a_plain_dense_head_through_save_and_load(tmp_path):
    """sparsify_head=False (an ablation): the head stays an nn.Linear (no θ, counted dense), also after a round trip."""
    ids, mask = rand_batch()
    m = to_cwic(tiny_model(), stripe_size=16, sparsify_head=False)
    assert type(m.lm_head) is torch.nn.Linear and m.lm_head.weight is m.model.embed_tokens.weight
    assert all(x.kind != "head" for x in cwic_exp.iter_cwic_modules(m))
    _stats_step(m, ids, mask)
    m.save_pretrained(tmp_path)
    loaded = _load(tmp_path)
    assert type(loaded.lm_head) is torch.nn.Linear and not cwic_options(loaded).sparsify_head


def test_a_context_leaves_no_token_mask_behind():
    """cwic_context restores the runtime on exit: a later forward of another shape (generation, another batch) runs
    and moves nothing."""
    ids, mask = rand_batch()
    m = to_cwic(tiny_model(), stripe_size=16)
    _stats_step(m, ids, mask)
    rt = m._cwic_runtime
    assert rt.token_mask is None and not rt.update_stats and not rt.track_ap and not rt.accumulate_stats
    with torch.no_grad():
        m(input_ids=ids[:1, :5])


def test_clamp_thresholds_clamps_theta_and_phi():
    """θ ← max(0, θ) and φ ← max(0, φ) (METHOD.md §2): both, in every module."""
    m = to_cwic(tiny_model(), stripe_size=16)
    with torch.no_grad():
        for x in cwic_exp.iter_cwic_modules(m):
            (x.theta if isinstance(x, CwicLinear) else x.phi).uniform_(-1, 1)
    cwic_exp.clamp_thresholds(m)
    for x in cwic_exp.iter_cwic_modules(m):
        p = x.theta if isinstance(x, CwicLinear) else x.phi
        assert float(p.detach().min()) == 0.0 and float(p.detach().max()) > 0


# ----------------------------------------------------------------------------- statistics and the folded bias

def test_folded_bias_is_w_times_the_running_mean_plus_b_and_follows_the_statistics():
    """folded_bias() (the W x̄ + b that the kernels add) uses the bias-corrected running mean and the layer's own
    bias (Qwen2's q/k/v have one), equals the layer's output when every input is off, and is recomputed when the
    statistics move (it is cached)."""
    ids, mask = rand_batch()
    m = to_cwic(tiny_model("qwen2"), stripe_size=16, beta_dist=0.9)
    _stats_step(m, ids, mask, 2)
    q = m.model.layers[0].self_attn.q_proj
    assert q.bias is not None and float(q.bias.detach().abs().sum()) > 0

    def want():
        mean = q.running_stats()[0]
        return mean @ q.weight.float().t() + q.bias.float()
    torch.testing.assert_close(q.folded_bias(), want(), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        q.theta.fill_(1e6)
        x = torch.randn(3, q.in_features)
        torch.testing.assert_close(q(x), want().expand(3, -1), atol=1e-5, rtol=1e-5)
    old = q.folded_bias().clone()
    _stats_step(m, *rand_batch(seed=9, pad_last=0))
    assert not torch.allclose(old, want())
    torch.testing.assert_close(q.folded_bias(), want(), atol=1e-6, rtol=1e-5)


def test_statistics_move_once_per_context_even_when_the_forward_runs_twice():
    """In statistics mode the running values move once per cwic_context block (gradient checkpointing recomputes
    the forward inside the same block): two forwards give the statistics of one."""
    ids, mask = rand_batch()
    a, b = to_cwic(tiny_model(), stripe_size=16), to_cwic(tiny_model(), stripe_size=16)
    with torch.no_grad():
        with cwic_context(a, token_mask=mask, update_stats=True):
            a(input_ids=ids, attention_mask=mask)
        with cwic_context(b, token_mask=mask, update_stats=True):
            b(input_ids=ids, attention_mask=mask)
            b(input_ids=ids, attention_mask=mask)
    for x, y in zip(cwic_exp.iter_cwic_modules(a), cwic_exp.iter_cwic_modules(b)):
        assert float(y._ema("stat_steps")) == 1
        for n, buf in x.named_buffers():
            torch.testing.assert_close(dict(y.named_buffers())[n], buf, msg=n)


def test_inference_never_moves_the_statistics():
    """Without statistics mode nothing moves, in eval mode as in train mode, with or without grad."""
    ids, mask = rand_batch()
    m = to_cwic(tiny_model(), stripe_size=16)
    _stats_step(m, ids, mask)
    before = {n: b.clone() for n, b in m.named_buffers()}
    for train in (False, True):
        m.train(train)
        with torch.no_grad():
            m(input_ids=ids, attention_mask=mask)
        with cwic_context(m, token_mask=mask, track_ap=True):
            m(input_ids=ids, attention_mask=mask).logits.sum().backward()
    for n, b in m.named_buffers():
        assert torch.equal(b, before[n]), n


# ----------------------------------------------------------------------------- the LightningModule

def _module(micro=2, lam=10.0):
    from cwic_exp.lit import CwicDistillModule
    teacher = tiny_model(attention_dropout=0.5)          # dropout: eval mode is visible in its outputs
    student = to_cwic(copy.deepcopy(teacher), stripe_size=16)
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "segment_ids": torch.ones(4, 24, dtype=torch.int16),
             "position_ids": torch.arange(24).repeat(4, 1)}
    batch["segment_ids"][3, 14:] = 0
    with torch.no_grad():
        with cwic_context(student, token_mask=batch["segment_ids"] > 0, update_stats=True):
            student(**model_inputs(batch))
        g = torch.Generator().manual_seed(3)
        for m in cwic_exp.iter_cwic_modules(student):
            p = m.theta if hasattr(m, "theta") else m.phi
            p.copy_(torch.rand(p.shape, generator=g) * 0.6)
        for p in student.model.layers[0].mlp.up_proj.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cfg = {"cwic": {"apr_start": 1.05, "lambda_ap": lam, "mse_weight": 0.0, "eta_theta": 1.0},
           "optim": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.0, "warmup_steps": 0,
                     "schedule_steps": 10, "grad_clip": None},
           "trainer": {"micro_batch_size": micro}}
    return CwicDistillModule(student, teacher, cfg), batch


def test_the_teacher_is_frozen_and_stays_in_eval_mode():
    """The teacher is frozen (no parameter requires grad: under DDP a trainable, unused teacher fails the reduction)
    and stays in eval mode when Lightning puts the module in train mode: its outputs are deterministic (its dropout
    is off) while the student trains."""
    mod, batch = _module()
    assert not any(p.requires_grad for p in mod.teacher.parameters())
    mod.train()
    assert mod.student.training and not any(m.training for m in mod.teacher.modules())
    torch.manual_seed(0)
    a = mod._teacher(batch).logits
    torch.manual_seed(1)
    assert torch.equal(a, mod._teacher(batch).logits)


def test_a_lightning_checkpoint_holds_the_whole_student_and_no_teacher():
    """on_save_checkpoint drops the teacher (reloaded from its source) and keeps every student tensor: weights, θ, φ
    and the running statistics a resume needs."""
    mod, _ = _module()
    ckpt = {"state_dict": mod.state_dict()}
    mod.tokens_seen = 123
    mod.on_save_checkpoint(ckpt)
    want = {"student." + k for k in mod.student.state_dict()}
    assert set(ckpt["state_dict"]) == want and ckpt["cwic_tokens_seen"] == 123
    assert any(k.endswith("ema_std") for k in want) and any(k.endswith(".phi") for k in want)


def test_a_lightning_checkpoint_without_a_student_tensor_is_refused():
    """strict_loading is off so that the teacher can stay out of checkpoints; a resume from a checkpoint missing a
    student tensor (θ here) or holding a stray one must still be refused by name, not load half a student."""
    mod, _ = _module()
    ckpt = {"state_dict": mod.state_dict()}
    mod.on_save_checkpoint(ckpt)
    mod.on_load_checkpoint(ckpt)                                  # whole: accepted
    theta = next(k for k in ckpt["state_dict"] if k.endswith(".theta"))
    short = {"state_dict": {k: v for k, v in ckpt["state_dict"].items() if k != theta}}
    with pytest.raises(RuntimeError, match="missing " + re.escape(repr([theta]))):
        mod.on_load_checkpoint(short)
    extra = {"state_dict": {**ckpt["state_dict"], "student.stray": torch.zeros(1)}}
    with pytest.raises(RuntimeError, match="unexpected.*student.stray"):
        mod.on_load_checkpoint(extra)


def test_the_students_active_parameters_are_counted_on_real_tokens_only():
    """The APR the AP loss and the logs use counts the real tokens only: padding positions (here 10 of 96) neither
    count as tokens nor add active parameters."""
    mod, batch = _module()
    real = batch["segment_ids"] > 0
    with torch.no_grad():
        _, st = mod._student(batch, real, update_stats=False)
    n = int(real.sum())
    assert st.tokens == n == 86
    counts = sum(m.ap_tokens.reshape(real.shape)[real].sum() for m in cwic_exp.iter_cwic_modules(mod.student))
    torch.testing.assert_close(st.active, counts)


def _run_training_step(mod, batch):
    opt_cfg = mod.configure_optimizers()
    logged = {}
    mod.optimizers = lambda: opt_cfg["optimizer"]
    mod.lr_schedulers = lambda: opt_cfg["lr_scheduler"]["scheduler"]
    mod.log_dict = lambda d, **kw: logged.update(d)
    mod.training_step(batch, 0)
    return mod.last_metrics


def test_a_steps_logged_kl_and_apr_are_those_of_the_whole_batch_per_real_token():
    """train/kl is ½(FKL + RKL) per real token and train/apr the APR of all the step's micro-batches together, both of
    the parameters the step started from (statistics frozen here so the reference is exact)."""
    from cwic_exp.distill import symmetric_kl
    mod, batch = _module(micro=2)
    mod.update_stats = False
    real = batch["segment_ids"] > 0
    with torch.no_grad():
        s_out, st = mod._student(batch, real, update_stats=False)
        kl = float(symmetric_kl(s_out.logits, mod._teacher(batch).logits, real))
        chunk = mod._student({k: v[2:] for k, v in batch.items()}, real[2:], update_stats=False)[1]
    assert abs(float(chunk.apr) - float(st.apr)) > 1e-3 * float(st.apr)      # the last micro-batch alone differs
    m = _run_training_step(mod, batch)
    assert m["train/kl"] == pytest.approx(kl, rel=1e-5)
    assert m["train/apr"] == pytest.approx(float(st.apr), rel=1e-5)


def test_validation_counts_real_tokens_and_moves_no_statistics():
    """A validation step measures KL and APR on the real tokens and leaves the running statistics where they are."""
    from cwic_exp.distill import kl_parts
    mod, batch = _module()
    real = batch["segment_ids"] > 0
    before = {n: b.clone() for n, b in mod.student.named_buffers()}
    with torch.no_grad():
        fkl, rkl, n = kl_parts(mod._student(batch, real, update_stats=False)[0].logits, mod._teacher(batch).logits,
                               real)
    mod.on_validation_epoch_start()
    with torch.no_grad():
        mod.validation_step(batch, 0)
    v = mod.val_sums
    assert float(v.tokens) == int(n) == 86
    assert float(v.fkl) == pytest.approx(float(fkl), rel=1e-5) and float(v.rkl) == pytest.approx(float(rkl), rel=1e-5)
    for k, b in mod.student.named_buffers():
        assert torch.equal(b, before[k]), k


def test_from_pretrained_honours_or_names_its_keywords(tmp_path):
    """from_pretrained passes attn_implementation= to the architecture it rebuilds and reads a subfolder=; a keyword
    it cannot honour is named in a warning instead of being dropped silently (it dropped all of them). Loading through
    the Auto class, with or without trust_remote_code, warns about nothing."""
    import warnings

    from transformers import AutoModelForCausalLM

    from conftest import tiny_cwic_checkpoint
    (tmp_path / "sub").mkdir()
    path = tiny_cwic_checkpoint(tmp_path / "sub" / "ckpt")
    import transformers
    # transformers 4.x (checked 4.56.2) does not look for a subfolder's remote code (its own limitation): there the
    # subfolder is read without it
    sub = {"subfolder": "ckpt", "trust_remote_code": int(transformers.__version__.split(".")[0]) >= 5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
        sdpa = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sub"), attn_implementation="sdpa", **sub)
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids=ids).logits, sdpa(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="ignores device_mesh"):
        AutoModelForCausalLM.from_pretrained(path, device_mesh="nonsense")
