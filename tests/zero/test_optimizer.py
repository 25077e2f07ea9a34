"""ZeRO stages 1 and 2 against the single-process reference (stage 0 is in test_engine.py).

Every case has gradient accumulation and clipping on, tied embeddings and a frozen layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from shardwise.config import Config
from shardwise.distributed.comm import CommStats
from shardwise.distributed.compressed import packed_bytes
from shardwise.engine import initialize
from shardwise.errors import ConfigError
from shardwise.zero.store import clip_coefficient
from tests.parity import (
    BF16_RTOL,
    assert_parity,
    build_model,
    engine_run,
    global_batches,
    make_config,
    reference_run,
    train_then_resume,
)


def test_clip_coefficient_is_torchs_and_skips_a_factor_of_one():
    param = torch.nn.Parameter(torch.zeros(5))
    param.grad = torch.randn(5, generator=torch.Generator().manual_seed(0)) * 3
    grads = [param.grad.clone()]
    norm = torch.nn.utils.clip_grad_norm_([param], 1.0)  # clips param.grad in place
    torch._foreach_mul_(grads, clip_coefficient(norm, 1.0))
    assert norm > 1 and torch.equal(grads[0], param.grad)
    assert clip_coefficient(norm, 0.0) is None  # no clipping asked
    assert clip_coefficient(norm, float(norm) * 2) is None  # a factor of 1: nothing to do


@pytest.mark.parametrize("stage", [1, 2])
def test_two_ranks_match_single_process(pool2, stage):
    cfg = make_config(micro_batch=1, global_batch=4, zero_stage=stage)
    want = reference_run(cfg, freeze=True)
    for got in pool2.run(engine_run, cfg, freeze=True):
        assert_parity(got, want, rtol=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_four_ranks_match_single_process(pool4, stage):
    cfg = make_config(micro_batch=1, global_batch=8, zero_stage=stage)
    want = reference_run(cfg, freeze=True)
    for got in pool4.run(engine_run, cfg, freeze=True):
        assert_parity(got, want, rtol=1e-5)


@pytest.mark.parametrize("reduce_dtype", ["fp32", "param"])
def test_bf16_stage2_within_documented_tolerance(pool2, reduce_dtype):
    cfg = make_config(
        micro_batch=1, global_batch=4, zero_stage=2, dtype="bf16", reduce_dtype=reduce_dtype
    )
    want_losses, _ = reference_run(make_config(micro_batch=1, global_batch=4))
    for losses, _ in pool2.run(engine_run, cfg):
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(want_losses), rtol=BF16_RTOL, atol=0
        )


def _overflow_on_one_rank_skips_everywhere() -> tuple[bool, float, bool]:
    """fp16 stage 2: only rank 1 sees an inf gradient; both ranks must skip the step."""
    cfg = make_config(micro_batch=1, global_batch=2, zero_stage=2, dtype="fp16")
    engine = initialize(build_model(cfg), None, cfg)
    inputs, targets = global_batches(cfg, 1)[0]
    rank = dist.get_rank()
    before = [p.detach().clone() for p in engine.params]
    loss = engine.loss_fn(engine.forward(inputs[rank : rank + 1]), targets[rank : rank + 1])
    engine.backward(loss * (float("inf") if rank == 1 else 1.0))
    stepped = engine.step()
    unchanged = all(torch.equal(b, p) for b, p in zip(before, engine.params, strict=True))
    return stepped, engine.scaler.scale, unchanged


def test_fp16_overflow_on_one_shard_is_a_global_decision(pool2):
    for stepped, scale, unchanged in pool2.run(_overflow_on_one_rank_skips_everywhere):
        assert not stepped and unchanged
        assert scale == 2.0**16  # hysteresis 2: the first overflow keeps the scale


def _memory_per_param(stage: int, dtype: str) -> dict[str, float]:
    cfg = make_config(
        micro_batch=1,
        global_batch=dist.get_world_size(),
        zero_stage=stage,
        dtype=dtype,
        reduce_dtype="param",
    )
    engine = initialize(build_model(cfg), None, cfg)
    engine.train_step(global_batches(cfg, 1)[0])
    psi = sum(p.numel() for p in engine.params)
    return {k: v / psi for k, v in engine.memory_report().items()}


# (stage, dtype) -> model-state bytes per parameter with N ranks (ZeRO paper, section 3).
FORMULAS = {
    (0, "bf16"): lambda n: 16,
    (1, "bf16"): lambda n: 4 + 12 / n,
    (2, "bf16"): lambda n: 2 + 14 / n,
    (0, "fp32"): lambda n: 16,
    (1, "fp32"): lambda n: 8 + 8 / n,
    (2, "fp32"): lambda n: 4 + 12 / n,
}


@pytest.mark.parametrize("stage, dtype", list(FORMULAS), ids=[f"stage{s}-{d}" for s, d in FORMULAS])
def test_model_state_bytes_follow_the_zero_formulas(pool4, stage, dtype):
    for report in pool4.run(_memory_per_param, stage, dtype):
        measured = sum(report.values())
        # Padding to 4 ranks and Adam's step counters add a little; 2% bounds both here.
        assert measured == pytest.approx(FORMULAS[stage, dtype](4), rel=0.02), report


def test_stage_outside_zero_to_three_is_a_clear_error():
    with pytest.raises(ConfigError, match="zero.stage=4: input should be less than or equal to 3"):
        Config.from_file(None, ["zero.stage=4"])


@pytest.mark.parametrize("stage", [1, 2])
def test_sharded_state_resumes_exactly(pool2, tmp_path, stage):
    for full, resumed in pool2.run(train_then_resume, str(tmp_path), stage):
        assert resumed == full[2:]
    assert (tmp_path / "checkpoints" / "step_00000004" / "shards_rank1.bin").is_file()


def _tiny_model_on_four_ranks() -> str:
    cfg = Config().replace(zero={"stage": 1}, train={"micro_batch": 1})
    try:
        initialize(torch.nn.Linear(1, 1, bias=False), None, cfg)
    except ConfigError as err:
        return str(err)
    return "no error"


def test_more_ranks_than_parameter_elements_is_a_clear_error(pool4):
    for message in pool4.run(_tiny_model_on_four_ranks):
        assert message == (
            "zero.stage=1 shards over 4 data-parallel ranks, but the model has only 1 trainable "
            "elements; use at most 1 ranks or zero.stage=0"
        )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_hierarchical_dp_shards_within_and_replicates_across(pool4, stage):
    """2 replicas x 2 shards: ZeRO shards over dp_shard only, replicas stay identical."""
    cfg = make_config(micro_batch=1, global_batch=8, zero_stage=stage).replace(
        parallel={"dp_replicate": 2}
    )
    want = reference_run(cfg, freeze=True)
    for got in pool4.run(engine_run, cfg, freeze=True):
        assert_parity(got, want, rtol=1e-5)


def _shard_sizes_with_replicas() -> list[int]:
    cfg = make_config(micro_batch=1, global_batch=4, zero_stage=2).replace(
        parallel={"dp_replicate": 2}
    )
    engine = initialize(build_model(cfg), None, cfg)
    return [b.reduced.numel() * 2 == b.numel for b in engine.store.reducer.buckets]


def test_hierarchical_dp_keeps_half_of_each_bucket_on_two_shards(pool4):
    for halves in pool4.run(_shard_sizes_with_replicas):
        assert all(halves)


# -- 1-bit Adam over replicas ([Note: 1-bit Adam over replicas] in distributed/reducer.py) ---

ONEBIT = {"name": "onebit_adam", "compression_chunk": 64}


def _compressed_average_over_replicas() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """2 replicas x 2 shards at ZeRO-2, after the freeze: gradients whose every 64-element
    chunk has one magnitude (rank + 1 times a chunk's value, the same signs on every rank)
    compress without loss, so each rank's reduced slice must be exactly their mean over the 4
    ranks (2.5 times the pattern); recorded bytes per op."""
    cfg = make_config(micro_batch=1, global_batch=4, zero_stage=2).replace(
        parallel={"dp_replicate": 2}, optim={**ONEBIT, "freeze_step": 1}
    )
    engine = initialize(build_model(cfg), None, cfg)
    rank = dist.get_rank()
    inputs, targets = global_batches(cfg, steps=1)[0]
    engine.train_step((inputs[rank : rank + 1], targets[rank : rank + 1]))  # the exact step
    store, gen = engine.store, torch.Generator().manual_seed(3)
    patterns = []
    for bucket in store.reducer.buckets:
        chunks = torch.rand(bucket.numel // 64, 1, generator=gen) + 0.5
        signs = torch.randint(0, 2, (bucket.numel // 64, 64), generator=gen) * 2.0 - 1
        patterns.append((chunks * signs).view(-1))
    with CommStats() as stats:
        store.before_backward(True, engine.optimizer)
        loss = sum(
            (param * bucket.view_of(pattern, i) * (rank + 1)).sum()
            for bucket, pattern in zip(store.reducer.buckets, patterns, strict=True)
            for i, param in enumerate(bucket.params)
        )
        loss.backward()
        store.after_backward(sync=True)
    slices = []
    for bucket, pattern in zip(store.reducer.buckets, patterns, strict=True):
        start, end = bucket.shard
        want = pattern[start:end] * 2.5
        want[max(0, bucket.used - start) :] = 0  # padding
        slices.append((bucket.reduced.clone(), want))
    recorded = {op: stats.total(op=op) for op in ("all_to_all", "all_gather", "reduce_scatter")}
    recorded["all_reduce"] = stats.total("payload_bytes", op="all_reduce")
    recorded["messages"] = [packed_bytes(b.numel // 4, 64) for b in store.reducer.buckets]
    recorded["exact"] = sum(b.numel * 4 / 2 for b in store.reducer.buckets)  # reduce-scatter
    store.update(engine.optimizer, None)  # the first frozen step: its denominators are kept
    recorded["memory"] = (
        sum(engine.memory_report().values()),
        sum(engine.plan.model_state_bytes().values()),
    )
    return slices, recorded


def test_onebit_adam_averages_over_replicas_compressed(pool4):
    """The shard group reduce-scatters exactly, the replicas average compressed (an
    all-to-all and an all-gather of packed bytes), no gradient is all-reduced whole, and the
    plan's predicted model-state bytes count the error buffers of a slice (and the frozen
    denominators)."""
    for slices, recorded in pool4.run(_compressed_average_over_replicas):
        for got, want in slices:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        messages = recorded["messages"]  # a slice's half, packed, per bucket
        assert recorded["all_to_all"] == sum(0.5 * 2 * m for m in messages)
        assert recorded["all_gather"] == sum(messages)
        assert recorded["reduce_scatter"] == recorded["exact"]
        assert recorded["all_reduce"] == 0
        measured, predicted = recorded["memory"]  # the planner counts the error buffers
        assert measured == pytest.approx(predicted, rel=0.03)


@pytest.mark.parametrize("stage", [1, 2])
def test_onebit_adam_with_replicas_resumes_exactly_after_the_freeze(pool4, tmp_path, stage):
    """2 replicas x 2 shards: stage 2 averages over the replicas compressed, stage 1 every
    bucket over all 4 ranks (its optimizer shards are over 2); steps 3-4 bitwise."""
    optim = {**ONEBIT, "freeze_step": 1}
    parallel = {"dp_replicate": 2}
    sections = {"optim": optim, "parallel": parallel, "train": {"global_batch": 4}}
    for full, resumed in pool4.run(train_then_resume, str(tmp_path), stage, "fp32", **sections):
        assert resumed == full[2:]
