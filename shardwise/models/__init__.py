"""Model definitions, their specs and their tensor-parallel plans.

`MODELS` maps a config's ``model.name`` to a builder, `SPECS` a model class (by qualified name)
to its declared `ModelSpec`; both are written out here, not filled by import side effects.
"""

from __future__ import annotations

from torch import nn

from shardwise.models.gpt import (
    GPT,
    PRESETS,
    GPTConfig,
    build_gpt,
    count_params,
    gpt_config_from,
    init_weights,
)
from shardwise.models.gpt_plans import gpt_spec
from shardwise.models.hf import HF_SPECS, build_hf
from shardwise.models.spec import ModelSpec, SpecBuilder, qualified_name, resolve_spec
from shardwise.registry import Registry

MODELS: Registry = Registry("model", {"gpt": build_gpt, "hf": build_hf})
"""Model builders: ``fn(model_cfg: ModelConfig, seq_len: int, *, device, seed) -> nn.Module``."""

SPECS: dict[str, SpecBuilder] = {qualified_name(GPT): gpt_spec, **HF_SPECS}
"""Declared specs by qualified class name (a subclass inherits its base's); other models'
specs are discovered."""


def spec_of(model: nn.Module, given: ModelSpec | None = None) -> ModelSpec:
    """The spec of `model`: `given`, declared in `SPECS`, or discovered."""
    return resolve_spec(model, SPECS, given)


__all__ = [
    "GPT",
    "MODELS",
    "PRESETS",
    "SPECS",
    "GPTConfig",
    "ModelSpec",
    "build_gpt",
    "count_params",
    "gpt_config_from",
    "init_weights",
    "spec_of",
]
