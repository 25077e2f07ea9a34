"""A flat group: parameters that are laid out, reduced, stepped and gathered as one.

The flat store (zero/store.py) keeps every trainable parameter as a view of one flat buffer
per group. A group's layout and gradient buffers are the reducer's `Bucket`; the group itself
adds what this rank holds of the parameters and how they live, by two policies:

* ``sharded``: this rank's optimizer steps one slice of the group (ZeRO 1-3), else all of it;
* ``released``: the parameters are kept only as this rank's slice and gathered around the
  compute that needs them (ZeRO-3: the group is a unit, a block of the `ModelSpec` or the
  rest of the model), else kept whole.

Its parameters are permanent views of `flat_params`; only the buffer's storage comes and goes
(`alloc_storage` / `free_storage`), so nothing is ever re-pointed. A released group's buffer
is gathered and freed as a `GatheredChunk` of the chunk manager (zero/params.py
`unit_chunks`); a group that is not released keeps it for good.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from shardwise.distributed import comm
from shardwise.distributed.reducer import Bucket


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
    released: bool
    start: int
    """First element of the slice this rank's optimizer owns (0 unless `sharded`)."""
    end: int
    flat_params: torch.Tensor
    """The whole group's parameters, in the parameter dtype; model parameters are views. When
    `released` its storage is empty except while the group is gathered."""
    shard: torch.Tensor
    """The owned parameters in the parameter dtype: a view of `flat_params`, or when
    `released` the only persistent copy."""
    master: torch.Tensor
    """The owned slice in the master dtype (a copy, or `shard` itself)."""
    pieces: list[nn.Parameter] = field(default_factory=list)
    """What the optimizer steps: the part of each parameter inside the owned slice."""
    owners: list[nn.Parameter] = field(default_factory=list)
    """The model parameter each piece is a slice of."""
    infos: list[PieceInfo] = field(default_factory=list)
    grad_ranges: list[tuple[int, int]] = field(default_factory=list)
    """Flat range of each piece, for finding its reduced gradient."""
    name: str = ""
    """A released group's unit name (``root``, a block's)."""
    modules: list[nn.Module] = field(default_factory=list, repr=False)
    """Whose calls gather a released group (see `zero3_units`)."""

    def owned_grad(self) -> torch.Tensor:
        """The reduced gradient of the owned slice."""
        return self.bucket.reduced_range(self.start, self.end)

    def write_back(self, needs_master: bool, group: object) -> None:
        """After a step: the owned slice into the parameters, all-gathered when only the
        optimizer is sharded (a released group is gathered when it next runs)."""
        if needs_master:
            self.shard.copy_(self.master)
        if self.sharded and not self.released:
            comm.all_gather_(self.flat_params, self.shard, group)


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


def free_storage(tensor: torch.Tensor) -> None:
    """Release a tensor's memory but keep it (and every view of it) as a valid object."""
    tensor.untyped_storage().resize_(0)


def alloc_storage(tensor: torch.Tensor) -> None:
    """Give a tensor freed by `free_storage` its memory back (contents undefined)."""
    tensor.untyped_storage().resize_(tensor.numel() * tensor.element_size())
