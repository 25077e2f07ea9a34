"""Placement policies: where chunks start and what may never leave the device.

Two policies, as in Colossal-AI Gemini:

- ``static``: fixed fractions. `param_device_fraction` of the chunks are pinned on the device
  for the whole run and the rest stream through it; `optim_device_fraction` of the chunks keep
  their optimizer states on the device (Colossal-AI's shard/offload fractions, stated as what
  stays rather than what leaves). The pinned chunks are the *last* in execution order: they run
  at the end of forward and again at the start of backward, the shortest reuse distance in the
  step, so streaming them would move the most bytes for the least memory.
- ``auto``: from a traced warm-up step (tracer.py). At each moment the device budget left for
  chunks is the device budget minus that moment's non-model data; the manager keeps what fits
  and evicts the chunk needed furthest ahead. Chunks start on the device in order of first use
  until the first moment's budget is full.

Colossal-AI users hit out-of-memory errors with auto placement and could not tell which knob to
turn (#2246, #5030): here a budget too small for some moment is a `ConfigError` naming the
moment, its non-model bytes and the minimum device budget, and `placement_summary` says what
was decided.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from shardwise.distributed.comm import format_bytes
from shardwise.errors import ConfigError
from shardwise.zero.chunks.chunk import Chunk, ChunkState, Tier
from shardwise.zero.chunks.manager import ChunkManager
from shardwise.zero.chunks.tracer import MemoryTrace


@dataclass(frozen=True)
class Placement:
    """A placement decision, applied to a manager by `apply_placement`."""

    policy: Literal["static", "auto"]
    tiers: tuple[Tier, ...]
    """Where each chunk is materialised."""
    pinned: frozenset[int]
    """Chunks that never leave the device."""
    optim_on_device: tuple[bool, ...] | None
    """Per chunk: its optimizer states stay on the device; None: they follow the chunk."""
    device_budget: int | None
    """Bytes of device memory for chunks (static) or for everything (auto)."""
    trace: MemoryTrace | None = None
    chunk_budgets: tuple[int, ...] | None = None
    """Per traced moment: device bytes chunks may use (auto)."""


def _last_fraction(count: int, fraction: float, what: str) -> frozenset[int]:
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"{what}={fraction} is not a fraction; use a value in [0, 1]")
    keep = round(fraction * count)
    return frozenset(range(count - keep, count))


def static_placement(
    chunks: Sequence[Chunk],
    param_device_fraction: float,
    optim_device_fraction: float,
    device_budget: int | None = None,
) -> Placement:
    """Pin the last `param_device_fraction` of the chunks (by count, in execution order) on
    the device, start the rest on the host; keep the optimizer states of the last
    `optim_device_fraction` on the device."""
    pinned = _last_fraction(len(chunks), param_device_fraction, "param_device_fraction")
    optim = _last_fraction(len(chunks), optim_device_fraction, "optim_device_fraction")
    tiers = tuple(Tier.DEVICE if c.index in pinned else Tier.HOST for c in chunks)
    optim_on_device = tuple(c.index in optim for c in chunks)
    return Placement("static", tiers, pinned, optim_on_device, device_budget)


def on_the_device(count: int) -> Placement:
    """Every chunk pinned on the device, with no budget (ZeRO-3's units without
    ``offload.policy``: zero/params.py)."""
    tiers = (Tier.DEVICE,) * count
    return Placement("static", tiers, frozenset(range(count)), None, None)


def auto_placement(
    chunks: Sequence[Chunk], trace: MemoryTrace, device_budget: int, margin_bytes: int = 0
) -> Placement:
    """Chunk budgets per moment from `trace`: ``device_budget - non_model - margin_bytes``
    (`margin_bytes` absorbs allocator fragmentation and step-to-step variation)."""
    budgets, worst, shortfall = [], None, 0
    for t, moment in enumerate(trace.moments):
        budget = device_budget - moment.non_model_bytes - margin_bytes
        working_set = sum(chunks[i].nbytes for i in set(moment.chunks))
        budgets.append(budget)
        if working_set - budget > shortfall:
            worst, shortfall = (t, working_set), working_set - budget
    if worst is not None:
        t, working_set = worst
        moment = trace.moments[t]
        raise ConfigError(
            f"device_budget={device_budget} bytes is too small for auto placement: at "
            f"{moment.module} {moment.phase} non-model data takes {moment.non_model_bytes} "
            f"bytes (margin {margin_bytes}) and its chunks {list(moment.chunks)} need "
            f"{working_set} bytes; the minimum device_budget is {device_budget + shortfall} "
            "bytes (or lower chunk_bytes, the batch size or the sequence length)"
        )
    first_use = {}
    for t, moment in enumerate(trace.moments):
        for index in moment.chunks:
            first_use.setdefault(index, t)
    on_device, room = set(), budgets[0] if budgets else device_budget
    for index in sorted(first_use, key=first_use.get):
        if chunks[index].nbytes > room:
            break
        on_device.add(index)
        room -= chunks[index].nbytes
    tiers = tuple(Tier.DEVICE if c.index in on_device else Tier.HOST for c in chunks)
    return Placement("auto", tiers, frozenset(), None, device_budget, trace, tuple(budgets))


def apply_placement(
    manager: ChunkManager, placement: Placement, homes: Sequence[Chunk] | None = None
) -> None:
    """Pin, materialise FREE chunks where the placement says (chunks that already have bytes,
    e.g. after a warm-up step, stay and move lazily), and give the manager the schedule.
    `homes`: the chunks the placement's positions stand for, if not the manager's first ones
    (the shards of sharded chunks, sharding.py)."""
    homes = manager.chunks if homes is None else homes
    for index in sorted(placement.pinned):
        manager.pin(homes[index])
    # Off the device first: each briefly needs a chunk of device memory (Chunk.materialize).
    order = sorted(range(len(placement.tiers)), key=lambda i: placement.tiers[i] is Tier.DEVICE)
    for index in order:
        if homes[index].state is ChunkState.FREE:
            manager.place(homes[index], placement.tiers[index])
    if placement.trace is not None:
        manager.set_schedule(
            placement.trace.uses(), placement.chunk_budgets, placement.trace.names()
        )


def placement_summary(chunks: Sequence[Chunk], placement: Placement) -> str:
    """A few lines for the log: what the placement decided and why."""
    total = sum(c.nbytes for c in chunks)
    padding = sum(c.nbytes - c.used_numel * c.dtype.itemsize for c in chunks)
    size = format_bytes(chunks[0].nbytes) if chunks else "0 B"
    budget = (
        "unlimited" if placement.device_budget is None else format_bytes(placement.device_budget)
    )
    starts = [i for i, tier in enumerate(placement.tiers) if tier is Tier.DEVICE]
    lines = [
        f"placement {placement.policy}: {len(chunks)} chunks x {size} = {format_bytes(total)} "
        f"({format_bytes(padding)} padding); device budget {budget}",
        f"  start on device: {_ranges(starts)}; on host: "
        + _ranges([c.index for c in chunks if c.index not in starts]),
        f"  pinned on device: {_ranges(sorted(placement.pinned))} "
        f"({format_bytes(sum(chunks[i].nbytes for i in placement.pinned))})",
    ]
    if placement.optim_on_device is not None:
        optim = [i for i, on in enumerate(placement.optim_on_device) if on]
        lines.append(f"  optimizer states on device: {_ranges(optim)}")
    if placement.trace is not None and placement.chunk_budgets:
        moments, budgets = placement.trace.moments, placement.chunk_budgets
        peak = max(range(len(moments)), key=lambda t: moments[t].non_model_bytes)
        low = min(range(len(budgets)), key=budgets.__getitem__)
        lines += [
            f"  traced {len(moments)} moments; peak non-model "
            f"{format_bytes(moments[peak].non_model_bytes)} at {moments[peak].module} "
            f"{moments[peak].phase}",
            f"  chunk budget per moment: min {format_bytes(budgets[low])} at {moments[low].module} "
            f"{moments[low].phase}, max {format_bytes(max(budgets))}",
        ]
    return "\n".join(lines)


def _ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "chunks 0-2, 5"; [] -> "none"."""
    if not indices:
        return "none"
    parts, start = [], indices[0]
    for prev, cur in zip(indices, [*indices[1:], math.inf], strict=True):
        if cur != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return "chunks " + ", ".join(parts)
