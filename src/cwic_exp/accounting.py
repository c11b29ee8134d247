"""Active-parameter accounting (METHOD.md §4): APs per token, per kind, per layer; APR; the AP loss.

Counted: every sparsified matrix, q, k, v, o, gate, the FFN units (up + down) and the LM head (a dense
head, when the head is not sparsified, counts in full on both sides). Not counted: embeddings and
attention scores. Every APR this project reports uses this accounting.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .modeling.layers import KINDS, CwicGatedMLP, CwicLinear
from .modeling.modeling_cwic import cwic_context, cwic_options, iter_cwic_modules


@dataclass
class ActiveStats:
    """Active parameters of one batch, summed over its real tokens."""
    active: Tensor                  # scalar, differentiable when gathered under grad
    dense: float                    # dense parameters per token (counted matrices only)
    tokens: int
    by_kind: dict[str, Tensor] = field(default_factory=dict)    # kind -> active sum
    dense_by_kind: dict[str, float] = field(default_factory=dict)
    by_layer: dict[int, Tensor] = field(default_factory=dict)
    dense_by_layer: dict[int, float] = field(default_factory=dict)
    per_token: Tensor | None = None  # (N,) active parameters of each flattened token

    @property
    def apr(self) -> Tensor:
        return self.dense * self.tokens / self.active.clamp_min(1e-9)

    def __add__(self, other: "ActiveStats") -> "ActiveStats":
        """Sum over micro-batches: the APR of a whole optimizer step."""
        assert self.dense == other.dense
        add = lambda a, b: {k: a[k] + b[k] for k in a}  # noqa: E731
        return ActiveStats(self.active + other.active, self.dense, self.tokens + other.tokens,
                           add(self.by_kind, other.by_kind), self.dense_by_kind,
                           add(self.by_layer, other.by_layer), self.dense_by_layer)

    def detach(self) -> "ActiveStats":
        d = lambda a: {k: v.detach() for k, v in a.items()}  # noqa: E731
        return ActiveStats(self.active.detach(), self.dense, self.tokens, d(self.by_kind),
                           self.dense_by_kind, d(self.by_layer), self.dense_by_layer,
                           None if self.per_token is None else self.per_token.detach())

    def summary(self) -> dict:
        """Plain numbers: apr, active and dense per token, density per kind and per layer."""
        t = max(self.tokens, 1)
        return {
            "apr": float(self.apr),
            "active": float(self.active) / t,
            "dense": float(self.dense),
            "tokens": self.tokens,
            "density": {k: float(v) / t / self.dense_by_kind[k] for k, v in self.by_kind.items()},
            "density_per_layer": {i: float(v) / t / self.dense_by_layer[i] for i, v in self.by_layer.items()},
            "note": "counts q,k,v,o,gate,up+down,head; not embeddings or attention scores",
        }


def gather_active(model: nn.Module, token_mask: Tensor | None = None, head_capped: bool | None = None) -> ActiveStats:
    """Collect the `.ap_tokens` recorded by the last forward under `cwic_context(track_ap=True)`.

    head_capped: whether the head's reduction is past `head_max_reduction` (its AP gradient stopped). None decides
    from this batch; a step split into micro-batches passes the whole step's decision (`lit.py`)."""
    sel = None if token_mask is None else token_mask.reshape(-1).bool()
    opts = cwic_options(model)
    by_kind: dict[str, Tensor] = {}
    dense_kind: dict[str, float] = {}
    by_layer: dict[int, Tensor] = {}
    dense_layer: dict[int, float] = {}
    per_token = None
    for m in iter_cwic_modules(model):
        if m.ap_tokens is None:
            raise RuntimeError("no active-parameter counts recorded: run the forward inside "
                               "cwic_context(model, track_ap=True)")
        counts = m.ap_tokens
        if sel is not None:
            counts = counts[sel.to(counts.device)]
        kind = m.kind
        if kind == "head" and opts.head_max_reduction is not None:
            # cap the head's own reduction (METHOD.md §11): past it, the AP loss stops pushing it
            if head_capped is None:
                red = m.dense_params * counts.shape[0] / counts.sum().clamp_min(1e-9)
                counts = torch.where(red > opts.head_max_reduction, counts.detach(), counts)
            elif head_capped:
                counts = counts.detach()
        per_token = counts if per_token is None else per_token + counts
        s = counts.sum()
        by_kind[kind] = by_kind.get(kind, 0) + s
        dense_kind[kind] = dense_kind.get(kind, 0) + m.dense_params
        if m.layer_idx >= 0:
            by_layer[m.layer_idx] = by_layer.get(m.layer_idx, 0) + s
            dense_layer[m.layer_idx] = dense_layer.get(m.layer_idx, 0) + m.dense_params
    if per_token is None:
        raise RuntimeError("model has no CWIC modules: convert it with cwic_exp.to_cwic first")
    n = per_token.shape[0]
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):  # dense head: counted in full on both sides
        dp = head.in_features * head.out_features
        by_kind["head"] = per_token.new_tensor(float(dp * n))
        dense_kind["head"] = dp
        per_token = per_token + dp
    active = sum(by_kind.values())
    return ActiveStats(active, float(sum(dense_kind.values())), n,
                       {k: by_kind[k] for k in KINDS if k in by_kind}, dense_kind,
                       by_layer, dense_layer, per_token)


def ap_loss(apr: Tensor, target: float) -> Tensor:
    """L_AP = [min(APR - APR_target, 0)]²: only being denser than the target is penalised."""
    return torch.clamp(apr - target, max=0.0) ** 2


@torch.no_grad()
def active_parameters(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                      per_token: bool = False) -> dict:
    """Measure the active parameters of `model` on a batch (no gradient, statistics untouched).

    Returns apr, active (per real token), dense (per token), tokens, density per kind and per layer,
    and with `per_token=True` the (batch, seq) tensor of active parameters of each token (0 on padding).
    """
    with cwic_context(model, token_mask=attention_mask, track_ap=True):
        model(input_ids=input_ids, attention_mask=attention_mask)
    full = gather_active(model)  # every position; masked below
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    out = gather_active(model, mask).summary()
    if per_token:
        out["per_token"] = (full.per_token.view(input_ids.shape) * mask).cpu()
    return out
