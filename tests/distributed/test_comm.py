from __future__ import annotations

import re
import threading
from functools import cache

import pytest
import torch
import torch.distributed as dist

from shardwise.accelerator import get_accelerator
from shardwise.distributed import comm, host
from shardwise.distributed.agreement import CollectiveMismatchError, check_collectives
from shardwise.distributed.comm import CommStats
from shardwise.distributed.dims import ParallelDims

# --- helpers that run on the ranks -----------------------------------------------------------


def _device() -> torch.device:
    return get_accelerator().device(dist.get_rank())


@cache
def _mesh():
    """(dp_shard=2, tp=2) on 4 ranks, built once per worker process."""
    dims = ParallelDims(1, 2, 1, 2, 1, "1d", 1, world_size=dist.get_world_size())
    return dims.build_mesh(get_accelerator().device_type)


def _counts(stats: CommStats, axis: str, op: str) -> tuple:
    return tuple(stats.total(kind, axis, op) for kind in ("calls", "payload_bytes", "wire_bytes"))


def _rank_tensor(numel: int, rank: int) -> torch.Tensor:
    """Rank-dependent values every rank can recompute for any other rank."""
    return torch.arange(numel, dtype=torch.float32, device=_device()) + 1000.0 * rank


# --- no process group: every op is the one-rank fast path --------------------------------------


def test_without_a_process_group_every_op_is_local():
    assert not dist.is_initialized()
    x = torch.arange(6.0).reshape(2, 3).requires_grad_()
    with CommStats() as stats:
        assert comm.all_reduce_(x.detach(), None) is None
        assert comm.all_reduce_(x.detach(), None, async_op=True).wait()
        out = torch.empty(2, 3)
        comm.all_gather_(out, x.detach(), None)
        assert torch.equal(out, x)
        for fn in (comm.copy_to_group, comm.reduce_from_group):
            assert fn(x, None) is x
        for fn in (comm.gather_along_dim, comm.scatter_along_dim, comm.reduce_scatter_along_dim):
            assert fn(x, 1, None) is x
        assert comm.all_to_all_along_dims(x, 0, 1, None) is x
    assert stats.as_dict() == {} and comm.last_collective() is None
    assert (comm.group_size(None), comm.group_rank(None)) == (1, 0)


def test_stats_totals_dict_table_and_reset():
    stats = CommStats()
    stats.record("dp", "all_reduce", 4000, 6000.0)
    stats.record("dp", "all_reduce", 4000, 6000.0)
    stats.record("tp", "all_gather", 1000, 3000.0)
    assert stats.total() == 15000.0
    assert stats.total("calls", axis="dp") == 2
    assert stats.total("payload_bytes", op="all_gather") == 1000
    assert stats.total("wire_bytes", axis="tp", op="all_reduce") == 0
    assert stats.as_dict() == {
        "dp": {"all_reduce": {"calls": 2, "payload_bytes": 8000, "wire_bytes": 12000.0}},
        "tp": {"all_gather": {"calls": 1, "payload_bytes": 1000, "wire_bytes": 3000.0}},
    }
    lines = stats.table().splitlines()
    assert lines[0].split() == ["axis", "op", "calls", "payload", "wire"]
    assert lines[1].split() == ["dp", "all_reduce", "2", "7.8", "KiB", "11.7", "KiB"]
    assert lines[-1].split() == ["total", "3", "8.8", "KiB", "14.6", "KiB"]
    with pytest.raises(ValueError, match="kind='bytes'"):
        stats.total("bytes")
    stats.reset()
    assert stats.as_dict() == {} and stats.total() == 0


# --- in-place ops: values and exact bytes ------------------------------------------------------


def _in_place_ops() -> dict:
    rank, n = dist.get_rank(), dist.get_world_size()
    everyone = [_rank_tensor(1000, r) for r in range(n)]
    with CommStats() as stats:
        x = _rank_tensor(1000, rank)
        comm.all_reduce_(x, None)
        assert torch.equal(x, sum(everyone))

        gathered = torch.empty(1000, device=_device())
        comm.all_gather_(gathered, _rank_tensor(250, rank), None)
        assert torch.equal(gathered, torch.cat([_rank_tensor(250, r) for r in range(n)]))

        shard = torch.empty(250, device=_device())
        comm.reduce_scatter_(shard, _rank_tensor(1000, rank), None)
        assert torch.equal(shard, sum(everyone)[250 * rank : 250 * (rank + 1)])

        swapped = torch.empty(1000, device=_device())
        comm.all_to_all_(swapped, _rank_tensor(1000, rank), None)
        expected = torch.cat([everyone[r][250 * rank : 250 * (rank + 1)] for r in range(n)])
        assert torch.equal(swapped, expected)

        y = _rank_tensor(1000, rank)
        comm.broadcast_(y, 1, None)
        assert torch.equal(y, everyone[1])
    return stats.as_dict()


def test_in_place_ops_values_and_bytes(pool4):
    for rank, got in enumerate(pool4.run(_in_place_ops)):
        world = got["world"]
        assert world["all_reduce"] == {"calls": 1, "payload_bytes": 4000, "wire_bytes": 6000}
        assert world["all_gather"] == {"calls": 1, "payload_bytes": 1000, "wire_bytes": 3000}
        assert world["reduce_scatter"] == {"calls": 1, "payload_bytes": 4000, "wire_bytes": 3000}
        assert world["all_to_all"] == {"calls": 1, "payload_bytes": 4000, "wire_bytes": 3000}
        wire = 4000 if rank == 1 else 0
        assert world["broadcast"] == {"calls": 1, "payload_bytes": 4000, "wire_bytes": wire}


def _host_pieces() -> dict:
    """Collectives on host tensors in pieces ([Note: host collectives in pieces]), pieces made
    tiny here (12 elements of each rank's 250, the last one shorter): sync and async, and an
    all-gather into the tensor its input is a slice of (how ZeRO writes updated slices back)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    everyone = [_rank_tensor(1000, r) for r in range(n)]
    piece_bytes, host.PIECE_BYTES = host.PIECE_BYTES, 12 * n * 4
    try:
        with CommStats() as stats:
            for async_op in (False, True):
                gathered = torch.empty(1000, device=_device())
                work = comm.all_gather_(gathered, _rank_tensor(250, rank), None, async_op=async_op)
                if work is not None:
                    work.wait()
                assert torch.equal(gathered, torch.cat([_rank_tensor(250, r) for r in range(n)]))

                shard = torch.empty(250, device=_device())
                x = _rank_tensor(1000, rank)
                work = comm.reduce_scatter_(shard, x, None, async_op=async_op)
                if work is not None:
                    assert work.wait()
                assert torch.equal(shard, sum(everyone)[250 * rank : 250 * (rank + 1)])

            in_place = _rank_tensor(1000, rank)
            comm.all_gather_(in_place, in_place[250 * rank : 250 * (rank + 1)], None)
            assert torch.equal(
                in_place, torch.cat([everyone[r][250 * r : 250 * (r + 1)] for r in range(n)])
            )
    finally:
        host.PIECE_BYTES = piece_bytes
    return {"host": _device().type == "cpu", **stats.as_dict()["world"]}


def test_host_collectives_in_pieces_keep_values_and_count_once(pool4):
    for got in pool4.run(_host_pieces):
        assert got.pop("host"), "the pieces are the host's (gloo) path"
        # one recorded collective per call, whatever the pieces
        assert got["all_gather"]["calls"] == 3 and got["reduce_scatter"]["calls"] == 2


def _on_mesh_axes() -> tuple:
    mesh, rank = _mesh(), dist.get_rank()
    labelled = dist.new_group(list(range(dist.get_world_size())), group_desc="everyone")
    with CommStats() as stats:
        x = torch.ones(1000, device=_device())
        comm.all_reduce_(x, mesh["tp"])  # tp groups {0, 1}, {2, 3}
        assert torch.equal(x, torch.full_like(x, 2.0))
        y = torch.full((10,), float(rank), device=_device())
        comm.broadcast_(y, 1, mesh["dp_shard"])  # dp_shard groups {0, 2}, {1, 3}
        assert torch.equal(y, torch.full_like(y, float(rank % 2 + 2)))
        comm.all_reduce_(torch.ones(4, device=_device()), labelled)
        comm.all_reduce_(torch.ones(250, device=_device()), mesh["tp"].get_group())
        before = comm.last_collective()
        comm.all_reduce_(x, mesh["pp"])  # one rank: nothing happens, nothing is recorded
        comm.all_reduce_(x, mesh["pp"], async_op=True).wait()
        out = torch.empty(1000, device=_device())
        comm.all_gather_(out, x, mesh["sp"])
        assert torch.equal(out, x) and before is None
    assert (comm.group_size(mesh["tp"]), comm.group_rank(mesh["tp"])) == (2, rank % 2)
    with pytest.raises(ValueError, match="1-D mesh"):
        comm.all_reduce_(x, mesh)
    return stats.as_dict(), comm.group_size(labelled)


def test_axis_labels_and_one_rank_fast_path(pool4):
    for rank, (got, size) in enumerate(pool4.run(_on_mesh_axes)):
        assert size == 4
        wire = 40 if rank >= 2 else 0  # group rank 1 of dp_shard = global ranks 2 and 3
        assert got == {
            "tp": {"all_reduce": {"calls": 2, "payload_bytes": 5000, "wire_bytes": 5000}},
            "dp_shard": {"broadcast": {"calls": 1, "payload_bytes": 40, "wire_bytes": wire}},
            "everyone": {"all_reduce": {"calls": 1, "payload_bytes": 16, "wire_bytes": 24}},
        }


def _point_to_point(async_op: bool) -> dict:
    rank = dist.get_rank()
    with CommStats() as stats:
        x = torch.full((10,), 7.0 if rank == 0 else 0.0, device=_device())
        if rank == 0:
            work = comm.send(x, 1, None, async_op=async_op)
        else:
            work = comm.recv(x, 0, None, async_op=async_op)
        if async_op:
            assert comm.last_collective() is not None
            work.wait()
        assert comm.last_collective() is None
        assert torch.equal(x, torch.full_like(x, 7.0))
    return stats.as_dict()["world"]


@pytest.mark.parametrize("async_op", [False, True])
def test_send_recv_bytes(pool2, async_op):
    sent, received = pool2.run(_point_to_point, async_op)
    assert sent == {"send": {"calls": 1, "payload_bytes": 40, "wire_bytes": 40}}
    assert received == {"recv": {"calls": 1, "payload_bytes": 40, "wire_bytes": 0}}


# --- recording scope ---------------------------------------------------------------------------


def _recorder_scopes() -> dict:
    x = torch.ones(100, device=_device())
    explicit = CommStats()
    with CommStats() as outer:
        comm.all_reduce_(x, None)
        with CommStats() as inner:
            comm.all_reduce_(x, None, stats=explicit)
            comm.all_reduce_(x, None, stats=inner)  # already open: counted once
        comm.all_reduce_(x, None)
    comm.all_reduce_(x, None)  # no recorder open
    comm.all_reduce_(x, None, stats=explicit)

    # A backward collective counts into recorders still open when it runs.
    w = torch.ones(100, device=_device(), requires_grad=True)
    with CommStats() as fwd_and_bwd:
        comm.copy_to_group(w, None).sum().backward()
    with CommStats() as fwd_only:
        y = comm.copy_to_group(w, None).sum()
    y.backward()
    return {
        name: stats.total("calls", op="all_reduce")
        for name, stats in {
            "outer": outer,
            "inner": inner,
            "explicit": explicit,
            "fwd_and_bwd": fwd_and_bwd,
            "fwd_only": fwd_only,
        }.items()
    }


def test_nested_and_explicit_recorders(pool2):
    for got in pool2.run(_recorder_scopes):
        assert got == {"outer": 4, "inner": 2, "explicit": 2, "fwd_and_bwd": 1, "fwd_only": 0}


# --- last_collective ---------------------------------------------------------------------------


def _pending_descriptions() -> list:
    mesh = _mesh()
    seen = [comm.last_collective()]
    x = torch.zeros(262144, device=_device())  # 1.0 MiB of float32
    work = comm.all_reduce_(x, mesh["tp"], async_op=True)
    seen.append(comm.last_collective())
    work.wait()
    seen.append(comm.last_collective())
    work = comm.all_reduce_(x, mesh["tp"], async_op=True)
    comm.broadcast_(torch.zeros(3, dtype=torch.int64, device=_device()), 0, None)
    seen.append(comm.last_collective())  # the sync broadcast replaced and then cleared it
    work.wait()
    ids = torch.zeros(3, dtype=torch.int64, device=_device())
    work = comm.broadcast_(ids, 2, None, async_op=True)
    seen.append(comm.last_collective())
    work.wait()
    return seen


def test_last_collective_describes_the_pending_one(pool4):
    for seen in pool4.run(_pending_descriptions):
        assert seen[0] is None and seen[2] is None and seen[3] is None
        assert re.fullmatch(r"all_reduce on axis 'tp' \(1\.0 MiB float32, call #\d+\)", seen[1])
        assert re.fullmatch(
            r"broadcast from group rank 2 on axis 'world' \(24 B int64, call #\d+\)", seen[4]
        )
        first, last = (int(s.rsplit("#", 1)[1].rstrip(")")) for s in (seen[1], seen[4]))
        assert last == first + 3


# --- autograd functions against hand-computed references --------------------------------------


def _inputs(rank: int) -> torch.Tensor:
    return torch.arange(24.0, device=_device()).reshape(2, 4, 3) + 100.0 * rank


def _weights(rank: int, shape: tuple) -> torch.Tensor:
    return torch.arange(float(torch.Size(shape).numel()), device=_device()).reshape(shape) - rank


def _run_autograd(fn, x: torch.Tensor, weight: torch.Tensor, *args):
    x = x.clone().requires_grad_()
    with CommStats() as stats:
        y = fn(x, *args, None)
        (y * weight).sum().backward()
    return y.detach(), x.grad, stats


def _megatron_f_and_g() -> None:
    rank, n = dist.get_rank(), dist.get_world_size()
    w = [_weights(r, (2, 4, 3)) for r in range(n)]
    y, grad, stats = _run_autograd(comm.copy_to_group, _inputs(rank), w[rank])
    assert torch.equal(y, _inputs(rank)) and torch.equal(grad, sum(w))
    assert _counts(stats, "world", "all_reduce") == (1, 96, 144)

    y, grad, stats = _run_autograd(comm.reduce_from_group, _inputs(rank), w[rank])
    assert torch.equal(y, sum(_inputs(r) for r in range(n))) and torch.equal(grad, w[rank])
    assert _counts(stats, "world", "all_reduce") == (1, 96, 144)


def _gathers_and_scatters() -> None:
    rank, n = dist.get_rank(), dist.get_world_size()
    full = torch.cat([_inputs(r) for r in range(n)], dim=1)  # (2, 16, 3)
    own = slice(4 * rank, 4 * (rank + 1))

    # Replicated consumer: same weight everywhere, each rank keeps its slice of the grad.
    shared = _weights(0, (2, 16, 3))
    y, grad, stats = _run_autograd(comm.gather_along_dim, _inputs(rank), shared, 1)
    assert torch.equal(y, full) and torch.equal(grad, shared[:, own])
    assert _counts(stats, "world", "all_gather") == (1, 96, 288) and stats.total("calls") == 1

    # Sharded consumer (Megatron-SP f-bar): grads are partial sums, reduce-scattered.
    w = [_weights(r, (2, 16, 3)) for r in range(n)]
    fn = comm.gather_along_dim_reduce_scatter_grad
    y, grad, stats = _run_autograd(fn, _inputs(rank), w[rank], -2)
    assert torch.equal(y, full) and torch.equal(grad, sum(w)[:, own])
    assert _counts(stats, "world", "reduce_scatter") == (1, 384, 288)

    w = [_weights(r, (2, 4, 3)) for r in range(n)]
    y, grad, stats = _run_autograd(comm.scatter_along_dim, full, w[rank], 1)
    assert torch.equal(y, _inputs(rank)) and torch.equal(grad, torch.cat(w, dim=1))
    assert _counts(stats, "world", "all_gather") == (1, 96, 288) and stats.total("calls") == 1

    # Megatron-SP g-bar: reduce-scatter forward, all-gather backward.
    summed = sum(torch.cat([_inputs(r)] * n, dim=1) * (r + 1) for r in range(n))
    x = torch.cat([_inputs(rank)] * n, dim=1) * (rank + 1)
    y, grad, stats = _run_autograd(comm.reduce_scatter_along_dim, x, w[rank], 1)
    assert torch.equal(y, summed[:, own]) and torch.equal(grad, torch.cat(w, dim=1))
    assert _counts(stats, "world", "reduce_scatter") == (1, 384, 288)
    assert _counts(stats, "world", "all_gather") == (1, 96, 288)


def _ulysses_all_to_all() -> None:
    rank, n = dist.get_rank(), dist.get_world_size()
    inputs = [torch.arange(64.0, device=_device()).reshape(2, 4, 8) + 100 * r for r in range(n)]
    # Sequence-sharded (seq 4 of 16) -> head-sharded (heads 2 of 8): dim 2 scattered, dim 1
    # gathered in rank order.
    expected = torch.cat([inputs[r][:, :, 2 * rank : 2 * rank + 2] for r in range(n)], dim=1)
    w = [_weights(r, (2, 16, 2)) for r in range(n)]
    y, grad, stats = _run_autograd(comm.all_to_all_along_dims, inputs[rank], w[rank], 2, 1)
    assert torch.equal(y, expected)
    want = torch.cat([w[j][:, 4 * rank : 4 * rank + 4] for j in range(n)], dim=2)
    assert torch.equal(grad, want)
    assert _counts(stats, "world", "all_to_all") == (2, 512, 384)


@pytest.mark.parametrize("case", [_megatron_f_and_g, _gathers_and_scatters, _ulysses_all_to_all])
def test_autograd_functions_match_references(pool4, case):
    pool4.run(case)


def _autograd_on_tp_axis() -> None:
    mesh, rank = _mesh(), dist.get_rank()
    peer = rank ^ 1  # the other rank of this tp pair
    x = torch.full((3, 2), float(rank), device=_device(), requires_grad=True)
    with CommStats() as stats:
        y = comm.gather_along_dim(x, 0, mesh["tp"])
        y.sum().backward()
    pair = [x.detach(), torch.full_like(x.detach(), float(peer))]
    assert torch.equal(y, torch.cat(pair if rank % 2 == 0 else pair[::-1]))
    assert torch.equal(x.grad, torch.ones_like(x))
    assert stats.as_dict() == {
        "tp": {"all_gather": {"calls": 1, "payload_bytes": 24, "wire_bytes": 24}}
    }


def test_autograd_function_on_a_mesh_axis(pool4):
    pool4.run(_autograd_on_tp_axis)


def _indivisible() -> str:
    with pytest.raises(ValueError) as info:
        comm.scatter_along_dim(torch.zeros(2, 3), 1, None)
    return str(info.value)


def test_indivisible_dims_are_refused(pool4):
    messages = pool4.run(_indivisible)
    assert messages[0] == (
        "scatter_along_dim: size 3 of dim 1 is not divisible by the group size 4"
    )


def test_recording_into_carries_forward_recorders_to_another_thread():
    """What a custom autograd Function does for a backward on an autograd engine thread,
    which starts with an empty context: the forward's recorders, if still open, record it."""
    seen = []
    with comm.CommStats() as outer:
        remembered = comm.open_recorders()

        def backward_thread() -> None:
            seen.append(comm.open_recorders())
            with comm.recording_into(remembered):
                seen.append(comm.open_recorders())
            seen.append(comm.open_recorders())

        worker = threading.Thread(target=backward_thread)
        worker.start()
        worker.join()
    assert seen == [(), (outer,), ()]
    with comm.recording_into(remembered):
        assert comm.open_recorders() == ()  # closed recorders are not revived


def _mismatched_collectives() -> list:
    """Two agreeing collectives, then rank 1 reduces one element more than rank 0."""
    rank = dist.get_rank()
    check_collectives(True)
    try:
        agreed = comm.all_reduce_(torch.ones(3), None)
        comm.all_gather_(torch.empty(4), torch.ones(2), None)
        try:
            comm.all_reduce_(torch.ones(3 + rank), None)
        except CollectiveMismatchError as err:
            return [agreed, str(err)]
        return [agreed, None]
    finally:
        check_collectives(False)


def test_check_collectives_names_both_call_sites_of_a_mismatch(pool2):
    first, second = pool2.run(_mismatched_collectives)
    assert first == second  # every rank raised the same line
    message = first[1]
    assert message.startswith("collectives differ on axis 'world' (check #3): ")
    assert "group rank 0: all_reduce of [3] float32 at test_comm.py:" in message
    assert "group rank 1: all_reduce of [4] float32 at test_comm.py:" in message
    assert message.count("in _mismatched_collectives") == 2
