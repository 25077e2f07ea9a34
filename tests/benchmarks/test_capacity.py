"""The capacity benchmark (benchmarks/capacity.py): its ratios from the runs' records, and
the cap's watchdog (the runs themselves take ~25 minutes: `shardwise bench capacity`, figures
in docs/benchmarks.md)."""

from __future__ import annotations

import threading

from benchmarks import capacity

GIB = 2**30


def _record(params: float, trained: bool, rss: float) -> dict:
    return {"params": params, "trained": trained, "why": "", "peak_rss_bytes": rss}


def test_ratios_compare_the_largest_trained_sizes_and_the_first_sizes_rss():
    runs = {
        "ours": [
            _record(4e8, True, 1 * GIB),
            _record(7e8, True, 2 * GIB),
            _record(1e9, True, 3 * GIB),
        ],
        "deepspeed": [_record(4e8, True, 4 * GIB), _record(7e8, False, 9 * GIB)],
    }
    result = capacity.summarise((8, 14, 20), runs, "deepspeed 0.19.8")
    assert result.ours == 1e9
    assert result.ratio == {"largest_vs_deepspeed": 2.5, "rss_vs_deepspeed": 0.25}
    assert result.config["at_ladder_top"] == ["ours"]


def test_without_deepspeed_the_peak_is_compared_with_the_cap():
    runs = {"ours": [_record(4e8, True, 2 * GIB), _record(7e8, False, 9 * GIB)]}
    result = capacity.summarise((8, 14), runs, "deepspeed not importable here")
    assert result.ratio == {"rss_vs_cap": 2 * GIB / capacity.CAP_BYTES}
    assert result.config["at_ladder_top"] == []


def test_watchdog_reports_the_resident_set_past_the_cap():
    seen: list[int] = []
    passed = threading.Event()
    watchdog = capacity.CapWatchdog(cap=1, on_pass=lambda rss: (seen.append(rss), passed.set()))
    assert passed.wait(60)  # a guard against a hang only: any process is past one byte
    watchdog.stop()
    assert seen[0] > 1
