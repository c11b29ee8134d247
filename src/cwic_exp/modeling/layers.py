"""CWIC layers: the granular sparse linear layer and the gated FFN (METHOD.md §1-§5).

State lives in standard places so checkpoints stay readable: `weight`/`bias` keep their Hugging Face
names; θ is `theta` (k, n); the running statistics are buffers `ema_mean`, `ema_std`, `stat_steps`.

Statistics move only in statistics mode (`CwicRuntime.update_stats`, set by
`cwic_exp.cwic_context(model, update_stats=True)`), never as a side effect of grad mode,
`model.train()` or checkpointing (METHOD.md §11).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import GranularMatmul, UnitMask, active_count, granular_forward, stripe_mask, stripe_rows

KINDS = ("q", "k", "v", "o", "gate", "up+down", "head")


class CwicRuntime:
    """Per-model switches shared by every CWIC module of that model (not saved)."""

    def __init__(self):
        self.update_stats = False   # statistics mode: update the running mean/std from this batch
        self.track_ap = False       # record per-token active-parameter counts in `module.ap_tokens`
        self.token_mask: Tensor | None = None   # (N,) bool over flattened tokens: real (not padding)
        self.batch_id = 0           # bumped per context entry: statistics update at most once per batch
        self.accumulate_stats = False   # pool the real tokens' moments for one update per optimizer step
        self.pooled_eps = False     # ε from the std of the batch pooled at the last commit, not this forward's

    def real_tokens(self, x2: Tensor) -> Tensor:
        if self.token_mask is None:
            return x2
        if self.token_mask.numel() != x2.shape[0]:
            raise ValueError(f"CWIC token mask covers {self.token_mask.numel()} tokens but the layer "
                             f"sees {x2.shape[0]}: pass the attention mask of this very batch")
        return x2[self.token_mask.to(x2.device)]


class _RunningStats(nn.Module):
    """Bias-corrected exponential moving average of a feature's mean and standard deviation."""

    def _init_stats(self, n: int, beta: float, device, prefix: str = ""):
        self.beta_dist = float(beta)
        self._prefix = prefix
        self.register_buffer(prefix + "ema_mean", torch.zeros(n, device=device))
        self.register_buffer(prefix + "ema_std", torch.zeros(n, device=device))
        self.register_buffer(prefix + "stat_steps", torch.zeros((), device=device))
        self._stats_batch = -1
        self._stats_acc: Tensor | None = None   # (1 + 2n,) fp64: token count, Σx, Σx² (accumulate mode)
        self._pooled_std: Tensor | None = None  # the pooled batch's std at the last commit (ε under pooled_eps)

    def _ema(self, name: str) -> Tensor:
        return getattr(self, self._prefix + name)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.half()`, ... leave the running statistics in fp32 (a bf16 step counter would stop
        counting at 256 and a bf16 mean loses the low bits the thresholds are measured from): they follow the
        module's device only."""
        names = [self._prefix + n for n in ("ema_mean", "ema_std", "stat_steps")] + ["_rows"]   # counts: 257 ≠ 256
        keep = {n: self._buffers[n] for n in names if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if new is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(device=new.device)
        return out

    def running_stats(self) -> tuple[Tensor, Tensor]:
        """(mean, std), fp32, bias-corrected; (0, 1) before any statistics were gathered."""
        # torch.where, not `if steps == 0`: no host synchronisation inside the forward
        steps = self._ema("stat_steps")
        started = steps > 0
        corr = (1.0 - self.beta_dist ** steps).clamp_min(1e-12)
        mean = torch.where(started, self._ema("ema_mean") / corr, 0.0)
        std = torch.where(started, self._ema("ema_std") / corr, 1.0)
        return mean, std

    @torch.no_grad()
    def _accumulate_stats(self, real: Tensor) -> None:
        """Accumulate mode: add this forward's real tokens to the step's pooled moments (nothing moves yet)."""
        x = real.detach().float()        # sums in fp64 without an fp64 copy of the tokens
        acc = torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device),
                         x.sum(0, dtype=torch.float64), x.square().sum(0, dtype=torch.float64)])
        self._stats_acc = acc if self._stats_acc is None else self._stats_acc + acc

    def _take_moments(self) -> Tensor:
        """The pooled moments gathered since the last commit (zeros if none), and a fresh start."""
        acc, self._stats_acc = self._stats_acc, None
        if acc is None:
            acc = torch.zeros(1 + 2 * self._ema("ema_mean").numel(), dtype=torch.float64,
                              device=self._ema("ema_mean").device)
        return acc

    @torch.no_grad()
    def _commit_moments(self, acc: Tensor) -> None:
        """One moving-average step from pooled moments (count, Σx, Σx²), as `_update_stats` takes from a batch."""
        n = int(self._ema("ema_mean").numel())
        cnt = acc[0]
        self._pooled_std = None
        if float(cnt) <= 0:
            return
        mean = acc[1:1 + n] / cnt
        std = (acc[1 + n:] / cnt - mean * mean).clamp_min(0).sqrt()
        self._pooled_std = std.float()
        self._ema_step(mean.float(), self._pooled_std)

    @torch.no_grad()
    def _update_stats(self, real: Tensor, batch_id: int) -> tuple[Tensor, Tensor]:
        mean, std = real.float().mean(0), real.float().std(0, unbiased=False)
        if self._stats_batch != batch_id:  # once per batch, even if a forward is recomputed
            self._stats_batch = batch_id
            self._ema_step(mean, std)
        return mean, std

    def _ema_step(self, mean: Tensor, std: Tensor) -> None:
        b = self.beta_dist
        self._ema("ema_mean").mul_(b).add_(mean, alpha=1 - b)
        self._ema("ema_std").mul_(b).add_(std, alpha=1 - b)
        self._ema("stat_steps").add_(1)

    def _observe(self, x2: Tensor, rt: "CwicRuntime", grad: bool) -> Tensor | None:
        """This forward's part in the statistics (pooled under `accumulate_stats`, moved once per batch under
        `update_stats`) and, under grad, the batch std that sets ε: this forward's real tokens', the one moved with,
        or the pooled step's (`pooled_eps`). None without a real token, or when nothing needs the batch."""
        if not (grad or rt.update_stats or rt.accumulate_stats):
            return None
        real = rt.real_tokens(x2)
        if real.shape[0] == 0:
            return None
        if rt.accumulate_stats:
            self._accumulate_stats(real)
        if rt.update_stats:
            return self._update_stats(real, rt.batch_id)[1]
        if not grad:
            return None
        if rt.pooled_eps and self._pooled_std is not None:
            return self._pooled_std
        return real.detach().float().std(0, unbiased=False)


def _compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class CwicLinear(_RunningStats):
    """y = GMM(x - x̄, W; θ⊙σ) + W x̄ + b, with output stripes of `stripe_size` rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 stripe_size: int | None = None, alpha_eps: float = 0.1, beta_dist: float = 0.99,
                 ste: bool = True, kind: str = "", layer_idx: int = -1, device=None, dtype=None):
        super().__init__()
        stripe = out_features if stripe_size is None else int(stripe_size)
        if stripe <= 0:
            raise ValueError(f"stripe_size must be positive (or None for whole columns), got {stripe}")
        self.in_features, self.out_features = in_features, out_features
        self.stripe_size = min(stripe, out_features)
        self.num_stripes = -(-out_features // self.stripe_size)
        self.alpha_eps, self.ste, self.kind, self.layer_idx = float(alpha_eps), bool(ste), kind, layer_idx
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.theta = nn.Parameter(torch.zeros(self.num_stripes, in_features, device=device))
        self._init_stats(in_features, beta_dist, device)
        self.register_buffer("_rows", stripe_rows(out_features, self.stripe_size, device), persistent=False)
        self.runtime = CwicRuntime()
        self.ap_tokens: Tensor | None = None
        self._bias_cache: tuple | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, **kw) -> "CwicLinear":
        """Wrap an existing nn.Linear, sharing its parameters (so tied weights stay tied)."""
        new = cls(lin.in_features, lin.out_features, bias=False, device=lin.weight.device, **kw)
        new.weight = lin.weight
        new.bias = lin.bias
        return new

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features

    def thresholds(self) -> Tensor:
        """θ·σ: the thresholds in the units of x - x̄, (k, n) fp32."""
        return self.theta * self.running_stats()[1]

    def folded_bias(self) -> Tensor:
        """W x̄ + b in fp32; cached while weights and statistics do not change (inference)."""
        key = (self.weight._version, self.weight.data_ptr(), self.ema_mean._version,
               self.stat_steps._version, None if self.bias is None else self.bias._version)
        if self._bias_cache is None or self._bias_cache[0] != key:
            with torch.no_grad():
                mean = self.running_stats()[0]
                b = F.linear(mean, self.weight.float(), None if self.bias is None else self.bias.float())
            self._bias_cache = (key, b)
        return self._bias_cache[1]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        rt = self.runtime
        grad = torch.is_grad_enabled() and (x.requires_grad or self.theta.requires_grad
                                            or self.weight.requires_grad)
        batch_std = self._observe(x2, rt, grad)
        mean, std = self.running_stats()
        thr = self.theta * std                                        # (k, n), grad to θ
        cdt = _compute_dtype(x2)
        xin, mc = x2.to(cdt), mean.to(cdt)
        xc = xin - mc
        # the mask is decided in fp32 from x and x̄ whatever the compute dtype (as the kernels do)
        xm = None if xc.dtype in (torch.float32, torch.float64) else (x2.float() - mean)
        if grad:
            eps = (self.alpha_eps * batch_std.clamp_min(1e-6)) if batch_std is not None else std * self.alpha_eps
            with torch.autocast(x.device.type, enabled=False):
                # W (x̄ + G ⊙ xc) in one product per stripe (the W x̄ term inside, differentiable in W)
                y, counts = GranularMatmul.apply(xc, self.weight.to(cdt), thr, eps, self._rows,
                                                 self.stripe_size, self.ste, xm, xin.detach(), mc)
        else:
            with torch.no_grad():
                y, counts, _ = granular_forward(xc, self.weight.to(cdt), thr, self.stripe_size,
                                                self._rows if rt.track_ap else None,
                                                None if xm is None else stripe_mask(xm, thr), xin, mc)
        if self.bias is not None:
            y = y + self.bias.to(cdt)
        self.ap_tokens = counts if rt.track_ap else None
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, stripe={self.stripe_size} "
                f"(k={self.num_stripes}), kind={self.kind!r}, ste={self.ste}, bias={self.bias is not None}")


class CwicGatedMLP(_RunningStats):
    """Gated FFN (SwiGLU and kin): g = GMM(x, W_gate), a = M ⊙ act(g), y = W_down(W_up x ⊙ a).

    M_j = H(|act(g_j)| - φ_j·scale_j), scale_j the running std of act(g_j) (statistics mode).
    Only the active units' rows of W_up and columns of W_down are needed: APs = gate + 2·d·‖M‖₁.
    """

    kind = "up+down"

    def __init__(self, gate_proj: CwicLinear, up_proj: nn.Linear, down_proj: nn.Linear,
                 act_fn: nn.Module, act_name: str, alpha_eps: float = 0.1, beta_dist: float = 0.99,
                 ste: bool = True, layer_idx: int = -1):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn
        self.act_name = act_name
        self.hidden_size, self.intermediate_size = up_proj.in_features, up_proj.out_features
        self.alpha_eps, self.ste, self.layer_idx = float(alpha_eps), bool(ste), layer_idx
        dev = up_proj.weight.device
        self.phi = nn.Parameter(torch.zeros(self.intermediate_size, device=dev))
        self._init_stats(self.intermediate_size, beta_dist, dev, prefix="act_")
        self.register_buffer("_rows", torch.tensor([2.0 * self.hidden_size], device=dev), persistent=False)
        self.runtime = gate_proj.runtime
        self.ap_tokens: Tensor | None = None

    @property
    def dense_params(self) -> int:
        return 2 * self.hidden_size * self.intermediate_size

    def unit_thresholds(self) -> Tensor:
        """φ·scale, (d_ff,) fp32."""
        return self.phi * self.running_stats()[1]

    def forward(self, x: Tensor) -> Tensor:
        g = self.gate_proj(x)
        a = self.act_fn(g)
        a2 = a.reshape(-1, self.intermediate_size)
        rt = self.runtime
        grad = torch.is_grad_enabled() and (a.requires_grad or self.phi.requires_grad)
        # std of act(g) around zero mean would also do; the std is what scales the threshold
        batch_std = self._observe(a2, rt, grad)
        thr = self.unit_thresholds()
        if grad:
            scale = self.running_stats()[1]
            eps = (self.alpha_eps * batch_std.clamp_min(1e-6)) if batch_std is not None else scale * self.alpha_eps
            h = UnitMask.apply(a2, thr, eps, self.ste)
        else:
            eps = None
            h = a2 * (a2.float().abs() >= thr).to(a2.dtype)
        if rt.track_ap:
            self.ap_tokens = active_count(a2, thr.unsqueeze(0), self._rows, eps if grad else None)
        return self.down_proj(self.up_proj(x) * h.reshape(a.shape))

    def extra_repr(self) -> str:
        return f"units={self.intermediate_size}, act={self.act_name!r}, ste={self.ste}"
