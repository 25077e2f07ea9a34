"""ZeRO stages 1 and 2 against the single-process reference (stage 0 is in test_engine.py).

Every case has gradient accumulation and clipping on, tied embeddings and a frozen layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from shardwise.config import Config
from shardwise.engine import initialize
from shardwise.errors import ConfigError
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
