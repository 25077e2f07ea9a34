from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from shardwise.accelerator import get_accelerator
from shardwise.config import ParallelConfig
from shardwise.distributed.dims import AXIS_NAMES, ParallelDims, valid_tp_degrees
from shardwise.distributed.dims import dp_mesh as flat_dp_mesh
from shardwise.errors import ConfigError


def _dims(world_size: int, **degrees) -> ParallelDims:
    return ParallelDims.from_config(ParallelConfig(**degrees), world_size)


def _error(world_size: int, **degrees) -> str:
    with pytest.raises(ConfigError) as info:
        _dims(world_size, **degrees)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_dp_shard_minus_one_takes_what_the_other_degrees_leave():
    dims = _dims(8, tp=2)
    assert (dims.dp_replicate, dims.dp_shard, dims.pp, dims.sp, dims.tp) == (1, 4, 1, 1, 2)
    assert dims.dp == 4 and dims.world_size == 8
    assert _dims(16, dp_replicate=2, pp=2, sp=2).dp_shard == 2
    assert _dims(1).dp_shard == 1
    assert dims.axis_names == AXIS_NAMES == ("dp_replicate", "dp_shard", "pp", "sp", "tp")
    assert dims.mesh_shape == (1, 4, 1, 1, 2)


def test_explicit_degrees_are_kept():
    dims = _dims(8, dp_replicate=2, dp_shard=2, tp=2)
    assert (dims.dp, dims.mesh_shape) == (4, (2, 2, 1, 1, 2))


def test_dp_shard_minus_one_needs_a_divisible_world():
    assert _error(4, tp=3) == (
        "parallel.dp_shard=-1 cannot be resolved: world size 4 is not divisible by "
        "dp_replicate x pp x sp x tp = 1x1x1x3 = 3; use a multiple of 3 processes"
    )


def test_degrees_must_multiply_to_the_world_size():
    assert _error(4, dp_shard=3, tp=2) == (
        "parallel degrees dp_replicate x dp_shard x pp x sp x tp = 1x3x1x1x2 = 6 "
        "do not match world size 4"
    )


def test_world_size_must_be_positive():
    assert "world size 0" in _error(0)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="= 4 do not match world size 8"):
        ParallelDims(1, 2, 1, 2, 1, "1d", 1, world_size=8)
    with pytest.raises(ConfigError, match=r"parallel.dp_shard=-1 must be a whole number >= 1"):
        ParallelDims(1, -1, 1, 2, 1, "1d", 1, world_size=2)


def test_tp_depth_only_with_two_and_a_half_d():
    assert _error(8, tp=2, tp_depth=2) == (
        "parallel.tp_depth=2 only applies to tp_mode='2.5d' (tp_mode is '1d'); "
        "set tp_depth=1 or tp_mode='2.5d'"
    )
    assert "only applies" in _error(8, tp=4, tp_mode="2d", tp_depth=2)


def test_two_d_needs_a_square():
    assert _error(16, tp=8, tp_mode="2d") == (
        "parallel.tp=8 does not fit tp_mode='2d', which needs tp = a square q^2; "
        "valid tp up to world size 16: 1, 4, 9, 16"
    )
    assert _dims(16, tp=4, tp_mode="2d").dp_shard == 4


def test_two_and_a_half_d_needs_depth_times_a_square():
    assert _error(32, tp=4, tp_mode="2.5d", tp_depth=2) == (
        "parallel.tp=4 does not fit tp_mode='2.5d', which needs tp = tp_depth=2 x q^2; "
        "valid tp up to world size 32: 2, 8, 18, 32"
    )
    assert _dims(8, tp=8, tp_mode="2.5d", tp_depth=2).dp_shard == 1
    assert _error(4, tp=4, tp_mode="2.5d", tp_depth=8).endswith("up to world size 4: none")


def test_three_d_needs_a_cube():
    assert _error(27, tp=9, tp_mode="3d") == (
        "parallel.tp=9 does not fit tp_mode='3d', which needs tp = a cube q^3; "
        "valid tp up to world size 27: 1, 8, 27"
    )
    assert _dims(16, tp=8, tp_mode="3d").dp_shard == 2


def test_valid_tp_degrees():
    assert valid_tp_degrees("1d", 1, 4) == [1, 2, 3, 4]
    assert valid_tp_degrees("2d", 1, 64) == [1, 4, 9, 16, 25, 36, 49, 64]
    assert valid_tp_degrees("2.5d", 3, 100) == [3, 12, 27, 48, 75]
    assert valid_tp_degrees("3d", 1, 63) == [1, 8, 27]


@pytest.mark.parametrize(
    ("degrees", "split"),
    [
        ({"tp": 4}, (1, 1, 1)),
        ({"tp": 4, "tp_sequence_parallel": True}, (1, 4, 1)),
        ({"tp": 9, "tp_mode": "2d"}, (3, 1, 3)),
        ({"tp": 18, "tp_mode": "2.5d", "tp_depth": 2}, (6, 1, 3)),
        ({"tp": 27, "tp_mode": "3d"}, (9, 1, 3)),
    ],
)
def test_hidden_split_follows_each_layout(degrees, split):
    """A tp rank's share of a hidden state [B, T, h] between layers, per dimension."""
    sequence = degrees.pop("tp_sequence_parallel", False)
    assert _dims(degrees["tp"], **degrees).hidden_split(sequence) == split


# --- meshes (4 gloo ranks) -------------------------------------------------------------------


def _sum_of_ranks(group) -> float:
    value = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(value, group=group)
    return value.item()


def _build_mesh(dp_replicate: int, dp_shard: int, tp: int) -> dict:
    dims = ParallelDims(dp_replicate, dp_shard, 1, tp, 1, "1d", 1, dist.get_world_size())
    mesh = dims.build_mesh(get_accelerator().device_type)
    dp_mesh = flat_dp_mesh(mesh)
    with warnings.catch_warnings():  # torch warns that root-mesh slicing of "dp" will go
        warnings.simplefilter("ignore")
        sliced = mesh["dp"]
    return {
        "names": mesh.mesh_dim_names,
        "sizes": {name: mesh[name].size() for name in AXIS_NAMES},
        "dp_names": dp_mesh.mesh_dim_names,
        "dp_ranks": dp_mesh.mesh.tolist(),
        "dp_rank": dims.dp_rank(mesh),
        "dp_local_rank": dp_mesh.get_local_rank(),
        "same_dp": sliced.mesh.tolist() == dp_mesh.mesh.tolist(),
        "dp_sum": _sum_of_ranks(dp_mesh.get_group()),
        "tp_sum": _sum_of_ranks(mesh["tp"].get_group()),
    }


def test_mesh_has_five_named_axes_and_a_flat_dp_axis(pool4):
    results = pool4.run(_build_mesh, 1, 2, 2)
    for rank, got in enumerate(results):
        assert got["names"] == AXIS_NAMES
        assert got["sizes"] == {"dp_replicate": 1, "dp_shard": 2, "pp": 1, "sp": 1, "tp": 2}
        assert got["dp_names"] == ("dp",) and got["same_dp"]
        # Row-major mesh (dp_shard, tp) = ((0, 1), (2, 3)): dp groups are {0, 2} and {1, 3}.
        assert got["dp_ranks"] == [rank % 2, rank % 2 + 2]
        assert got["dp_rank"] == got["dp_local_rank"] == rank // 2
        assert got["dp_sum"] == [2.0, 4.0][rank % 2]
        assert got["tp_sum"] == [1.0, 5.0][rank // 2]


def test_flat_dp_axis_spans_replicate_and_shard(pool4):
    results = pool4.run(_build_mesh, 2, 2, 1)
    for rank, got in enumerate(results):
        assert got["dp_ranks"] == [0, 1, 2, 3]
        assert got["dp_rank"] == got["dp_local_rank"] == rank
        assert got["dp_sum"] == 6.0 and got["tp_sum"] == float(rank)


def _mesh_for_wrong_world() -> str:
    try:
        ParallelDims(1, 8, 1, 1, 1, "1d", 1, world_size=8).build_mesh(get_accelerator().device_type)
    except ConfigError as err:
        return str(err)
    return "no error"


def test_build_mesh_checks_the_running_world_before_any_collective(pool4):
    messages = pool4.run(_mesh_for_wrong_world)
    assert (
        messages
        == [
            "parallel degrees were resolved for world size 8 but 4 processes are running; "
            "resolve them with the running world size"
        ]
        * 4
    )
