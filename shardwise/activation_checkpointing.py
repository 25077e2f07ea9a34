"""Activation checkpointing of transformer blocks, applied from outside the model.

A checkpointed block keeps only its input during forward and recomputes its internals in
backward (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): saved
activations of the block drop from O(its internals) to O(its input), for one extra forward.

[Note: names stay put] We use torch's composable ``checkpoint``, which works through
forward hooks on the block itself instead of wrapping it in a new module. A wrapper would add
a prefix to every parameter name (``blocks.0._checkpoint_wrapped_module.attn.qkv.weight``),
which checkpoints on disk and tensor-parallel plans addressed by name would then not match.
The recomputation is torch's non-reentrant one (the only kind the composable API offers), so
the RNG state is restored for dropout and gradients equal those of the plain model.
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import _get_registry, checkpoint

from shardwise.errors import ConfigError
from shardwise.models.spec import ModelSpec

MODES = ("none", "full", "every_n")
"""none: no recomputation; full: every block; every_n: blocks 0, n, 2n, ..."""


def apply_activation_checkpointing(
    model: nn.Module, spec: ModelSpec, mode: str, every_n: int = 2
) -> int:
    """Checkpoint the blocks of the model's `ModelSpec` in place; returns how many blocks
    were wrapped.

    Parameter names and state_dict keys are unchanged (see [Note: names stay put]). Apply
    at most once per model: recomputing a block inside its own recomputation is never meant.
    """
    if mode not in MODES:
        raise ConfigError(
            f"train.activation_checkpointing={mode!r} is unknown; use one of {', '.join(MODES)}"
        )
    if mode == "none":
        return 0
    blocks = spec.named_blocks(model, f"train.activation_checkpointing={mode!r}")
    if every_n < 1:
        raise ConfigError(f"train.checkpoint_every_n={every_n} must be at least 1")
    stride = 1 if mode == "full" else every_n
    chosen = [block for index, (_, block) in enumerate(blocks) if index % stride == 0]
    for name, block in blocks:
        # torch would raise too, but with the whole module printed over many lines.
        if "checkpoint" in (_get_registry(block) or {}):
            raise ValueError(f"{name} is already checkpointed; apply checkpointing once")
    for block in chosen:
        checkpoint(block)
    return len(chosen)
