from __future__ import annotations

import functools
import logging
import random

import pytest
import torch
import torch.distributed as dist

from shardwise import precision
from shardwise.accelerator import Accelerator
from shardwise.config import PrecisionConfig
from shardwise.errors import CheckpointError, ConfigError
from shardwise.precision import (
    DynamicLossScaler,
    LossScalerStateError,
    MixedPrecisionPolicy,
    make_loss_scaler,
    policy_from_config,
)

CPU = Accelerator(device_type="cpu", backend="gloo")
INF = float("inf")


# --- policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("default", [torch.float32, torch.bfloat16])
def test_auto_dtype_asks_the_accelerator(monkeypatch, default):
    monkeypatch.setattr(Accelerator, "default_dtype", lambda self: default)
    policy = policy_from_config(PrecisionConfig(dtype="auto"), CPU)
    assert policy.param_dtype == default
    assert policy.reduce_dtype == torch.float32
    assert policy.master_dtype == torch.float32
    assert policy.needs_master_weights == (default != torch.float32)
    assert not policy.needs_loss_scaling


@pytest.mark.parametrize(
    ("dtype", "reduce", "param_dtype", "reduce_dtype"),
    [
        ("fp32", "fp32", torch.float32, torch.float32),
        ("bf16", "fp32", torch.bfloat16, torch.float32),
        ("bf16", "param", torch.bfloat16, torch.bfloat16),
        ("fp16", "param", torch.float16, torch.float16),
    ],
)
def test_explicit_dtypes(dtype, reduce, param_dtype, reduce_dtype):
    policy = policy_from_config(PrecisionConfig(dtype=dtype, reduce_dtype=reduce), CPU)
    assert (policy.param_dtype, policy.reduce_dtype) == (param_dtype, reduce_dtype)


def test_fp16_on_cpu_warns_and_gets_a_scaler(caplog):
    cfg = PrecisionConfig(dtype="fp16", initial_scale=1024.0, hysteresis=3)
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        policy = policy_from_config(cfg, CPU)
    assert "fp16" in caplog.text and "CPU" in caplog.text
    assert policy.needs_loss_scaling and policy.needs_master_weights
    scaler = make_loss_scaler(policy, cfg)
    assert scaler is not None and scaler.scale == 1024.0 and scaler.hysteresis == 3


def test_no_scaler_unless_fp16():
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert make_loss_scaler(policy, PrecisionConfig()) is None


def test_min_scale_above_initial_scale_is_a_config_error():
    with pytest.raises(ConfigError, match="min_scale=8 is above precision.initial_scale=4"):
        make_loss_scaler(
            MixedPrecisionPolicy(torch.float16, torch.float32),
            PrecisionConfig(initial_scale=4.0, min_scale=8.0),
        )


# --- transition table -----------------------------------------------------------------------


def _run(scaler: DynamicLossScaler, overflows: list[bool]) -> list[tuple[bool, float]]:
    return [(scaler.update(f), scaler.scale) for f in overflows]


def test_count_then_grow_after_exactly_growth_interval_clean_steps():
    s = DynamicLossScaler(initial_scale=8.0, growth_interval=3)
    assert _run(s, [False] * 7) == [
        (True, 8.0), (True, 8.0), (True, 16.0),   # count, count, grow
        (True, 16.0), (True, 16.0), (True, 32.0),  # run restarts after a growth
        (True, 32.0),
    ]  # fmt: skip
    assert s.skipped_steps == 0


def test_tolerate_then_back_off_and_overflow_always_skips(caplog):
    s = DynamicLossScaler(initial_scale=64.0, growth_interval=100, hysteresis=3)
    with caplog.at_level(logging.INFO, logger="shardwise"):
        got = _run(s, [True, False, True, True, True])
    # hysteresis is not refilled by the clean step in between: the 3rd overflow halves S,
    # and the halving refills it, so the next overflow is tolerated again.
    assert got == [(False, 64.0), (True, 64.0), (False, 64.0), (False, 32.0), (False, 32.0)]
    assert s.skipped_steps == 4
    assert "loss scale 64 -> 32" in caplog.text and "(back_off)" in caplog.text
    assert "(tolerate)" in caplog.text


def test_an_overflow_restarts_the_clean_run_and_growth_refills_hysteresis():
    s = DynamicLossScaler(initial_scale=8.0, growth_interval=2, hysteresis=2)
    # clean, overflow (tolerated, run restarts), clean, clean (grow: 16, hysteresis refilled),
    # overflow (tolerated again rather than halving).
    assert _run(s, [False, True, False, False, True]) == [
        (True, 8.0), (False, 8.0), (True, 8.0), (True, 16.0), (False, 16.0),
    ]  # fmt: skip


def test_min_scale_is_never_crossed(caplog):
    s = DynamicLossScaler(initial_scale=6.0, growth_interval=100, hysteresis=1, min_scale=2.0)
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        got = _run(s, [True, True, True])
    assert got == [(False, 3.0), (False, 2.0), (False, 2.0)]  # back_off, floor, floor
    assert "(floor)" in caplog.text


def test_a_state_outside_the_table_is_an_illegal_transition():
    s = DynamicLossScaler(growth_interval=4, hysteresis=2)
    s._state.hysteresis_left = 0
    with pytest.raises(LossScalerStateError, match="OVERFLOW .* matches none"):
        s.update(True)
    s._state.clean_run = 4
    with pytest.raises(LossScalerStateError, match="CLEAN .* matches none"):
        s.update(False)


def test_overlapping_rows_are_an_illegal_transition(monkeypatch):
    count = precision._TRANSITIONS[0]
    monkeypatch.setattr(precision, "_TRANSITIONS", (*precision._TRANSITIONS, count))
    with pytest.raises(LossScalerStateError, match="matches count, count"):
        DynamicLossScaler().update(False)


def test_state_dict_resumes_the_exact_sequence():
    rng = random.Random(0)
    events = [rng.random() < 0.3 for _ in range(60)]
    make = functools.partial(
        DynamicLossScaler, initial_scale=2.0**10, growth_interval=3, hysteresis=2, min_scale=4.0
    )
    reference = make()
    expected = _run(reference, events)

    first = make()
    head = _run(first, events[:25])
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert head + _run(resumed, events[25:]) == expected
    assert resumed.state_dict() == reference.state_dict()
    assert resumed.skipped_steps == sum(events)


def test_state_dict_that_does_not_fit_the_settings_is_rejected():
    state = DynamicLossScaler(hysteresis=4).state_dict()
    with pytest.raises(CheckpointError, match="hysteresis=2"):
        DynamicLossScaler(hysteresis=2).load_state_dict(state)
    with pytest.raises(CheckpointError, match="lacks \\['scale'\\]"):
        DynamicLossScaler().load_state_dict({k: v for k, v in state.items() if k != "scale"})


# --- unscale --------------------------------------------------------------------------------


def test_unscale_divides_in_place():
    s = DynamicLossScaler(initial_scale=4.0)
    grads = [torch.tensor([4.0, -8.0]), torch.tensor([[2.0]], dtype=torch.float16)]
    assert s.unscale_and_check_(grads) is False
    assert torch.equal(grads[0], torch.tensor([1.0, -2.0]))
    assert torch.equal(grads[1], torch.tensor([[0.5]], dtype=torch.float16))


@pytest.mark.parametrize("bad", [INF, -INF, float("nan")])
def test_unscale_detects_inf_and_nan(bad):
    s = DynamicLossScaler(initial_scale=2.0)
    grads = [torch.ones(3), torch.tensor([1.0, bad], dtype=torch.float16)]
    assert s.unscale_and_check_(grads) is True
    assert torch.equal(grads[0], torch.full((3,), 0.5))


def test_scale_loss():
    s = DynamicLossScaler(initial_scale=8.0)
    assert s.scale_loss(torch.tensor(1.5)).item() == 12.0


def _global_found_inf() -> tuple[bool, bool, list[float]]:
    rank = dist.get_rank()
    s = DynamicLossScaler(initial_scale=2.0)
    local = s.unscale_and_check_([torch.tensor([INF if rank == 1 else 2.0])])
    grads = [torch.tensor([INF if rank == 1 else 2.0, 4.0])]
    found = s.unscale_and_check_(grads, [dist.group.WORLD])
    return local, found, grads[0].tolist()


def test_overflow_on_one_rank_is_seen_by_every_rank(pool2):
    (local0, global0, grads0), (local1, global1, _) = pool2.run(_global_found_inf)
    assert (local0, local1) == (False, True)
    assert (global0, global1) == (True, True)
    assert grads0 == [1.0, 2.0]


# --- end to end -----------------------------------------------------------------------------


def test_fp16_steps_skip_until_the_scale_fits():
    """W = 1, x = 1: dL/dout = 2 * out = 8, so the scaled fp16 output gradient is 8 * S, which
    is inf for S >= 2^13 (fp16 max 65504) and finite for S = 2^12."""
    model = torch.nn.Linear(4, 2, bias=False).to(torch.float16)
    torch.nn.init.ones_(model.weight)
    scaler = DynamicLossScaler(initial_scale=2.0**14, growth_interval=100, hysteresis=2)
    x = torch.ones(1, 4, dtype=torch.float16)
    stepped, scales = [], []
    for _ in range(5):
        model.weight.grad = None
        loss = model(x).float().pow(2).sum()  # loss in fp32, as the engine computes it
        scaler.scale_loss(loss).backward()
        should_step = scaler.update(scaler.unscale_and_check_([model.weight.grad]))
        if should_step:  # plain SGD, lr = 1/64 (torch.optim's first step costs a second)
            with torch.no_grad():
                model.weight -= model.weight.grad / 64
        stepped.append(should_step)
        scales.append(scaler.scale)
        if not should_step:
            assert torch.equal(model.weight, torch.ones(2, 4, dtype=torch.float16))
    assert stepped == [False, False, False, False, True]
    assert scales == [2.0**14, 2.0**13, 2.0**13, 2.0**12, 2.0**12]
    assert torch.equal(model.weight, torch.full((2, 4), 1 - 8 / 64, dtype=torch.float16))
    assert scaler.skipped_steps == 4
