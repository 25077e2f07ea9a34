"""Sequence parallelism inside a model: each sp rank runs the model on its part of every
sequence. A forward pre-hook cuts the token ids to this rank's positions and passes the
positions to the model (RoPE and learned position tables read them); the attention cores
become ring or Ulysses attention over the ``sp`` axis; the loss takes the same part of the
targets. Each rank's loss is the mean over its tokens, so averaging gradients over dp x sp
(`grad_mesh`) gives the gradient of the whole sequences' mean loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shardwise.distributed import comm
from shardwise.models.spec import ModelSpec
from shardwise.sequence_parallel.masks import contiguous_positions, zigzag_positions
from shardwise.sequence_parallel.ring import ring_attention
from shardwise.sequence_parallel.ulysses import ulysses_attention

KINDS = {
    "ring": (ring_attention, zigzag_positions),
    "ulysses": (ulysses_attention, contiguous_positions),
}
"""attention.sequence_parallel -> (attention op, the positions a rank holds)."""


class SequenceParallelCore(nn.Module):
    """Causal attention of this rank's part of the sequence over the sp group: a drop-in for
    the model's parameter-free attention core."""

    def __init__(self, kind: str, group: comm.Group) -> None:
        super().__init__()
        self.kind, self.group = kind, group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return KINDS[self.kind][0](q, k, v, self.group, causal=True)

    def extra_repr(self) -> str:
        return f"{self.kind} over sp={comm.group_size(self.group)}"


def apply_sequence_parallel(
    model: nn.Module, spec: ModelSpec, kind: str, group: comm.Group, loss_fn: Callable
) -> Callable:
    """Make `model` run on this rank's part of each sequence (see the module docstring);
    returns `loss_fn` taking the same part of the targets."""
    for name in spec.attention_cores(model, f"parallel.sp with {kind} attention"):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SequenceParallelCore(kind, group))
    rank, ranks, positions_of = comm.group_rank(group), comm.group_size(group), KINDS[kind][1]

    def mine(tokens: torch.Tensor) -> torch.Tensor:
        return positions_of(tokens.shape[1], rank, ranks, tokens.device)

    def cut_inputs(module, args, kwargs):
        ids, *rest = args
        positions = mine(ids)
        return (ids[:, positions], *rest), {**kwargs, spec.positions: positions}

    model.register_forward_pre_hook(cut_inputs, with_kwargs=True)
    return lambda output, targets: loss_fn(output, targets[:, mine(targets)])
