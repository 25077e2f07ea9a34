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

from dataclasses import dataclass

import torch

from shardwise.distributed import comm
from shardwise.distributed.reducer import Bucket
from shardwise.zero.chunks.chunk import Chunk, Slot


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
    pieces: list[Slot]
    """What the optimizer steps: the part of each parameter inside the owned slice, a 1-D
    view of `master` (offsets from `start`), as a chunk's home holds them
    (`zero.chunks.chunk.cut`)."""
    owners: list[Slot]
    """The chunk's slot of the model parameter each piece is a part of."""

    def owned_grad(self) -> torch.Tensor:
        """The reduced gradient of the owned slice."""
        return self.bucket.reduced_range(self.start, self.end)

    def piece_grad(self, piece: Slot) -> torch.Tensor:
        """The reduced gradient of one of the `pieces` (flat)."""
        return self.owned_grad()[piece.offset : piece.offset + piece.numel]

    def write_back(self, needs_master: bool, group: object) -> None:
        """After a step: the owned slice into the parameters, all-gathered when the optimizer
        is sharded."""
        if needs_master:
            self.shard.copy_(self.master)
        if self.sharded:
            comm.all_gather_(self.chunk.payload, self.shard, group)
