"""The 1-bit Adam benchmark (benchmarks/onebit.py): its JSON ratios from a given record (the
runs themselves are `shardwise bench onebit`, whose figures docs/benchmarks.md records)."""

from __future__ import annotations

import pytest

from benchmarks import onebit as bench


def test_ratios_are_onebit_over_adamw():
    record = {
        "speed": {
            "wire_bytes": {"adamw": 1000.0, "onebit_adam": 40.0},
            "mean_step_s": {"adamw": 2.0, "onebit_adam": 0.5},
        },
        "losses": {
            "tiny": {"adamw": 2.0, "onebit_adam": 2.04},
            "mini": {"adamw": 1.0, "onebit_adam": 1.01},
        },
    }
    result = bench.summarise(bench.FULL, record)
    assert result.ratio == pytest.approx(
        {
            "bytes_vs_allreduce": 0.04,
            "step_vs_adam_slow_link": 0.25,
            "loss_vs_adam": 1.02,
            "loss_vs_adam_mini": 1.01,
        }
    )
    assert result.ours == 0.25 and result.config["zero_stage"] == 0
