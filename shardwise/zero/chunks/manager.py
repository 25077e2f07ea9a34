"""The chunk manager: which chunks are on the device, host or disk, within byte budgets.

PatrickStar / Colossal-AI Gemini: before a module computes, its chunks are brought to the
device (`access`); when the device budget would be exceeded, chunks that are not in use are
evicted to host memory, and from there to disk when the host budget is exceeded too. After the
module computes its chunks are released (`release`) but stay where they are until room is
needed (lazy eviction: a chunk used again soon never moves).

[Note: eviction is Belady's] The victim is the evictable chunk whose next use is furthest in
the future (Belady's OPT, optimal for a known reference string). The reference string is one
recorded step (tracer.py) given to `set_schedule`: moment t computes with chunks ``uses[t]``.
`access` calls are matched to moments as they come, so the manager knows the current moment
without the engine telling it. Steps repeat, so a chunk with no use left in this step is next
used at its first moment of the next step (the string read cyclically: at the end of
backward and in the optimizer pass the chunks the next forward starts with stay); before a
schedule exists (the warm-up step) every chunk counts as used never again. Ties go to the
least recently used. A schedule may also give a chunk budget per moment (the device budget
minus that moment's non-model data, placement.py); the budget in force is the current
moment's.

[Note: accounting] The manager counts the bytes of every chunk per tier itself (chunks are
fixed-size, so this is exact for chunk memory and independent of the allocator); the device
count never exceeds the budget in force, because room is made *before* bytes are allocated and
a move off the device frees its memory before it returns. `device_peak_bytes` is the
high-water mark of that count. The transient host buffers of moves to and from disk are not
counted: one per read, and one per write behind (at most `MAX_WRITES_BEHIND` in flight).
Nor are the freed gradient-chunk buffers a CPU keeps for reuse (`TierIO.recycle`): at most as
many of a size as were on the device at once.

[Note: chunks with a source] A gathered chunk (`GatheredChunk`: ZeRO-3's parameters
all-gathered from every rank's shard) is never copied off the device: evicting it drops its
bytes, and accessing it while FREE gathers it again. Its shard is a chunk of its own
(`Chunk.source`, the *home*: kept on the device for a ZeRO-3 unit, zero/params.py; placed in
the tiers for a full chunk of ``offload.policy``, zero/chunks/sharding.py).
Accessing the chunk accesses the home first. Prefetching it starts the all-gather when the
home is on the device (the home is held in use until the gather is done, so that nothing
moves it meanwhile; the chunk's access waits for the gather), and otherwise prefetches the
home. Every rank makes these calls alike ([Note: the same moves on every rank]), so their
all-gathers pair up. A chunk may also ask to be dropped as soon as its last user releases it
(`Chunk.frees_on_release`: a unit after its backward, and after its forward with
``zero.reshard_after_forward``) instead of staying until room is needed.
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Sequence
from typing import Literal

import torch

from shardwise.errors import ConfigError
from shardwise.zero.chunks.chunk import (
    Chunk,
    ChunkEvent,
    ChunkState,
    DiskTierLike,
    ParamInit,
    Tier,
    TierIO,
)

MAX_WRITES_BEHIND = 2
"""Moves to disk in flight at once: each holds a chunk of host memory (its staging buffer)
until its write is done."""


class ChunkManager:
    """Moves chunks between tiers around module computation; see [Note: eviction is Belady's]."""

    def __init__(
        self,
        chunks: Sequence[Chunk],
        device: torch.device | str,
        device_budget: int | None,
        host_budget: int | None,
        disk: DiskTierLike | None = None,
        param_init: ParamInit | None = None,
    ) -> None:
        """`device_budget` / `host_budget`: bytes of chunks allowed on each tier (None: no
        limit). `param_init` fills parameters still on the meta device when their chunk is
        first materialised."""
        self.chunks = list(chunks)
        self.device = torch.device(device)
        self.io = TierIO.for_device(self.device, disk)
        self.device_budget = device_budget
        self.host_budget = host_budget
        self.param_init = param_init
        self.pinned: set[int] = set()
        """Chunks never evicted (static placement)."""
        self._leaders: dict[int, int] = {}
        """Chunk -> the chunk whose scheduled uses it shares (see `follow`)."""
        self._bytes = dict.fromkeys(Tier, 0)
        for chunk in self.chunks:
            if chunk.tier is not None:
                self._bytes[chunk.tier] += chunk.nbytes
        self.device_peak_bytes = self._bytes[Tier.DEVICE]
        """High-water mark of chunk bytes on the device."""
        self.host_peak_bytes = self._bytes[Tier.HOST]
        self._tick = 0
        self._last_use = dict.fromkeys(range(len(self.chunks)), 0)
        self._uses: list[frozenset[int]] = []
        self._moments_of: dict[int, list[int]] = {}
        self._budgets: list[int] | None = None
        self._names: list[str] = []
        self._moment = 0
        self._seen: set[int] = set()
        self._writing: collections.deque[Chunk] = collections.deque()
        """Chunks whose move to disk is being written behind, oldest first."""
        largest = max((c.nbytes for c in self.chunks), default=0)
        if device_budget is not None and device_budget < largest:
            raise ConfigError(
                f"device_budget={device_budget} bytes is smaller than one chunk ({largest} "
                f"bytes); the minimum is {largest} bytes: raise the budget or lower chunk_bytes"
            )
        if self._bytes[Tier.DEVICE] > (device_budget or math.inf):
            raise ConfigError(
                f"{self._bytes[Tier.DEVICE]} bytes of chunks are already on the device, more "
                f"than device_budget={device_budget}; build the chunks FREE or on the host"
            )

    # -- schedule --------------------------------------------------------------------------

    def set_schedule(
        self,
        uses: Sequence[Sequence[int]],
        chunk_budgets: Sequence[int] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        """One step's access order: moment t computes with chunks ``uses[t]`` (indices), with
        at most ``chunk_budgets[t]`` bytes of chunks on the device; `names` label moments in
        errors. Raises `ConfigError` with the minimum budget when a moment cannot fit."""
        self._uses = [frozenset(u) for u in uses]
        self._budgets = list(chunk_budgets) if chunk_budgets is not None else None
        self._names = (
            list(names) if names is not None else [f"moment {t}" for t in range(len(uses))]
        )
        self._moments_of = {}
        for moment, used in enumerate(self._uses):
            for index in used:
                self._moments_of.setdefault(index, []).append(moment)
        self._check_schedule()
        self._moment, self._seen = 0, set()

    def _check_schedule(self) -> None:
        pinned = sum(self.chunks[i].nbytes for i in self.pinned)
        shortfall, worst = 0, None
        for moment, used in enumerate(self._uses):
            need = pinned + sum(self.chunks[i].nbytes for i in used if i not in self.pinned)
            budget = self._budget_at(moment)
            if budget is not None and need - budget > shortfall:
                shortfall, worst = need - budget, (moment, need, budget)
        if worst is None:
            return
        moment, need, budget = worst
        base = budget if self.device_budget is None else self.device_budget
        raise ConfigError(
            f"device_budget={self.device_budget} bytes leaves {budget} bytes for chunks at "
            f"{self._names[moment]}, but its chunks {sorted(self._uses[moment])} and the pinned "
            f"chunks need {need} bytes together; the minimum device_budget is "
            f"{base + shortfall} bytes (or lower chunk_bytes)"
        )

    def pin(self, chunk: Chunk) -> None:
        """Keep `chunk` on the device for good (static placement)."""
        self.pinned.add(chunk.index)
        pinned = sum(self.chunks[i].nbytes for i in self.pinned)
        largest = max((c.nbytes for c in self.chunks if c.index not in self.pinned), default=0)
        if self.device_budget is not None and pinned + largest > self.device_budget:
            raise ConfigError(
                f"pinning {len(self.pinned)} chunks ({pinned} bytes) leaves no room in "
                f"device_budget={self.device_budget} bytes to bring in a {largest}-byte chunk; "
                f"the minimum is {pinned + largest} bytes: pin fewer chunks"
            )
        if self._uses:
            self._check_schedule()

    def follow(self, chunk: Chunk, leader: Chunk) -> None:
        """Rank `chunk` for eviction by `leader`'s next use: a gradient chunk receives
        gradients while its parameter chunk computes in backward, so evicting it between two
        modules of one chunk would write it out only to read it back."""
        self._leaders[chunk.index] = leader.index

    def _budget_at(self, moment: int) -> int | None:
        """Device bytes chunks may use at `moment`: the budget, or the schedule's if lower."""
        budget = self.device_budget
        if self._budgets is not None and moment < len(self._budgets):
            scheduled = self._budgets[moment]
            budget = scheduled if budget is None else min(budget, scheduled)
        return budget

    def _advance(self, chunk: Chunk) -> None:
        """Match an access to the schedule: this moment if `chunk` is in it and not yet seen,
        else the next moment that uses it (an access the schedule lacks matches nothing)."""
        index = chunk.index
        if index in self._uses_now() and index not in self._seen:
            self._seen.add(index)
            return
        moments = self._moments_of.get(index, [])
        position = bisect.bisect_right(moments, self._moment)
        if position < len(moments):
            self._moment, self._seen = moments[position], {index}

    def _uses_now(self) -> frozenset[int]:
        return self._uses[self._moment] if self._moment < len(self._uses) else frozenset()

    def _next_use(self, chunk: Chunk) -> float:
        index = self._leaders.get(chunk.index, chunk.index)
        if index in self._uses_now() and index not in self._seen:
            return self._moment
        moments = self._moments_of.get(index, [])
        if not moments:
            return math.inf
        position = bisect.bisect_right(moments, self._moment)
        return moments[position] if position < len(moments) else moments[0] + len(self._uses)

    # -- the three calls around a module ---------------------------------------------------

    def access(self, chunk: Chunk, read_only: bool = False) -> None:
        """Before a module computes: `chunk` on the device, usable, and COMPUTE. Unless
        `read_only`, its bytes may change: a clean disk copy is dropped ([Note: clean disk
        copies] in chunk.py)."""
        self._advance(chunk)
        self._tick += 1
        self._last_use[chunk.index] = self._tick
        if chunk.state is ChunkState.FREE:
            source = chunk.source
            if source is not None:
                self.access(source, read_only=True)  # on the device while it is read
            self._make_room(chunk, chunk.nbytes)
            chunk.materialize(Tier.DEVICE, self.io, self.param_init)
            self._count(chunk, None, Tier.DEVICE)
            if source is not None:
                self.release(source, "forward")
        elif chunk.tier is not Tier.DEVICE:
            self._make_room(chunk, chunk.nbytes)
            self._move(chunk, Tier.DEVICE)
        else:
            self._make_room(chunk, 0)  # this moment's budget may be lower than the last one's
        chunk.wait(self.io)
        if not read_only:
            chunk.modified(self.io)
        chunk.apply(ChunkEvent.ACCESS)

    def release(self, chunk: Chunk, after: Literal["forward", "backward"]) -> None:
        """After a module computes; the chunk stays where it is until room is needed, or,
        released by its last user, is dropped if it asks to be ([Note: chunks with a
        source])."""
        events = {"forward": ChunkEvent.RELEASE_FWD, "backward": ChunkEvent.RELEASE_BWD}
        if after not in events:
            raise ValueError(f"release(after={after!r}): use 'forward' or 'backward'")
        chunk.apply(events[after])
        if not chunk.users and chunk.frees_on_release(after):
            self.discard(chunk)

    def prefetch(self, chunk: Chunk) -> bool:
        """Start bringing `chunk` to the device while the current module computes (the disk
        read, the copy-stream copy or the all-gather runs in the background; `access` waits
        for it). Only evicts chunks needed later than `chunk`; returns False when that leaves
        no room. A FREE chunk with a source starts gathering from it if the source is on the
        device, else prefetches the source."""
        source = chunk.source
        gathers = chunk.state is ChunkState.FREE and source is not None
        if gathers and source.tier is not Tier.DEVICE:
            return self.prefetch(source)
        if (chunk.state is ChunkState.FREE and not gathers) or chunk.tier is Tier.DEVICE:
            return False
        if not self._room_for(chunk, keep=source):
            return False
        if gathers:
            source.wait(self.io)  # its own move onto the device first
            source.apply(ChunkEvent.ACCESS)  # read by the all-gather: it stays where it is
            chunk.start_gather(finish=lambda: source.apply(ChunkEvent.RELEASE_FWD))
            self._count(chunk, None, Tier.DEVICE)
        else:
            self._move(chunk, Tier.DEVICE, non_blocking=True)
        return True

    def _room_for(self, chunk: Chunk, keep: Chunk | None) -> bool:
        """Make room for a prefetch of `chunk` by evicting only chunks needed later than it
        (never `keep`); False, evicting nothing, if that is not enough."""
        budget = self._budget_at(self._moment)
        if budget is None:
            return True
        short = self._bytes[Tier.DEVICE] + chunk.nbytes - budget
        needed_at = self._next_use(chunk)
        victims = [
            c for c in self._evictable(chunk) if c is not keep and self._next_use(c) > needed_at
        ]
        victims.sort(key=self._eviction_rank, reverse=True)
        chosen = []
        while short > 0 and victims:
            chosen.append(victims.pop(0))
            short -= chosen[-1].nbytes
        if short > 0:
            return False
        for victim in chosen:
            self._evict(victim)
        return True

    def end_step(self) -> None:
        """After the optimizer step: every move in flight done (a prefetch nothing used), every
        chunk back to HOLD, the schedule back to moment 0."""
        for chunk in self.chunks:
            chunk.wait(self.io)
        while self._writing:
            self._settle(self._writing.popleft())
        for chunk in self.chunks:
            if chunk.state is not ChunkState.FREE:
                chunk.apply(ChunkEvent.END_STEP)
        self._moment, self._seen = 0, set()

    def discard(self, chunk: Chunk) -> None:
        """Drop a released chunk's bytes (a gradient chunk the optimizer has used): FREE."""
        self._settle(chunk)
        source = chunk.tier
        chunk.discard(self.io)
        if source is not None:
            self._bytes[source] -= chunk.nbytes

    def memory_report(self) -> dict[str, int]:
        """Bytes of chunks per tier: ``{"device": ..., "host": ..., "disk": ...}``."""
        return {tier.value: self._bytes[tier] for tier in Tier}

    # -- eviction --------------------------------------------------------------------------

    def _evictable(self, incoming: Chunk) -> list[Chunk]:
        return [
            c
            for c in self.chunks
            if c.tier is Tier.DEVICE
            and c.state is not ChunkState.COMPUTE
            and c.index not in self.pinned
            and c is not incoming
        ]

    def _eviction_rank(self, chunk: Chunk) -> tuple[float, int]:
        """Larger is evicted first: furthest next use, then least recently used."""
        return self._next_use(chunk), -self._last_use[chunk.index]

    def _make_room(self, incoming: Chunk, nbytes: int) -> None:
        budget = self._budget_at(self._moment)
        if budget is None:
            return
        while self._bytes[Tier.DEVICE] + nbytes > budget:
            candidates = self._evictable(incoming)
            if not candidates:
                raise self._too_small(incoming, budget)
            self._evict(max(candidates, key=self._eviction_rank))

    def _too_small(self, incoming: Chunk, budget: int) -> ConfigError:
        evictable = self._evictable(incoming)
        stuck = [
            c
            for c in self.chunks
            if c.tier is Tier.DEVICE and c is not incoming and c not in evictable
        ]
        need = incoming.nbytes + sum(c.nbytes for c in stuck)
        return ConfigError(
            f"device_budget={self.device_budget} bytes ({budget} bytes for chunks now) cannot "
            f"hold chunk {incoming.index} ({incoming.nbytes} bytes) together with the chunks "
            f"in use or pinned {sorted(c.index for c in stuck)}; the minimum is {need} bytes: "
            "raise the device budget or lower chunk_bytes"
        )

    def _evict(self, chunk: Chunk) -> None:
        """Off the device: to host memory, spilling host chunks needed later than `chunk` to
        disk when the host budget is full, or straight to disk if that is not enough. A
        gathered chunk is dropped instead: `access` gathers it again."""
        if chunk.source is not None:
            self.discard(chunk)
            return
        self._move(chunk, self._host_or_disk(chunk), non_blocking=True)

    def _host_or_disk(self, chunk: Chunk) -> Tier:
        if self.host_budget is None or self._bytes[Tier.HOST] + chunk.nbytes <= self.host_budget:
            return Tier.HOST
        if self.io.disk is None:
            raise ConfigError(
                f"host_budget={self.host_budget} bytes is full ({self._bytes[Tier.HOST]} bytes "
                f"of chunks) and there is no disk tier for chunk {chunk.index} ({chunk.nbytes} "
                "bytes); raise host_budget or configure a disk tier"
            )
        needed_at = self._next_use(chunk)
        on_host = [c for c in self.chunks if c.tier is Tier.HOST and self._next_use(c) > needed_at]
        on_host.sort(key=self._eviction_rank, reverse=True)
        freeable = sum(c.nbytes for c in on_host)
        if self._bytes[Tier.HOST] - freeable + chunk.nbytes > self.host_budget:
            return Tier.DISK
        for spilled in on_host:
            if self._bytes[Tier.HOST] + chunk.nbytes <= self.host_budget:
                break
            self._move(spilled, Tier.DISK, non_blocking=True)
        return Tier.HOST

    def place(self, chunk: Chunk, tier: Tier) -> None:
        """Materialise a FREE chunk on `tier` (placement), within the budgets."""
        if tier is Tier.DEVICE:
            self._make_room(chunk, chunk.nbytes)
        elif tier is Tier.HOST:
            tier = self._host_or_disk(chunk)
        chunk.materialize(tier, self.io, self.param_init)
        self._count(chunk, None, tier)

    def _move(self, chunk: Chunk, to: Tier, non_blocking: bool = False) -> None:
        """`Chunk.move` with the counts kept; a move to disk with `non_blocking` is written
        behind ([Note: write-behind] in chunk.py), at most `MAX_WRITES_BEHIND` at a time."""
        self._settle(chunk)
        source = chunk.tier
        chunk.move(to, self.io, non_blocking=non_blocking)
        self._count(chunk, source, to)
        if chunk.writing is not None:
            self._writing.append(chunk)
            if len(self._writing) > MAX_WRITES_BEHIND:
                self._settle(self._writing.popleft())

    def _settle(self, chunk: Chunk) -> None:
        """Complete `chunk`'s write behind; a failed one left it in host memory: count it
        there, then raise."""
        try:
            chunk.settle()
        except Exception:
            self._count(chunk, Tier.DISK, Tier.HOST)
            raise

    def _count(self, chunk: Chunk, source: Tier | None, to: Tier) -> None:
        if source is not None:
            self._bytes[source] -= chunk.nbytes
        self._bytes[to] += chunk.nbytes
        self.device_peak_bytes = max(self.device_peak_bytes, self._bytes[Tier.DEVICE])
        self.host_peak_bytes = max(self.host_peak_bytes, self._bytes[Tier.HOST])
