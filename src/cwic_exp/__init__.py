"""CWIC — Compute Where It Counts: learned granular activation sparsity for Hugging Face LLMs.

    model, tok = cwic_exp.load_teacher("smollm2-135m-instruct")
    cwic_exp.to_cwic(model, stripe_size=192)          # in place; θ = 0: same outputs
    cwic_exp.active_parameters(model, ids, mask)      # {"apr": ..., "density": {...}, ...}

Importing this package registers the "cwic" model type with transformers' Auto classes.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .accounting import ActiveStats, active_parameters, ap_loss, gather_active
from .modeling import (CwicConfig, CwicForCausalLM, CwicGatedMLP, CwicLinear, CwicOptions,
                       clamp_thresholds, commit_statistics, cwic_context, cwic_options, is_cwic,
                       iter_cwic_modules, to_cwic)
from .teacher import load_teacher

AutoConfig.register("cwic", CwicConfig, exist_ok=True)
AutoModelForCausalLM.register(CwicConfig, CwicForCausalLM, exist_ok=True)

__all__ = ["ActiveStats", "CwicConfig", "CwicForCausalLM", "CwicGatedMLP", "CwicLinear", "CwicOptions",
           "active_parameters", "ap_loss", "clamp_thresholds", "commit_statistics", "cwic_context", "cwic_options",
           "gather_active", "is_cwic", "iter_cwic_modules", "load_teacher", "to_cwic"]
