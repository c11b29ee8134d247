"""The LightningModule: a CWIC student distilled from its frozen dense teacher (METHOD.md §4, §6, §7).

One `training_step` is one optimizer step over `sequences_per_step` packed rows, split into
micro-batches. The AP loss is a function of the APR of the whole step, L_AP(APR(A_tot)) with
A_tot = Σ_j A_j, so its gradient is Σ_j L_AP'(A_tot)·∇A_j: with several micro-batches a no-grad
pre-pass measures A_tot first, then each micro-batch backpropagates c·A_j with c = ∂L_AP/∂A_tot
(exactly the step-level gradient, unlike per-micro-batch AP losses). With one micro-batch the
loss is formed directly.

The running statistics move once per optimizer step, from the whole step's tokens: with several
micro-batches (or data-parallel ranks) the same no-grad pre-pass pools every real token's moments
(`cwic_context(accumulate_stats=True)`), `commit_statistics` moves them once (summed over the ranks), and
the gradient passes then use them, with ε from the pooled batch's std too. A_tot is measured in that
pre-pass, before the statistics move (by 1 − β_dist of the way), and so is the head's reduction, which decides
the head's cap (METHOD.md §11) once for the step. The pre-pass computes every layer's
input with the statistics from before the step, so past the first layer the update differs slightly from
one forward over all rows (which updates layer by layer): the micro-batch size no longer changes it, the
choice between one chunk and several still does, by about 1 % of σ a step. Under data parallelism A_tot
and the token count are summed over the ranks and each rank's losses are scaled by the world size, so the
ranks' averaged gradients are those of the global batch.

Manual optimisation keeps this explicit; callbacks set the APR target, statistics mode and θ clamp.
"""
from __future__ import annotations

import math
import time

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from .accounting import ActiveStats, ap_loss, gather_active
from .data import model_inputs
from .distill import hidden_mse, kl_parts
from .modeling import CwicGatedMLP, CwicLinear, commit_statistics, cwic_context, cwic_options, iter_cwic_modules
from .modeling.layers import KINDS
from .modeling.modeling_cwic import world_size


def _sum_over_ranks(values: list[float], device) -> list[float]:
    """Σ over the data-parallel ranks of a few numbers (fp64, one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


class ValidationSums(Metric):
    """The validation's sums over real tokens: FKL, RKL, tokens, active parameters in all and per kind (q, k, …,
    head), in fp64. Each data-parallel rank validates its own rows; `compute()` sums the ranks (torchmetrics'
    sync), so every rank gets the figures of all the rows."""
    full_state_update = False

    def __init__(self):
        super().__init__()
        self._kind_state = {k: "active_" + "".join(c if c.isalnum() else "_" for c in k) for k in KINDS}
        for name in ("fkl", "rkl", "tokens", "active", *self._kind_state.values()):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.dense = None          # dense parameters a token, in all and per kind (the model's: the same on every
        self.dense_by_kind = {}    # rank)

    def update(self, fkl: Tensor, rkl: Tensor, n: Tensor, st: ActiveStats) -> None:
        self.fkl += fkl.detach().double()
        self.rkl += rkl.detach().double()
        self.tokens += n.double()
        self.active += st.active.detach().double()
        for k, v in st.by_kind.items():
            name = self._kind_state[k]
            setattr(self, name, getattr(self, name) + v.detach().double())
        self.dense, self.dense_by_kind = st.dense, st.dense_by_kind

    def compute(self) -> dict:
        n = max(float(self.tokens), 1.0)
        out = {"val/kl": 0.5 * float(self.fkl + self.rkl) / n, "val/fkl": float(self.fkl) / n,
               "val/tokens": float(self.tokens)}
        if self.dense is not None:       # None before any batch
            out["val/apr"] = self.dense * float(self.tokens) / max(float(self.active), 1e-9)
            out.update({f"val/density/{k}": float(getattr(self, self._kind_state[k])) / n / d
                        for k, d in self.dense_by_kind.items()})
        return out


def threshold_param_groups(student: nn.Module, lr: float, eta_theta: float) -> list[dict]:
    """θ (and φ) groups with LR × η_θ × √n, n = the input width of the layer the threshold gates."""
    by_n: dict[int, list] = {}
    for m in iter_cwic_modules(student):
        if isinstance(m, CwicLinear):
            by_n.setdefault(m.in_features, []).append(m.theta)
        elif isinstance(m, CwicGatedMLP):   # φ gates the FFN whose input width is hidden_size
            by_n.setdefault(m.hidden_size, []).append(m.phi)
    return [{"params": ps, "lr": lr * eta_theta * math.sqrt(n), "weight_decay": 0.0, "name": f"theta_n{n}"}
            for n, ps in sorted(by_n.items())]


class CwicDistillModule(L.LightningModule):
    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: dict):
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.cfg = cfg                     # plain dict: cwic, optim, trainer sections
        self.automatic_optimization = False
        self.strict_loading = False        # the teacher is not saved in checkpoints
        self.apr_target = float(cfg["cwic"]["apr_start"])   # set each step by AprWarmup
        self.update_stats = True           # set by StatisticsMode
        self.last_metrics: dict = {}
        self.tokens_seen = 0
        self.wall_before = 0.0             # wall seconds of the earlier starts, up to their last checkpoint
        self.wall_t0 = time.time()         # this start (train.run sets its own)
        self.val_sums = ValidationSums()

    # ------------------------------------------------------------------ plumbing
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()                # the teacher never leaves eval mode
        return self

    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("teacher.")}
        checkpoint["cwic_tokens_seen"] = self.tokens_seen
        checkpoint["cwic_wall_s"] = self.wall_s_total()

    def on_load_checkpoint(self, checkpoint):
        # strict_loading is off for the teacher's sake only: every student tensor must be there, and nothing else
        want = {k for k in self.state_dict() if not k.startswith("teacher.")}
        have = {k for k in checkpoint.get("state_dict", {}) if not k.startswith("teacher.")}
        if want != have:
            def few(keys):
                keys = sorted(keys)
                return f"{keys[:8]}{' …' if len(keys) > 8 else ''} ({len(keys)})"
            raise RuntimeError(f"checkpoint does not match the student: missing {few(want - have)}, "
                               f"unexpected {few(have - want)}")
        self.tokens_seen = int(checkpoint.get("cwic_tokens_seen", 0))
        self.wall_before = float(checkpoint.get("cwic_wall_s", 0.0))

    def wall_s_total(self) -> float:
        """Wall seconds of the whole run: this start and the earlier ones (a resumed run's own wall_s is its start's)."""
        return self.wall_before + time.time() - self.wall_t0

    def configure_optimizers(self):
        o, c = self.cfg["optim"], self.cfg["cwic"]
        thr = threshold_param_groups(self.student, o["lr"], c["eta_theta"])
        thr_ids = {id(p) for g in thr for p in g["params"]}
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad or id(p) in thr_ids:
                continue
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": o["weight_decay"], "name": "weights"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "norms_biases"}] + thr
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=o["lr"], betas=(o["beta1"], o["beta2"]))
        warm, total = max(o["warmup_steps"], 0), max(o["schedule_steps"], 1)

        def lr_lambda(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            prog = min((step - warm) / max(total - warm, 1), 1.0)
            return 0.5 * (1 + math.cos(math.pi * prog))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ forward pieces
    def _student(self, batch: dict, mask: torch.Tensor, update_stats: bool, hidden: bool = False,
                 accumulate_stats: bool = False, pooled_eps: bool = False, head_capped: bool | None = None):
        dtype = next(self.student.parameters()).dtype
        with cwic_context(self.student, token_mask=mask, update_stats=update_stats, track_ap=True,
                          accumulate_stats=accumulate_stats, pooled_eps=pooled_eps):
            out = self.student(**model_inputs(batch, dtype), output_hidden_states=hidden)
            stats = gather_active(self.student, mask, head_capped=head_capped)
        return out, stats

    @torch.no_grad()
    def _teacher(self, batch: dict, hidden: bool = False):
        dtype = next(self.teacher.parameters()).dtype
        return self.teacher(**model_inputs(batch, dtype), output_hidden_states=hidden)

    @staticmethod
    def _chunks(batch: dict, mb: int):
        n = batch["input_ids"].shape[0]
        for i in range(0, n, mb):
            yield {k: v[i:i + mb] for k, v in batch.items()}

    # ------------------------------------------------------------------ training
    def _backward(self, loss):
        if self._trainer is not None:
            self.manual_backward(loss)
        else:                              # used outside a Trainer (tests, notebooks)
            loss.backward()

    def accumulate_gradients(self, batch: dict, target: float, update_stats: bool) -> dict:
        """Forward/backward over the step's micro-batches; gradients summed in .grad. Returns parts."""
        c = self.cfg["cwic"]
        lam, mse_w = float(c["lambda_ap"]), float(c["mse_weight"])
        chunks = list(self._chunks(batch, int(self.cfg["trainer"]["micro_batch_size"])))
        n_real = int((batch["segment_ids"] > 0).sum())
        world = world_size()
        dev = batch["input_ids"].device
        n_all = n_real if world == 1 else _sum_over_ranks([n_real], dev)[0]   # the step's tokens, every rank
        split = len(chunks) > 1 or world > 1
        pooled = update_stats and split        # statistics from the whole step's batch, moved once
        coef = head_capped = None
        if split and (lam > 0 or pooled):
            # pre-pass: the step's pooled statistics, and its total active parameters (to differentiate
            # L_AP(APR(A_tot)))
            with torch.no_grad():
                tot = None
                for ch in chunks:
                    _, st = self._student(ch, ch["segment_ids"] > 0, update_stats=False, accumulate_stats=pooled)
                    tot = st if tot is None else tot + st
            if pooled:
                commit_statistics(self.student)
            if lam > 0:
                head = float(tot.by_kind.get("head", 0.0))
                active, tokens = float(tot.active), float(tot.tokens)
                if world > 1:
                    active, tokens, head = _sum_over_ranks([active, tokens, head], dev)
                a_tot = torch.tensor(active, dtype=torch.float32, requires_grad=True)
                l_ap = ap_loss(tot.dense * tokens / a_tot, target)
                (coef,) = torch.autograd.grad(l_ap, a_tot)
                # the head's cap decided once for the step, as one forward over all its rows would
                cap = cwic_options(self.student).head_max_reduction
                if cap is not None and "head" in tot.dense_by_kind:
                    head_capped = tot.dense_by_kind["head"] * tokens / max(head, 1e-9) > cap
        fkl_sum = rkl_sum = mse_sum = 0.0
        step_stats: ActiveStats | None = None
        for ch in chunks:
            mask = ch["segment_ids"] > 0
            t_out = self._teacher(ch, hidden=mse_w > 0)
            s_out, st = self._student(ch, mask, update_stats=update_stats and not pooled, hidden=mse_w > 0,
                                      pooled_eps=pooled, head_capped=head_capped)
            fkl, rkl, _ = kl_parts(s_out.logits, t_out.logits, mask)
            # × world: data parallelism averages the ranks' gradients, and the objective is the global sum
            loss = 0.5 * (fkl + rkl) * world / n_all
            if mse_w > 0:
                mse = hidden_mse(s_out.hidden_states[-1], t_out.hidden_states[-1], mask)
                loss = loss + mse_w * mse * world / n_all
                mse_sum += float(mse.detach())
            if lam > 0:
                if coef is None:       # one micro-batch, one process: the step's APR is this one's
                    loss = loss + lam * ap_loss(st.apr, target)
                else:
                    loss = loss + lam * world * coef.to(st.active.device) * st.active
            self._backward(loss)
            fkl_sum += float(fkl.detach())
            rkl_sum += float(rkl.detach())
            st = st.detach()
            step_stats = st if step_stats is None else step_stats + st
        return {"fkl": fkl_sum, "rkl": rkl_sum, "mse": mse_sum, "n_real": n_real, "n_all": int(n_all),
                "stats": step_stats}

    def training_step(self, batch, batch_idx):
        t0 = time.perf_counter()
        opt = self.optimizers()
        sched = self.lr_schedulers()
        target = self.apr_target
        opt.zero_grad(set_to_none=True)
        parts = self.accumulate_gradients(batch, target, self.update_stats)
        clip = self.cfg["optim"].get("grad_clip")
        if clip:
            self.clip_gradients(opt, gradient_clip_val=float(clip), gradient_clip_algorithm="norm")
        opt.step()
        lr = sched.get_last_lr()[0]            # the rate this step used (after sched.step() it is the next one's)
        sched.step()
        n_real = max(parts["n_real"], 1)       # this rank's tokens (its KL sums are over them)
        self.tokens_seen += parts["n_all"]     # every rank's
        # ----------------------------------------------------------------- logging
        dt = time.perf_counter() - t0
        step_stats = parts["stats"]
        apr = float(step_stats.apr)
        kl = 0.5 * (parts["fkl"] + parts["rkl"]) / n_real
        summ = step_stats.summary()
        m = {"train/kl": kl, "train/fkl": parts["fkl"] / n_real, "train/rkl": parts["rkl"] / n_real,
             "train/apr": apr, "train/apr_target": target,
             "train/ap_loss": float(ap_loss(torch.tensor(apr), target)),
             "train/tokens_per_s": parts["n_all"] / dt, "train/tokens": float(self.tokens_seen),
             "train/lr": lr}
        if self.cfg["cwic"]["mse_weight"] > 0:
            m["train/mse"] = parts["mse"] / n_real
        m.update({f"density/{k}": v for k, v in summ["density"].items()})
        self.log_dict(m, on_step=True, prog_bar=False)
        self.log_dict({"apr": apr, "target": target, "kl": kl}, prog_bar=True, on_step=True, logger=False)
        self.last_metrics = m
        return None

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch, batch_idx):
        mask = batch["segment_ids"] > 0
        t_out = self._teacher(batch)
        s_out, st = self._student(batch, mask, update_stats=False)
        fkl, rkl, n = kl_parts(s_out.logits, t_out.logits, mask)
        self.val_sums.update(fkl, rkl, n, st)

    def on_validation_epoch_start(self):
        self.val_sums.reset()

    def on_validation_epoch_end(self):
        m = self.val_sums.compute()          # every rank's rows (a collective: every rank gets here)
        if not m["val/tokens"]:
            return
        self.val_metrics = m
        self.val_metrics_step = self.trainer.global_step   # run() skips its final validation when it is this step
        if self.trainer.state.fn == "validate":
            # the final validation after training: logged at the step of the last training row, as a validation
            # inside the fit is (Lightning's own step is one further, where a resume would take it for a later
            # step's row and drop it)
            for lg in self.trainer.loggers:
                lg.log_metrics(self.val_metrics, step=max(self.trainer.global_step - 1, 0))
                lg.save()
        else:
            self.log_dict(self.val_metrics, prog_bar=False)
