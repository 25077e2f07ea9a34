"""Pipeline schedules as data: which compute action each rank runs, in which order.

A `Schedule` lists, per pipeline rank, its compute actions: forward, backward, or the
zero-bubble split of backward into I (gradient of the stage input) and W (gradient of its
weights). The point-to-point messages between ranks follow from the stage placement, so
they are derived (`Schedule.actions`), never written by hand. All of it is checked without
processes: `check` proves a schedule complete, causal, FIFO-consistent, deadlock-free under
the runtime's semantics and within its memory bound; `simulate` times it; `timeline` prints it.

Schedules: GPipe (Huang et al. 2019); 1F1B (PipeDream-flush, Narayanan et al. 2021);
interleaved 1F1B (Megatron-LM's virtual pipeline, Narayanan et al. 2021, section 2.2);
ZB-H1 and ZB-V (zero bubble, Qi et al. 2023).
"""

from __future__ import annotations

import enum
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from shardwise.errors import ConfigError

__all__ = [
    "SCHEDULES",
    "Action",
    "Kind",
    "Placement",
    "Schedule",
    "ScheduleError",
    "Simulation",
    "build_schedule",
    "check",
    "simulate",
    "theoretical_bubble",
]


class Kind(enum.Enum):
    """What an action does: the first four compute, the last four move a tensor."""

    FORWARD = "F"
    BACKWARD = "B"
    BACKWARD_INPUT = "I"
    BACKWARD_WEIGHT = "W"
    SEND_ACT = "send_act"
    RECV_ACT = "recv_act"
    SEND_GRAD = "send_grad"
    RECV_GRAD = "recv_grad"


F, B, I, W = Kind.FORWARD, Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT  # noqa: E741
_COMPUTE = frozenset({F, B, I, W})
_HOLD = {F: +1, B: -1, W: -1}
"""How a compute action changes the activations its rank holds (I keeps them for W)."""
_RECV_OF_SEND = {Kind.SEND_ACT: (Kind.RECV_ACT, +1), Kind.SEND_GRAD: (Kind.RECV_GRAD, -1)}
"""A send from stage s is taken by a receive for stage s+1 (activation) or s-1 (gradient)."""


class Placement(enum.Enum):
    """Which rank runs a (virtual) stage."""

    LOOP = "loop"  # stage s on rank s % p: one chunk per rank, or Megatron's interleaving
    V = "v"  # stage s on rank s for s < p, then back: rank 2p-1-s (ZB-V)

    def rank_of(self, stage: int, ranks: int) -> int:
        """The rank of `ranks` that runs `stage`."""
        if self is Placement.V and stage >= ranks:
            return 2 * ranks - 1 - stage
        return stage % ranks


class ScheduleError(RuntimeError):
    """A schedule is incomplete, acausal, FIFO-inconsistent, deadlocks or holds too much."""


@dataclass(frozen=True)
class Action:
    """One step of a rank's program.

    On a communication action, `stage` is the stage on *this* rank that produces (send) or
    consumes (receive) the tensor, and `peer` the other pipeline rank: `send_act 3 s1->r2`
    sends stage 1's output for micro-batch 3 to rank 2, where `recv_act 3 s2<-r1` takes it
    as stage 2's input; `send_grad 3 s2->r1` sends stage 2's input gradient back, taken by
    `recv_grad 3 s1<-r2` as stage 1's output gradient.
    """

    kind: Kind
    micro: int
    """Micro-batch, 0..m-1."""
    stage: int
    """Global (virtual) stage, 0..S-1."""
    peer: int | None = None
    """The other pipeline rank of a communication action; None on compute actions."""

    def __str__(self) -> str:
        if self.kind in _COMPUTE:
            return f"{self.kind.value}{self.micro}s{self.stage}"
        arrow = "->" if self.kind in _RECV_OF_SEND else "<-"
        return f"{self.kind.value} {self.micro} s{self.stage}{arrow}r{self.peer}"


@dataclass(frozen=True)
class Schedule:
    """Per rank, its compute actions in execution order."""

    name: str
    ranks: int
    """p, pipeline ranks."""
    micro_batches: int
    """m, micro-batches per optimizer step."""
    chunks: int
    """v, stages per rank; 1 except interleaved 1F1B and ZB-V."""
    compute: tuple[tuple[Action, ...], ...]
    """Per rank: its F, B, I and W actions, in execution order."""
    placement: Placement = Placement.LOOP
    """How stages map to ranks."""

    @property
    def stages(self) -> int:
        """S = ranks * chunks."""
        return self.ranks * self.chunks

    def rank_of(self, stage: int) -> int:
        """The rank that runs `stage`."""
        return self.placement.rank_of(stage, self.ranks)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages `rank` runs, ascending."""
        return tuple(s for s in range(self.stages) if self.rank_of(s) == rank)

    def actions(self, rank: int) -> tuple[Action, ...]:
        """This rank's compute actions with point-to-point actions inserted.

        Where a neighbouring stage runs on another rank: receive the activation before F and
        send the output after it; receive the output gradient before B or I and send the
        input gradient after it. W reads only what its I kept. Sends are non-blocking (the
        runtime waits for them at the end of the step), receives block.
        """
        program: list[Action] = []
        for action in self.compute[rank]:
            if action.kind is W:
                program.append(action)
                continue
            if action.kind is F:
                source, target = action.stage - 1, action.stage + 1
                recv, send = Kind.RECV_ACT, Kind.SEND_ACT
            else:
                source, target = action.stage + 1, action.stage - 1
                recv, send = Kind.RECV_GRAD, Kind.SEND_GRAD
            if self._elsewhere(source, rank):
                program.append(Action(recv, action.micro, action.stage, self.rank_of(source)))
            program.append(action)
            if self._elsewhere(target, rank):
                program.append(Action(send, action.micro, action.stage, self.rank_of(target)))
        return tuple(program)

    def _elsewhere(self, stage: int, rank: int) -> bool:
        """Whether `stage` exists and runs on a rank other than `rank`."""
        return 0 <= stage < self.stages and self.rank_of(stage) != rank

    def timeline(self) -> str:
        """One row per rank, one column per slot of a unit-time run; "." is idle."""
        run = simulate(self, forward=1, backward=1, backward_input=1, backward_weight=1)
        rows = []
        for actions, starts in zip(self.compute, run.starts, strict=True):
            cells = ["."] * round(run.makespan)
            for action, start in zip(actions, starts, strict=True):
                stage = f"s{action.stage}" if self.chunks > 1 else ""
                cells[round(start)] = f"{action.kind.value}{action.micro}{stage}"
            rows.append(cells)
        width = max(len(cell) for cells in rows for cell in cells)
        return "\n".join(
            f"r{rank} " + " ".join(cell.ljust(width) for cell in cells).rstrip()
            for rank, cells in enumerate(rows)
        )

    def in_flight_peak(self) -> list[int]:
        """Per rank, the most forward activations held at once: each from its F to its B
        (or W, when backward is split)."""
        peaks = []
        for actions in self.compute:
            held = peak = 0
            for action in actions:
                held += _HOLD.get(action.kind, 0)
                peak = max(peak, held)
            peaks.append(peak)
        return peaks


# --- Schedules -----------------------------------------------------------------------------


def _alternate(forwards: list[Action], backwards: list[Action], warmup: int) -> list[Action]:
    """`warmup` forwards, then one forward and one backward in turn, then the remaining
    backwards: the 1F1B shape, which holds at most `warmup + 1` activations."""
    steady = len(forwards) - warmup
    order = forwards[:warmup]
    for forward, backward in zip(forwards[warmup:], backwards[:steady], strict=True):
        order += [forward, backward]
    return order + backwards[steady:]


def _gpipe(ranks: int, micro_batches: int) -> Schedule:
    """GPipe: all forwards, then all backwards, both in micro-batch order.

    Backwards run in forward order rather than reversed: the last rank starts on micro-batch
    0 as soon as its last forward is done either way, and the oldest activation goes first.
    """
    compute = tuple(
        tuple(Action(kind, mb, rank) for kind in (F, B) for mb in range(micro_batches))
        for rank in range(ranks)
    )
    return Schedule("gpipe", ranks, micro_batches, 1, compute)


def _one_f_one_b(ranks: int, micro_batches: int) -> Schedule:
    """1F1B (PipeDream-flush): rank r runs min(p-r-1, m) warm-up forwards, then alternates,
    so it holds at most p-r activations where GPipe holds m; same bubble."""
    compute = []
    for rank in range(ranks):
        forwards = [Action(F, mb, rank) for mb in range(micro_batches)]
        backwards = [Action(B, mb, rank) for mb in range(micro_batches)]
        order = _alternate(forwards, backwards, min(ranks - rank - 1, micro_batches))
        compute.append(tuple(order))
    return Schedule("1f1b", ranks, micro_batches, 1, tuple(compute))


def _interleaved_1f1b(ranks: int, micro_batches: int, chunks: int) -> Schedule:
    """Megatron-LM's interleaved 1F1B (Narayanan et al. 2021, section 2.2).

    Rank r runs stages r, r+p, ..., r+(v-1)p. Its forwards take micro-batches in groups of
    p: the group through chunk 0, the same group through chunk 1, ..., then the next group;
    its backwards do the same with the chunks reversed. A warm-up of (v-1)p + 2(p-r-1)
    forwards (capped at m*v) covers the round trip to the last chunk and back, then 1F1B.
    """
    p, m, v = ranks, micro_batches, chunks
    compute = []
    for rank in range(p):
        forwards, backwards = [], []
        for k in range(m * v):
            group, index = divmod(k, p * v)
            micro, chunk = group * p + index % p, index // p
            forwards.append(Action(F, micro, chunk * p + rank))
            backwards.append(Action(B, micro, (v - 1 - chunk) * p + rank))
        warmup = min((v - 1) * p + 2 * (p - rank - 1), m * v)
        compute.append(tuple(_alternate(forwards, backwards, warmup)))
    return Schedule("interleaved_1f1b", p, m, v, tuple(compute))


def _zb_h1(ranks: int, micro_batches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, section 3.1): 1F1B with each backward split into I and W.

    The previous stage waits only for I, so I's take 1F1B's backward slots and rank r runs
    the W of micro-batch k after its I of k+r; the last r W's fill the cool-down, where
    1F1B idles. Rank r then holds up to (p-r) + r = p activations: every rank at 1F1B's
    peak (that of its rank 0), which is how the paper keeps ZB-H1 within 1F1B's memory.
    """
    compute = []
    for rank in range(ranks):
        forwards = [Action(F, mb, rank) for mb in range(micro_batches)]
        inputs = [Action(I, mb, rank) for mb in range(micro_batches)]
        order = []
        for action in _alternate(forwards, inputs, min(ranks - rank - 1, micro_batches)):
            order.append(action)
            if action.kind is I and action.micro >= rank:
                order.append(Action(W, action.micro - rank, rank))
        order += [Action(W, mb, rank) for mb in range(max(micro_batches - rank, 0), micro_batches)]
        compute.append(tuple(order))
    return Schedule("zb_h1", ranks, micro_batches, 1, tuple(compute))


def _zbv(ranks: int, micro_batches: int) -> Schedule:
    """ZB-V (Qi et al. 2023, section 6): two chunks per rank in a V, backward split in I, W.

    [Note: ZB-V order] Rank r runs stage r (chunk 0) and stage 2p-1-r (chunk 1): the
    forward goes down the ranks and back up, so rank 0 holds both the first stage and the
    loss. Rather than the paper's hand-drawn pattern, the order comes from a unit-time list
    schedule (F = I = W = 1): in each slot a rank runs the first ready one of
      1. an I, chunk 1 first: the chain of I's is the critical path;
      2. an F, chunk 1 first; a chunk-0 F admits a micro-batch to the rank and waits while
         p micro-batches hold a chunk-0 activation there;
      3. its oldest pending W, in a slot that would otherwise idle.
    An F or I whose input comes from another rank is ready only once every earlier message
    from that rank has been taken, so receives follow sends (check's FIFO rule) by
    construction. W's follow their I's in order, so a micro-batch frees its chunk-1
    activation before its chunk-0 one: a rank holds at most 2p chunk activations, p stages'
    worth, as 1F1B. The loop ends: a rank with a pending W can act, and with none pending
    anywhere the oldest unfinished micro-batch's next F or I is ready; the messages queued
    before its own belong to younger micro-batches that the sender held together with it,
    fewer than p, so the receiver can admit them.
    """
    p, m, last = ranks, micro_batches, 2 * ranks - 1
    shape = Schedule("zbv", p, m, 2, (), Placement.V)  # the placement, to ask where stages run
    finish: dict[tuple[Kind, int, int], int] = {}  # slot at which each done action ended
    next_micro = {(kind, stage): 0 for kind in (F, I) for stage in range(last + 1)}
    inbox: dict[tuple[int, int], deque[Action]] = defaultdict(deque)  # (from, to): consumers
    pending_w: list[deque[Action]] = [deque() for _ in range(p)]
    admitted = [0] * p
    compute: list[list[Action]] = [[] for _ in range(p)]

    def ready(rank: int, kind: Kind, stage: int, slot: int) -> Action | None:
        """The stage's next F or I, if its inputs are done and its message is next in."""
        action = Action(kind, next_micro[(kind, stage)], stage)
        source = stage - 1 if kind is F else stage + 1
        inputs = [(F, source)] if kind is F else [(F, stage), (I, source)]
        if action.micro == m or any(
            finish.get((k, action.micro, s), slot + 1) > slot for k, s in inputs if 0 <= s <= last
        ):
            return None
        if shape._elsewhere(source, rank) and inbox[(shape.rank_of(source), rank)][0] != action:
            return None
        return action

    def run(rank: int, action: Action, slot: int) -> None:
        compute[rank].append(action)
        finish[(action.kind, action.micro, action.stage)] = slot + 1
        if action.stage == rank:
            admitted[rank] += {F: 1, W: -1}.get(action.kind, 0)
        if action.kind is W:
            return
        next_micro[(action.kind, action.stage)] += 1
        if action.kind is I:
            pending_w[rank].append(Action(W, action.micro, action.stage))
        step = 1 if action.kind is F else -1
        source, target = action.stage - step, action.stage + step
        if shape._elsewhere(source, rank):
            inbox[(shape.rank_of(source), rank)].popleft()
        if shape._elsewhere(target, rank):
            inbox[(rank, shape.rank_of(target))].append(Action(action.kind, action.micro, target))

    slot = 0
    while len(finish) < 3 * m * (last + 1):
        for rank in range(p):
            chunk0, chunk1 = rank, last - rank
            action = (
                ready(rank, I, chunk1, slot)
                or ready(rank, I, chunk0, slot)
                or ready(rank, F, chunk1, slot)
            )
            if action is None and admitted[rank] < p:
                action = ready(rank, F, chunk0, slot)
            if action is None and pending_w[rank]:
                action = pending_w[rank].popleft()
            if action is not None:
                run(rank, action, slot)
        slot += 1
    return Schedule("zbv", p, m, 2, tuple(map(tuple, compute)), Placement.V)


# --- Registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """What a named schedule accepts, holds and idles."""

    build: Callable[..., Schedule]
    chunks: int | None
    """The chunks per rank it runs; None: any v >= 2, passed on to `build`."""
    max_in_flight: Callable[[int, int, int, int], int]
    """(p, m, v, rank) -> activations the rank may hold at once; see `check`."""
    bubble: Callable[[int, int, int], float]
    """(p, m, v) -> idle fraction; see `theoretical_bubble`."""
    ranks_divide_micro_batches: bool = False
    """Whether micro-batches must come in whole groups of p (Megatron's interleaving)."""


_SPECS: dict[str, _Spec] = {
    "gpipe": _Spec(_gpipe, 1, lambda p, m, v, r: m, lambda p, m, v: (p - 1) / (m + p - 1)),
    "1f1b": _Spec(
        _one_f_one_b, 1, lambda p, m, v, r: min(p - r, m), lambda p, m, v: (p - 1) / (m + p - 1)
    ),
    "interleaved_1f1b": _Spec(
        _interleaved_1f1b,
        None,
        lambda p, m, v, r: min((v - 1) * p + 2 * (p - r - 1) + 1, m * v),
        lambda p, m, v: (p - 1) / (v * m + p - 1),
        ranks_divide_micro_batches=True,
    ),
    "zb_h1": _Spec(
        _zb_h1, 1, lambda p, m, v, r: min(p, m), lambda p, m, v: (p - 1) / (3 * m + p - 1)
    ),
    "zbv": _Spec(
        _zbv, 2, lambda p, m, v, r: 2 * min(p, m), lambda p, m, v: (p - 1) / (6 * m + p - 1)
    ),
}

SCHEDULES: dict[str, Callable[..., Schedule]] = {name: spec.build for name, spec in _SPECS.items()}
"""Builders by name, taking (ranks, micro_batches), and chunks for interleaved_1f1b. They
trust their arguments; `build_schedule` validates them first."""


def _spec(name: str, ranks: int, micro_batches: int, chunks: int) -> _Spec:
    """The spec of `name` once (p, m, v) suit it; else a one-line ConfigError."""
    spec = _SPECS.get(name)
    if spec is None:
        raise ConfigError(f"schedule {name!r} is unknown; use one of {', '.join(_SPECS)}")
    if ranks < 1:
        raise ConfigError(f"{name} needs at least 1 rank (got ranks={ranks})")
    if micro_batches < 1:
        raise ConfigError(
            f"{name} needs at least 1 micro-batch (got micro_batches={micro_batches})"
        )
    if spec.chunks is None and chunks < 2:
        raise ConfigError(f"{name} needs chunks >= 2 (got {chunks}); for one chunk use 1f1b")
    if spec.chunks is not None and chunks != spec.chunks:
        raise ConfigError(f"{name} runs chunks={spec.chunks} per rank (got chunks={chunks})")
    if spec.ranks_divide_micro_batches and micro_batches % ranks:
        raise ConfigError(
            f"{name} needs micro_batches divisible by ranks (got m={micro_batches}, p={ranks})"
        )
    return spec


def build_schedule(name: str, ranks: int, micro_batches: int, chunks: int = 1) -> Schedule:
    """The schedule `name` for p ranks, m micro-batches and v chunks per rank, checked: a
    generator bug surfaces here as a ScheduleError, not as a hang or mixed-up tensors."""
    spec = _spec(name, ranks, micro_batches, chunks)
    if spec.chunks is None:
        schedule = spec.build(ranks, micro_batches, chunks)
    else:
        schedule = spec.build(ranks, micro_batches)
    check(schedule)
    return schedule


def theoretical_bubble(name: str, ranks: int, micro_batches: int, chunks: int = 1) -> float:
    """The idle fraction 1 - busy / (p * makespan) that the schedule's paper predicts.

    [Note: bubble formulas] Each is idle / (idle + busy) of one rank, the form `simulate`
    measures, for stages of equal cost:
    - gpipe, 1f1b: (p-1)/(m+p-1): each rank idles (p-1)(F+B) beside m(F+B) of work.
    - interleaved_1f1b: (p-1)/(v*m+p-1). Megatron gives the bubble as (p-1)/(v*m) of the
      ideal time; a bubble b of the ideal time is b/(1+b) of the makespan.
    - zb_h1: (p-1)/(3m+p-1) with F = I = W = 1: the paper's bubble (p-1)(F+I-W) = p-1
      beside 3m of work, a third of 1F1B's 3(p-1) at the same costs (B = I + W = 2).
    - zbv: (p-1)/(6m+p-1) with F = I = W = 1 per chunk: the p-1 slots before micro-batch 0
      reaches the last rank, beside 6m of work. No order does better at these costs (the
      last rank starts after p-1 forwards); it is the paper's "zero bubble" seen from a
      shared start and end.
    Simulated with those costs, gpipe, 1f1b and interleaved_1f1b meet them exactly, zb_h1
    for m >= p, zbv when p divides m; otherwise zbv's last m mod p micro-batches cross the
    V as a partial wave (up to ~3.5x the bound, still below 1F1B).
    """
    return _spec(name, ranks, micro_batches, chunks).bubble(ranks, micro_batches, chunks)


# --- Simulation and checks -----------------------------------------------------------------


@dataclass(frozen=True)
class Simulation:
    """A timed run: all ranks start at 0, a message arrives `comm` after its send."""

    busy: tuple[float, ...]
    """Per rank, time spent computing."""
    makespan: float
    """Time until the last rank finishes."""
    starts: tuple[tuple[float, ...], ...]
    """Per rank, the start time of each compute action, in `Schedule.compute` order."""

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time: 1 - total busy / (ranks * makespan)."""
        return 1 - sum(self.busy) / (len(self.busy) * self.makespan)


def simulate(
    schedule: Schedule,
    forward: float = 1.0,
    backward: float = 2.0,
    backward_input: float = 1.0,
    backward_weight: float = 1.0,
    comm: float = 0.0,
) -> Simulation:
    """Run every rank's `actions` with these costs per action (see [Note: execution model]);
    raises ScheduleError if the order deadlocks or breaks a same-rank dependency."""
    return _run(schedule, {F: forward, B: backward, I: backward_input, W: backward_weight}, comm)


def _run(schedule: Schedule, cost: Mapping[Kind, float], comm: float) -> Simulation:
    """[Note: execution model] The runtime's semantics: each rank runs its program in order;
    a send never blocks (isend, waited for at the end of the step), a receive blocks until
    the matching send has run. Ranks are advanced in turn as far as each can go; a round
    without progress while actions remain is a deadlock. Times follow the dependencies, so
    the order in which ranks are advanced does not change them."""
    programs = [schedule.actions(rank) for rank in range(schedule.ranks)]
    position = [0] * schedule.ranks
    clock = [0.0] * schedule.ranks
    busy = [0.0] * schedule.ranks
    starts: list[list[float]] = [[] for _ in programs]
    done: list[set[tuple[Kind, int, int]]] = [set() for _ in programs]
    arrival: dict[tuple[Kind, int, int], float] = {}  # keyed as the receive will ask
    while any(position[rank] < len(program) for rank, program in enumerate(programs)):
        progressed = False
        for rank, program in enumerate(programs):
            while position[rank] < len(program):
                action = program[position[rank]]
                key = (action.kind, action.micro, action.stage)
                if action.kind in _RECV_OF_SEND:
                    recv, step = _RECV_OF_SEND[action.kind]
                    arrival[(recv, action.micro, action.stage + step)] = clock[rank] + comm
                elif action.kind in _COMPUTE:
                    _require_local_inputs(schedule, rank, action, done[rank])
                    starts[rank].append(clock[rank])
                    clock[rank] += cost[action.kind]
                    busy[rank] += cost[action.kind]
                    done[rank].add(key)
                elif key in arrival:
                    clock[rank] = max(clock[rank], arrival[key])
                else:
                    break
                position[rank] += 1
                progressed = True
        if not progressed:
            waits = "; ".join(
                f"rank {rank} waits at {program[position[rank]]}"
                for rank, program in enumerate(programs)
                if position[rank] < len(program)
            )
            raise ScheduleError(f"{schedule.name} deadlocks: {waits}")
    return Simulation(tuple(busy), max(clock), tuple(map(tuple, starts)))


def _require_local_inputs(
    schedule: Schedule, rank: int, action: Action, done: set[tuple[Kind, int, int]]
) -> None:
    """Raise unless what `action` needs from its own rank has run: the previous stage's F
    (for F); the stage's F and the next stage's B or I (for B, I); the stage's I (for W).
    What comes from another rank arrives through a receive, which blocks instead."""
    stage = action.stage
    if action.kind is F:
        needs = [((F,), stage - 1)]
    elif action.kind is W:
        needs = [((I,), stage)]
    else:
        needs = [((F,), stage), ((B, I), stage + 1)]
    for kinds, source in needs:
        local = 0 <= source < schedule.stages and schedule.rank_of(source) == rank
        if local and not any((kind, action.micro, source) in done for kind in kinds):
            needed = "/".join(kind.value for kind in kinds) + f"{action.micro}s{source}"
            raise ScheduleError(f"rank {rank}: {action} runs before {needed}, which it needs")


def sends_complete_at(schedule: Schedule, rank: int) -> dict[int, list[int]]:
    """[Note: sends complete early] Index of a receive in `rank`'s `actions` -> the indices of
    its earlier sends that are complete once that receive is: the peer sent the received
    message after its receive of theirs had completed, so their bytes have all arrived. The
    runtime then lets their tensors go instead of holding every send of the step to its end
    (m activations, or input gradients, alive beside the in-flight ones). Sends that no later
    message vouches for (the step's last few) are waited for at the step's end. Channels are
    FIFO (`check`), so the k-th send to a peer is its k-th receive from this rank."""
    mine = schedule.actions(rank)
    complete: dict[int, list[int]] = {}
    for peer in {a.peer for a in mine if a.peer is not None}:
        theirs = schedule.actions(peer)
        sends, receives = _messages(mine, peer)
        their_sends, their_receives = _messages(theirs, rank)
        for send, their_receive in zip(sends, their_receives, strict=True):
            later = next((j for j, i in enumerate(their_sends) if i > their_receive), None)
            if later is not None:
                complete.setdefault(receives[later], []).append(send)
    return complete


def _messages(program: tuple[Action, ...], peer: int) -> tuple[list[int], list[int]]:
    """Indices in `program` of its sends to `peer` and of its receives from it, in order."""
    sends = [i for i, a in enumerate(program) if a.peer == peer and a.kind in _RECV_OF_SEND]
    receives = [i for i, a in enumerate(program) if a.peer == peer and a.kind not in _RECV_OF_SEND]
    return sends, receives


def check(schedule: Schedule) -> None:
    """Raise ScheduleError, one line naming the rank and action, unless the schedule
    1. runs each (micro-batch, stage) once forward and once backward (B, or I and W) on
       the stage's rank;
    2. receives, between every ordered pair of ranks, messages in the order they are sent.
       NCCL matches point-to-point operations between two ranks in issue order, without
       tags, so this is checked across activations and gradients together (and so holds
       for each kind alone);
    3. respects every dependency and cannot deadlock (see [Note: execution model]);
    4. holds no more activations on rank r than its named schedule allows: gpipe m; 1f1b
       min(p-r, m); interleaved_1f1b min((v-1)p + 2(p-r-1) + 1, m*v), its warm-up plus
       one; zb_h1 min(p, m); zbv 2*min(p, m) chunk activations, p stages' worth. A
       schedule named otherwise (built by hand) has no bound.
    """
    _check_complete(schedule)
    _check_fifo(schedule)
    _run(schedule, dict.fromkeys(_COMPUTE, 1.0), comm=0.0)
    spec = _SPECS.get(schedule.name)
    if spec is None:
        return
    p, m, v = schedule.ranks, schedule.micro_batches, schedule.chunks
    for rank, peak in enumerate(schedule.in_flight_peak()):
        bound = spec.max_in_flight(p, m, v, rank)
        if peak > bound:
            raise ScheduleError(
                f"rank {rank}: holds {peak} activations at once; {schedule.name} allows {bound}"
            )


def _check_complete(schedule: Schedule) -> None:
    if len(schedule.compute) != schedule.ranks:
        raise ScheduleError(
            f"{schedule.name} has programs for {len(schedule.compute)} of {schedule.ranks} ranks"
        )
    seen: set[tuple[Kind, int, int]] = set()
    for rank, actions in enumerate(schedule.compute):
        for action in actions:
            key = (action.kind, action.micro, action.stage)
            if action.kind not in _COMPUTE:
                problem = "is not a compute action"
            elif not (0 <= action.micro < schedule.micro_batches):
                problem = f"is outside micro-batches 0..{schedule.micro_batches - 1}"
            elif not (0 <= action.stage < schedule.stages):
                problem = f"is outside stages 0..{schedule.stages - 1}"
            elif schedule.rank_of(action.stage) != rank:
                problem = f"belongs on rank {schedule.rank_of(action.stage)}"
            elif key in seen:
                problem = "runs twice"
            else:
                seen.add(key)
                continue
            raise ScheduleError(f"rank {rank}: {action} {problem}")
    for stage in range(schedule.stages):
        for micro in range(schedule.micro_batches):
            kinds = {kind for kind in _COMPUTE if (kind, micro, stage) in seen}
            if kinds not in ({F, B}, {F, I, W}):
                runs = "".join(kind.value for kind in (F, B, I, W) if kind in kinds) or "nothing"
                raise ScheduleError(
                    f"rank {schedule.rank_of(stage)}: micro-batch {micro} of stage {stage} "
                    f"runs {runs}; it needs F and B, or F, I and W"
                )


def _check_fifo(schedule: Schedule) -> None:
    # Each send is recorded as the receive that should take it, so the lists compare as is.
    sent: dict[tuple[int, int], list[Action]] = {}
    received: dict[tuple[int, int], list[Action]] = {}
    for rank in range(schedule.ranks):
        for action in schedule.actions(rank):
            if action.kind in _RECV_OF_SEND:
                recv, step = _RECV_OF_SEND[action.kind]
                expected = Action(recv, action.micro, action.stage + step, rank)
                sent.setdefault((rank, action.peer), []).append(expected)
            elif action.kind not in _COMPUTE:
                received.setdefault((action.peer, rank), []).append(action)
    for (source, destination), messages in sent.items():
        receives = received[(source, destination)]
        for index, (message, receive) in enumerate(zip(messages, receives, strict=True)):
            if message != receive:
                raise ScheduleError(
                    f"rank {destination}: receive #{index} from rank {source} is {receive}, "
                    f"but rank {source} sends for {message} first (NCCL matches in order)"
                )
