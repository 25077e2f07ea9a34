"""The 1-bit Adam benchmark (benchmarks/onebit.py): its JSON ratios from a given record (the
runs themselves are `shardwise bench onebit`, whose figures docs/benchmarks.md records)."""

from __future__ import annotations

import pytest

from benchmarks import onebit as bench


def test_ratios_are_each_compressed_optimizer_over_adamw():
    record = {
        "speed": {
            "wire_bytes": {"adamw": 1000.0, "onebit_adam": 40.0, "zero_one_adam": 10.0},
            "mean_step_s": {"adamw": 2.0, "onebit_adam": 0.5, "zero_one_adam": 0.4},
        },
        "losses": {
            "tiny": {"adamw": 2.0, "onebit_adam": 2.04, "zero_one_adam": 2.02},
            "mini": {"adamw": 1.0, "onebit_adam": 1.01, "zero_one_adam": 1.03},
        },
    }
    result = bench.summarise(bench.FULL, record)
    assert result.ratio == pytest.approx(
        {
            "bytes_vs_allreduce": 0.04,
            "step_vs_adam_slow_link": 0.25,
            "loss_vs_adam": 1.02,
            "loss_vs_adam_mini": 1.01,
            "zero_one_bytes_per_step_vs_allreduce": 0.01,
            "zero_one_step_vs_adam_slow_link": 0.2,
            "zero_one_loss_vs_adam": 1.01,
            "zero_one_loss_vs_adam_mini": 1.03,
        }
    )
    assert result.ours == 0.25 and result.config["zero_stage"] == 0
    assert result.config["zero_one"]["sync_interval_max"] == 8
