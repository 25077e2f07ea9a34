"""Bad tensor-parallel settings fail with one line naming the fix, before any process starts
(`shardwise.trainer.validate` runs in the CLI before the launcher)."""

from __future__ import annotations

import pytest

from shardwise.config import Config
from shardwise.errors import ConfigError
from shardwise.run_plan import resolve

BAD = {
    "1d-heads": (
        {"tp": 3},
        {},
        {},
        "model.n_heads=4 does not split over parallel.tp=3 (tp_mode='1d' needs a multiple of 3); "
        "tp degrees that fit: 2, 4",
    ),
    "1d-vocab": (
        {"tp": 4},
        {"vocab_size": 258},
        {},
        "model.vocab_size=258 does not split over parallel.tp=4 (tp_mode='1d' needs a multiple "
        "of 4); tp degrees that fit: 2",
    ),
    "1d-mlp-hidden": (
        {"tp": 4},
        {"d_ff": 130},
        {},
        "model.d_ff=130 does not split over parallel.tp=4 (tp_mode='1d' needs a multiple of 4); "
        "tp degrees that fit: 2",
    ),
    "2d-not-square": (
        {"tp": 8, "tp_mode": "2d"},
        {},
        {},
        "parallel.tp=8 does not fit tp_mode='2d', which needs tp = a square q^2; valid tp up to "
        "world size 8: 1, 4",
    ),
    "2d-vocab": (
        {"tp": 4, "tp_mode": "2d"},
        {"vocab_size": 257},
        {},
        "model.vocab_size=257 does not split over parallel.tp=4 (tp_mode='2d' needs a multiple "
        "of 2)",
    ),
    "2.5d-impossible-depth": (
        {"tp": 8, "tp_mode": "2.5d", "tp_depth": 3},
        {},
        {},
        "parallel.tp=8 does not fit tp_mode='2.5d', which needs tp = tp_depth=3 x q^2; valid tp "
        "up to world size 8: 3",
    ),
    "2.5d-batch": (
        {"tp": 8, "tp_mode": "2.5d", "tp_depth": 2},
        {},
        {"micro_batch": 2},
        "train.micro_batch=2 does not split over parallel.tp=8 (tp_mode='2.5d' needs a multiple "
        "of 4)",
    ),
    "3d-not-cube": (
        {"tp": 4, "tp_mode": "3d"},
        {},
        {},
        "parallel.tp=4 does not fit tp_mode='3d', which needs tp = a cube q^3",
    ),
    "3d-hidden": (
        {"tp": 27, "tp_mode": "3d"},
        {"d_model": 48, "n_heads": 6},
        {"micro_batch": 9},
        "model.d_model=48 does not split over parallel.tp=27 (tp_mode='3d' needs a multiple of 9)",
    ),
    "sequence-parallel-2d": (
        {"tp": 4, "tp_mode": "2d", "tp_sequence_parallel": True},
        {},
        {},
        "parallel.tp_sequence_parallel applies to tp_mode='1d' (Megatron-SP), not '2d'",
    ),
    "learned-positions-3d": (
        {"tp": 8, "tp_mode": "3d"},
        {"positions": "learned"},
        {},
        "model.positions='learned' is split for tp_mode='1d' only",
    ),
}


@pytest.mark.parametrize(("parallel", "model", "train", "message"), BAD.values(), ids=list(BAD))
def test_bad_layouts_are_one_line_errors(parallel, model, train, message):
    cfg = Config().replace(parallel=parallel, model=model, train=train)
    with pytest.raises(ConfigError) as info:
        resolve(cfg, parallel["tp"])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("mode", ["2d", "2.5d", "3d"])
def test_good_layouts_validate(mode):
    tp, depth = {"2d": (4, 1), "2.5d": (8, 2), "3d": (8, 1)}[mode]
    cfg = Config().replace(parallel={"tp": tp, "tp_mode": mode, "tp_depth": depth})
    want = {"2d": (2, 2), "2.5d": (2, 2, 2), "3d": (2, 2, 2)}[mode]
    assert resolve(cfg, tp).dims.tp_shape == want
