"""Conversion of a Hugging Face causal LM to CWIC, and the class that saves and loads it.

`to_cwic(model, **options)` converts in place: every q/k/v/o projection and the gate projection
become `CwicLinear`, each MLP a `CwicGatedMLP`, the LM head a `CwicLinear` with its own stripe
size. The parameters are shared, not copied, and θ = 0, so the model computes exactly what it did.
No modelling file is copied: the model keeps its own class, extended by `CwicForCausalLM`
(`model.__class__` becomes e.g. `CwicLlamaForCausalLM`, a subclass of `LlamaForCausalLM`).

`save_pretrained` writes the weights in the standard layout plus `theta`, `phi` and the statistics,
a `CwicConfig` (model_type "cwic") with an `auto_map`, and copies of this folder's files, so
`AutoModelForCausalLM.from_pretrained(path)` works after `import cwic_exp` and, in a process that
never imports it, with `trust_remote_code=True`.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .configuration_cwic import CwicConfig
# functional is imported here too, not only by layers: transformers 4.x (checked 4.56.2) copies only the modeling
# file's own relative imports into its remote-code cache, and then failed to find functional.py
from .functional import stripe_rows  # noqa: F401
from .layers import CwicGatedMLP, CwicLinear, CwicRuntime

_HERE = os.path.dirname(os.path.abspath(__file__))
_CODE_FILES = ("configuration_cwic.py", "modeling_cwic.py", "layers.py", "functional.py")


@dataclass
class CwicOptions:
    stripe_size: int | None = 512        # output rows per stripe; None: whole columns ("no stripes")
    head_stripe_size: int | None = None  # LM head's stripe; None: same as stripe_size
    alpha_eps: float = 0.1               # pseudo-derivative bandwidth ε = α_ε · batch std
    beta_dist: float = 0.99              # EMA momentum of the running mean/std
    ste: bool = True                     # x gets W^T dy as if unmasked (False: the "no STE" ablation)
    sparsify_head: bool = True           # LM head as a striped CWIC layer (else dense and counted dense)
    head_max_reduction: float | None = 100.0  # stop AP gradients to the head past this reduction

    def __post_init__(self):
        for name in ("stripe_size", "head_stripe_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{name} must be a positive integer or None (whole columns), got {v!r}")
        if not self.alpha_eps > 0:
            raise ValueError(f"alpha_eps must be > 0, got {self.alpha_eps}")
        if not 0 <= self.beta_dist < 1:
            raise ValueError(f"beta_dist must be in [0, 1), got {self.beta_dist}")
        if self.head_max_reduction is not None and self.head_max_reduction < 1:
            raise ValueError(f"head_max_reduction must be >= 1 or None, got {self.head_max_reduction}")

    @classmethod
    def from_kwargs(cls, **kw) -> "CwicOptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown CWIC option(s) {unknown}; valid: {sorted(names)}")
        return cls(**kw)


# ----------------------------------------------------------------------------- conversion

def _decoder_layers(model: nn.Module):
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: expected a causal LM with `.{model.base_model_prefix}"
                        f".layers` (Llama, Mistral, Qwen2, ...); cannot convert it to CWIC")
    return layers


def iter_cwic_modules(model: nn.Module):
    for m in model.modules():
        if isinstance(m, (CwicLinear, CwicGatedMLP)):
            yield m


def is_cwic(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_cwic_runtime", None), CwicRuntime)


def to_cwic(model: nn.Module, **options) -> nn.Module:
    """Convert a Hugging Face causal LM to CWIC in place (θ = 0: outputs unchanged) and return it."""
    if is_cwic(model):
        raise ValueError("model is already a CWIC model")
    opts = CwicOptions.from_kwargs(**options)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    act_name = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", "silu")
    common = dict(alpha_eps=opts.alpha_eps, beta_dist=opts.beta_dist, ste=opts.ste)
    runtime = CwicRuntime()
    for i, layer in enumerate(_decoder_layers(model)):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in names):
            raise TypeError(f"layer {i}: expected self_attn with q/k/v/o_proj nn.Linear, found "
                            f"{type(attn).__name__}")
        if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear)
                                  for n in ("gate_proj", "up_proj", "down_proj")):
            raise TypeError(f"layer {i}: expected a gated MLP with gate/up/down_proj nn.Linear, found "
                            f"{type(mlp).__name__}")
        for n in names:
            setattr(attn, n, CwicLinear.from_linear(getattr(attn, n), stripe_size=opts.stripe_size,
                                                    kind=n[0], layer_idx=i, **common))
        gate = CwicLinear.from_linear(mlp.gate_proj, stripe_size=opts.stripe_size, kind="gate",
                                      layer_idx=i, **common)
        layer.mlp = CwicGatedMLP(gate, mlp.up_proj, mlp.down_proj, mlp.act_fn, act_name,
                                 layer_idx=i, **common)
    if opts.sparsify_head:
        head_stripe = opts.head_stripe_size if opts.head_stripe_size is not None else opts.stripe_size
        model.lm_head = CwicLinear.from_linear(model.lm_head, stripe_size=head_stripe, kind="head",
                                               **common)
    for m in iter_cwic_modules(model):
        m.runtime = runtime
    model._cwic_runtime = runtime
    model.config.cwic = asdict(opts)
    model.__class__ = _cwic_class(type(model))
    return model


def cwic_options(model: nn.Module) -> CwicOptions:
    return CwicOptions(**model.config.cwic)


@contextmanager
def cwic_context(model: nn.Module, token_mask: torch.Tensor | None = None, update_stats: bool = False,
                 track_ap: bool = False, accumulate_stats: bool = False, pooled_eps: bool = False):
    """Switches for the forward passes inside the block.

    token_mask: (batch, seq) bool/int, 1 for real tokens: only they feed the statistics, ε and the
    AP counts. update_stats: statistics mode (the running mean/std move, once per block, from this
    batch). accumulate_stats: every CWIC module adds its real inputs' moments to a pool instead, and
    `commit_statistics(model)` then moves the statistics once from all the pooled batches (one optimizer
    step split into micro-batches, or over data-parallel ranks). pooled_eps: the STE bandwidth ε comes
    from the std of the batch pooled at the last commit instead of this forward's tokens (the gradient
    passes of such a step). track_ap: every CWIC module records its per-token active-parameter count in
    `.ap_tokens` (differentiable under grad).
    """
    if update_stats and accumulate_stats:
        raise ValueError("cwic_context: update_stats and accumulate_stats exclude each other")
    rt = getattr(model, "_cwic_runtime", None)
    if rt is None:
        raise TypeError(f"{type(model).__name__} is not a CWIC model: convert it with cwic_exp.to_cwic first, or "
                        f"load a CWIC checkpoint")
    prev = (rt.update_stats, rt.track_ap, rt.token_mask, rt.accumulate_stats, rt.pooled_eps)
    rt.update_stats, rt.track_ap, rt.accumulate_stats = bool(update_stats), bool(track_ap), bool(accumulate_stats)
    rt.pooled_eps = bool(pooled_eps)
    rt.token_mask = None if token_mask is None else token_mask.reshape(-1).bool()
    rt.batch_id += 1
    try:
        yield rt
    finally:
        rt.update_stats, rt.track_ap, rt.token_mask, rt.accumulate_stats, rt.pooled_eps = prev


def world_size() -> int:
    """The ranks of the initialised torch.distributed group, or 1."""
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


@torch.no_grad()
def commit_statistics(model: nn.Module) -> None:
    """Move every running statistic once, from the moments pooled under `cwic_context(accumulate_stats=True)`
    since the last commit: the same moving-average step that one batch holding all those tokens would take.
    In an initialised torch.distributed group the pools of every rank are summed first (one all-reduce), so
    every rank's statistics move the same way from the global batch. Every rank must call it."""
    mods = list(iter_cwic_modules(model))
    if not mods:
        return
    flat = torch.cat([m._take_moments() for m in mods])
    if world_size() > 1:
        torch.distributed.all_reduce(flat)
    off = 0
    for m in mods:
        n = 1 + 2 * m._ema("ema_mean").numel()
        m._commit_moments(flat[off:off + n])
        off += n


@torch.no_grad()
def clamp_thresholds(model: nn.Module) -> None:
    """θ ← max(0, θ) and φ ← max(0, φ): applied after every optimizer step."""
    for m in iter_cwic_modules(model):
        (m.theta if isinstance(m, CwicLinear) else m.phi).clamp_(min=0)


# ----------------------------------------------------------------------------- save / load

_CLASSES: dict[type, type] = {}


def _cwic_class(base_cls: type) -> type:
    if issubclass(base_cls, CwicForCausalLM):
        return base_cls
    if base_cls not in _CLASSES:
        _CLASSES[base_cls] = type(f"Cwic{base_cls.__name__}", (CwicForCausalLM, base_cls),
                                  {"config_class": base_cls.config_class, "__module__": __name__})
    return _CLASSES[base_cls]


def _load_state_files(path: str) -> dict:
    from safetensors.torch import load_file
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for s in shards:
            state.update(load_file(os.path.join(path, s)))
        return state
    raise FileNotFoundError(f"no model.safetensors(.index.json) in {path}")


# from_pretrained: the keywords passed to the hub download (a hub id only), and those it accepts without effect (what
# Auto classes pass on, loading options that have no meaning for a CWIC checkpoint read whole on the CPU)
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
_QUIET_KWARGS = ("trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "code_revision")


class CwicForCausalLM:
    """Mixed into the converted model's own class; also the class `auto_map` points at.

    `from_pretrained` rebuilds the dense architecture from `text_config`, converts it with the saved
    options and loads the tensors; `save_pretrained` writes a loadable CWIC checkpoint.
    """

    config_class = CwicConfig

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        return None  # the auto_map written by save_pretrained already does this

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config: CwicConfig | None = None,
                        dtype=None, torch_dtype=None, device_map=None, **kwargs):
        from transformers import AutoModelForCausalLM
        hub = {k: v for k in _HUB_KWARGS if (v := kwargs.pop(k, None)) is not None}
        attn = kwargs.pop("attn_implementation", None)
        subfolder = kwargs.pop("subfolder", None) or ""
        ignored = sorted(k for k, v in kwargs.items() if not k.startswith("_") and k not in _QUIET_KWARGS
                         and v is not None and not (isinstance(v, dict) and not v))   # None / {}: nothing asked
        if ignored:
            import warnings
            warnings.warn(f"CwicForCausalLM.from_pretrained ignores {', '.join(ignored)}", stacklevel=2)
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download
            path = snapshot_download(path, **hub)
        path = os.path.join(path, subfolder) if subfolder else path
        if config is None:
            config = CwicConfig.from_pretrained(path)
        text = config.text_config
        dtype = dtype if dtype is not None else torch_dtype
        if dtype in (None, "auto"):
            dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        model = AutoModelForCausalLM.from_config(text, dtype=dtype,
                                                 **({"attn_implementation": attn} if attn else {}))
        to_cwic(model, **config.cwic)
        state = _load_state_files(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        loaded = {p.data_ptr() for k, p in model.state_dict().items() if k in state}
        missing = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
        if missing or unexpected:
            raise RuntimeError(f"CWIC checkpoint {path} does not match its config: missing {missing[:8]}, "
                               f"unexpected {unexpected[:8]}")
        gen = os.path.join(path, "generation_config.json")
        if os.path.exists(gen):
            from transformers import GenerationConfig
            model.generation_config = GenerationConfig.from_pretrained(path)
        if device_map is not None:
            dev = device_map if not isinstance(device_map, dict) else next(iter(device_map.values()))
            if dev == "auto":
                dev = "cuda" if torch.cuda.is_available() else "cpu"
            model.to(dev)
        return model.eval()

    def save_pretrained(self, save_directory, **kwargs):
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        text = self.config.to_dict()
        text.pop("cwic", None)
        cfg = CwicConfig(text_config=text, cwic=dict(self.config.cwic))
        cfg.architectures = ["CwicForCausalLM"]
        cfg.auto_map = {"AutoConfig": "configuration_cwic.CwicConfig",
                        "AutoModelForCausalLM": "modeling_cwic.CwicForCausalLM"}
        cfg.save_pretrained(save_directory)
        for name in _CODE_FILES:
            shutil.copyfile(os.path.join(_HERE, name), os.path.join(save_directory, name))
