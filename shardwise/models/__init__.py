"""Model definitions; importing this package registers them in `shardwise.registry.MODELS`."""

from __future__ import annotations

from shardwise.models.gpt import (
    GPT,
    PRESETS,
    GPTConfig,
    build_gpt,
    count_params,
    gpt_config_from,
    init_weights,
)

__all__ = [
    "GPT",
    "PRESETS",
    "GPTConfig",
    "build_gpt",
    "count_params",
    "gpt_config_from",
    "init_weights",
]
