"""`CwicConfig`: the saved configuration of a CWIC model.

It keeps the dense model's own configuration whole as `text_config` (a LlamaConfig, Qwen2Config, ...)
and the CWIC options (stripe sizes, α_ε, β_dist, ...) as the plain dict `cwic`, so a checkpoint
says exactly which base architecture it extends and how.
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


class CwicConfig(PretrainedConfig):
    model_type = "cwic"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, cwic: dict | None = None, **kwargs):
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config.pop("cwic", None)
            text_config = CONFIG_MAPPING[text_config["model_type"]](**text_config)
        self.text_config = text_config
        self.cwic = dict(cwic or {})
        super().__init__(**kwargs)
