"""The resolved plan: degrees, sharding policy, checks before launch, the printed table."""

from __future__ import annotations

import pickle

import pytest
import tomllib

from shardwise.config import Config
from shardwise.errors import ConfigError
from shardwise.run_plan import resolve


def config(*overrides: str) -> Config:
    return Config.from_file(None, ["model.n_layers=2", "model.d_model=32", *overrides])


@pytest.mark.parametrize(
    ("stage", "world", "flags"),
    [
        (0, 2, (False, False, False)),
        (1, 2, (True, False, False)),
        (2, 2, (True, True, False)),
        (3, 2, (True, True, True)),
        (3, 1, (False, False, False)),  # one shard: nothing to shard
    ],
)
def test_zero_stage_becomes_sharding_flags(stage, world, flags):
    sharding = resolve(config(f"zero.stage={stage}"), world).sharding
    assert (sharding.optimizer, sharding.grads, sharding.params) == flags
    assert sharding.stage == stage


def test_plan_holds_degrees_accumulation_and_a_tp_plan():
    plan = resolve(config("parallel.tp=2", "train.micro_batch=2", "train.global_batch=8"), 4)
    assert (plan.dims.dp, plan.dims.tp, plan.micro_batches) == (2, 2, 2)
    assert plan.tp_plan is not None and plan.tp_plan.mode == "1d"
    assert "blocks.*.attn.qkv" in plan.tp_plan.layers
    assert resolve(config(), 2).tp_plan is None


def test_the_resolved_config_writes_in_what_resolving_chose():
    """config.toml holds concrete values: the dtype "auto" picked on this machine, dp_shard,
    the global batch, 1-bit Adam's freeze step; resolving it again gives the same plan."""
    from shardwise.accelerator import get_accelerator
    from shardwise.run_plan import _dtype

    cfg = config("parallel.tp=2", "train.micro_batch=2", "optim.name=onebit_adam")
    plan = resolve(cfg, 4)
    resolved = Config.from_dict(tomllib.loads(plan.resolved_config().to_toml()))
    assert (cfg.parallel.dp_shard, cfg.precision.dtype, cfg.train.global_batch) == (
        -1,
        "auto",
        None,
    )
    assert resolved.parallel.dp_shard == 2 and resolved.train.global_batch == 4
    assert resolved.precision.dtype == _dtype(get_accelerator().default_dtype())
    assert resolved.optim.freeze_step == plan.optimizer.onebit_freeze == cfg.train.steps // 5
    again = resolve(resolved, 4)
    assert again.layout() == plan.layout() and again.micro_batches == plan.micro_batches


def test_plan_pickles_for_the_workers():
    plan = resolve(config("parallel.tp=2", "parallel.tp_sequence_parallel=true"), 2)
    again = pickle.loads(pickle.dumps(plan))
    assert (
        again.layout() == plan.layout()
        and again.tp_plan.layers.keys() == plan.tp_plan.layers.keys()
    )


def test_table_names_axes_sharding_tiers_and_predicted_bytes():
    plan = resolve(config("zero.stage=3", "precision.dtype=fp32"), 2)
    table = plan.table()
    assert "dp_shard=2" in table and "optimizer, grads, params over dp_shard=2" in table
    assert "adam states: device" in table and "fp32 params" in table
    states = plan.model_state_bytes()
    psi = plan.trainable_params
    # ZeRO-3 in fp32 without master weights: (4 + 4 + 8) Ψ / N
    assert sum(states.values()) == pytest.approx(16 * psi / 2)
    assert states["master_params"] == 0
    delayed = resolve(config("offload.optimizer=host", "offload.delayed_update=5"), 2).table()
    assert "adam states: host, updated in the background from step 5" in delayed


def test_stage_one_keeps_params_and_grads_whole():
    mixed = config("zero.stage=1", "precision.dtype=bf16", "precision.reduce_dtype=param")
    states = resolve(mixed, 4).model_state_bytes()
    psi = resolve(config(), 1).trainable_params
    # ZeRO-1 with mixed precision: 2Ψ + 2Ψ + 12Ψ/N
    assert sum(states.values()) == pytest.approx(4 * psi + 12 * psi / 4)
    # reduced in fp32: an fp32 gradient buffer beside the bf16 one where gradients are whole
    fp32_reduce = resolve(config("zero.stage=1", "precision.dtype=bf16"), 4).model_state_bytes()
    assert fp32_reduce["grads"] == pytest.approx(6 * psi)
    stage2 = resolve(config("zero.stage=2", "precision.dtype=bf16"), 4).model_state_bytes()
    assert stage2["grads"] == pytest.approx(4 * psi / 4)


def test_chunks_take_any_stage_and_stage_zero_means_three():
    def flags(*overrides):
        sharding = resolve(
            config("offload.policy=static", "offload.optimizer=host", *overrides), 2
        ).sharding
        return sharding.stage, sharding.optimizer, sharding.grads, sharding.params

    assert flags() == (3, True, True, True)  # Gemini's default: chunks sharded whole
    assert flags("zero.stage=1") == (1, True, False, False)
    assert flags("zero.stage=2") == (2, True, True, False)
    plan = resolve(config("offload.policy=static", "zero.stage=2", "precision.dtype=fp32"), 2)
    assert "optimizer, grads over dp_shard=2; parameters in chunks (static)" in plan.table()
    assert plan.model_state_bytes()["params"] == 4 * plan.trainable_params


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (
            ["parallel.sp=2", "parallel.tp=2", "parallel.tp_sequence_parallel=true"],
            4,
            "parallel.sp=2 does not combine with this",
        ),
        (["parallel.tp=3"], 3, "model.n_heads=4 does not split over parallel.tp=3"),
        (["train.global_batch=5"], 2, "train.global_batch=5 is not divisible"),
        (["offload.policy=auto"], 1, "set it"),
        (["offload.optimizer=disk"], 1, "needs offload.disk_path"),
        (["model.name=gtp"], 1, "did you mean 'gpt'"),
    ],
)
def test_bad_configs_are_one_line_errors(overrides, world, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve(config(*overrides), world)
    assert "\n" not in str(info.value)


def test_a_given_optimizer_is_used_as_given_unless_the_config_says_otherwise():
    """[Note: a given optimizer] in run_plan.py."""
    given = resolve(config(), 1, optimizer_given=True).optimizer
    assert (given.lr_schedule, given.grad_clip, given.decay_groups) == (False, 0.0, False)
    builtin = resolve(config(), 1).optimizer
    assert (builtin.lr_schedule, builtin.grad_clip, builtin.decay_groups) == (True, 1.0, True)
    explicit = resolve(
        config("optim.grad_clip=0.5", "optim.warmup_steps=3"), 1, optimizer_given=True
    )
    assert (explicit.optimizer.lr_schedule, explicit.optimizer.grad_clip) == (True, 0.5)
    replaced = config().replace(train={"steps": 3})  # replace keeps what was set, nothing more
    assert resolve(replaced, 1, optimizer_given=True).optimizer.grad_clip == 0.0
    with pytest.raises(ConfigError, match="brings its own AdamW"):
        resolve(config("offload.optimizer=host"), 1, optimizer_given=True)
