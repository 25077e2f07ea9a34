"""Every collective of shardwise goes through this module, and every one is counted.

Three layers:

* in-place ops (`all_reduce_`, `reduce_scatter_`, `all_gather_`, `broadcast_`, `all_to_all_`,
  `send`, `recv`) for code that manages its own buffers (gradient reducer, ZeRO); they can
  run asynchronously and then return a `TrackedWork`;
* autograd functions for model code (Megatron's f and g and the sequence-parallel pairs);
* `CommStats`, the recorder of calls and bytes per (axis, op), and `last_collective()`, the
  launcher's hang diagnostic.

Groups. Every op takes ``group``: a 1-D `DeviceMesh` (its axis label is
``mesh_dim_names[0]``, e.g. ``mesh["tp"]`` is labelled ``"tp"``), a `ProcessGroup` (labelled
with its description — a mesh axis group ``"mesh_tp"`` as ``"tp"`` — or its name when it has
none) or None (the default group, labelled ``"world"``). A group of one rank is a fast path:
no communication, nothing recorded, no call number used. With no process group initialised,
``group=None`` is a group of one rank.

[Note: byte accounting] For a group of n ranks, CommStats records per call, for this rank:

================  ==============================  ===================================
op                payload_bytes                    wire_bytes
================  ==============================  ===================================
all_reduce        S = nbytes of the input          2 (n-1)/n * S
all_gather        S = nbytes of this rank's shard  (n-1) * S
reduce_scatter    S = nbytes of the full input     (n-1)/n * S
all_to_all        S = nbytes of the input          (n-1)/n * S   (equal splits)
broadcast         S = nbytes of the tensor         S on the source rank, 0 on the others
send              S = nbytes of the tensor         S
recv              S = nbytes of the receive buffer 0   (the sender counts the bytes)
================  ==============================  ===================================

payload_bytes is the size of the tensor this rank hands to the collective. wire_bytes is what
this rank *sends* under the bandwidth-optimal ring algorithm (reduce-scatter then all-gather
for all_reduce), so it is the per-rank volume of the textbook cost model T = alpha + wire/B;
summed over the n ranks it is the total traffic on the network. Broadcast is counted as a
single send of S by the source (the pipelined-ring broadcast moves S through every link,
but the formulas we compare with charge it once). wire_bytes is a float: with S not a
multiple of n the ideal ring volume is fractional; real libraries pad, so treat it as the
model, not a packet count. Autograd functions record the primitive they issue ("all_gather",
"reduce_scatter", ...) in forward and in backward alike.

[Note: recorder scope] ``with CommStats() as stats:`` records every collective issued through
this module inside the block, by this thread or task (a `contextvars.ContextVar` holds the
stack of open recorders; nested recorders all record). An ``stats=`` argument records into
that recorder as well (never twice into the same one). Backward passes can run on autograd
engine threads that do not see the forward's context (CUDA), so autograd functions remember
the recorders open at forward time and record their backward collective into those still
open at backward time, plus those open in the backward's own context, plus ``stats=``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, ReduceOp
from torch.distributed.device_mesh import DeviceMesh

from shardwise.distributed import agreement, host, link
from shardwise.distributed.cost import ring_wire_bytes

Group = DeviceMesh | ProcessGroup | None
"""A 1-D DeviceMesh axis, a process group, or None for the default group."""

__all__ = [
    "CommStats",
    "Group",
    "OpCount",
    "TrackedWork",
    "all_gather_",
    "all_reduce_",
    "all_to_all_",
    "all_to_all_along_dims",
    "backward_recording",
    "format_bytes",
    "broadcast_",
    "copy_to_group",
    "gather_along_dim",
    "gather_along_dim_reduce_scatter_grad",
    "group_rank",
    "group_size",
    "last_collective",
    "open_recorders",
    "recv",
    "reduce_from_group",
    "reduce_scatter_",
    "reduce_scatter_along_dim",
    "recording_into",
    "scatter_along_dim",
    "send",
]


# ---------------------------------------------------------------------------------------------
# Hang diagnostics
# ---------------------------------------------------------------------------------------------
# [Note: process-local diagnostic state] Apart from the context-local recorder stack and the
# emulated link (link.py), this is the one piece of module state in shardwise's distributed
# code. It is acceptable because it is write-only for the library (nothing
# branches on it; it never changes what a collective does, so no run depends on it) and is
# per process by nature: the question "what was *this* process waiting on when it timed out"
# has one answer per process. The launcher reads it after a timeout to print one line per
# rank. The lock guards against autograd engine threads issuing backward collectives while
# the main thread issues others.

_state_lock = threading.Lock()
_call_numbers = itertools.count(1)
_pending: tuple[int, str] | None = None


def configure_process(emulate_gbps: float | None, check_collectives: bool) -> None:
    """This process's collective behaviour from ``distributed.*``: the emulated link
    ([Note: emulated link]) and the agreement check ([Note: collective agreement])."""
    link.emulate_link(emulate_gbps)
    agreement.check_collectives(check_collectives)


def last_collective() -> str | None:
    """The most recent collective of this process whose completion was not yet observed.

    E.g. ``"all_reduce on axis 'dp' (1.0 MiB float32, call #12)"``, or None. A synchronous op
    clears it when it returns (on NCCL that is when it is enqueued, so there this is a best
    effort); an asynchronous op stays pending until its `TrackedWork` is waited or the next
    collective is issued.
    """
    pending = _pending
    return None if pending is None else pending[1]


def _begin(description: str) -> int:
    global _pending
    with _state_lock:
        number = next(_call_numbers)
        _pending = (number, f"{description}, call #{number})")
    return number


def _finish(number: int) -> None:
    global _pending
    with _state_lock:
        if _pending is not None and _pending[0] == number:
            _pending = None


def format_bytes(nbytes: float) -> str:
    """A byte count for people: ``"512 B"``, ``"1.5 KiB"``, ... up to GiB."""
    if nbytes < 1024:
        return f"{nbytes:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "GiB":
            break
    return f"{nbytes:.1f} {unit}"


class TrackedWork:
    """The Work of an asynchronous collective; waiting on it marks the collective complete.

    Wraps None (already complete) for ops on a one-rank group.
    """

    def __init__(self, work: Any, number: int, sent_at: float | None = None) -> None:
        self._work = work
        self._number = number
        self._sent_at = sent_at

    def wait(self, *args: Any) -> bool:
        """Block until the collective has completed (on CUDA: until the stream waits on it)."""
        result = self._work.wait(*args) if self._work is not None else True
        link.wait_until_sent(self._sent_at)
        _finish(self._number)
        return result

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()

    def __getattr__(self, name: str) -> Any:  # get_future() and the rest of Work
        return getattr(self._work, name)


# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------


@dataclass
class OpCount:
    """Calls and bytes of one (axis, op); see [Note: byte accounting]."""

    calls: int = 0
    """Collectives issued."""
    payload_bytes: int = 0
    """Bytes of the tensors this rank handed in."""
    wire_bytes: float = 0.0
    """Bytes this rank sends under the ring algorithm."""


_ACTIVE: contextvars.ContextVar[tuple[CommStats, ...]] = contextvars.ContextVar(
    "shardwise_comm_stats", default=()
)

_KINDS = ("calls", "payload_bytes", "wire_bytes")


class CommStats:
    """Calls, payload bytes and wire bytes per (axis, op); a context manager that records."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], OpCount] = {}
        self._tokens: list[contextvars.Token] = []

    def __enter__(self) -> CommStats:
        self._tokens.append(_ACTIVE.set(_ACTIVE.get() + (self,)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        _ACTIVE.reset(self._tokens.pop())

    @property
    def recording(self) -> bool:
        """Whether a ``with`` block of this recorder is open."""
        return bool(self._tokens)

    def record(self, axis: str, op: str, payload_bytes: int, wire_bytes: float) -> None:
        """Count one call of `op` on `axis`."""
        count = self._counts.setdefault((axis, op), OpCount())
        count.calls += 1
        count.payload_bytes += payload_bytes
        count.wire_bytes += wire_bytes

    def total(
        self, kind: str = "wire_bytes", axis: str | None = None, op: str | None = None
    ) -> float:
        """Sum of `kind` (calls, payload_bytes or wire_bytes) over matching axes and ops."""
        if kind not in _KINDS:
            raise ValueError(f"kind={kind!r} is not one of {', '.join(_KINDS)}")
        return sum(
            getattr(count, kind)
            for (a, o), count in self._counts.items()
            if (axis is None or a == axis) and (op is None or o == op)
        )

    def reset(self) -> None:
        """Forget everything recorded so far (an open ``with`` block keeps recording)."""
        self._counts.clear()

    def wire_by_axis_op(self) -> dict[tuple[str, str], float]:
        """Wire bytes per (axis, op): the keys of a closed-form `WireBytes` phase."""
        return {key: count.wire_bytes for key, count in sorted(self._counts.items())}

    def as_dict(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{axis: {op: {"calls": .., "payload_bytes": .., "wire_bytes": ..}}}``."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for (axis, op), count in sorted(self._counts.items()):
            out.setdefault(axis, {})[op] = {k: getattr(count, k) for k in _KINDS}
        return out

    def table(self) -> str:
        """A fixed-width table, one row per (axis, op), and a total row."""
        rows = [("axis", "op", "calls", "payload", "wire")]
        for (axis, op), c in sorted(self._counts.items()):
            payload, wire = format_bytes(c.payload_bytes), format_bytes(c.wire_bytes)
            rows.append((axis, op, str(c.calls), payload, wire))
        rows.append(
            (
                "total",
                "",
                str(self.total("calls")),
                format_bytes(self.total("payload_bytes")),
                format_bytes(self.total("wire_bytes")),
            )
        )
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = []
        for row in rows:
            left = "  ".join(row[i].ljust(widths[i]) for i in range(2))
            right = "  ".join(row[i].rjust(widths[i]) for i in range(2, 5))
            lines.append(f"{left}  {right}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CommStats({self.as_dict()})"


def _recorders(
    stats: CommStats | None, remembered: Iterable[CommStats] = ()
) -> tuple[CommStats, ...]:
    """Recorders a collective issued now counts into; see [Note: recorder scope]."""
    found: dict[int, CommStats] = {}
    for recorder in (*_ACTIVE.get(), *(r for r in remembered if r.recording)):
        found[id(recorder)] = recorder
    if stats is not None:
        found[id(stats)] = stats
    return tuple(found.values())


def open_recorders() -> tuple[CommStats, ...]:
    """The recorders open in this context. A custom autograd Function that issues in-place
    collectives keeps them at forward time and decorates its backward with
    `backward_recording`, as this module's own functions remember theirs ([Note: recorder
    scope])."""
    return _ACTIVE.get()


@contextlib.contextmanager
def recording_into(remembered: Iterable[CommStats]) -> Iterator[None]:
    """Collectives issued inside also count into those of `remembered` still open."""
    token = _ACTIVE.set(_recorders(None, remembered))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def backward_recording(backward: Callable) -> Callable:
    """Decorates a custom autograd Function's ``backward`` whose ``forward`` kept
    ``ctx.recorders = open_recorders()``: its collectives count into those recorders too (on
    CUDA backward runs on an autograd engine thread that does not see them)."""

    @functools.wraps(backward)
    def wrapped(ctx: Any, *grads: torch.Tensor) -> Any:
        with recording_into(ctx.recorders):
            return backward(ctx, *grads)

    return wrapped


# ---------------------------------------------------------------------------------------------
# Groups and the one issuing path
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    pg: ProcessGroup | None
    label: str
    size: int
    rank: int


def _resolve(group: Group) -> _Group:
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"a collective needs a 1-D mesh (one axis), got axes {group.mesh_dim_names}"
            )
        pg = group.get_group()
        label = group.mesh_dim_names[0] if group.mesh_dim_names else "mesh"
        return _Group(pg, label, dist.get_world_size(pg), dist.get_rank(pg))
    if group is None and not dist.is_initialized():
        return _Group(None, "world", 1, 0)
    if group is None or group is dist.GroupMember.WORLD:
        label = "world"
    else:
        # DeviceMesh names its groups "mesh_<axis>": label them by the axis, as the mesh would.
        desc = getattr(group, "group_desc", "undefined")
        label = desc.removeprefix("mesh_") if desc and desc != "undefined" else group.group_name
    return _Group(group, label, dist.get_world_size(group), dist.get_rank(group))


def group_size(group: Group) -> int:
    """Ranks in `group` (1 when no process group is initialised and `group` is None)."""
    return _resolve(group).size


def group_rank(group: Group) -> int:
    """This process's rank within `group`."""
    return _resolve(group).rank


def _issue(
    op: str,
    g: _Group,
    tensor: torch.Tensor,
    wire_bytes: float,
    launch: Callable[[], Any],
    async_op: bool,
    recorders: tuple[CommStats, ...],
    peer: str = "",
) -> TrackedWork | None:
    """Record, mark pending, launch; sync ops are complete when `launch` returns."""
    payload = tensor.nbytes
    if op not in ("send", "recv"):  # every rank of the group issues this one
        agreement.agree(op, g.pg, g.label, tensor)  # [Note: collective agreement]
    for recorder in recorders:
        recorder.record(g.label, op, payload, wire_bytes)
    dtype = str(tensor.dtype).removeprefix("torch.")
    number = _begin(f"{op}{peer} on axis '{g.label}' ({format_bytes(payload)} {dtype}")
    sent_at = link.sent_at(wire_bytes)  # [Note: emulated link]
    work = launch()
    if async_op:
        return TrackedWork(work, number, sent_at)
    link.wait_until_sent(sent_at)
    _finish(number)
    return None


def _done(async_op: bool) -> TrackedWork | None:
    """What an op on a one-rank group returns: nothing, or an already complete Work."""
    return TrackedWork(None, 0) if async_op else None


# ---------------------------------------------------------------------------------------------
# In-place ops
# ---------------------------------------------------------------------------------------------


def _all_reduce(t: torch.Tensor, g: _Group, op: Any, async_op: bool, rec: tuple) -> Any:
    if g.size == 1:
        return _done(async_op)
    wire = ring_wire_bytes("all_reduce", g.size, t.nbytes)
    launch = partial(dist.all_reduce, t, op=op, group=g.pg, async_op=async_op)
    return _issue("all_reduce", g, t, wire, launch, async_op, rec)


def _reduce_scatter(
    out: torch.Tensor, inp: torch.Tensor, g: _Group, op: Any, async_op: bool, rec: tuple
) -> Any:
    if g.size == 1:
        out.copy_(inp.view_as(out))
        return _done(async_op)
    wire = ring_wire_bytes("reduce_scatter", g.size, inp.nbytes)
    on_host = out.device.type == "cpu"  # [Note: host collectives in pieces] (host.py)
    issue = host.reduce_scatter_single if on_host else dist.reduce_scatter_single
    launch = partial(issue, out, inp, op=op, group=g.pg, async_op=async_op)
    return _issue("reduce_scatter", g, inp, wire, launch, async_op, rec)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, g: _Group, async_op: bool, rec: tuple) -> Any:
    if g.size == 1:
        out.copy_(inp.view_as(out))
        return _done(async_op)
    wire = ring_wire_bytes("all_gather", g.size, inp.nbytes)
    issue = host.all_gather_single if out.device.type == "cpu" else dist.all_gather_single
    launch = partial(issue, out, inp, group=g.pg, async_op=async_op)
    return _issue("all_gather", g, inp, wire, launch, async_op, rec)


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, g: _Group, async_op: bool, rec: tuple) -> Any:
    if g.size == 1:
        out.copy_(inp)
        return _done(async_op)
    wire = ring_wire_bytes("all_to_all", g.size, inp.nbytes)
    launch = partial(dist.all_to_all_single, out, inp, group=g.pg, async_op=async_op)
    return _issue("all_to_all", g, inp, wire, launch, async_op, rec)


def all_reduce_(
    tensor: torch.Tensor,
    group: Group,
    *,
    op: Any = ReduceOp.SUM,
    async_op: bool = False,
    stats: CommStats | None = None,
) -> TrackedWork | None:
    """Reduce `tensor` in place over `group` (gloo has no AVG or PREMUL_SUM: divide after)."""
    return _all_reduce(tensor, _resolve(group), op, async_op, _recorders(stats))


def reduce_scatter_(
    output: torch.Tensor,
    input: torch.Tensor,
    group: Group,
    *,
    op: Any = ReduceOp.SUM,
    async_op: bool = False,
    stats: CommStats | None = None,
) -> TrackedWork | None:
    """Reduce contiguous `input` (n x output.numel() elements) over `group`; keep chunk rank."""
    return _reduce_scatter(output, input, _resolve(group), op, async_op, _recorders(stats))


def all_gather_(
    output: torch.Tensor,
    input: torch.Tensor,
    group: Group,
    *,
    async_op: bool = False,
    stats: CommStats | None = None,
) -> TrackedWork | None:
    """Concatenate every rank's contiguous `input` into `output`, in group-rank order."""
    return _all_gather(output, input, _resolve(group), async_op, _recorders(stats))


def all_to_all_(
    output: torch.Tensor,
    input: torch.Tensor,
    group: Group,
    *,
    async_op: bool = False,
    stats: CommStats | None = None,
) -> TrackedWork | None:
    """Send chunk j of `input` (dim 0, equal chunks) to rank j; `output` chunk j came from j."""
    return _all_to_all(output, input, _resolve(group), async_op, _recorders(stats))


def broadcast_(
    tensor: torch.Tensor,
    src_group_rank: int,
    group: Group,
    *,
    async_op: bool = False,
    stats: CommStats | None = None,
) -> TrackedWork | None:
    """Overwrite `tensor` on every rank with the one of group rank `src_group_rank`."""
    g = _resolve(group)
    if g.size == 1:
        return _done(async_op)
    wire = float(tensor.nbytes) if g.rank == src_group_rank else 0.0
    launch = partial(
        dist.broadcast, tensor, group=g.pg, group_src=src_group_rank, async_op=async_op
    )
    peer = f" from group rank {src_group_rank}"
    return _issue("broadcast", g, tensor, wire, launch, async_op, _recorders(stats), peer)


def send(
    tensor: torch.Tensor,
    dst_group_rank: int,
    group: Group,
    *,
    async_op: bool = False,
    stats: CommStats | None = None,
) -> TrackedWork | None:
    """Send `tensor` to group rank `dst_group_rank` (async: `isend`)."""
    g = _resolve(group)
    fn = dist.isend if async_op else dist.send
    launch = partial(fn, tensor, group=g.pg, group_dst=dst_group_rank)
    peer = f" to group rank {dst_group_rank}"
    wire = float(tensor.nbytes)
    return _issue("send", g, tensor, wire, launch, async_op, _recorders(stats), peer)


def recv(
    tensor: torch.Tensor,
    src_group_rank: int,
    group: Group,
    *,
    async_op: bool = False,
    stats: CommStats | None = None,
) -> TrackedWork | None:
    """Receive into `tensor` from group rank `src_group_rank` (async: `irecv`)."""
    g = _resolve(group)
    fn = dist.irecv if async_op else dist.recv
    launch = partial(fn, tensor, group=g.pg, group_src=src_group_rank)
    peer = f" from group rank {src_group_rank}"
    return _issue("recv", g, tensor, 0.0, launch, async_op, _recorders(stats), peer)


# ---------------------------------------------------------------------------------------------
# Out-of-place helpers along a tensor dim (gloo's tensor collectives work on dim 0 only)
# ---------------------------------------------------------------------------------------------


def _chunk_len(x: torch.Tensor, dim: int, n: int, what: str) -> int:
    if x.shape[dim] % n:
        raise ValueError(
            f"{what}: size {x.shape[dim]} of dim {dim} is not divisible by the group size {n}"
        )
    return x.shape[dim] // n


def _gather_dim(x: torch.Tensor, dim: int, g: _Group, rec: tuple) -> torch.Tensor:
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((g.size * front.shape[0], *front.shape[1:]))
    _all_gather(out, front, g, False, rec)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter_dim(x: torch.Tensor, dim: int, g: _Group, rec: tuple) -> torch.Tensor:
    local = _chunk_len(x, dim, g.size, "reduce_scatter_along_dim")
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((local, *front.shape[1:]))
    _reduce_scatter(out, front, g, ReduceOp.SUM, False, rec)
    return out.movedim(0, dim).contiguous()


def _own_slice(x: torch.Tensor, dim: int, g: _Group) -> torch.Tensor:
    local = _chunk_len(x, dim, g.size, "scatter_along_dim")
    return x.narrow(dim, g.rank * local, local).contiguous()


def _all_reduced_copy(x: torch.Tensor, g: _Group, rec: tuple) -> torch.Tensor:
    # Never reduce in place: autograd may share x (or an expanded grad) with other users.
    out = x.clone(memory_format=torch.contiguous_format)
    _all_reduce(out, g, ReduceOp.SUM, False, rec)
    return out


def _all_to_all_dims(
    x: torch.Tensor, scatter_dim: int, gather_dim: int, g: _Group, rec: tuple
) -> torch.Tensor:
    local = _chunk_len(x, scatter_dim, g.size, "all_to_all_along_dims")
    front = x.movedim(scatter_dim, 0)
    chunks = front.reshape(g.size, local, *front.shape[1:]).contiguous()
    received = torch.empty_like(chunks)
    _all_to_all(received, chunks, g, False, rec)
    # received[j] is rank j's chunk `rank` of scatter_dim; rank order along gather_dim.
    pieces = [piece.movedim(0, scatter_dim) for piece in received.unbind(0)]
    return torch.cat(pieces, dim=gather_dim)


# ---------------------------------------------------------------------------------------------
# Autograd functions
# ---------------------------------------------------------------------------------------------
# Each Function receives the resolved group and the explicit recorder; ctx keeps the recorders
# open at forward time for the backward collective (see [Note: recorder scope]).


def _save(ctx: Any, g: _Group, stats: CommStats | None) -> tuple[CommStats, ...]:
    ctx.group, ctx.stats, ctx.remembered = g, stats, _ACTIVE.get()
    return _recorders(stats)


def _backward_recorders(ctx: Any) -> tuple[CommStats, ...]:
    return _recorders(ctx.stats, ctx.remembered)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: _Group, stats: CommStats | None) -> torch.Tensor:
        _save(ctx, g, stats)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _all_reduced_copy(grad, ctx.group, _backward_recorders(ctx)), None, None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: _Group, stats: CommStats | None) -> torch.Tensor:
        return _all_reduced_copy(x, g, _save(ctx, g, stats))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None, None


class _GatherAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, dim: int, g: _Group, stats: CommStats | None, reduce_grad: bool
    ) -> torch.Tensor:
        ctx.dim, ctx.reduce_grad = dim, reduce_grad
        return _gather_dim(x, dim, g, _save(ctx, g, stats))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.reduce_grad:
            grad = _reduce_scatter_dim(grad, ctx.dim, ctx.group, _backward_recorders(ctx))
        else:
            grad = _own_slice(grad, ctx.dim, ctx.group)
        return grad, None, None, None, None


class _ScatterAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, dim: int, g: _Group, stats: CommStats | None
    ) -> torch.Tensor:
        _save(ctx, g, stats)
        ctx.dim = dim
        return _own_slice(x, dim, g)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _gather_dim(grad, ctx.dim, ctx.group, _backward_recorders(ctx)), None, None, None


class _ReduceScatterAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, dim: int, g: _Group, stats: CommStats | None
    ) -> torch.Tensor:
        ctx.dim = dim
        return _reduce_scatter_dim(x, dim, g, _save(ctx, g, stats))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _gather_dim(grad, ctx.dim, ctx.group, _backward_recorders(ctx)), None, None, None


class _AllToAllAlongDims(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scatter_dim: int,
        gather_dim: int,
        g: _Group,
        stats: CommStats | None,
    ) -> torch.Tensor:
        ctx.dims = (scatter_dim, gather_dim)
        return _all_to_all_dims(x, scatter_dim, gather_dim, g, _save(ctx, g, stats))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        scatter_dim, gather_dim = ctx.dims
        rec = _backward_recorders(ctx)
        grad = _all_to_all_dims(grad, gather_dim, scatter_dim, ctx.group, rec)
        return grad, None, None, None, None


def copy_to_group(x: torch.Tensor, group: Group, *, stats: CommStats | None = None) -> torch.Tensor:
    """Megatron's f (Shoeybi et al. 2019, sec. 3): identity forward, all-reduce backward.

    Put it where a replicated activation enters a group-parallel region (before a
    column-parallel linear): each rank's gradient is a partial sum.
    """
    g = _resolve(group)
    return x if g.size == 1 else _CopyToGroup.apply(x, g, stats)


def reduce_from_group(
    x: torch.Tensor, group: Group, *, stats: CommStats | None = None
) -> torch.Tensor:
    """Megatron's g (Shoeybi et al. 2019, sec. 3): all-reduce forward, identity backward.

    Put it where partial sums leave a group-parallel region (after a row-parallel linear).
    """
    g = _resolve(group)
    return x if g.size == 1 else _ReduceFromGroup.apply(x, g, stats)


def gather_along_dim(
    x: torch.Tensor, dim: int, group: Group, *, stats: CommStats | None = None
) -> torch.Tensor:
    """All-gather along `dim` forward; backward keeps this rank's slice of the gradient.

    Megatron's ``gather_from_tensor_model_parallel_region``: for outputs consumed by
    replicated computation, where every rank holds the same full gradient.
    """
    g = _resolve(group)
    return x if g.size == 1 else _GatherAlongDim.apply(x, dim, g, stats, False)


def gather_along_dim_reduce_scatter_grad(
    x: torch.Tensor, dim: int, group: Group, *, stats: CommStats | None = None
) -> torch.Tensor:
    """All-gather along `dim` forward, reduce-scatter the gradient backward.

    Megatron-SP's f-bar (Korthikanti et al. 2022, sec. 4.2.2): the sequence-sharded
    activation is gathered before a column-parallel linear, whose per-rank gradients are
    partial sums over the tensor-parallel group.
    """
    g = _resolve(group)
    return x if g.size == 1 else _GatherAlongDim.apply(x, dim, g, stats, True)


def scatter_along_dim(
    x: torch.Tensor, dim: int, group: Group, *, stats: CommStats | None = None
) -> torch.Tensor:
    """Keep this rank's slice along `dim` forward (no comm); all-gather the gradient backward.

    Megatron's ``scatter_to_tensor_model_parallel_region`` (and its sequence-parallel twin).
    """
    g = _resolve(group)
    return x if g.size == 1 else _ScatterAlongDim.apply(x, dim, g, stats)


def reduce_scatter_along_dim(
    x: torch.Tensor, dim: int, group: Group, *, stats: CommStats | None = None
) -> torch.Tensor:
    """Reduce-scatter along `dim` forward, all-gather the gradient backward.

    Megatron-SP's g-bar (Korthikanti et al. 2022, sec. 4.2.2): partial sums of a row-parallel
    linear become sequence-sharded sums.
    """
    g = _resolve(group)
    return x if g.size == 1 else _ReduceScatterAlongDim.apply(x, dim, g, stats)


def all_to_all_along_dims(
    x: torch.Tensor,
    scatter_dim: int,
    gather_dim: int,
    group: Group,
    *,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Split `scatter_dim` across the group, concatenate along `gather_dim`; inverse backward.

    DeepSpeed-Ulysses (Jacobs et al. 2023, sec. 3.1): switches activations between
    sequence-sharded and head-sharded layouts around attention.
    """
    g = _resolve(group)
    if g.size == 1:
        return x
    return _AllToAllAlongDims.apply(x, scatter_dim, gather_dim, g, stats)
