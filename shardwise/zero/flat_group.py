"""A flat group: parameters that are laid out, reduced, stepped and gathered as one.

The flat store (zero/store.py) keeps every trainable parameter as a view of one flat buffer
per group: a `Chunk` (zero/chunks/chunk.py) laid out as the reducer's `Bucket`, which also
holds the group's gradient buffers. The chunk stays on the device from the start, so it needs
no manager: it is the chunk store's full chunk of ZeRO stages 1-2 with every chunk on the
device. The group adds what this rank holds of the parameters: with ``sharded``, this rank's
optimizer steps one slice of the group (ZeRO 1-2), else all of it. (ZeRO-3's parameters,
gathered around their use, are chunks of the chunk store: zero/params.py.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from shardwise.distributed import comm
from shardwise.distributed.reducer import Bucket
from shardwise.zero.chunks.chunk import Chunk


@dataclass(frozen=True)
class PieceInfo:
    """Which global slice of which parameter an optimizer piece holds."""

    name: str
    """Parameter name in the model (the first name of a tied parameter)."""
    start: int
    """First element of the slice, in the flattened parameter."""
    end: int
    """One past the last element of the slice."""


@dataclass(eq=False)
class FlatGroup:
    """One bucket's parameters as this rank holds and steps them (module docstring)."""

    bucket: Bucket
    """The layout and the gradient buffers."""
    sharded: bool
    start: int
    """First element of the slice this rank's optimizer owns (0 unless `sharded`)."""
    end: int
    chunk: Chunk
    """The whole group's parameters, in the parameter dtype, on the device: model parameters
    are views of its payload."""
    shard: torch.Tensor
    """The owned parameters in the parameter dtype: a view of the chunk's payload."""
    master: torch.Tensor
    """The owned slice in the master dtype (a copy, or `shard` itself)."""
    pieces: list[nn.Parameter] = field(default_factory=list)
    """What the optimizer steps: the part of each parameter inside the owned slice."""
    owners: list[nn.Parameter] = field(default_factory=list)
    """The model parameter each piece is a slice of."""
    infos: list[PieceInfo] = field(default_factory=list)
    grad_ranges: list[tuple[int, int]] = field(default_factory=list)
    """Flat range of each piece, for finding its reduced gradient."""

    def owned_grad(self) -> torch.Tensor:
        """The reduced gradient of the owned slice."""
        return self.bucket.reduced_range(self.start, self.end)

    def write_back(self, needs_master: bool, group: object) -> None:
        """After a step: the owned slice into the parameters, all-gathered when the optimizer
        is sharded."""
        if needs_master:
            self.shard.copy_(self.master)
        if self.sharded:
            comm.all_gather_(self.chunk.payload, self.shard, group)


def overlaps(spans: Iterable[tuple[int, int]], start: int, end: int) -> list[tuple[int, int, int]]:
    """``(index, lo, hi)`` for each span ``(offset, numel)`` of a flat layout that overlaps
    the slice [start, end): the flat range [lo, hi) of its part inside the slice. How a
    rank's slice of a flat group, or of a chunk (zero/chunks/sharding.py), cuts parameters
    into the pieces its optimizer steps."""
    result = []
    for index, (offset, numel) in enumerate(spans):
        lo, hi = max(offset, start), min(offset + numel, end)
        if lo < hi:
            result.append((index, lo, hi))
    return result
