"""The sparse-attention benchmark (benchmarks/sparse_attention.py): its JSON ratios from
given times and peaks, and one peak-memory run in a fresh process on a short sequence (the
full run is `shardwise bench sparse-attention`, recorded in docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from benchmarks import sparse_attention as bench


def test_ratios_follow_the_times_and_peaks():
    settings = bench.QUICK
    short, long = bench.SEQS
    times = {
        short: {"bigbird": 1.0, "fixed": 2.0, "sliding_window": 0.5, "dense_causal": 4.0},
        long: {"bigbird": 3.0, "fixed": 9.0, "sliding_window": 2.0, "dense_causal": 60.0},
    }
    times[short]["masked"] = 12.0
    peaks = {f"{name}@{seq}": 100 for seq in bench.SEQS for name in bench.contenders(seq)}
    peaks[f"fixed@{long}"] = 150
    result = bench.summarise(settings, times, peaks)
    assert result.ours == 1.0
    assert result.ratio == {
        "speed_vs_dense": 4.0,
        "speed_vs_masked": 12.0,
        "mem_vs_dense": 1.5,
        "scaling_16k_vs_4k": 4.0,
    }
    assert result.config["worst_mem_case"] == f"fixed@{long}"
    assert result.config["kept_of_full_square_at_4096"]["bigbird"] == pytest.approx(
        0.0845, abs=1e-3
    )


def test_peak_of_one_step_in_a_fresh_process():
    settings = bench.Settings(warmup=0, iters=1, heads=2, head_dim=16)
    peak = bench.measure_peak("bigbird", 512, settings)
    output_and_grads = 4 * 2 * 512 * 16 * 4  # out, dq, dk, dv: [1, 2, 512, 16] fp32
    assert peak >= output_and_grads
