"""Pipeline schedules as data: every built schedule passes `check` and meets its memory and
bubble claims; hand-broken schedules are caught; bad names and sizes are one-line errors."""

from __future__ import annotations

import re

import pytest

from shardwise.errors import ConfigError
from shardwise.pipeline.schedules import (
    SCHEDULES,
    Action,
    Kind,
    Schedule,
    ScheduleError,
    build_schedule,
    check,
    sends_complete_at,
    simulate,
    theoretical_bubble,
)


def _cases() -> list[tuple[str, int, int, int]]:
    """(name, p, m, v) over the sizes each schedule accepts."""
    cases = []
    for p in (1, 2, 3, 4):
        for m in range(1, 9):
            cases += [("gpipe", p, m, 1), ("1f1b", p, m, 1), ("zb_h1", p, m, 1), ("zbv", p, m, 2)]
            if m % p == 0:
                cases += [("interleaved_1f1b", p, m, v) for v in (2, 3)]
    return cases


CASES = _cases()


def _in_flight_bound(name: str, p: int, m: int, v: int, rank: int) -> int:
    """What each schedule is documented to hold at most, per rank (see `check`)."""
    return {
        "gpipe": m,
        "1f1b": min(p - rank, m),
        "interleaved_1f1b": min((v - 1) * p + 2 * (p - rank - 1) + 1, m * v),
        "zb_h1": min(p, m),
        "zbv": 2 * min(p, m),
    }[name]


@pytest.mark.parametrize(("name", "p", "m", "v"), CASES)
def test_built_schedules_pass_check_within_their_memory_bound(name, p, m, v):
    schedule = build_schedule(name, p, m, v)
    check(schedule)
    assert (schedule.ranks, schedule.micro_batches, schedule.chunks) == (p, m, v)
    bounds = [_in_flight_bound(name, p, m, v, rank) for rank in range(p)]
    peaks = schedule.in_flight_peak()
    assert all(peak <= bound for peak, bound in zip(peaks, bounds, strict=True)), (peaks, bounds)
    if name != "zbv":  # the bound is what the schedule holds
        assert peaks == bounds


def _sends_held(schedule: Schedule, rank: int) -> int:
    """The most isends `rank` holds at once: each from its action until the receive that
    shows it complete (`sends_complete_at`), or the step's end."""
    complete = sends_complete_at(schedule, rank)
    held = most = 0
    for index, action in enumerate(schedule.actions(rank)):
        held += action.kind in (Kind.SEND_ACT, Kind.SEND_GRAD)
        held -= len(complete.get(index, ()))
        most = max(most, held)
    return most


@pytest.mark.parametrize(("name", "p", "m", "v"), CASES)
def test_sends_are_let_go_once_a_later_receive_shows_them_complete(name, p, m, v):
    """No rank holds more sent tensors than the schedule's largest count of activations in
    flight (held until the step's end, they were every send of the step: ~m per stage), and a
    receive vouches only for earlier sends to the rank it receives from."""
    schedule = build_schedule(name, p, m, v)
    bound = max(schedule.in_flight_peak())
    assert all(_sends_held(schedule, rank) <= bound for rank in range(p))
    for rank in range(p):
        actions = schedule.actions(rank)
        for receive, sends in sends_complete_at(schedule, rank).items():
            assert all(s < receive and actions[s].peer == actions[receive].peer for s in sends)


@pytest.mark.parametrize(("name", "p", "m", "v"), CASES)
def test_comms_pair_up_and_every_stage_runs_where_placed(name, p, m, v):
    schedule = build_schedule(name, p, m, v)
    assert sorted(s for r in range(p) for s in schedule.stages_of(r)) == list(range(p * v))
    sends, recvs = 0, 0
    for rank in range(p):
        for action in schedule.actions(rank):
            if action.kind in (Kind.SEND_ACT, Kind.SEND_GRAD):
                sends += 1
                assert action.peer != rank
            elif action.kind in (Kind.RECV_ACT, Kind.RECV_GRAD):
                recvs += 1
                assert action.peer != rank
            else:
                assert schedule.rank_of(action.stage) == rank
    crossings = sum(schedule.rank_of(s) != schedule.rank_of(s + 1) for s in range(p * v - 1))
    assert sends == recvs == 2 * m * crossings


def test_zbv_places_stages_in_a_v():
    schedule = build_schedule("zbv", 4, 8, 2)
    assert [schedule.rank_of(s) for s in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert schedule.stages_of(0) == (0, 7)
    assert build_schedule("interleaved_1f1b", 4, 8, 2).stages_of(1) == (1, 5)


@pytest.mark.parametrize("p", [1, 2, 3, 8])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_makespan_is_m_plus_p_minus_1_rounds(name, p, m):
    """With uniform stages, makespan = (m+p-1)(F+B), so the bubble is (p-1)/(m+p-1)."""
    schedule = build_schedule(name, p, m)
    for forward, backward in [(1.0, 2.0), (1.0, 3.0), (2.0, 1.0)]:
        run = simulate(schedule, forward=forward, backward=backward)
        assert run.makespan == (m + p - 1) * (forward + backward)
    assert simulate(schedule).bubble_fraction == pytest.approx(theoretical_bubble(name, p, m))
    assert theoretical_bubble(name, p, m) == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize(("p", "m", "v"), [(2, 2, 2), (2, 6, 3), (4, 4, 2), (4, 8, 3), (8, 16, 2)])
def test_interleaved_bubble_is_megatrons_and_below_1f1b(p, m, v):
    interleaved = simulate(build_schedule("interleaved_1f1b", p, m, v)).bubble_fraction
    assert interleaved == pytest.approx((p - 1) / (v * m + p - 1))
    assert interleaved == pytest.approx(theoretical_bubble("interleaved_1f1b", p, m, v))
    assert interleaved < simulate(build_schedule("1f1b", p, m)).bubble_fraction


@pytest.mark.parametrize(("p", "m"), [(p, m) for p in (2, 3, 4) for m in range(1, 9)] + [(8, 16)])
@pytest.mark.parametrize(("name", "v"), [("zb_h1", 1), ("zbv", 2)])
def test_zero_bubble_schedules_beat_1f1b(name, v, p, m):
    """F = I = W = 1, B = 2: below 1F1B always; the paper's bubble exactly once m >= p (ZB-V:
    once p divides m, see [Note: bubble formulas])."""
    bubble = simulate(build_schedule(name, p, m, v)).bubble_fraction
    assert bubble < simulate(build_schedule("1f1b", p, m)).bubble_fraction
    if m >= p and (name == "zb_h1" or m % p == 0):
        assert bubble == pytest.approx(theoretical_bubble(name, p, m, v))
    else:
        assert bubble >= theoretical_bubble(name, p, m, v)


def test_zb_h1_idles_a_third_of_1f1b():
    p, m = 4, 8
    idle = {
        name: p * run.makespan - sum(run.busy)
        for name in ("1f1b", "zb_h1")
        for run in [simulate(build_schedule(name, p, m))]
    }
    assert idle["zb_h1"] * 3 == idle["1f1b"] == 3 * (p - 1) * p


def test_simulation_with_comm_cost_slows_but_finishes():
    for name, v in [("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1), ("zbv", 2)]:
        schedule = build_schedule(name, 4, 8, v)
        assert simulate(schedule, comm=0.5).makespan > simulate(schedule).makespan


def test_timeline_prints_one_row_per_rank():
    rows = build_schedule("1f1b", 2, 3).timeline().splitlines()
    assert rows == [
        "r0 F0 F1 .  B0 F2 B1 .  B2",
        "r1 .  F0 B0 F1 B1 F2 B2 .",
    ]
    zbv_rows = build_schedule("zbv", 2, 2, 2).timeline().splitlines()
    assert len(zbv_rows) == 2 and zbv_rows[0].split()[1:3] == ["F0s0", "F1s0"]


def test_actions_insert_comms_around_compute():
    schedule = build_schedule("1f1b", 2, 2)
    assert [str(a) for a in schedule.actions(1)] == [
        "recv_act 0 s1<-r0",
        "F0s1",
        "B0s1",
        "send_grad 0 s1->r0",
        "recv_act 1 s1<-r0",
        "F1s1",
        "B1s1",
        "send_grad 1 s1->r0",
    ]
    assert str(schedule.actions(0)[1]) == "send_act 0 s0->r1"


_WORD = re.compile(r"([FBIW])(\d+)s(\d+)")


def _hand(ranks: int, micro_batches: int, chunks: int, *programs: str) -> Schedule:
    """A schedule written by hand, one program per rank: "F0s0 B0s0" is F then B of
    micro-batch 0 on stage 0. Named "hand", so `check` applies no memory bound."""
    compute = tuple(
        tuple(
            Action(Kind(kind), int(micro), int(stage))
            for kind, micro, stage in _WORD.findall(program)
        )
        for program in programs
    )
    return Schedule("hand", ranks, micro_batches, chunks, compute)


def test_backward_before_its_forward_is_caught():
    with pytest.raises(ScheduleError, match=r"rank 0: B0s0 runs before F0s0"):
        check(_hand(1, 1, 1, "B0s0 F0s0"))


def test_a_deadlocking_order_is_caught():
    # Rank 0 waits for micro-batch 0's gradient before sending micro-batch 1's input, which
    # rank 1 needs before it runs micro-batch 0's backward: each waits on the other.
    schedule = _hand(2, 2, 1, "F0s0 B0s0 F1s0 B1s0", "F0s1 F1s1 B0s1 B1s1")
    with pytest.raises(ScheduleError) as caught:
        check(schedule)
    message = str(caught.value)
    assert "deadlocks" in message and "\n" not in message
    assert "rank 0 waits at recv_grad 0 s0<-r1" in message
    assert "rank 1 waits at recv_act 1 s1<-r0" in message


def test_a_fifo_violation_is_caught():
    # Rank 0 takes gradients in the reverse of the order rank 1 sends them: NCCL would
    # hand micro-batch 0's gradient to the receive meant for micro-batch 1.
    schedule = _hand(2, 2, 1, "F0s0 F1s0 B1s0 B0s0", "F0s1 B0s1 F1s1 B1s1")
    with pytest.raises(ScheduleError, match=r"rank 0: receive #0 from rank 1 is recv_grad 1"):
        check(schedule)


def test_a_fifo_violation_across_activations_and_gradients_is_caught():
    # Interleaved placement, p=2, v=2: rank 1 sends rank 0 both activations (stage 1 -> 2)
    # and gradients (stages 3 -> 2 and 1 -> 0). Each kind alone arrives in order, but rank 0
    # receives micro-batch 0's gradient before micro-batch 1's activation, which rank 1 sent
    # first: without tags NCCL would swap the two tensors (same shape).
    schedule = _hand(
        2,
        2,
        2,
        "F0s0 F1s0 F0s2 B0s2 F1s2 B0s0 B1s2 B1s0",
        "F0s1 F1s1 F0s3 B0s3 B0s1 F1s3 B1s3 B1s1",
    )
    with pytest.raises(
        ScheduleError,
        match=r"rank 0: receive #1 from rank 1 is recv_grad 0 s2<-r1, "
        r"but rank 1 sends for recv_act 1 s2<-r1 first",
    ):
        check(schedule)


@pytest.mark.parametrize(
    ("program", "message"),
    [
        ("F0s0", "micro-batch 0 of stage 0 runs F; it needs F and B"),
        ("F0s0 B0s0 B0s0", "B0s0 runs twice"),
        ("F0s0 I0s0", "runs FI; it needs F and B, or F, I and W"),
        ("F0s0 I0s0 W0s0 B0s0", "runs FBIW; it needs F and B, or F, I and W"),
        ("F0s0 W0s0 I0s0", "rank 0: W0s0 runs before I0s0"),
        ("F0s0 B0s0 F0s3", "outside stages 0..0"),
        ("F0s0 B0s0 F1s0", "outside micro-batches 0..0"),
    ],
)
def test_incomplete_or_misordered_programs_are_caught(program, message):
    with pytest.raises(ScheduleError, match=message):
        check(_hand(1, 1, 1, program))


def test_a_wrongly_placed_action_is_caught():
    with pytest.raises(ScheduleError, match="rank 0: F0s1 belongs on rank 1"):
        check(_hand(2, 1, 1, "F0s1", ""))


def test_holding_more_than_the_named_schedule_allows_is_caught():
    # GPipe's order under 1F1B's name: each rank holds both activations; 1F1B allows p-r,
    # 2 on rank 0 but 1 on rank 1.
    gpipe = build_schedule("gpipe", 2, 2)
    schedule = Schedule("1f1b", 2, 2, 1, gpipe.compute)
    with pytest.raises(ScheduleError, match="rank 1: holds 2 activations at once; 1f1b allows 1"):
        check(schedule)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("x", 4, 8), "schedule 'x' is unknown; use one of gpipe, 1f1b, interleaved_1f1b"),
        (("interleaved_1f1b", 4, 6, 2), r"needs micro_batches divisible by ranks \(got m=6, p=4\)"),
        (("interleaved_1f1b", 4, 8), r"needs chunks >= 2 \(got 1\); for one chunk use 1f1b"),
        (("1f1b", 4, 0), r"1f1b needs at least 1 micro-batch \(got micro_batches=0\)"),
        (("gpipe", 0, 4), r"gpipe needs at least 1 rank"),
        (("1f1b", 4, 8, 2), r"1f1b runs chunks=1 per rank \(got chunks=2\)"),
        (("zbv", 4, 8), r"zbv runs chunks=2 per rank \(got chunks=1\)"),
    ],
)
def test_bad_names_and_sizes_are_one_line_config_errors(args, message):
    with pytest.raises(ConfigError, match=message) as caught:
        build_schedule(*args)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError):
        theoretical_bubble(*args)


def test_registry_names_every_schedule():
    assert list(SCHEDULES) == ["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv"]
    assert SCHEDULES["1f1b"](2, 3) == build_schedule("1f1b", 2, 3)
