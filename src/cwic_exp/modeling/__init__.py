"""The CWIC model code. Self-contained (torch + transformers only): checkpoints carry copies of it."""
from .configuration_cwic import CwicConfig
from .layers import KINDS, CwicGatedMLP, CwicLinear, CwicRuntime
from .modeling_cwic import (CwicForCausalLM, CwicOptions, clamp_thresholds, commit_statistics, cwic_context,
                            cwic_options, is_cwic, iter_cwic_modules, to_cwic)

__all__ = ["CwicConfig", "CwicForCausalLM", "CwicGatedMLP", "CwicLinear", "CwicOptions", "CwicRuntime",
           "KINDS", "clamp_thresholds", "commit_statistics", "cwic_context", "cwic_options", "is_cwic",
           "iter_cwic_modules", "to_cwic"]
