"""The checkpoint benchmark (benchmarks/checkpoint.py): its JSON ratios from a given record
(the runs themselves are `shardwise bench checkpoint`, whose figures docs/benchmarks.md
records)."""

from __future__ import annotations

import pytest

from benchmarks import checkpoint as bench


def test_ratios_are_throughput_and_memory_over_the_reference():
    record = {
        "seconds": {
            "save": 2.0,
            "raw_save": 1.5,
            "load": 1.0,
            "raw_load": 0.8,
            "dcp_save": 3.0,
            "dcp_load": 2.0,
            "async_blocking": 0.5,
        },
        "largest_tensor_bytes": 100,
        "convert_peak_bytes": 250,
        "single_peak_bytes": 300,
    }
    result = bench.summarise(bench.QUICK, record)
    assert result.ratio == pytest.approx(
        {
            "save_vs_raw": 0.75,
            "load_vs_raw": 0.8,
            "convert_mem_vs_largest": 2.5,
            "single_mem_vs_largest": 3.0,
            "save_vs_dcp": 1.5,
            "load_vs_dcp": 2.0,
            "async_blocking_vs_save": 0.25,
        }
    )
    assert result.ours == 0.75 and result.config["precision"] == "fp32"
