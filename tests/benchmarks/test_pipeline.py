"""The pipeline benchmark (benchmarks/pipeline.py): its JSON ratios from a worker's record
(the worker itself runs in `shardwise bench pipeline`, whose figures docs/benchmarks.md
records; a live run here would cost the suite ~12 s)."""

from __future__ import annotations

from benchmarks import pipeline


def test_json_ratios_are_measured_over_theory_and_step_time_ratios(monkeypatch):
    medians = {name: 1.0 for name in pipeline.SCHEDULES}
    medians.update({"zb_h1": 0.9, "1f1b_pair": 1.0, "torch_pipelining": 2.0})
    bubbles = {name: 0.2 for name in pipeline.SCHEDULES}
    m = pipeline.QUICK.micro_batches
    a = 1000.0  # one micro-batch's activations of a whole stage on both ranks
    peaks = {name: [m * a, m * a] for name in pipeline.SCHEDULES}  # GPipe: m held
    peaks["1f1b"] = [2 * a, 2 * a]  # rank 0 may hold p = 2, rank 1 only 1: twice its bound
    peaks["1f1b_memory_partition"] = [1.5 * a, 1.2 * a]
    slowest = {name: 0.1 for name in pipeline.SCHEDULES}
    shares = {name: [0.98, 1.02] for name in pipeline.SCHEDULES}
    fake = {
        "median_s": medians,
        "bubble": bubbles,
        "bubble_slowest_rank": slowest,
        "busy_over_mean": shares,
        "peak_bytes": peaks,
        "config": {},
    }
    monkeypatch.setattr(pipeline, "launch_workers", lambda *args: fake)
    result = pipeline.run(quick=True)
    theory = 1 / (pipeline.QUICK.micro_batches + 1)  # (p-1)/(m+p-1) at p=2
    assert result.ratio["bubble_1f1b"] == 0.2 / theory
    assert result.config["slowest_rank_bubble_over_theory"]["1f1b"] == 0.1 / theory
    assert result.config["busy_per_rank_over_mean"]["gpipe"] == [0.98, 1.02]
    assert result.ratio["zb_vs_1f1b"] == 0.9
    assert result.ratio["torch_pipelining"] == 0.5
    assert {f"bubble_{name}" for name in pipeline.SCHEDULES} <= set(result.ratio)
    assert result.ratio["activation_gpipe"] == 1.0
    assert result.ratio["activation_1f1b"] == 2.0 and result.peers["activation_1f1b"] == a
    assert result.ratio["memory_partition"] == 0.75 and result.peers["memory_partition"] == 2 * a
