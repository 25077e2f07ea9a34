"""ZeRO-3 (zero/params.py: a chunk per unit in the chunk store): parity, memory,
communication volume, resume, unit state table."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from shardwise.distributed import comm
from shardwise.distributed.comm import CommStats
from shardwise.engine import initialize
from shardwise.zero.chunks.chunk import ChunkState, GatheredChunk
from tests.parity import (
    BF16_RTOL,
    assert_parity,
    build_model,
    engine_run,
    global_batches,
    make_config,
    reference_run,
    train_rows,
    train_then_resume,
)

TIERS = ("device", "host", "disk")


@pytest.mark.parametrize(
    "zero",
    [{}, {"reshard_after_forward": False}, {"prefetch": False}],
    ids=["default", "keep-after-forward", "no-prefetch"],
)
def test_stage3_two_ranks_match_single_process(pool2, zero):
    cfg = make_config(micro_batch=1, global_batch=4, zero_stage=3).replace(zero=zero)
    want = reference_run(cfg, freeze=True)
    for got in pool2.run(engine_run, cfg, freeze=True):
        assert_parity(got, want, rtol=1e-5)


def test_stage3_four_ranks_match_single_process(pool4):
    cfg = make_config(micro_batch=1, global_batch=8, zero_stage=3)
    want = reference_run(cfg, freeze=True)
    for got in pool4.run(engine_run, cfg, freeze=True):
        assert_parity(got, want, rtol=1e-5)


def test_stage3_with_activation_checkpointing(pool2):
    cfg = make_config(micro_batch=2, global_batch=4, zero_stage=3, activation_checkpointing="full")
    want = reference_run(cfg)
    for got in pool2.run(engine_run, cfg):
        assert_parity(got, want, rtol=1e-5)


def test_stage3_bf16_within_documented_tolerance(pool2):
    cfg = make_config(micro_batch=1, global_batch=4, zero_stage=3, dtype="bf16")
    want_losses, _ = reference_run(make_config(micro_batch=1, global_batch=4))
    for losses, _ in pool2.run(engine_run, cfg):
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(want_losses), rtol=BF16_RTOL, atol=0
        )


def _stage3_state_between_steps(dtype: str) -> dict:
    world = dist.get_world_size()
    cfg = make_config(
        micro_batch=1, global_batch=world, zero_stage=3, dtype=dtype, reduce_dtype="param"
    )
    engine = initialize(build_model(cfg), None, cfg)
    engine.train_step(global_batches(cfg, 1)[0])
    psi = sum(p.numel() for p in engine.params)
    report = engine.memory_report()
    kept = ("params", "grads", "master_params", "optimizer_states")
    return {
        "bytes_per_param": sum(report[key] for key in kept) / psi,
        "grad_bytes": report["grads"] + sum(report[f"grad_chunks_{t}"] for t in TIERS),
        "all_sharded": all(u.state is ChunkState.FREE for u in engine.store.chunks),
        "units": [u.key for u in engine.store.chunks],
    }


@pytest.mark.parametrize(("dtype", "grad_bytes"), [("fp32", 4), ("bf16", 2)])
def test_stage3_model_states_are_16_psi_over_n(pool4, dtype, grad_bytes):
    """16Ψ/N with 4 ranks, less the gradients' share: their chunks live only during the
    step (gathered and reduce-scattered per unit, freed after the update)."""
    for result in pool4.run(_stage3_state_between_steps, dtype):
        assert result["all_sharded"]
        assert result["units"] == ["root", "blocks.0", "blocks.1"]
        assert result["grad_bytes"] == 0
        # Padding every unit to 4 ranks and Adam's step counters add a little.
        assert result["bytes_per_param"] == pytest.approx((16 - grad_bytes) / 4, rel=0.02)


def _bytes_of_one_step(stage: int, checkpointing: str = "none") -> dict:
    cfg = make_config(
        micro_batch=2, global_batch=4, zero_stage=stage, activation_checkpointing=checkpointing
    )
    engine = initialize(build_model(cfg), None, cfg)
    batches = global_batches(cfg, 2)
    rank = dist.get_rank()
    engine.train_step(tuple(t[2 * rank : 2 * rank + 2] for t in batches[0]))  # warm-up
    with CommStats() as stats:
        engine.train_step(tuple(t[2 * rank : 2 * rank + 2] for t in batches[1]))
    element = 4  # fp32
    store = engine.store
    groups = store.chunks if stage == 3 else store.reducer.buckets  # units; buckets
    return {
        "by_op": {op: stats.total(op=op) for op in ("all_reduce", "all_gather", "reduce_scatter")},
        "bucket_bytes": [g.numel * element for g in groups],
    }


def test_stage3_moves_one_and_a_half_times_the_bytes_of_stage0(pool2):
    n = 2
    stage0 = pool2.run(_bytes_of_one_step, 0)[0]
    stage3 = pool2.run(_bytes_of_one_step, 3)[0]
    scalar = 2 * (n - 1) / n * 4  # all-reduce of one fp32 (the step's loss, the grad norm)
    # Stage 0: one all-reduce per bucket, plus the loss.
    assert stage0["by_op"] == {
        "all_reduce": 2 * (n - 1) / n * sum(stage0["bucket_bytes"]) + scalar,
        "all_gather": 0,
        "reduce_scatter": 0,
    }
    # Stage 3: every unit gathered for forward and again for backward, gradients
    # reduce-scattered; the loss and the sharded gradient norm are all-reduced.
    units = sum(stage3["bucket_bytes"])
    assert stage3["by_op"] == {
        "all_reduce": 2 * scalar,
        "all_gather": 2 * (n - 1) / n * units,
        "reduce_scatter": (n - 1) / n * units,
    }
    moved0 = stage0["by_op"]["all_reduce"] - scalar
    moved3 = stage3["by_op"]["all_gather"] + stage3["by_op"]["reduce_scatter"]
    padding = units / sum(stage0["bucket_bytes"])  # units pad separately from size buckets
    assert moved3 / moved0 == pytest.approx(1.5 * padding, rel=1e-12)
    assert padding == pytest.approx(1.0, abs=1e-3)


def _reduce_scatters(offload: dict) -> list[bool]:
    """Whether each gradient reduce-scatter of one step ran in the background."""
    cfg = make_config(micro_batch=1, global_batch=2, zero_stage=3).replace(offload=offload)
    engine = initialize(build_model(cfg), None, cfg)
    launched = []
    reduce_scatter = comm.reduce_scatter_

    def recorded(output, input, group, **kwargs):
        launched.append(kwargs.get("async_op", False))
        return reduce_scatter(output, input, group, **kwargs)

    comm.reduce_scatter_ = recorded
    try:
        engine.train_step(global_batches(cfg, 1)[0])
    finally:
        comm.reduce_scatter_ = reduce_scatter
    return launched


def test_units_reduce_gradients_in_the_background_and_budgets_do_not(pool2):
    """With no device budget a unit's gradient chunk is reduce-scattered while backward goes
    on; under a budget (which counts one gradient shard being reduced into) each one is
    finished before backward goes on."""
    units = pool2.run(_reduce_scatters, {})[0]
    assert units == [True] * 3  # root, blocks.0, blocks.1
    budgeted = pool2.run(_reduce_scatters, {"policy": "static"})[0]
    assert budgeted and not any(budgeted)


def test_stage3_recomputation_gathers_nothing_more(pool2):
    """Activation checkpointing re-runs each block's forward inside backward: the unit is
    gathered already (for its backward), and the next unit in forward order, whose backward
    is done, is not prefetched ([Note: the hook protocol])."""
    plain = pool2.run(_bytes_of_one_step, 3)[0]
    recomputed = pool2.run(_bytes_of_one_step, 3, "full")[0]
    assert recomputed["by_op"] == plain["by_op"]
    assert recomputed["by_op"]["all_gather"] > 0


@pytest.mark.parametrize("async_save", [False, True], ids=["save", "async-save"])
def test_stage3_resumes_exactly(pool2, tmp_path, async_save):
    """checkpoint.async_save: written by a background thread, barriers on its own group."""
    checkpoint = {"async_save": async_save}
    for full, resumed in pool2.run(train_then_resume, str(tmp_path), 3, checkpoint=checkpoint):
        assert resumed == full[2:]


def test_a_unit_is_freed_after_the_phases_it_names():
    """The manager drops a unit its last user released after forward only with
    ``reshard_after_forward``, and never for a forward re-run inside backward (activation
    checkpointing), whose backward follows; after backward always."""

    def unit(frees_after: set[str]) -> GatheredChunk:
        phases = frozenset(frees_after)
        return GatheredChunk(0, "blocks.0", 4, torch.float32, [], frees_after=phases)

    resharded, kept = unit({"forward", "backward"}), unit({"backward"})
    assert resharded.frees_on_release("forward") and resharded.frees_on_release("backward")
    assert not kept.frees_on_release("forward") and kept.frees_on_release("backward")
    seen = []

    class Recomputed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(resharded.frees_on_release("forward"))
            return grad

    Recomputed.apply(torch.ones(1, requires_grad=True)).sum().backward()
    assert seen == [False]


def _meta_built_stage3(cfg) -> tuple[list[float], dict, dict]:
    from functools import partial

    from shardwise.models.gpt import build_gpt

    model = build_gpt(cfg.model, cfg.data.seq_len, device="meta")
    seed = cfg.train.seed
    engine = initialize(model, None, cfg, param_init=partial(model.init_parameter, seed=seed))
    at_start = engine.memory_report()
    losses, state = train_rows(engine, cfg)
    psi = sum(p.numel() for p in engine.params)
    return losses, state, {k: v / psi for k, v in at_start.items()}


def test_meta_model_is_built_directly_as_shards(pool2):
    cfg = make_config(micro_batch=1, global_batch=4, zero_stage=3)
    want = reference_run(cfg)
    for losses, state, at_start in pool2.run(_meta_built_stage3, cfg):
        assert_parity((losses, state), want, rtol=1e-5)
        assert at_start["params"] == pytest.approx(4 / 2, rel=0.02)  # fp32 shards only


def test_meta_model_without_param_init_is_a_clear_error():
    from shardwise.errors import ConfigError
    from shardwise.models.gpt import build_gpt

    cfg = make_config(micro_batch=2, global_batch=2)
    model = build_gpt(cfg.model, cfg.data.seq_len, device="meta")
    with pytest.raises(ConfigError, match="meta device: pass param_init"):
        initialize(model, None, cfg)
