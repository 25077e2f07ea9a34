"""benchmarks.tp: its formulas, its settings, the 1D layout measured on two ranks, the DTensor
peer against our engine, and its JSON line.

The whole benchmark (three launched jobs, ~25 timed steps of a 25M-parameter model) takes
minutes and is not run here; the 4- and 8-rank layouts are exercised by tests/tensor_parallel/.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpt_workload
from benchmarks import tp as bench_tp
from shardwise.bench import result_record
from shardwise.distributed.dims import TP_AXES
from shardwise.models.gpt import gpt_config_from
from shardwise.planner.activations import activation_fraction
from shardwise.planner.comm import tp_wire_bytes
from shardwise.run_plan import resolve
from shardwise.tensor_parallel.plan import split_fused

MODES = ("1d", "2d", "2.5d", "3d")
WORLD = {"1d": 2, "2d": 4, "2.5d": 8, "3d": 8}
"""Ranks of each layout in the benchmark."""
SMALL = bench_tp.LayoutModel(n_layers=1, d_model=32, n_heads=4, seq_len=16, micro_batch=4)
"""A layout model that splits over every layout, smaller than `QUICK_LAYOUT`."""


def dims_of(mode: str):
    return bench_tp.layout_dims(mode, WORLD[mode])


# --------------------------------------------------------------------------- settings


def test_jobs_cover_every_layout_once():
    modes = [mode for modes in bench_tp.JOBS.values() for mode in modes]
    assert sorted(modes) == sorted(MODES)
    assert set(bench_tp.MODE_KEYS.values()) == {"1d", "2d", "2p5d", "3d"}
    assert bench_tp.JOBS[bench_tp.TIMING_NPROC] == ("1d",)


@pytest.mark.parametrize("layout", [bench_tp.QUICK_LAYOUT, bench_tp.FULL_LAYOUT, SMALL])
def test_layout_models_split_over_every_layout(layout):
    assert layout.seq_len != layout.micro_batch  # see saved_kind
    for mode in MODES:
        dims = dims_of(mode)
        plan = resolve(bench_tp.layout_config(layout, dims), dims.world_size).tp_plan
        assert plan.mode == mode


def test_timing_workload_fits_1d_at_two_ranks():
    for settings in (bench_tp.QUICK_TIMING, bench_tp.FULL_TIMING):
        cfg = gpt_workload.engine_config(settings, torch.float32, parallel={"tp": 2})
        dims = bench_tp.layout_dims("1d", 2)
        assert resolve(cfg, dims.world_size).tp_plan.mode == "1d"
        assert cfg.precision.dtype == "fp32"
    assert bench_tp.QUICK_TIMING.iters < bench_tp.FULL_TIMING.iters


def test_job_settings_round_trip():
    job = bench_tp.Job(("2.5d", "3d"), SMALL, bench_tp.QUICK_TIMING)
    assert bench_tp.job_from_json(**json.loads(bench_tp.job_settings(job))) == job
    bare = bench_tp.Job(("1d",), SMALL)
    assert bench_tp.job_from_json(**json.loads(bench_tp.job_settings(bare))) == bare


# --------------------------------------------------------------------------- formulas


def test_parameter_fractions_are_the_papers():
    """Matrices 1/tp, 1/q^2, 1/q^2, 1/q^3; norm vectors 1, 1/q, 1/q, 1/q (q = 2, d = 2)."""
    want = {"1d": (1 / 2, 1), "2d": (1 / 4, 1 / 2), "2.5d": (1 / 4, 1 / 2), "3d": (1 / 8, 1 / 2)}
    for mode, (matrix, vector) in want.items():
        dims = dims_of(mode)
        assert bench_tp.param_formula({"matrix": 1000}, dims) == pytest.approx(1000 * matrix)
        assert bench_tp.param_formula({"vector": 1000}, dims) == pytest.approx(1000 * vector)


def test_activation_fractions():
    dims = {mode: dims_of(mode) for mode in MODES}
    frac = activation_fraction
    assert frac(dims["1d"], "attn", "activation") == 1 / 2
    assert frac(dims["1d"], "mlp.up", "activation") == 1  # its replicated input
    assert frac(dims["1d"], "loss", "per_token") == 1  # targets
    assert frac(dims["2d"], "norm1", "activation") == 1 / 4
    assert frac(dims["2d"], "norm1", "per_token") == 1 / 2
    assert frac(dims["2.5d"], "attn", "activation") == 1 / 8
    assert frac(dims["2.5d"], "embed", "per_token") == 1 / 4
    assert frac(dims["3d"], "mlp", "activation") == 1 / 8
    assert frac(dims["3d"], "loss", "per_token") == 1 / 4
    assert all(frac(d, "attn", "fixed") == 1 for d in dims.values())
    saved = {"attn/activation": 800, "norm1/per_token": 40, "attn/fixed": 8}
    assert bench_tp.activation_formula(saved, dims["2d"]) == {"attn": 208.0, "norm1": 20.0}


def test_1d_comm_is_megatrons_all_reduces():
    """Per layer four all-reduces of a [tokens, h] fp32 activation (f of qkv and up
    backward, g of proj and down forward), the embedding's g, the head's f and the loss's
    three per-token scalars: 2 (P-1)/P S each."""
    gpt = gpt_config_from(bench_tp.layout_config(SMALL, dims_of("1d")).model, SMALL.seq_len)
    tokens = SMALL.micro_batch * SMALL.seq_len
    s = tokens * gpt.d_model * 4
    costs = tp_wire_bytes(gpt, SMALL.micro_batch, dims_of("1d"))
    ring = 2 * (2 - 1) / 2
    forward = ring * (s * (2 * gpt.n_layers + 1) + 12 * tokens)
    assert costs["forward"] == {("tp", "all_reduce"): pytest.approx(forward)}
    assert costs["backward"] == {("tp", "all_reduce"): ring * s * (2 * gpt.n_layers + 1)}


@pytest.mark.parametrize("mode", MODES)
def test_comm_formula_uses_the_layouts_axes_only(mode):
    dims = dims_of(mode)
    gpt = gpt_config_from(bench_tp.layout_config(SMALL, dims).model, SMALL.seq_len)
    costs = tp_wire_bytes(gpt, SMALL.micro_batch, dims)
    axes = {axis for ops in costs.values() for axis, _ in ops}
    assert axes == set(TP_AXES[mode])
    assert bench_tp.total_bytes(costs) > 0


def test_2p5d_at_depth_one_costs_what_2d_costs():
    dims_2d = dims_of("2d")
    depth_one = bench_tp.ParallelDims.tensor_parallel(4, "2.5d", 1)
    gpt = gpt_config_from(bench_tp.layout_config(SMALL, dims_2d).model, SMALL.seq_len)
    costs_2d = tp_wire_bytes(gpt, SMALL.micro_batch, dims_2d)
    assert tp_wire_bytes(gpt, SMALL.micro_batch, depth_one) == costs_2d
    activations = {"attn/activation": 800, "norm1/per_token": 40}
    assert bench_tp.activation_formula(activations, depth_one) == bench_tp.activation_formula(
        activations, dims_2d
    )


# --------------------------------------------------------------------------- measuring


def test_dense_saved_tensors_by_region():
    """One process: each linear saves its input (never its weight), the loss its fp32
    log-softmax and the targets, rope tables count as fixed."""
    dims = dims_of("1d")
    profile = bench_tp.dense_profile(
        SMALL, bench_tp.layout_config(SMALL, dims), torch.device("cpu")
    )
    saved = profile["saved"]
    tokens, h, vocab = SMALL.micro_batch * SMALL.seq_len, SMALL.d_model, 256
    for linear in ("attn.qkv", "attn.proj", "mlp.up", "head"):
        assert saved[f"{linear}/activation"] == tokens * h * 4
    assert saved["mlp.down/activation"] == tokens * 4 * h * 4  # the GELU output
    assert saved["loss/activation"] == tokens * vocab * 4
    assert saved["loss/per_token"] == tokens * 8
    assert "attn/fixed" in saved  # cos and sin of the rotary angles
    gpt = gpt_config_from(bench_tp.layout_config(SMALL, dims).model, SMALL.seq_len)
    assert profile["params"]["vector"] == (2 * gpt.n_layers + 1) * 2 * h * 4
    assert (
        profile["params"]["matrix"]
        == (vocab * h + gpt.n_layers * (3 * h * h + h * h + 2 * h * gpt.d_ff)) * 4
    )


def test_interleaved_qkv_rows_are_our_column_shards():
    weight = torch.arange(24.0).reshape(12, 2)
    rows = bench_tp.interleave_fused_rows(weight, 3, 2)
    for rank in range(2):
        assert torch.equal(rows[rank * 6 : (rank + 1) * 6], split_fused(weight, 0, 3, 2, rank))


def _one_d_layout(layout: bench_tp.LayoutModel) -> dict:
    import torch.distributed as dist

    job = bench_tp.Job(("1d",), layout)
    return bench_tp.measure_layouts(
        job, dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    )


def test_1d_layout_matches_its_formulas_on_two_ranks(pool2):
    measured = pool2.run(_one_d_layout, SMALL)[0]["1d"]
    summary = bench_tp.summarise_layout(SMALL, dims_of("1d"), measured)
    assert summary["param"]["ratio"] == 1.0  # every shard exactly 1/tp, norms replicated
    assert summary["comm"]["ratio"] == pytest.approx(1.0, abs=1e-12)
    assert summary["activation"]["ratio"] == pytest.approx(1.0, abs=0.01)
    assert summary["plan_replicas_match_formula"]
    assert summary["loss_max_rel_diff_vs_dense"] < 1e-5


def _peer_losses(settings: gpt_workload.Settings) -> list[tuple[float, float]]:
    import torch.distributed as dist

    world = dist.get_world_size()
    cfg = gpt_workload.engine_config(settings, torch.float32, parallel={"tp": world})
    batches = gpt_workload.make_batches(settings, 0, 1, cfg.model.vocab_size, torch.device("cpu"))
    ours = bench_tp.ours_step(cfg, torch.device("cpu"), batches)
    peer = bench_tp.dtensor_step(cfg, torch.device("cpu"), batches)
    return [(ours(i), peer(i)) for i in range(len(batches))]


def test_dtensor_peer_trains_like_our_engine(pool2):
    settings = gpt_workload.Settings(warmup=1, iters=2, preset="tiny", seq_len=16, micro_batch=2)
    for rank_losses in pool2.run(_peer_losses, settings):
        for ours, peer in rank_losses:
            # Same weights, data, optimizer, schedule and clipping: the same losses.
            assert ours == pytest.approx(peer, rel=1e-5)


# --------------------------------------------------------------------------- the JSON line


def fake_layout_records(excess: float) -> dict[int, dict]:
    """Job records whose measurements equal the formulas, but 2D's activations are
    `excess` more."""
    dense = {
        "params": {"matrix": 80_000, "vector": 2_000},
        "saved": {"attn/activation": 40_000, "norm1/per_token": 1_000, "attn/fixed": 500},
        "loss": 2.0,
    }
    records: dict[int, dict] = {}
    for nproc, modes in bench_tp.JOBS.items():
        layouts = {}
        for mode in modes:
            dims = bench_tp.layout_dims(mode, nproc)
            gpt = gpt_config_from(bench_tp.layout_config(SMALL, dims).model, SMALL.seq_len)
            saved = bench_tp.activation_formula(dense["saved"], dims)
            if mode == "2d":
                saved = {region: v * (1 + excess) for region, v in saved.items()}
            rank = {
                "param_bytes": bench_tp.param_formula(dense["params"], dims),
                "saved": saved,
                "comm": bench_tp.readable(tp_wire_bytes(gpt, SMALL.micro_batch, dims)),
                "loss": 2.0,
                "replicas_agree": True,
            }
            layouts[mode] = {"dense": dense, "ranks": [rank] * nproc}
        records[nproc] = {"layouts": layouts, "device": "cpu"}
    records[2]["timing"] = {
        "median_s": {"ours": 0.9, "dtensor_tp": 1.2},
        "config": {"precision": "fp32", "nproc": 2},
    }
    return records


def test_json_line_has_the_peer_and_every_layouts_ratios():
    result = bench_tp.summarise(SMALL, fake_layout_records(excess=0.5))
    record = result_record("tp", result)
    keys = {"dtensor_tp"} | {
        f"{kind}_ratio_{mode}" for kind in ("mem", "comm") for mode in ("1d", "2d", "2p5d", "3d")
    }
    assert set(record["ratio"]) == set(record["peers"]) == keys
    assert record["ours"] == 0.9 and record["peers"]["dtensor_tp"] == 1.2
    assert record["ratio"]["dtensor_tp"] == pytest.approx(0.75)
    assert all(
        record["ratio"][f"comm_ratio_{m}"] == pytest.approx(1.0)
        for m in bench_tp.MODE_KEYS.values()
    )
    for mode in ("1d", "2p5d", "3d"):
        assert record["ratio"][f"mem_ratio_{mode}"] == pytest.approx(1.0)
    layout_2d = record["config"]["layouts"]["2d"]
    assert layout_2d["activation"]["ratio"] == pytest.approx(1.5)
    assert layout_2d["param"]["ratio"] == pytest.approx(1.0)
    assert 1.05 < record["ratio"]["mem_ratio_2d"] < 1.5  # parameters match, activations not
    assert record["config"]["precision"] == "fp32"
    assert not record["config"]["layouts_within_tolerance"]
    json.dumps(record, allow_nan=False)
