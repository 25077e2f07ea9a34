"""Chunks sharded over the data-parallel ranks: ZeRO stages 1-3 for chunks (Colossal-AI
Gemini).

With N > 1 data-parallel ranks every parameter chunk is split into N equal shards and rank r
updates only shard r: its slice of the parameters (an `OwnedSlice`), of their gradients and
of their Adam states. The gradient shard is a chunk of its own in the rank's `ChunkManager`,
so it lives on the device, in host memory or on disk under the same budgets as everything
else. What the stages add to that:

    stage 3    the parameter shard is a chunk of its own (`ShardChunk`), and the full chunk
               the model computes with is gathered from the shards for each use and
               dropped after (`GatheredChunk`)
    stage 2    every rank keeps the full chunk (`ReplicaChunk`), placed and moved like one
               process's; its shard is a slice of it, updated in place, after which the
               chunk is all-gathered in place
    stage 1    as stage 2, and the full gradient chunks accumulate over the micro-batches
               and are reduced once per step, at its last backward

[Note: gather, reduce-scatter, update]

    forward / backward   a module's full chunk (`GatheredChunk`) is all-gathered from the N
                         shards when accessed FREE, or in the background when prefetched
                         while its shard is on the device, and dropped when evicted: its
                         source, the shard, still has the bytes ([Note: chunks with a
                         source], manager.py)
    gradient hooks       a parameter's gradient goes into the chunk's full gradient chunk
                         (zero-filled); once every parameter of the chunk has its gradient for
                         this backward, the full gradient chunk is reduce-scattered into this
                         rank's gradient shard (added from the second micro-batch on), divided
                         by N, and freed (`ShardedGrads`); with no device budget (ZeRO-3's
                         units) in the background, finished before the next one starts
    optimizer pass       each home with its gradient shard: the update touches 1/N of the
                         chunk; the full chunk gathered before it is stale from then and freed
                         (stage 3), or, being the home, all-gathered in place from the updated
                         slices before it is released (stages 1 and 2)

[Note: the same moves on every rank] Every rank must reach the collectives in the same
order: gathers follow the accesses, which the model fixes, and the evictions, which the
manager decides from budgets and a schedule that are the same on every rank (the auto policy
takes each traced moment's non-model bytes as the largest over the ranks) and from what is on
the device. So every rank makes the same manager calls on chunks of the same sizes, whatever
its shards hold: a shard of padding only (no parameter of the chunk reaches it) is still
brought in by the optimizer pass with its gradient shard, and by fp16's unscale pass, and a
shard the optimizer has no state for is visited in its turn (`ChunkStore.update`). Before
that, such a shard left one rank with other chunks on the device after the update; the next
step evicted (dropped) a different full chunk on each rank and the gathers paired up wrongly:
a hang at one device budget, silently wrong weights at another.

Reduce-scatters follow the completion of gradient chunks in backward: every rank's backward
must give gradients to the same parameters, as for DDP without ``find_unused_parameters``.
Chunks some of whose parameters got no gradient are reduced at the end of the backward, in
chunk order (stage 1: every chunk, at the end of the step's last backward). Full chunks kept
whole (stages 1 and 2) move between tiers without collectives, so each rank may place them as
its own memory asks; their all-gathers after the update run in chunk order on every rank.

With hierarchical data parallelism (``parallel.dp_replicate`` > 1) the chunks are sharded
within ``dp_shard`` and every replica group all-reduces its gradient shards after the
reduce-scatter (HSDP); gathers, norms and overflow flags stay within the shard group, whose
replicas hold identical shards.

The global gradient norm is the square root of the all-reduced sum of the squared norms of
each rank's gradient pieces (`ChunkStore.grad_norm`): equal to a single process's up to
summation order (not bit for bit, as the one-process path is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from shardwise.distributed import comm
from shardwise.zero.chunks.chunk import (
    Chunk,
    ChunkState,
    GatheredChunk,
    GradChunk,
    OwnedSlice,
    ParamInit,
    Slot,
    Tier,
    TierIO,
    cut,
)
from shardwise.zero.chunks.grads import GradChunks, grad_norms
from shardwise.zero.chunks.manager import ChunkManager


@dataclass(eq=False)
class SeededChunk(Chunk):
    """A chunk whose first values are given (`initial`, dropped once it is materialised)
    rather than read from its parameters."""

    initial: torch.Tensor | None = field(default=None, repr=False)

    def _fill(self, flat: torch.Tensor, param_init: ParamInit | None) -> None:
        flat.copy_(self.initial)
        self.initial = None


@dataclass(eq=False)
class ShardChunk(SeededChunk):
    """This rank's shard of a gathered chunk (ZeRO-3), its home. Its slots are *pieces*: 1-D
    parameters of their own (what the optimizer updates), one per parameter of the chunk
    that overlaps the shard."""


@dataclass(eq=False)
class ReplicaChunk(SeededChunk):
    """A full parameter chunk every rank keeps whole (ZeRO stages 1 and 2): placed and moved
    like a chunk of one process, with no collective to bring it in. It is its own home: this
    rank's optimizer steps `pieces` that view its payload, as the parameters do, and after
    each update the chunk is all-gathered in place from the ranks' updated slices
    (`ChunkStore`)."""

    pieces: list[Slot] = field(default_factory=list, repr=False)
    """This rank's optimizer pieces at their offsets in the chunk."""

    def _views(self) -> list[Slot]:
        return [*self.slots, *self.pieces]


def shard_chunks(
    chunks: Sequence[Chunk],
    group: object,
    io: TierIO,
    param_init: ParamInit | None,
    *,
    gathered: bool,
    frees_after: frozenset[str] = frozenset(),
) -> tuple[list[GatheredChunk] | list[ReplicaChunk], list[OwnedSlice]]:
    """Turn `chunks` (indices 0..n-1, capacities divisible by the group size) into full
    chunks with the same indices, `gathered` (ZeRO-3) or kept whole (`ReplicaChunk`, stages 1
    and 2), and the slice of each this rank's optimizer updates: with `gathered` its home is
    this rank's FREE shard, a chunk of its own with index 2n..3n-1 (the full gradient chunks
    take n..2n-1), else the full chunk. `frees_after`: see `GatheredChunk`. Builds one chunk
    at a time in host memory."""
    size, rank, n = comm.group_size(group), comm.group_rank(group), len(chunks)
    fulls, slices = [], []
    for chunk in chunks:
        if chunk.numel % size:
            raise ValueError(
                f"chunk {chunk.index}: {chunk.numel} elements do not split {size} ways"
            )
        values = _first_values(chunk, io, param_init)
        numel = chunk.numel // size
        lo, hi = rank * numel, (rank + 1) * numel
        pieces, owners = cut(
            chunk.slots,
            lo,
            hi,
            lambda slot, start, end: nn.Parameter(
                torch.empty(end - start, dtype=slot.param.dtype, device="meta")
            ),
        )
        fields = (chunk.index, chunk.key, chunk.numel, chunk.dtype, chunk.slots)
        if gathered:  # refilled in place: the parameters view this payload
            home = ShardChunk(
                2 * n + chunk.index,
                f"shard.{chunk.index}",
                numel,
                chunk.dtype,
                pieces,
                initial=values[lo:hi].clone(),
            )
            full = GatheredChunk(
                *fields, payload=chunk.payload, home=home, group=group, frees_after=frees_after
            )
            offset = 0
        else:
            in_chunk = [dataclasses.replace(piece, offset=lo + piece.offset) for piece in pieces]
            full = home = ReplicaChunk(*fields, initial=values, pieces=in_chunk)
            offset = lo
        fulls.append(full)
        slices.append(OwnedSlice(home, offset, numel, lo, pieces, owners))
    return fulls, slices


def slice_grad_chunks(
    slices: Sequence[OwnedSlice], first_index: int, dtype: torch.dtype
) -> list[GradChunk]:
    """FREE gradient chunks of the owned slices, indices from `first_index`: the size of a
    slice, its pieces as slots (`ShardedGrads` reduce-scatters into them)."""
    return [
        GradChunk(first_index + i, f"grads.slice.{i}", owned.numel, dtype, owned.pieces)
        for i, owned in enumerate(slices)
    ]


def _first_values(chunk: Chunk, io: TierIO, param_init: ParamInit | None) -> torch.Tensor:
    """The whole chunk's first values in host memory (its parameters' own, or `param_init`'s),
    the chunk left FREE with its parameters viewing an empty payload."""
    chunk.materialize(Tier.HOST, io, param_init)
    values = chunk.host
    chunk.discard(io)
    return values


class ShardedGrads(GradChunks):
    """Gradients of sharded chunks: `chunks` are this rank's gradient shards (their slots the
    pieces, as for the parameter shards), filled by reduce-scattering the `full` gradient
    chunks (zero-filled, one per gathered chunk); see [Note: gather, reduce-scatter, update]."""

    def __init__(
        self,
        shards: Sequence[ShardChunk],
        chunks: Sequence[GradChunk],
        full: Sequence[GradChunk],
        manager: ChunkManager,
        group: object,
        replicate: object | None = None,
        *,
        reduce_every_backward: bool = True,
        overlap: bool = False,
    ) -> None:
        """`replicate`: ranks holding the same shards as this one (hierarchical data
        parallelism); each gradient shard is all-reduced over them. Unless
        `reduce_every_backward`, the full gradient chunks accumulate over the step's
        backwards and are reduced at its last one (stage 1)."""
        super().__init__(shards, chunks, manager)
        self.reduce_every_backward = reduce_every_backward
        self.overlap = overlap
        """Reduce-scatters run in the background (no device budget: nothing else needs the
        room the chunk in flight holds)."""
        self._in_flight: tuple[int, object, torch.Tensor, bool] | None = None
        """The reduction started last and not finished: chunk index, its work, the tensor it
        reduces into, whether that is the shard itself (the step's first)."""
        self.full = list(full)
        self.group = group
        replicas = comm.group_size(replicate) if replicate is not None else 1
        self.replicate = replicate if replicas > 1 else None
        self.size = comm.group_size(group) * replicas
        """Ranks whose gradients are averaged."""
        self._full_of = {id(s.param): (i, s) for i, c in enumerate(self.full) for s in c.slots}
        self._waiting: dict[int, set[int]] = {}
        """Full gradient chunk -> parameters whose gradient this backward has not brought."""

    @torch.no_grad()
    def accumulate(self, param: nn.Parameter) -> None:
        """Add ``param.grad`` into its full gradient chunk (zero-filled when it is
        materialised) and drop it; reduce the chunk once it is complete for this backward,
        if every backward reduces."""
        i, slot = self._full_of[id(param)]
        chunk = self.full[i]
        grad, param.grad = param.grad, None
        waiting = self._waiting.setdefault(i, {id(s.param) for s in chunk.slots})
        self.manager.access(chunk)
        chunk.grad_view(slot).add_(grad)
        self.manager.release(chunk, "backward")
        waiting.discard(id(param))
        if not waiting and self.reduce_every_backward:
            self._reduce(i)

    def finish_backward(self, last: bool) -> None:
        """Reduce, in chunk order, the chunks some of whose parameters got no gradient in
        this backward, or, at the step's `last` backward of stage 1, every chunk that got
        gradients in the step."""
        if self.reduce_every_backward or last:
            for i in sorted(self._waiting):
                self._reduce(i)
        self.settle()

    @torch.no_grad()
    def _reduce(self, i: int) -> None:
        """Start reducing full gradient chunk `i` into its shard, after finishing the one
        before; with `overlap` it runs while backward goes on, else it is finished at once."""
        del self._waiting[i]
        self.settle()
        full, shard = self.full[i], self.chunks[i]
        self.manager.access(full)
        self.manager.access(shard)
        first = not shard.slots or id(shard.slots[0].param) not in self.written
        part = shard.payload.data if first else torch.empty_like(shard.payload)
        work = comm.reduce_scatter_(part, full.payload, self.group, async_op=self.overlap)
        self._in_flight = (i, work, part, first)
        if not self.overlap:
            self.settle()

    @torch.no_grad()
    def settle(self) -> None:
        """Finish the reduction in flight, if any: average it into the shard, note its
        pieces' norms, and free the full gradient chunk."""
        if self._in_flight is None:
            return
        i, work, part, first = self._in_flight
        self._in_flight = None
        if work is not None:
            work.wait()
        full, shard = self.full[i], self.chunks[i]
        if self.replicate is not None:
            comm.all_reduce_(part, self.replicate)
        part.div_(self.size)
        if not first:
            shard.payload.add_(part)
        views = [shard.grad_view(s) for s in shard.slots]
        for s, norm in zip(shard.slots, grad_norms(views), strict=True):
            self.written.add(id(s.param))
            self.norms[id(s.param)] = norm
        self.manager.release(shard, "backward")
        self.manager.release(full, "backward")
        self.manager.discard(full)

    def bytes_per_tier(self) -> dict[Tier, int]:
        shards = super().bytes_per_tier()
        return {t: shards[t] + sum(c.nbytes for c in self.full if c.tier is t) for t in Tier}

    def end_step(self) -> None:
        for chunk in self.full:
            if chunk.state is not ChunkState.FREE:
                self.manager.discard(chunk)
        self._waiting.clear()
        super().end_step()
