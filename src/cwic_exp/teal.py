"""TEAL, the training-free activation-sparsity baseline (Liu et al. 2025; METHOD.md §9).

Every q, k, v, o, gate, up and down projection zeroes the inputs whose magnitude is below its own
threshold: `y = W (x ⊙ [|x| > t])`. Thresholds come from activation histograms of calibration
sequences (chat data, never evaluation data), and a per-projection sparsity level is turned into a
threshold as the level-quantile of |x|. Two allocations of a model-wide sparsity:

- greedy (TEAL's block-wise search, teal/greedyopt.py of the official code): per decoder layer, start
  dense and repeatedly raise the sparsity of the one projection whose step hurts the layer's output
  least, step = base_step / (its parameters relative to q), until the parameter-weighted sparsity of
  the layer reaches the target; the error is the L2 norm over the last 25% of positions of the layer
  output minus the dense output, averaged over batch and features. One search up to the largest
  target gives every smaller target (closest row, as TEAL's lookup tables);
- uniform (CATS-style): the same sparsity for every projection.

Differences from the official code, on purpose: thresholds are quantiles of |x| (TEAL takes the
symmetric quantile of the signed distribution, which misses the requested sparsity when a feature
is not centred); every token is sparsified (TEAL's prefill path leaves the first half of a prompt
dense); the 7 candidate steps of a greedy iteration run as one batched forward.

Accounting (same conventions as CWIC, eval/compute.py): a projection with input sparsity counts
out_features × (its active inputs) per token; the LM head is dense and counted in full.

    thresholds = calibrate_teal(model, calib_ids).thresholds(0.5, "greedy")
    apply_teal(model, thresholds)            # in place, class swap: weights and state_dict unchanged
    teal_active_parameters(model, ids, mask) # same dict as cwic_exp.active_parameters
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

PROJS = ("q", "k", "v", "o", "gate", "up", "down")
_LEAF = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
         "up_proj": "up", "down_proj": "down"}
# projections reading the same tensor share one histogram
SITE = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}
KIND = {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "gate", "up": "up+down", "down": "up+down"}


class TealLinear(nn.Linear):
    """nn.Linear with input magnitude sparsity. Made by swapping the class of an existing nn.Linear
    (see apply_teal), so parameters, names and state_dict are the model's own."""

    teal_threshold: float | Tensor = 0.0
    teal_track: bool = False
    teal_enabled: bool = True
    ap_tokens: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        thr = self.teal_threshold
        active = self.teal_enabled and (isinstance(thr, Tensor) or thr > 0)
        if active:
            keep = x.abs() > thr
            x = x * keep
        if self.teal_track:
            n = x.numel() // self.in_features
            if active:
                self.ap_tokens = keep.reshape(n, self.in_features).sum(-1) * self.out_features
            else:
                self.ap_tokens = torch.full((n,), self.in_features * self.out_features, device=x.device)
        return F.linear(x, self.weight, self.bias)


def _layers(model: nn.Module):
    return getattr(model, getattr(model, "base_model_prefix", "model")).layers


def _named_projs(model: nn.Module):
    """(layer index, proj, module) for q/k/v/o/gate/up/down of every decoder layer."""
    for i, layer in enumerate(_layers(model)):
        for name, mod in layer.named_modules():
            p = _LEAF.get(name.rsplit(".", 1)[-1])
            if p is not None and isinstance(mod, nn.Linear):
                yield i, p, mod


def is_teal(model: nn.Module) -> bool:
    return any(isinstance(m, TealLinear) for m in model.modules())


def teal_modules(model: nn.Module) -> list[TealLinear]:
    return [m for m in model.modules() if isinstance(m, TealLinear)]


def apply_teal(model: nn.Module, thresholds: dict[str, float] | None = None) -> nn.Module:
    """Make every q/k/v/o/gate/up/down projection a TealLinear (in place) and set its threshold.

    `thresholds`: {"<layer>.<proj>": t} (e.g. "3.gate"), as returned by TealCalibration.thresholds;
    missing entries (or None) mean 0: dense, bit for bit.
    """
    for i, p, mod in _named_projs(model):
        if not isinstance(mod, TealLinear):
            mod.__class__ = TealLinear
        mod.teal_layer, mod.teal_proj, mod.teal_kind = i, p, KIND[p]
        mod.teal_threshold = float((thresholds or {}).get(f"{i}.{p}", 0.0))
    return model


def remove_teal(model: nn.Module) -> nn.Module:
    for m in teal_modules(model):
        m.__class__ = nn.Linear
        for a in ("teal_threshold", "teal_track", "teal_enabled", "ap_tokens", "teal_layer",
                  "teal_proj", "teal_kind"):
            m.__dict__.pop(a, None)
    return model


class teal_disabled:
    """Context: run the TEAL model dense (its teacher), e.g. for KL to the dense model."""

    def __init__(self, model):
        self.mods = teal_modules(model)

    def __enter__(self):
        for m in self.mods:
            m.teal_enabled = False

    def __exit__(self, *exc):
        for m in self.mods:
            m.teal_enabled = True


# ----------------------------------------------------------------------------- histograms

class MagnitudeHistogram:
    """Streaming histogram of log10|x| on fixed bins (range 1e-10 .. 1e6, 0.001 decade a bin):
    about 0.23% relative resolution on a threshold, any scale, no first pass. Zeros fall in bin 0."""

    LO, HI, BINS = -10.0, 6.0, 16000

    def __init__(self, counts: Tensor | None = None):
        self.counts = torch.zeros(self.BINS, dtype=torch.float64) if counts is None else counts.double().cpu()
        self._cum: Tensor | None = None

    def add(self, x: Tensor) -> None:
        v = torch.log10(x.detach().abs().float().clamp_min(10 ** self.LO)).clamp_(self.LO, self.HI)
        self.counts += torch.histc(v, self.BINS, self.LO, self.HI).double().cpu()
        self._cum = None

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def quantile(self, q: float) -> float:
        """Magnitude below which a fraction q of the values lie (0 for q <= 0)."""
        if q <= 0:
            return 0.0
        if self._cum is None:
            self._cum = torch.cumsum(self.counts, 0)
        cum = self._cum
        target = min(q, 1.0) * float(cum[-1])
        i = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)))
        i = min(i, self.BINS - 1)
        below = float(cum[i - 1]) if i > 0 else 0.0
        inside = float(self.counts[i])
        frac = 0.0 if inside <= 0 else (target - below) / inside
        width = (self.HI - self.LO) / self.BINS
        return 10 ** (self.LO + (i + frac) * width)


@torch.no_grad()
def collect_histograms(model: nn.Module, batches, device=None) -> dict[str, MagnitudeHistogram]:
    """Histograms of |input| of every projection site ("<layer>.<q|o|gate|down>") on the dense model.

    `batches`: iterable of input-id tensors (B, T) (fixed-length rows, no padding) or (ids, mask)
    pairs; with a mask only real tokens count.
    """
    hists: dict[str, MagnitudeHistogram] = {}
    hooks = []
    state = {"mask": None}

    def hook(key):
        def fn(mod, args):
            x = args[0]
            m = state["mask"]
            x = x.reshape(-1, x.shape[-1]) if m is None else x.reshape(-1, x.shape[-1])[m]
            hists.setdefault(key, MagnitudeHistogram()).add(x)
        return fn

    for i, p, mod in _named_projs(model):
        if SITE[p] == p:
            hooks.append(mod.register_forward_pre_hook(hook(f"{i}.{p}")))
    dev = device or next(model.parameters()).device
    try:
        with _all_dense(model):
            for b in batches:
                ids, mask = (b if isinstance(b, (tuple, list)) else (b, None))
                state["mask"] = None if mask is None else mask.reshape(-1).bool().to(dev)
                model(input_ids=ids.to(dev), attention_mask=None if mask is None else mask.to(dev),
                      use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return hists


class _all_dense:
    """Thresholds off for the duration (calibration statistics come from the dense model)."""

    def __init__(self, model):
        self.mods = teal_modules(model)

    def __enter__(self):
        self.saved = [m.teal_threshold for m in self.mods]
        for m in self.mods:
            m.teal_threshold = 0.0

    def __exit__(self, *exc):
        for m, t in zip(self.mods, self.saved):
            m.teal_threshold = t


# ----------------------------------------------------------------------------- greedy search

_BATCHED_KW = ("attention_mask", "position_embeddings", "position_ids")


def _repeat_batch(obj, b: int, c: int):
    """c copies along dim 0 of every tensor with batch dimension b (> 1); recurse into tuples.
    Batch-1 tensors (shared position embeddings, masks) broadcast and stay as they are."""
    if isinstance(obj, Tensor):
        if b > 1 and obj.dim() > 0 and obj.shape[0] == b:
            return obj.repeat(c, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, tuple):
        return tuple(_repeat_batch(o, b, c) for o in obj)
    return obj


def _layer_out(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class TealCalibration:
    """Histograms per site plus, per layer, TEAL's greedy path: rows of (layer sparsity, {proj: s})."""
    hists: dict[str, MagnitudeHistogram]
    greedy: list[list[tuple[float, dict[str, float]]]] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)    # params of each projection / params of q
    num_layers: int = 0
    info: dict = field(default_factory=dict)

    def threshold(self, layer: int, proj: str, sparsity: float) -> float:
        return self.hists[f"{layer}.{SITE[proj]}"].quantile(sparsity)

    def sparsities(self, sparsity: float, mode: str = "greedy") -> dict[str, float]:
        """{"<layer>.<proj>": per-projection sparsity} for a model-wide target."""
        out = {}
        for i in range(self.num_layers):
            if mode == "uniform":
                row = {p: sparsity for p in PROJS}
            elif mode == "greedy":
                if not self.greedy:
                    raise ValueError("this calibration has no greedy search: calibrate_teal(greedy=True)")
                rows = self.greedy[i]
                if sparsity > rows[-1][0] + 0.01:
                    raise ValueError(f"greedy search of layer {i} stops at {rows[-1][0]:.3f}; "
                                     f"recalibrate with max_sparsity >= {sparsity}")
                row = min(rows, key=lambda r: abs(r[0] - sparsity))[1]
            else:
                raise ValueError(f"unknown TEAL mode {mode!r}: expected 'greedy' or 'uniform'")
            out.update({f"{i}.{p}": float(s) for p, s in row.items()})
        return out

    def thresholds(self, sparsity: float, mode: str = "greedy") -> dict[str, float]:
        sp = self.sparsities(sparsity, mode)
        return {k: self.threshold(int(k.split(".")[0]), k.split(".")[1], s) for k, s in sp.items()}

    def state_dict(self) -> dict:
        return {"hists": {k: h.counts.float() for k, h in self.hists.items()}, "greedy": self.greedy,
                "weights": self.weights, "num_layers": self.num_layers, "info": self.info}

    @classmethod
    def from_state_dict(cls, d: dict) -> "TealCalibration":
        return cls({k: MagnitudeHistogram(v) for k, v in d["hists"].items()}, d["greedy"], d["weights"],
                   d["num_layers"], d.get("info", {}))


def _layer_weights(layer: nn.Module) -> dict[str, float]:
    sizes = {}
    for name, mod in layer.named_modules():
        p = _LEAF.get(name.rsplit(".", 1)[-1])
        if p is not None:
            sizes[p] = mod.in_features * mod.out_features
    return {p: sizes[p] / sizes["q"] for p in PROJS}


@torch.no_grad()
def greedy_search(model: nn.Module, calib: TealCalibration, ids: Tensor, max_sparsity: float = 0.7,
                  base_step: float = 0.05, last_fraction: float = 0.25) -> None:
    """TEAL's block-wise greedy allocation, every layer, on fixed-length rows `ids` (B, T)."""
    layers = _layers(model)
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    captured = {}

    def grab(mod, args, kwargs):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
        captured["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with _all_dense(model):
            model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    x, kw = captured["x"], captured["kw"]
    kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
    B, T = x.shape[:2]
    start = int(T * (1 - last_fraction))
    weights = _layer_weights(layers[0])
    wsum = sum(weights.values())
    step = {p: base_step / weights[p] for p in PROJS}
    calib.weights, calib.greedy, calib.num_layers = weights, [], len(layers)
    for i, layer in enumerate(layers):
        mods = {p: m for (li, p, m) in _named_projs(model) if li == i}
        for m in mods.values():
            if not isinstance(m, TealLinear):
                raise TypeError("greedy_search needs apply_teal(model) first")
            m.teal_threshold = 0.0
        target = _layer_out(layer(x, **kw))
        s = {p: 0.0 for p in PROJS}
        rows = [(0.0, dict(s))]
        while sum(weights[p] * s[p] for p in PROJS) / wsum < max_sparsity - 1e-9:
            cands = [p for p in PROJS if s[p] + step[p] <= 1.0 + 1e-9]
            if not cands:
                break
            C = len(cands)
            for p, m in mods.items():     # candidate c raises cands[c] by one step
                thr = [calib.threshold(i, p, s[p] + (step[p] if p == q else 0.0)) for q in cands]
                m.teal_threshold = torch.tensor(thr, device=dev, dtype=x.dtype).repeat_interleave(B)[:, None, None]
            xr = x.repeat(C, 1, 1)
            kwr = {k: _repeat_batch(v, B, C) if k in _BATCHED_KW else v for k, v in kw.items()}
            out = _layer_out(layer(xr, **kwr)).view(C, B, T, -1)
            err = torch.linalg.vector_norm((out - target)[:, :, start:].float(), dim=2).mean(dim=(1, 2))
            best = cands[int(err.argmin())]
            s[best] = min(1.0, s[best] + step[best])
            rows.append((sum(weights[p] * s[p] for p in PROJS) / wsum, dict(s)))
        for m in mods.values():
            m.teal_threshold = 0.0
        calib.greedy.append(rows)
        log.info("TEAL greedy: layer %d done (%d steps), at %.2f: %s", i, len(rows) - 1, rows[-1][0],
                 {p: round(v, 3) for p, v in rows[-1][1].items()})
        x = target                          # the next layer sees the dense output, as in TEAL


class _Stop(Exception):
    pass


def calibrate_teal(model: nn.Module, calib_ids: Tensor, greedy: bool = True, max_sparsity: float = 0.7,
                   greedy_rows: int | None = None, batch_rows: int = 8, base_step: float = 0.05,
                   last_fraction: float = 0.25) -> TealCalibration:
    """Histograms over all of `calib_ids` (B, T fixed-length rows), then TEAL's greedy search on the
    first `greedy_rows` rows (all when None). Leaves the model a TEAL model with thresholds 0."""
    apply_teal(model)
    batches = [calib_ids[i:i + batch_rows] for i in range(0, calib_ids.shape[0], batch_rows)]
    calib = TealCalibration(collect_histograms(model, batches), num_layers=len(_layers(model)))
    calib.info = {"calib_rows": int(calib_ids.shape[0]), "calib_seq_len": int(calib_ids.shape[1]),
                  "greedy_rows": int(min(greedy_rows or calib_ids.shape[0], calib_ids.shape[0])),
                  "max_sparsity": max_sparsity,
                  "base_step": base_step, "last_fraction": last_fraction}
    if greedy:
        greedy_search(model, calib, calib_ids[:greedy_rows] if greedy_rows else calib_ids, max_sparsity,
                      base_step, last_fraction)
    else:
        calib.weights = _layer_weights(_layers(model)[0])
    return calib


@torch.no_grad()
def fit_thresholds(model: nn.Module, calib_ids: Tensor, sparsities: dict[str, float]) -> dict[str, float]:
    """Thresholds that realise `sparsities` ({"<layer>.<proj>": s}) exactly on `calib_ids`, with the
    sparsity of everything upstream in place: one forward pass over all rows at once, where each
    projection, just before it runs, takes the s-quantile of the |x| it actually receives.

    Why: TEAL's thresholds come from the dense model's activations, but sparsifying early layers
    shrinks what later ones see, so the realised sparsity overshoots (SmolLM2, uniform 66%: 71.5%
    measured). Re-fitting keeps TEAL's per-projection allocation and hits the requested level.
    """
    apply_teal(model)
    dev = next(model.parameters()).device
    out: dict[str, float] = {}
    hooks = []

    def pre(mod, args):
        key = f"{mod.teal_layer}.{mod.teal_proj}"
        h = MagnitudeHistogram()
        h.add(args[0])
        mod.teal_threshold = h.quantile(float(sparsities.get(key, 0.0)))
        out[key] = mod.teal_threshold

    for m in teal_modules(model):
        m.teal_threshold = 0.0
        hooks.append(m.register_forward_pre_hook(pre))
    try:
        model(input_ids=calib_ids.to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return out


def teal_thresholds(model: nn.Module, calib: TealCalibration, sparsity: float, mode: str = "greedy",
                    refit_ids: Tensor | None = None) -> dict[str, float]:
    """Thresholds for a model-wide sparsity: TEAL's (from the dense histograms), or, given
    `refit_ids`, re-fitted to realise the allocation on those calibration rows (fit_thresholds)."""
    if refit_ids is None:
        return calib.thresholds(sparsity, mode)
    return fit_thresholds(model, refit_ids, calib.sparsities(sparsity, mode))


# ----------------------------------------------------------------------------- accounting

@torch.no_grad()
def teal_active_parameters(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                           per_token: bool = False) -> dict:
    """Active parameters of a TEAL (or dense) model on a batch: the dict of
    `cwic_exp.active_parameters` (apr, active, dense, tokens, density per kind, density_per_layer,
    per_token), plus `sparsity`: the parameter-weighted fraction of inactive q/k/v/o/gate/up/down
    weights (TEAL's own measure; the head is not in it)."""
    from .eval.compute import ComputeMeter, summarize
    meter = ComputeMeter.for_model(model)
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    with meter.track(model, mask.to(input_ids.device)):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    pt = meter.per_token()
    n = int(mask.sum())
    out = summarize(float(pt.sum()), meter.dense, n, meter.by_kind(), meter.dense_by_kind)
    layer_dense: dict[int, float] = {}
    for m in teal_modules(model):
        layer_dense[m.teal_layer] = layer_dense.get(m.teal_layer, 0.0) + m.in_features * m.out_features * n
    layer_active = getattr(meter, "layer_active", {})
    out["density_per_layer"] = {i: layer_active[i] / layer_dense[i] for i in sorted(layer_active)}
    dense_sum = sum(layer_dense.values())
    out["sparsity"] = 1.0 - sum(layer_active.values()) / dense_sum if dense_sum else 0.0
    if per_token:
        out["per_token"] = (pt.view(input_ids.shape) * mask.to(pt.device)).float().cpu()
    return out
