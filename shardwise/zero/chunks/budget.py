"""What a step with given chunks needs of the device: the smallest device budget it can run
in (before any step: chunk sizes and the static policy), the budget the auto policy's warm-up
step measured, and whether the chunks fit in device and host memory at all.

Sizes per chunk index: a *home* is what the placement places and the optimizer pass opens
(the chunk, or at ZeRO-3 this rank's shard of it); gradient chunks are in the reduce dtype,
and what the optimizer reads of them is this rank's slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from shardwise.errors import ConfigError
from shardwise.zero.chunks.chunk import Chunk
from shardwise.zero.chunks.packing import chunks_of_modules, held_chunks
from shardwise.zero.chunks.tracer import MemoryTrace

MIB = 2**20


@dataclass(frozen=True)
class ChunkBytes:
    """The device bytes of a step over `chunks` (see the module docstring)."""

    model: nn.Module
    chunks: Sequence[Chunk]
    ranks: int
    """Ranks each chunk is sharded over (1: the optimizer updates whole chunks)."""
    sharded: bool
    """Gradients are reduced over ranks (shards or replicas)."""
    gathered: bool
    """ZeRO-3: full chunks gathered from the shards (the homes) for each use."""
    grad_dtype: torch.dtype

    def home(self, index: int) -> int:
        """Bytes of the home of chunk `index`: the chunk, or this rank's shard of it."""
        return self.chunks[index].nbytes // (self.ranks if self.gathered else 1)

    def grad(self, index: int) -> int:
        """Bytes of the gradient chunk of chunk `index` (in the reduce dtype)."""
        return self.chunks[index].numel * self.grad_dtype.itemsize

    def largest(self, size: Callable[[int], int]) -> int:
        """The largest of `size` (`home`, `grad`) over the chunks."""
        return max(size(i) for i in range(len(self.chunks)))

    def update(self) -> int:
        """Device bytes of the optimizer pass beside pinned chunks: a home and the gradients
        of this rank's slice of it."""
        return self.largest(self.home) + self.largest(self.grad) // self.ranks

    def minimum(self, pinned: frozenset[int]) -> tuple[int, str]:
        """The smallest device budget for chunks a step runs in, and why: in backward the
        pinned homes, the chunks held through backward (`held_chunks`), the other chunks of
        the module that computes with the most bytes of them and one gradient chunk (sharded:
        and a gradient shard being reduced into; ZeRO-3: and a shard being gathered); in the
        optimizer pass the pinned homes and `update`."""
        on_device = frozenset() if self.gathered else pinned  # pinned shards gather anyway
        held = held_chunks(self.model, self.chunks) - on_device
        base = sum(self.home(i) for i in pinned)
        base += sum(self.chunks[i].nbytes for i in held)
        modules = chunks_of_modules(self.model, self.chunks)
        working = {
            name: sum(self.chunks[i].nbytes for i in used if i not in on_device | held)
            for name, used in modules.items()
        }
        module = max(working, key=working.get)
        grad = self.largest(self.grad)
        why = [f"{module!r} computes with chunks {list(modules[module])}"]
        if pinned:
            pinned_what = "shards of chunks" if self.gathered else "chunks"
            why.append(f"{pinned_what} {sorted(pinned)} are pinned")
        if held:
            why.append(f"chunks {sorted(held)} are held through backward (tied parameters)")
        why.append(f"one gradient chunk ({grad} bytes) receives gradients beside them")
        shards = (self.largest(self.home) if self.gathered else 0) + (
            grad // self.ranks if self.sharded else 0
        )
        if self.gathered:
            why.append(f"a shard is gathered and a gradient shard reduced into ({shards} bytes)")
        elif self.sharded:
            why.append(f"a gradient shard is reduced into ({shards} bytes)")
        update = sum(self.home(i) for i in pinned) + self.update()
        return max(base + working[module] + grad + shards, update), "; ".join(why)

    def check_trace(self, trace: MemoryTrace, budget: int, budget_mb: float) -> None:
        """The minimum device budget the warm-up measured: at each moment its non-model bytes
        plus its chunks, and in backward the chunks held through it (`held_chunks`) and one
        gradient chunk, which `auto_placement` does not know about; the optimizer pass (one
        chunk and its gradient chunk, beside the first or last moment's non-model bytes, whose
        budget is in force then). One error naming the minimum, if `budget` (``offload.
        device_budget_mb`` = `budget_mb`) is below it."""
        held = held_chunks(self.model, self.chunks)
        grad = self.largest(self.grad)
        gathered = self.largest(self.home) if self.gathered else 0  # a shard gathered from
        reduced = grad // self.ranks if self.sharded else 0  # a gradient shard reduced into
        need, worst = 0, None
        for moment in trace.moments:
            backward = moment.phase == "backward"
            used = set(moment.chunks) | (held if backward else set())
            moment_need = moment.non_model_bytes + sum(self.chunks[i].nbytes for i in used)
            moment_need += gathered + (grad + reduced if backward else 0)
            if moment_need > need:
                need, worst = moment_need, (moment, sorted(used))
        update = self.update()
        for moment in trace.moments[:1] + trace.moments[-1:]:
            if moment.non_model_bytes + update > need:
                need, worst = moment.non_model_bytes + update, (moment, "the optimizer pass")
        if worst is not None and need > budget:
            moment, used = worst
            raise ConfigError(
                f"offload.device_budget_mb={budget_mb:g} is below the "
                f"minimum {mib_up(need)} MiB ({need} bytes) the warm-up step measured: at "
                f"{moment.module} {moment.phase} activations take {moment.non_model_bytes} "
                f"bytes beside chunks {used} (and a gradient chunk in backward); raise "
                "offload.device_budget_mb or lower the batch size or sequence length"
            )

    def check_capacity(self, device_budget: int | None, host_budget: int | None) -> None:
        """Without a disk tier, homes and the gradients of this rank's slices must fit in the
        device and host budgets together."""
        indices = range(len(self.chunks))  # homes and their gradients, backward..update
        total = sum(self.home(i) + self.grad(i) // self.ranks for i in indices)
        if host_budget is not None and device_budget is not None:
            if total > device_budget + host_budget:
                raise ConfigError(
                    f"parameter and gradient chunks take {total / MIB:.4g} MiB, more than "
                    f"offload.device_budget_mb + offload.host_budget_mb = "
                    f"{(device_budget + host_budget) / MIB:.4g} MiB; set offload.disk_path or "
                    "raise offload.host_budget_mb"
                )


def mib_up(nbytes: int) -> str:
    """`nbytes` in MiB, rounded up to 4 decimals: a budget set to the printed value suffices."""
    return f"{math.ceil(nbytes / MIB * 10_000) / 10_000:g}"
