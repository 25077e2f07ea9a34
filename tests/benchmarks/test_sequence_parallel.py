"""The sequence-parallel benchmark (benchmarks/sequence_parallel.py): its JSON ratios from
given job records (the jobs themselves run in `shardwise bench sequence-parallel`, whose
figures docs/benchmarks.md records)."""

from __future__ import annotations

from benchmarks import sequence_parallel as bench


def test_ratios_are_longest_sequences_and_step_times():
    jobs = {
        "dense@1": {"longest": 2048, "tries": [], "step_s": None},
        "ring@2": {"longest": 4096, "tries": [], "step_s": None},
        "ring@4": {"longest": 7680, "tries": [], "step_s": 2.0},
        "ulysses@2": {"longest": 4096, "tries": [], "step_s": None},
        "ulysses@4": {"longest": 8192, "tries": [], "step_s": 1.0},
    }
    result = bench.summarise(bench.QUICK, jobs)
    assert result.ratio == {
        "longest_sp4_vs_sp1_ring": 3.75,
        "longest_sp4_vs_sp1_ulysses": 4.0,
        "ring_vs_ulysses_step": 2.0,
    }
    assert result.ours == 7680
