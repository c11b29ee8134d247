"""Active-parameter meters: one interface over dense, TEAL and CWIC models (METHOD.md §4 accounting).

A meter wraps a forward pass and returns the active parameters of every token of the batch:
- dense: every counted matrix in full (q, k, v, o, gate, up, down, head);
- TEAL: a projection with input sparsity counts out_features × (its active inputs); the LM head is
  dense and counted in full (cwic_exp/teal.py records the counts);
- CWIC: the core's `cwic_context(track_ap=True)` + `gather_active`.
Embeddings and attention scores are never counted, so the APRs of the three compare directly.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

PROJ_KIND = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
             "up_proj": "up+down", "down_proj": "up+down"}
KINDS = ("q", "k", "v", "o", "gate", "up+down", "head")


def counted_linears(model: nn.Module):
    """(name, module, kind, layer index) of every counted dense matrix; the head has layer -1."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"))
    out = []
    for i, layer in enumerate(base.layers):
        for name, mod in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in PROJ_KIND and isinstance(mod, nn.Linear):
                out.append((f"layers.{i}.{name}", mod, PROJ_KIND[leaf], i))
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        out.append(("lm_head", head, "head", -1))
    return out


def _base(model):
    return getattr(model, getattr(model, "base_model_prefix", "model"))


class ComputeMeter:
    """Dense accounting; subclasses for TEAL and CWIC."""

    def __init__(self, model: nn.Module):
        lins = counted_linears(model)
        self.dense_by_kind: dict[str, float] = {}
        for _, m, kind, _ in lins:
            self.dense_by_kind[kind] = self.dense_by_kind.get(kind, 0) + m.in_features * m.out_features
        self.dense = float(sum(self.dense_by_kind.values()))
        self._real: Tensor | None = None
        self._kinds: dict[str, float] = {}

    @staticmethod
    def for_model(model: nn.Module) -> "ComputeMeter":
        from ..modeling import is_cwic
        from ..teal import is_teal
        if is_cwic(model):
            return CwicMeter(model)
        if is_teal(model):
            return TealMeter(model)
        return ComputeMeter(model)

    name = "dense"

    @contextmanager
    def track(self, model: nn.Module, real: Tensor):
        """`real`: (B, T) bool, the tokens that count (not padding)."""
        self._real = real.reshape(-1).bool()
        yield
        self._collect(model)

    def _collect(self, model):
        n = self._real.sum().to(torch.float64)
        self._kinds = {k: v * n for k, v in self.dense_by_kind.items()}

    def per_token(self) -> Tensor:
        return self._real.to(torch.float64) * self.dense

    def by_kind(self) -> dict:
        """kind -> active parameters summed over the real tokens of the last batch (tensors: no sync)."""
        return dict(self._kinds)

    returns_logits = False

    def forward_selected(self, model: nn.Module, ids: Tensor, mask: Tensor, pos: Tensor, sel: Tensor) -> Tensor:
        """Last hidden states at the flat positions `sel` (the caller runs the head on them, in
        chunks): a dense head is counted in full per token whatever it ran on."""
        h = _base(model)(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        return h.reshape(-1, h.shape[-1])[sel]


class TealMeter(ComputeMeter):
    name = "teal"

    def __init__(self, model):
        super().__init__(model)
        from ..teal import teal_modules
        self._teal = teal_modules(model)
        teal_ids = {id(m) for m in self._teal}
        self._dense_rest = [(m, k) for _, m, k, _ in counted_linears(model) if id(m) not in teal_ids]
        self._pt: Tensor | None = None

    @contextmanager
    def track(self, model, real):
        self._real = real.reshape(-1).bool()
        for m in self._teal:
            m.teal_track = True
            m.ap_tokens = None
        try:
            yield
        finally:
            for m in self._teal:
                m.teal_track = False
        self._collect(model)

    def _collect(self, model):
        real = self._real
        pt = torch.zeros(real.shape[0], dtype=torch.float64, device=real.device)
        kinds: dict[str, Tensor] = {}
        layers: dict[int, Tensor] = {}
        for m in self._teal:
            if m.ap_tokens is None:
                raise RuntimeError("a TEAL projection recorded nothing: run the forward inside meter.track")
            c = m.ap_tokens.to(torch.float64) * real
            pt += c
            s = c.sum()
            kinds[m.teal_kind] = kinds.get(m.teal_kind, 0.0) + s
            layers[m.teal_layer] = layers.get(m.teal_layer, 0.0) + s
            m.ap_tokens = None
        n = real.sum().to(torch.float64)
        for m, k in self._dense_rest:
            d = float(m.in_features * m.out_features)
            pt += real * d
            kinds[k] = kinds.get(k, 0.0) + d * n
        self._pt, self._kinds_t, self._layers_t = pt, kinds, layers

    def by_kind(self) -> dict:
        return dict(self._kinds_t)

    @property
    def layer_active(self) -> dict[int, float]:
        return {k: float(v) for k, v in self._layers_t.items()}

    def per_token(self):
        return self._pt


class CwicMeter(ComputeMeter):
    name = "cwic"

    def __init__(self, model):
        from ..accounting import gather_active
        from ..modeling import cwic_context
        self._gather, self._ctx = gather_active, cwic_context
        self.dense_by_kind = {}
        self.dense = 0.0
        self._pt = None

    @contextmanager
    def track(self, model, real):
        self._real = real.reshape(-1).bool()
        with self._ctx(model, token_mask=real, track_ap=True):
            yield
        st = self._gather(model, self._real)
        self.dense, self.dense_by_kind = st.dense, dict(st.dense_by_kind)
        pt = torch.zeros(self._real.shape[0], dtype=torch.float64, device=st.per_token.device)
        pt[self._real.to(pt.device)] = st.per_token.detach().to(torch.float64)
        self._pt = pt
        self._kinds = {k: v.detach() if torch.is_tensor(v) else v for k, v in st.by_kind.items()}

    def per_token(self):
        return self._pt

    returns_logits = True

    def forward_selected(self, model, ids, mask, pos, sel):
        # the CWIC head is sparse and counted per token: run it on every position
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        return logits.reshape(-1, logits.shape[-1])[sel]


def summarize(active: float, dense: float, tokens: int, by_kind: dict, dense_by_kind: dict) -> dict:
    """The `active_parameters` dict shape: apr, active and dense per token, density per kind."""
    t = max(tokens, 1)
    return {"apr": dense * tokens / max(active, 1e-9), "active": active / t, "dense": dense,
            "tokens": tokens,
            "density": {k: float(by_kind[k]) / t / dense_by_kind[k] for k in KINDS
                        if k in by_kind and dense_by_kind.get(k)},
            "note": "counts q,k,v,o,gate,up+down,head; not embeddings or attention scores"}
