"""Sequence parallelism inside a model: each sp rank runs the model on its part of every
sequence. A forward pre-hook cuts the token ids to this rank's positions and passes the
positions to the model (RoPE and learned position tables read them); the attention cores
become ring or Ulysses attention over the ``sp`` axis; the loss takes the same part of the
targets. Pipeline stages never call the whole model: they take the same cut
(`SequenceCut`) and pass the positions to their parts (pipeline/stage.py). Each rank's loss
is the mean over its tokens, so averaging gradients over dp x sp (`grad_mesh`) gives the
gradient of the whole sequences' mean loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from shardwise.distributed import comm
from shardwise.errors import ConfigError
from shardwise.models.spec import ModelSpec
from shardwise.sequence_parallel.hybrid import hybrid_attention, hybrid_positions
from shardwise.sequence_parallel.masks import contiguous_positions, zigzag_positions
from shardwise.sequence_parallel.ring import ring_attention
from shardwise.sequence_parallel.ulysses import ulysses_attention

KINDS = {
    "ring": (ring_attention, zigzag_positions),
    "ulysses": (ulysses_attention, contiguous_positions),
}
"""attention.sequence_parallel (one group) -> (attention op, the positions a rank holds)."""


@dataclass(frozen=True)
class SequenceSplit:
    """How this rank takes part: its attention over the others, and its positions."""

    attend: Callable[..., torch.Tensor]
    """(q, k, v, doc_ids=None) -> this rank's attention output."""
    positions: Callable[[int, torch.device], torch.Tensor]
    """(sequence length, device) -> the positions this rank holds."""
    label: str


def split_of(kind: str, mesh: DeviceMesh, ulysses: int) -> SequenceSplit:
    """This rank's `SequenceSplit` over the mesh's ``sp`` axis (`ulysses`: ranks per Ulysses
    group of the hybrid)."""
    sp = mesh["sp"]
    ranks, rank = comm.group_size(sp), comm.group_rank(sp)
    if kind != "hybrid":
        op, positions_of = KINDS[kind]
        return SequenceSplit(
            partial(op, group=sp, causal=True),
            lambda seq, device: positions_of(seq, rank, ranks, device),
            f"{kind} over sp={ranks}",
        )
    rings, across = ranks // ulysses, _split_sp(mesh, ulysses)
    ring_rank, ulysses_rank = across.get_local_rank("sp_ring"), across.get_local_rank("sp_ulysses")
    return SequenceSplit(
        partial(
            hybrid_attention,
            ring_group=across["sp_ring"],
            ulysses_group=across["sp_ulysses"],
            causal=True,
        ),
        lambda seq, device: hybrid_positions(seq, ring_rank, rings, ulysses_rank, ulysses, device),
        f"hybrid over sp={ranks} (ring {rings} x Ulysses {ulysses})",
    )


def _split_sp(mesh: DeviceMesh, ulysses: int) -> DeviceMesh:
    """The mesh with its sp axis split into ``sp_ring`` x ``sp_ulysses`` (a collective: every
    rank builds it)."""
    names = list(mesh.mesh_dim_names)
    at = names.index("sp")
    shape = list(mesh.mesh.shape)
    shape[at : at + 1] = [shape[at] // ulysses, ulysses]
    names[at : at + 1] = ["sp_ring", "sp_ulysses"]
    return DeviceMesh(mesh.device_type, mesh.mesh.reshape(shape), mesh_dim_names=tuple(names))


class SequenceParallelCore(nn.Module):
    """Causal attention of this rank's part of the sequence over the sp ranks: a drop-in for
    the model's parameter-free attention core."""

    def __init__(self, split: SequenceSplit) -> None:
        super().__init__()
        self.split = split

    def forward(self, q: Tensor, k: Tensor, v: Tensor, documents: Tensor | None = None) -> Tensor:
        if q.is_meta:  # a forward traced on the meta device (the chunks' order): no data to send
            return torch.empty_like(q)
        return self.split.attend(q, k, v, doc_ids=documents)

    def extra_repr(self) -> str:
        return self.split.label


SequenceCut = Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]
"""Token ids [B, T] -> (this rank's part of them, the keywords that carry its positions)."""


def apply_sequence_parallel(
    model: nn.Module, spec: ModelSpec, split: SequenceSplit, loss_fn: Callable
) -> tuple[Callable, SequenceCut]:
    """Make `model` run on this rank's part of each sequence (see the module docstring);
    returns `loss_fn` taking the same part of the targets, and the cut of the inputs."""
    spec.replace_attention_cores(
        model, f"parallel.sp ({split.label})", lambda: SequenceParallelCore(split)
    )

    def mine(tokens: torch.Tensor) -> torch.Tensor:
        return split.positions(tokens.shape[1], tokens.device)

    def cut(ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        positions = mine(ids)
        keyword = positions[None] if spec.positions_rows else positions
        return ids[:, positions], {spec.positions: keyword}

    def cut_inputs(module, args, kwargs):
        if not args:
            raise ConfigError(
                "parallel.sp > 1 takes (inputs, targets) batches: a dict batch's labels "
                "would be shifted by the model within each rank's part of the sequence"
            )
        ids, keywords = cut(args[0])
        return (ids, *args[1:]), {**kwargs, **keywords}

    model.register_forward_pre_hook(cut_inputs, with_kwargs=True)
    return (lambda output, targets: loss_fn(output, targets[:, mine(targets)])), cut
