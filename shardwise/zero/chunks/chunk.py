"""Chunks: parameters packed in execution order into fixed-size flat buffers that move as units.

PatrickStar (Fang et al., 2021) and Colossal-AI Gemini keep parameters in *chunks* rather than
tensor by tensor: a chunk moves between the device, host memory and disk as one large transfer,
and equal-sized chunks recycle each other's memory without fragmentation. Parameters are packed
in the order the model first uses them, so one module's parameters sit together and the chunk
after the current one is the one needed next (which is what makes prefetching pay). This
module is a chunk's life (tiers, states, moves); packing.py builds them.

[Note: tier and state] Two independent things describe a chunk. Its *tier* is where its bytes
are (DEVICE, HOST, DISK, or nowhere while FREE); its *state* is how it is being used. States
follow Gemini's tensor states and move only along `_TRANSITIONS`:

    FREE --materialize--> HOLD
    HOLD | HOLD_AFTER_FWD | HOLD_AFTER_BWD --access--> COMPUTE
    COMPUTE --access--> COMPUTE                    (another module uses it meanwhile: counted)
    COMPUTE --release_fwd--> HOLD_AFTER_FWD        (when its last user releases it)
    COMPUTE --release_bwd--> HOLD_AFTER_BWD
    HOLD | HOLD_AFTER_FWD | HOLD_AFTER_BWD --end_step--> HOLD
    HOLD | HOLD_AFTER_FWD | HOLD_AFTER_BWD --discard--> FREE   (gradient chunks, once used)

Tier moves follow `_TIER_MOVES` and are refused while the chunk is COMPUTE (a module is reading
its parameters) or FREE (there are no bytes to move).

[Note: clean disk copies] Reading a chunk from disk keeps its file: while the chunk is
unchanged (`on_disk`), leaving for disk again writes nothing, which is most evictions of
parameter chunks (forward and backward only read them; the optimizer pass changes them once
per step). Whoever changes a chunk's bytes calls `modified` first (the manager's `access` does,
unless told the access only reads), which deletes the stale file.

[Note: write-behind] A move to disk with ``non_blocking`` returns once the write is issued
(the payload's device memory is free at once; a host buffer holds the bytes until the write is
done) and leaves the chunk DISK with a `writing`. `settle` completes it; reading the chunk
back, discarding it and a blocking move settle first. A write that failed (the disk is full)
puts the chunk back in host memory from its buffer before the error is raised, so no bytes
are lost; the manager settles its writes in order, at most a few in flight, and all of them
at the end of a step.

[Note: parameters are permanent views] Each parameter's ``.data`` is a view of the chunk's
`payload`, a flat buffer on the compute device. Only the payload's storage comes and goes
(`alloc_storage` / `free_storage`): it is allocated while the tier is DEVICE and resized to
zero otherwise, so modules, optimizers and tied weights keep pointing at the same Parameter
objects. Reading a parameter of a chunk that is not on the device is a bug in the caller (on
CPU it crashes the process), which is why modules must `access` their chunks first.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from shardwise.accelerator import get_accelerator
from shardwise.distributed import comm
from shardwise.errors import ConfigError
from shardwise.zero.module_hooks import in_backward

ParamInit = Callable[[str, torch.Tensor], None]
"""Fills the parameter of the given name in place (e.g. ``GPT.init_parameter``)."""


def free_storage(tensor: torch.Tensor) -> None:
    """Release a tensor's memory but keep it (and every view of it) as a valid object."""
    tensor.untyped_storage().resize_(0)


def alloc_storage(tensor: torch.Tensor) -> None:
    """Give a tensor freed by `free_storage` its memory back (contents undefined)."""
    tensor.untyped_storage().resize_(tensor.numel() * tensor.element_size())


class Tier(enum.Enum):
    """Where a chunk's bytes are."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


class ChunkState(enum.Enum):
    """How a chunk is being used (Gemini's tensor states, for the whole chunk)."""

    FREE = "free"
    """No storage anywhere yet."""
    HOLD = "hold"
    """Has bytes somewhere; not used since the step began."""
    COMPUTE = "compute"
    """A module is using its parameters: must stay on the device."""
    HOLD_AFTER_FWD = "hold_after_fwd"
    """Used by this step's forward; evictable."""
    HOLD_AFTER_BWD = "hold_after_bwd"
    """Used by this step's backward (its gradients are final); evictable."""


class ChunkEvent(enum.Enum):
    MATERIALIZE = "materialize"
    ACCESS = "access"
    RELEASE_FWD = "release_fwd"
    RELEASE_BWD = "release_bwd"
    END_STEP = "end_step"
    DISCARD = "discard"


_S, _E = ChunkState, ChunkEvent
_HOLDING = (_S.HOLD, _S.HOLD_AFTER_FWD, _S.HOLD_AFTER_BWD)

_TRANSITIONS: dict[tuple[ChunkState, ChunkEvent], ChunkState] = {
    (_S.FREE, _E.MATERIALIZE): _S.HOLD,
    **{(state, _E.ACCESS): _S.COMPUTE for state in _HOLDING},
    (_S.COMPUTE, _E.ACCESS): _S.COMPUTE,
    (_S.COMPUTE, _E.RELEASE_FWD): _S.HOLD_AFTER_FWD,
    (_S.COMPUTE, _E.RELEASE_BWD): _S.HOLD_AFTER_BWD,
    **{(state, _E.END_STEP): _S.HOLD for state in _HOLDING},
    **{(state, _E.DISCARD): _S.FREE for state in _HOLDING},
}

_TIER_MOVES = {
    (Tier.DEVICE, Tier.HOST),
    (Tier.HOST, Tier.DEVICE),
    (Tier.HOST, Tier.DISK),
    (Tier.DISK, Tier.HOST),
    (Tier.DEVICE, Tier.DISK),
    (Tier.DISK, Tier.DEVICE),
}
"""Every tier to every other: device <-> disk goes through a transient host buffer, not the
host tier, so it needs no room in the host budget."""


class ChunkStateError(RuntimeError):
    """An illegal chunk transition or move: a bug in the caller's hooks, never a user error."""


class DiskTierLike(Protocol):
    """What the manager needs from the disk tier (zero/offload/disk.py `DiskTier`): `write`
    and `read` of host tensors, returning futures; a write's source stays unchanged until its
    future is done."""

    def write(self, key: str, tensor: torch.Tensor) -> Future: ...

    def read(self, key: str, out: torch.Tensor) -> Future: ...

    def discard(self, key: str) -> Future: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives inside its chunk."""

    name: str
    param: nn.Parameter = field(repr=False)  # printing an evicted one would crash
    offset: int
    """First element in the chunk's payload."""
    numel: int


def cut(
    slots: Sequence[Slot], start: int, end: int, piece_of: Callable[[Slot, int, int], nn.Parameter]
) -> tuple[list[Slot], list[Slot]]:
    """A rank's slice [start, end) of a chunk cut into the pieces its optimizer steps: for each
    of the chunk's `slots` overlapping the slice, a slot of the slice (offsets from `start`)
    holding ``piece_of(slot, lo, hi)``, the parameter stepped for the chunk's elements
    [lo, hi); and, in a second list, the slot it is a piece of (its owner)."""
    pieces, owners = [], []
    for slot in slots:
        lo, hi = max(slot.offset, start), min(slot.offset + slot.numel, end)
        if lo < hi:
            name = f"{slot.name}[{lo - slot.offset}:{hi - slot.offset}]"
            pieces.append(Slot(name, piece_of(slot, lo, hi), lo - start, hi - lo))
            owners.append(slot)
    return pieces, owners


@dataclass(frozen=True)
class PieceInfo:
    """Which global slice of which parameter an optimizer piece holds (what a checkpoint
    saves, so that a later resharding can map it to any layout)."""

    name: str
    """Parameter name in the model (the first name of a tied parameter)."""
    start: int
    """First element of the slice, in the flattened parameter."""
    end: int
    """One past the last element of the slice."""

    @classmethod
    def of(cls, name: str, piece: Slot, owner: Slot, start: int) -> PieceInfo:
        """`piece`'s: a slot of the slice beginning at element `start` of the chunk holding
        `owner`, the slot of the parameter `name` it is a piece of."""
        first = start + piece.offset - owner.offset
        return cls(name, first, first + piece.numel)


@dataclass(frozen=True)
class OwnedSlice:
    """What a rank's optimizer updates of one chunk: elements [offset, offset + numel) of its
    *home*'s payload, cut into `pieces` (`cut`). The home is the chunk itself (in one
    process, or where every rank keeps the full chunk: ZeRO 1-2), or this rank's shard of it,
    a chunk of its own (ZeRO-3)."""

    home: Chunk
    offset: int
    """First element of the slice in the home's payload."""
    numel: int
    first: int
    """First element of the slice in the full chunk (what `PieceInfo.of` counts from)."""
    pieces: list[Slot]
    """What the optimizer steps, offsets from the slice's first element: the chunk's own
    slots where the slice is the whole chunk."""
    owners: list[Slot]
    """Per piece, the chunk's slot of the parameter it is a part of."""

    @classmethod
    def whole(cls, chunk: Chunk) -> OwnedSlice:
        """All of `chunk`, its parameters stepped as they are."""
        return cls(chunk, 0, chunk.numel, 0, chunk.slots, chunk.slots)

    def view(self) -> torch.Tensor:
        """The slice of the home's payload (on the device while the home is)."""
        return self.home.payload[self.offset : self.offset + self.numel]


@dataclass
class TierIO:
    """What moving bytes between tiers needs: the device, the disk tier, pinning, a copy stream."""

    device: torch.device
    disk: DiskTierLike | None = None
    pin_memory: bool = False
    """Allocate host buffers pinned (only where the accelerator has pinned memory)."""
    copy_stream: object | None = None
    """A device stream for asynchronous host-to-device copies; None on CPU (copies are sync)."""
    recycles: bool = False
    """Keep freed device buffers for reuse (`recycle`): where the allocator does not."""
    recycled: dict[tuple[int, torch.dtype], list[torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def for_device(cls, device: torch.device, disk: DiskTierLike | None = None) -> TierIO:
        on_accelerator = device.type != "cpu"
        accelerator = get_accelerator()
        pin = on_accelerator and accelerator.supports_pinned_memory
        stream = torch.get_device_module(device).Stream(device) if on_accelerator else None
        recycles = not (on_accelerator and accelerator.caches_allocations)
        return cls(device, disk, pin_memory=pin, copy_stream=stream, recycles=recycles)

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=self.pin_memory)

    def device_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer on the device, contents undefined: a recycled one of this size if any."""
        kept = self.recycled.get((numel, dtype))
        if kept:
            return kept.pop()
        return torch.empty(numel, dtype=dtype, device=self.device)

    def recycle(self, buffer: torch.Tensor) -> None:
        """`buffer` is no longer used: keep it for `device_buffer` where the allocator would
        not. Buffers are only kept once freed, so the kept and the used ones of a size never
        outnumber the most that were in use at once."""
        if self.recycles:
            self.recycled.setdefault((buffer.numel(), buffer.dtype), []).append(buffer)


@dataclass
class PendingMove:
    """A move onto the device that has started; `wait` makes its bytes usable."""

    future: Future | None = None
    """The disk tier's read, if the bytes come from disk."""
    work: object | None = None
    """The all-gather filling a gathered chunk, if it runs asynchronously."""
    event: object | None = None
    """Recorded on the copy stream after an asynchronous host-to-device copy."""
    finish: Callable[[], None] | None = None
    """Runs once the bytes have arrived (copy a staging buffer in, discard the disk copy)."""

    def wait(self, device: torch.device) -> None:
        if self.future is not None:
            self.future.result()
        if self.work is not None:
            self.work.wait()
        if self.event is not None:
            torch.get_device_module(device).current_stream().wait_event(self.event)
        if self.finish is not None:
            self.finish()


@dataclass
class PendingWrite:
    """A write to the disk tier that has started; its buffer must live until it is done."""

    future: Future
    buffer: torch.Tensor
    """The host bytes being written (a staging copy of the payload, or the host copy)."""


@dataclass(eq=False)
class Chunk:
    """A fixed-size flat buffer holding whole parameters; see [Note: tier and state]."""

    index: int
    key: str
    """Name of the chunk's bytes on the disk tier."""
    numel: int
    """Capacity in elements (the same for every chunk of a group)."""
    dtype: torch.dtype
    slots: list[Slot]
    state: ChunkState = ChunkState.FREE
    tier: Tier | None = None
    users: int = 0
    """Modules between `access` and `release`; the chunk is COMPUTE while this is > 0."""
    payload: torch.Tensor | None = field(default=None, repr=False)
    """Device buffer the parameters view; storage only while the tier is DEVICE."""
    host: torch.Tensor | None = field(default=None, repr=False)
    """Host copy while the tier is HOST."""
    pending: PendingMove | None = field(default=None, repr=False)
    on_disk: bool = False
    """The disk tier holds the chunk's current bytes (see [Note: clean disk copies])."""
    writing: PendingWrite | None = field(default=None, repr=False)
    """The write behind a move to disk, until `settle` (see [Note: write-behind])."""

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def used_numel(self) -> int:
        return sum(slot.numel for slot in self.slots)

    # -- state -----------------------------------------------------------------------------

    def apply(self, event: ChunkEvent) -> None:
        """Take one step of `_TRANSITIONS`; COMPUTE counts its users (nested or tied modules)."""
        key = (self.state, event)
        if key not in _TRANSITIONS:
            raise ChunkStateError(
                f"chunk {self.index}: event {event.name} is not legal in state {self.state.name}"
            )
        if event is ChunkEvent.ACCESS:
            self.users += 1
        elif event in (ChunkEvent.RELEASE_FWD, ChunkEvent.RELEASE_BWD):
            self.users -= 1
            if self.users:
                return  # another module still computes with it
        self.state = _TRANSITIONS[key]

    def _check_move(self, to: Tier) -> None:
        if self.state in (ChunkState.COMPUTE, ChunkState.FREE):
            raise ChunkStateError(
                f"chunk {self.index}: cannot move {self.tier.name if self.tier else 'nowhere'}"
                f" -> {to.name} in state {self.state.name}"
            )
        if (self.tier, to) not in _TIER_MOVES:
            raise ChunkStateError(
                f"chunk {self.index}: {self.tier.name} -> {to.name} is not a legal move"
            )

    # -- bytes -----------------------------------------------------------------------------

    def materialize(self, tier: Tier, io: TierIO, param_init: ParamInit | None = None) -> None:
        """FREE -> HOLD: give the chunk bytes on `tier`, filled from its parameters' current
        values (or by `param_init` for parameters on the meta device), and make every
        parameter a view of the payload. Built in host memory unless `tier` is DEVICE, so the
        device never holds more than the chunks placed there."""
        self.apply(ChunkEvent.MATERIALIZE)
        if tier is Tier.DEVICE:
            flat = torch.zeros(self.numel, dtype=self.dtype, device=io.device)
        else:
            flat = io.host_buffer(self.numel, self.dtype).zero_()  # padding is zero
        self._fill(flat, param_init)
        if tier is Tier.DEVICE:
            self.payload, self.tier = flat, Tier.DEVICE
            _point_params_at(self._views(), self.payload)
            return
        # torch slices no tensor larger than its storage, so the views are made before the
        # storage goes: one chunk of device memory for an instant. `apply_placement`
        # materialises host-bound chunks first, while the device is still empty.
        self.payload = torch.empty(self.numel, dtype=self.dtype, device=io.device)
        _point_params_at(self._views(), self.payload)
        free_storage(self.payload)
        self.host, self.tier = flat, Tier.HOST
        if tier is Tier.DISK:
            self.move(Tier.DISK, io)

    def _views(self) -> list[Slot]:
        """The slots whose parameters view the payload: the chunk's own."""
        return self.slots

    def _fill(self, flat: torch.Tensor, param_init: ParamInit | None) -> None:
        """First values of a new payload: the parameters' own, or `param_init`'s for those
        still on the meta device."""
        for slot in self.slots:
            view = flat[slot.offset : slot.offset + slot.numel].view(slot.param.shape)
            if slot.param.is_meta:
                if param_init is not None:
                    param_init(slot.name, view)
            else:
                view.copy_(slot.param.detach())

    @property
    def source(self) -> Chunk | None:
        """The chunk whose bytes `materialize` reads (a gathered chunk's shard), if any: the
        manager brings it to the device first."""
        return None

    def frees_on_release(self, after: str) -> bool:
        """Whether the manager drops the chunk as soon as its last user releases it after
        `after` ("forward", "backward"), instead of leaving it until room is needed."""
        return False

    def move(self, to: Tier, io: TierIO, non_blocking: bool = False) -> None:
        """Move the bytes to `to`. Moves off the device free its memory before returning. With
        `non_blocking`, a move onto the device may leave a `pending` move that `wait`
        completes, and a move to disk a `writing` that `settle` completes."""
        self._check_move(to)
        self.wait(io)
        source = self.tier
        if source is Tier.DISK:
            self.settle()
        if to is Tier.DEVICE:
            self._take_storage(io)
            self.pending = self._fill_payload(io, non_blocking)
        elif to is Tier.DISK:
            if not self.on_disk:
                if source is Tier.DEVICE:  # see [Note: the payload never meets the disk tier]
                    buffer = io.host_buffer(self.numel, self.dtype).copy_(self.payload)
                else:
                    buffer = self.host
                future = _disk(io, self).write(self.key, buffer)
                self.writing, self.on_disk = PendingWrite(future, buffer), True
            self.host = None
        elif source is Tier.DEVICE:  # -> HOST
            self.host = io.host_buffer(self.numel, self.dtype)
            self.host.copy_(self.payload)
        else:  # DISK -> HOST
            self.host = io.host_buffer(self.numel, self.dtype)
            _disk(io, self).read(self.key, self.host).result()
        if source is Tier.DEVICE:
            self._drop_storage(io)
        self.tier = to
        if not non_blocking:
            self.wait(io)
            self.settle()

    def settle(self) -> None:
        """Complete the write behind a move to disk. If it failed (a full disk), the bytes are
        put back in host memory from its buffer (tier HOST, nothing on disk) and the error
        is raised: the chunk is intact, one tier up."""
        if self.writing is None:
            return
        writing, self.writing = self.writing, None
        try:
            writing.future.result()
        except Exception:
            self.host, self.tier, self.on_disk = writing.buffer, Tier.HOST, False
            raise

    def discard(self, io: TierIO) -> None:
        """HOLD_* -> FREE: drop the bytes on whatever tier they are. Only for chunks whose
        contents are dead (a gradient chunk after the optimizer used it): a parameter chunk
        would lose its parameters."""
        self.settle()
        self.apply(ChunkEvent.DISCARD)
        self.wait(io)
        if self.tier is Tier.DEVICE:
            self._drop_storage(io)
        elif self.tier is Tier.HOST:
            self.host = None
        self.modified(io)
        self.tier = None

    def modified(self, io: TierIO) -> None:
        """The bytes are about to change: a clean disk copy is stale from now on, and goes."""
        if self.on_disk:
            _disk(io, self).discard(self.key)
            self.on_disk = False

    def _take_storage(self, io: TierIO) -> None:
        """The payload's device memory, as the chunk comes onto the device (the parameters
        view the payload, so its storage is what comes and goes)."""
        alloc_storage(self.payload)

    def _drop_storage(self, io: TierIO) -> None:
        """Release the payload's device memory, as the chunk leaves the device."""
        free_storage(self.payload)

    def wait(self, io: TierIO) -> None:
        """Complete a pending move onto the device."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.wait(io.device)

    def _fill_payload(self, io: TierIO, non_blocking: bool) -> PendingMove:
        """Copy the host or disk bytes into the (just allocated) payload.

        [Note: refilling keeps the version] Writes go through ``payload.data``, which shares
        the storage but not the version counter: autograd saved the parameters in forward, and
        bringing the same bytes back for backward must not look like an in-place change."""
        target = self.payload.data
        if self.tier is Tier.HOST:
            host, self.host = self.host, None
            if io.copy_stream is None or not non_blocking:
                target.copy_(host)
                return PendingMove()
            # The copy stream must not write memory the compute stream may still be using.
            module = torch.get_device_module(io.device)
            io.copy_stream.wait_stream(module.current_stream())
            with module.stream(io.copy_stream):
                target.copy_(host, non_blocking=True)
                event = io.copy_stream.record_event()
            return PendingMove(event=event)  # pinned host memory outlives the copy itself
        # [Note: the payload never meets the disk tier] The disk tier reads and writes
        # through numpy views, and exporting a tensor to numpy makes its storage non-resizable
        # for good, which would end `free_storage` on the payload. Disk moves go through a
        # host buffer of their own (on an accelerator it doubles as the transfer buffer).
        staging = io.host_buffer(self.numel, self.dtype)
        future = _disk(io, self).read(self.key, staging)

        def finish() -> None:
            target.copy_(staging, non_blocking=io.pin_memory)

        return PendingMove(future=future, finish=finish)


@dataclass(eq=False)
class GradChunk(Chunk):
    """The gradients of one parameter chunk: the same slots (offsets, shapes), its own bytes.

    Parameters are not views of it: gradients are copied in (`GradChunks`) and attached as
    ``param.grad`` views only while the optimizer updates the chunk. Its contents are
    undefined until written and dead after the update, so it is built without filling and
    `discard`-ed after each step rather than kept."""

    zeroed: bool = False
    """Materialise filled with zeros: the chunk is reduced whole, unwritten slots and padding
    included (a full gradient chunk of sharded chunks, zero/chunks/sharding.py)."""

    def materialize(self, tier: Tier, io: TierIO, param_init: ParamInit | None = None) -> None:
        """FREE -> HOLD on `tier`, contents undefined (only written slots are ever read)
        unless `zeroed`."""
        self.apply(ChunkEvent.MATERIALIZE)
        if tier is Tier.DEVICE:
            self._take_storage(io)
            self.tier = Tier.DEVICE
            if self.zeroed:
                self.payload.data.zero_()
            return
        self.host, self.tier = io.host_buffer(self.numel, self.dtype), Tier.HOST
        if self.zeroed:
            self.host.zero_()
        if tier is Tier.DISK:
            self.move(Tier.DISK, io)

    def _take_storage(self, io: TierIO) -> None:
        """A buffer of its own, recycled where the allocator does not cache: nothing views a
        gradient chunk's payload beyond its use."""
        self.payload = io.device_buffer(self.numel, self.dtype)

    def _drop_storage(self, io: TierIO) -> None:
        io.recycle(self.payload)
        self.payload = None

    def grad_view(self, slot: Slot) -> torch.Tensor:
        """The gradient of `slot`'s parameter: a view of the payload (on the device)."""
        return self.payload[slot.offset : slot.offset + slot.numel].view(slot.param.shape)


@dataclass(eq=False)
class GatheredChunk(Chunk):
    """Parameters whose bytes are the all-gather of every data-parallel rank's shard
    (ZeRO-3), on the device only: materialising gathers, discarding frees. The shard is a
    chunk of its own (`home`, the `source` the manager brings to the device first): for a
    ZeRO-3 unit (zero/params.py) one that stays on the device, for a full chunk of
    ``offload.policy`` one placed in the tiers ([Note: chunks with a source], manager.py).

    A unit's last release after a phase in `frees_after` frees it at once
    (``zero.reshard_after_forward``; never after a forward re-run inside backward, whose
    backward follows); a chunk of ``offload.policy`` names no phase and stays until the
    manager needs the room."""

    home: Chunk | None = field(default=None, repr=False)
    group: object = field(default=None, repr=False)
    frees_after: frozenset[str] = frozenset()
    """Phases after which the last release frees the chunk (a unit's)."""

    @property
    def source(self) -> Chunk | None:
        return self.home

    def frees_on_release(self, after: str) -> bool:
        return after in self.frees_after and not (after == "forward" and in_backward())

    def materialize(self, tier: Tier, io: TierIO, param_init: ParamInit | None = None) -> None:
        """FREE -> HOLD on the device: all-gather the shards (the `home` is on the device)."""
        self._gather(tier, async_op=False)

    def start_gather(self, finish: Callable[[], None]) -> None:
        """FREE -> HOLD on the device with the all-gather still running (a prefetch); `wait`
        completes it, then runs `finish` (the home may move again)."""
        work = self._gather(Tier.DEVICE, async_op=True)
        self.pending = PendingMove(work=work, finish=finish)

    def _gather(self, tier: Tier, async_op: bool) -> object | None:
        if tier is not Tier.DEVICE:
            raise ChunkStateError(f"chunk {self.index}: a gathered chunk lives on the device only")
        self.apply(ChunkEvent.MATERIALIZE)
        # into .data: see [Note: refilling keeps the version]
        alloc_storage(self.payload)
        work = comm.all_gather_(self.payload.data, self.home.payload, self.group, async_op=async_op)
        self.tier = Tier.DEVICE
        return work


def build_grad_chunks(
    chunks: Sequence[Chunk], zeroed: bool = False, dtype: torch.dtype | None = None
) -> list[GradChunk]:
    """FREE gradient chunks, one per chunk of `chunks` (in a manager's list, `chunks` first:
    the gradient chunk of the chunk with index i has index ``len(chunks) + i``), in `dtype`
    (the reduce dtype; default the chunks' own)."""
    return [
        GradChunk(
            len(chunks) + c.index,
            f"grads.{c.index}",
            c.numel,
            dtype or c.dtype,
            c.slots,
            zeroed=zeroed,
        )
        for c in chunks
    ]


def _disk(io: TierIO, chunk: Chunk) -> DiskTierLike:
    if io.disk is None:
        raise ConfigError(
            f"chunk {chunk.index} ({chunk.nbytes} bytes) must go to the disk tier but none is "
            "configured; set an offload disk path or raise the host budget"
        )
    return io.disk


def _point_params_at(slots: Sequence[Slot], payload: torch.Tensor) -> None:
    """Make each slot's parameter a view of `payload`. Through ``.data``: the parameter keeps
    a version counter of its own, so writes into the payload (an update, an all-gather after
    it) never trip autograd's check on a tensor some graph saved."""
    for slot in slots:
        view = payload[slot.offset : slot.offset + slot.numel].view(slot.param.shape)
        if slot.param.is_meta:
            # `.data =` cannot turn a meta tensor into a real one; a swap keeps the object.
            torch.utils.swap_tensors(
                slot.param, nn.Parameter(view.data, requires_grad=slot.param.requires_grad)
            )
        else:
            slot.param.data = view
