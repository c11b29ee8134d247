"""Typed (structured) training configuration and its early validation.

The dataclasses below are the schema Hydra merges `conf/` into (registered as `cwic_schema`): a key
that does not exist or a value of the wrong type fails while composing. `validate()` adds the checks
that need more than a type — stripe sizes, APR targets, whether a model or dataset exists — and
raises `ConfigError` with one line, before any model is loaded.
"""
from __future__ import annotations

import difflib
import functools
import math
import os
from dataclasses import MISSING as MISSING_FACTORY, dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration value that cannot work; the message is one line."""


@dataclass
class ModelCfg:
    name: str = "smollm2-135m-instruct"   # embedded default, hub id, local folder or .gguf
    attn_implementation: Optional[str] = "sdpa"
    teacher_dtype: str = "auto"           # auto: bf16 on GPU, fp32 on CPU


@dataclass
class CwicCfg:
    stripe_size: Optional[int] = 512     # null: whole columns (the "no stripes" ablation)
    head_stripe_size: Optional[int] = None
    alpha_eps: float = 0.1
    beta_dist: float = 0.99
    ste: bool = True
    sparsify_head: bool = True
    head_max_reduction: Optional[float] = 100.0
    apr_start: float = 1.05               # APR target at step 0
    apr_final: float = 6.0                # the target rises to apr_final + 0.05 (paper: 6.05)
    apr_warmup_steps: int = 15000
    lambda_ap: float = 10.0
    eta_theta: float = 1.0                # θ learning rate = lr × η_θ × √n
    mse_weight: float = 0.0               # > 0: the "MSE on last hidden states" ablation


@dataclass
class DataCfg:
    source: str = "sharegpt"              # sharegpt (offline) | paper_mix (needs the hub) | packed (data.path)
    path: Optional[str] = None            # a ShareGPT-format JSON file instead of the packaged one
    seq_len: int = 1024
    max_len: Optional[int] = None         # longest conversation kept (default: seq_len)
    max_conversations: Optional[int] = None
    val_fraction: float = 0.02
    val_rows: int = 16
    num_workers: int = 0
    cache: bool = True


@dataclass
class OptimCfg:
    lr: float = 5e-5
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.01
    warmup_steps: int = 500
    schedule_steps: int = 1_000_000        # cosine decay length (Table 5: effectively constant)
    grad_clip: Optional[float] = 1.0


@dataclass
class TrainerCfg:
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int = 100
    sequences_per_step: int = 64
    micro_batch_size: int = 8
    val_every: int = 50
    ckpt_every: int = 25
    log_every: int = 1
    threads: Optional[int] = None
    max_minutes: Optional[float] = None   # stop cleanly (checkpoint + export) after this wall time


@dataclass
class LoggerCfg:
    csv: bool = True
    wandb: bool = False                   # offline automatically when no WANDB_API_KEY is set
    project: str = "cwic"
    entity: Optional[str] = None
    tags: list = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    cwic: CwicCfg = field(default_factory=CwicCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    logger: LoggerCfg = field(default_factory=LoggerCfg)
    run_name: str = "default"
    out_dir: str = "runs"
    seed: int = 0
    resume: bool = True                   # same command again: continue from runs/<name>/checkpoints/last.ckpt
    export_milestones: bool = True


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf
    ConfigStore.instance().store(name="cwic_schema", node=TrainConfig)
    # a sweep member's folder is named by its overrides; a path among them (data.path=/data/x.json) made nested folders
    OmegaConf.register_new_resolver("cwic_folder_name", folder_name, replace=True)


def folder_name(text: str, limit: int = 200) -> str:
    """`text` as one folder name: '/', '\\' and ':' written %2F, %5C, %3A ('%' as %25). Past `limit` bytes (file
    systems take 255) its head, '~' and 12 hex digits of its SHA-256: still one name per text."""
    name = str(text).replace("%", "%25").replace("/", "%2F").replace("\\", "%5C").replace(":", "%3A")
    if len(name.encode()) <= limit:
        return name
    import hashlib
    head = name.encode()[:limit - 13].decode(errors="ignore")
    return f"{head}~{hashlib.sha256(str(text).encode()).hexdigest()[:12]}"


# strategies that cannot run this training step (fsdp tried on an H200, ddp_spawn on the CPU, 2026-12-04)
UNSUPPORTED_STRATEGIES = {
    "fsdp": "it flattens the frozen bf16 teacher with the fp32 student (on an H200 it stopped at start: 'Must flatten "
            "tensors with uniform dtype'), and a step's several forward/backward passes and the exports read the "
            "student outside its wrapped forward",
    "deepspeed": "it shards the student as fsdp would (see trainer.strategy=fsdp), and deepspeed is not a dependency",
    "ddp_spawn": "it pickles the student, whose CWIC class is built at run time (PicklingError)",
}

APR_FINAL_MAX = 100    # an HF export at each whole APR up to it; far past the paper's 6.05
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _devices_ok(v, cpu: bool) -> bool:
    """What Lightning's `devices` takes. On a CPU: "auto" or a count ≥ 1 (an int or its digits). On GPUs also -1
    (all), a list of indices, or a string of them ("0,1", "0,"; a bare "0" is zero GPUs)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v >= 1 or (v == -1 and not cpu)
    if isinstance(v, str):
        v = v.strip()
        if v == "auto" or (v.isdigit() and int(v) >= 1):
            return True
        parts = [p.strip() for p in v.split(",") if p.strip()]
        return not cpu and (v == "-1" or ("," in v and bool(parts) and all(p.isdigit() for p in parts)))
    if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig":
        return not cpu and len(v) > 0 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
    return False


@functools.lru_cache(maxsize=None)
def _schema_keys(schema=None, prefix: str = "") -> tuple[str, ...]:
    """Every key of the schema, dotted (cwic.lambda_ap, ...); computed once."""
    from dataclasses import fields, is_dataclass
    out: list[str] = []
    for f in fields(schema or TrainConfig):
        if f.default_factory is not MISSING_FACTORY and is_dataclass(f.default_factory):
            out += _schema_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return tuple(out)


def unknown_keys(cfg) -> list[str]:
    """Keys of `cfg` that the schema does not have. Hydra refuses `cwic.lamda_ap=3` but takes `+cwic.lamda_ap=3`
    (the form its own error message suggests) and `++cwic.foo=1`, and no code reads them."""
    known = set(_schema_keys())
    out = []

    def walk(node, prefix):
        for k in node.keys():
            key = f"{prefix}{k}"
            if key in known:
                continue
            if any(s.startswith(key + ".") for s in known):   # a section (read only then: `???` or `${x}` values
                walk(node[k], key + ".")                       # of unknown keys are never resolved)
            else:
                out.append(key)
    walk(cfg, "")
    return out


def validate(cfg) -> None:
    """One-line errors for values the types cannot catch. Loads nothing."""
    from .teacher import resolve_model_source
    extra = unknown_keys(cfg)
    if extra:
        hints = [f"{k} → {m[0]}" for k in extra
                 for m in [difflib.get_close_matches(k, _schema_keys(), n=1, cutoff=0.75)] if m]
        raise ConfigError(f"unknown config key(s) {', '.join(extra)}: not in the schema (src/cwic_exp/config.py), "
                          f"so nothing would read them" + (f"; did you mean {', '.join(hints)}? (an existing key "
                                                           f"takes no '+')" if hints else ""))
    c, d, t, o = cfg.cwic, cfg.data, cfg.trainer, cfg.optim
    for name in ("stripe_size", "head_stripe_size"):
        v = c[name]
        if v is not None and v <= 0:
            raise ConfigError(f"cwic.{name} must be a positive integer or null (whole columns), got {v}")
    rn = str(cfg.run_name)
    if not rn or "/" in rn or "\\" in rn or rn in (".", ".."):
        raise ConfigError(f"run_name must be one folder name (no '/', not '.' or '..'): it is a folder under "
                          f"out_dir, got {rn!r}")
    for name in ("apr_start", "apr_final", "alpha_eps", "beta_dist", "lambda_ap", "mse_weight", "eta_theta"):
        if not math.isfinite(c[name]):
            raise ConfigError(f"cwic.{name} must be a finite number, got {c[name]}")
    for name in ("lr", "weight_decay"):
        if not math.isfinite(o[name]):
            raise ConfigError(f"optim.{name} must be a finite number, got {o[name]}")
    if c.apr_start < 1:
        raise ConfigError(f"cwic.apr_start must be ≥ 1 (an APR below 1 is denser than dense), got {c.apr_start}")
    if not 1 <= c.apr_final <= APR_FINAL_MAX:
        raise ConfigError(f"cwic.apr_final must be in [1, {APR_FINAL_MAX}], got {c.apr_final}: the run exports an HF "
                          f"model at each whole APR on the way (2.05×, 3.05×, ...; the paper stops at 6.05×)")
    if c.apr_start > c.apr_final + 0.05:
        raise ConfigError(f"cwic.apr_start ({c.apr_start}) must be ≤ cwic.apr_final + 0.05 ({c.apr_final + 0.05}): "
                          f"the target rises from start to final + 0.05 over the warm-up")
    if c.head_max_reduction is not None and not c.head_max_reduction >= 1:
        raise ConfigError(f"cwic.head_max_reduction must be ≥ 1 (the head's largest APR) or null, got "
                          f"{c.head_max_reduction}")
    for name in ("beta1", "beta2"):
        if not 0 <= o[name] < 1:
            raise ConfigError(f"optim.{name} must be in [0, 1) (AdamW), got {o[name]}")
    if o.schedule_steps < 1:
        raise ConfigError(f"optim.schedule_steps must be ≥ 1 (the cosine decay's length), got {o.schedule_steps}")
    if d.max_len is not None and d.max_len < 1:
        raise ConfigError(f"data.max_len must be ≥ 1 or null (data.seq_len), got {d.max_len}")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be ≥ 0 (0: load in the main process), got {d.num_workers}")
    if os.path.exists(str(cfg.out_dir)) and not os.path.isdir(str(cfg.out_dir)):
        raise ConfigError(f"out_dir must be a folder, and {cfg.out_dir} is a file")
    if o.warmup_steps < 0 or o.weight_decay < 0:
        raise ConfigError(f"optim.warmup_steps and optim.weight_decay must be ≥ 0, got {o.warmup_steps}, "
                          f"{o.weight_decay}")
    if t.threads is not None and t.threads < 1:
        raise ConfigError(f"trainer.threads must be ≥ 1 or null (torch's default), got {t.threads}")
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not _cuda())
    if not _devices_ok(t.devices, on_cpu):
        raise ConfigError("trainer.devices must be 'auto' or a count ≥ 1" + ("" if on_cpu else
                          ", -1 (all), a list of GPU indices or a string of them ('0,1')") +
                          f" on {'the CPU' if on_cpu else 'GPUs'}, got {t.devices!r}")
    if d.max_conversations is not None and d.max_conversations < 1:
        raise ConfigError(f"data.max_conversations must be ≥ 1 or null (all), got {d.max_conversations}")
    if c.apr_warmup_steps < 1:
        raise ConfigError(f"cwic.apr_warmup_steps must be ≥ 1, got {c.apr_warmup_steps}")
    if not 0 < c.alpha_eps:
        raise ConfigError(f"cwic.alpha_eps must be > 0, got {c.alpha_eps}")
    if not 0 <= c.beta_dist < 1:
        raise ConfigError(f"cwic.beta_dist must be in [0, 1), got {c.beta_dist}")
    if c.lambda_ap < 0 or c.mse_weight < 0 or c.eta_theta <= 0:
        raise ConfigError(f"cwic.lambda_ap and cwic.mse_weight must be ≥ 0 and cwic.eta_theta > 0, got "
                          f"{c.lambda_ap}, {c.mse_weight}, {c.eta_theta}")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if t.max_steps < 1 or t.sequences_per_step < 1 or t.micro_batch_size < 1:
        raise ConfigError(f"trainer.max_steps, sequences_per_step and micro_batch_size must be ≥ 1, got "
                          f"{t.max_steps}, {t.sequences_per_step}, {t.micro_batch_size}")
    if t.sequences_per_step % t.micro_batch_size:
        raise ConfigError(f"trainer.sequences_per_step ({t.sequences_per_step}) must be a multiple of "
                          f"trainer.micro_batch_size ({t.micro_batch_size})")
    if t.val_every < 1 or t.ckpt_every < 1 or t.log_every < 1:
        raise ConfigError("trainer.val_every, ckpt_every and log_every must be ≥ 1 (ckpt_every=0 would silently "
                          f"turn checkpoints off), got {t.val_every}, {t.ckpt_every}, {t.log_every}")
    if t.max_minutes is not None and t.max_minutes <= 0:
        raise ConfigError(f"trainer.max_minutes must be > 0 or null, got {t.max_minutes}")
    if o.get("grad_clip") is not None and o.grad_clip <= 0:
        raise ConfigError(f"optim.grad_clip must be > 0 or null (no clipping), got {o.grad_clip}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if t.accelerator not in ("cpu", "gpu", "cuda", "auto"):
        raise ConfigError(f"trainer.accelerator must be cpu, gpu, cuda or auto, got {t.accelerator!r}")
    if t.strategy in UNSUPPORTED_STRATEGIES:
        raise ConfigError(f"trainer.strategy={t.strategy} is not supported: {UNSUPPORTED_STRATEGIES[t.strategy]}; "
                          f"use ddp (trainer=ddp), as the paper recipes do")
    if t.strategy not in ("auto", "ddp", "single_device"):
        raise ConfigError(f"trainer.strategy must be auto, ddp or single_device, got {t.strategy!r}")
    if cfg.model.teacher_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"model.teacher_dtype must be auto, float32, bfloat16 or float16, got "
                          f"{cfg.model.teacher_dtype!r}")
    if d.val_rows < 1 or not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_rows must be ≥ 1 and data.val_fraction in (0, 1), got {d.val_rows}, "
                          f"{d.val_fraction}")
    if not 8 <= d.seq_len <= 32767:   # packed position ids are int16
        raise ConfigError(f"data.seq_len must be in [8, 32767], got {d.seq_len}")
    if d.source not in ("sharegpt", "paper_mix", "packed"):
        raise ConfigError(f"data.source must be 'sharegpt', 'paper_mix' or 'packed', got {d.source!r}")
    if d.source == "packed" and d.path is None:
        raise ConfigError("data.source=packed needs data.path (a file from `make gpu-bundle` / save_packed)")
    if d.path is not None and not os.path.exists(d.path):
        raise ConfigError(f"data.path does not exist: {d.path}")
    if d.source == "sharegpt" and d.path is None:
        from .data import sharegpt_path
        try:
            sharegpt_path()
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    try:
        resolve_model_source(cfg.model.name)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.name: {e}") from None


def check_model_loadable(name: str) -> None:
    """A one-line error for a hub id that cannot load here (`teacher.hub_unreachable_reason`). Called just before
    the teacher loads, after `validate` and after a finished run has printed its summary (which needs no model)."""
    from .teacher import hub_unreachable_reason, resolve_model_source
    src = resolve_model_source(name)
    if src["kind"] == "hub":
        why = hub_unreachable_reason(src["path"])
        if why:
            raise ConfigError(f"model.name={src['path']} is a hub id, but {why}: use the embedded default "
                              f"(smollm2-135m-instruct), a local Hugging Face folder or a .gguf file")
