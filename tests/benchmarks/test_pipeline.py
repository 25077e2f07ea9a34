"""The pipeline benchmark (benchmarks/pipeline.py): its worker on a tiny model, its JSON keys."""

from __future__ import annotations

import json
from dataclasses import asdict

from benchmarks import pipeline
from shardwise.bench import launch_workers


def test_worker_times_every_schedule_and_the_torch_peer_on_a_tiny_model():
    settings = pipeline.Settings(warmup=1, iters=1, n_layers=4, d_model=32, seq_len=16)
    record = launch_workers(
        "benchmarks.pipeline", ["--settings", json.dumps(asdict(settings))], pipeline.NPROC
    )
    assert set(record["median_s"]) == {*pipeline.SCHEDULES, "1f1b_pair", "torch_pipelining"}
    assert all(seconds > 0 for seconds in record["median_s"].values())
    assert set(record["bubble"]) == set(pipeline.SCHEDULES)
    assert all(0.0 <= idle < 1.0 for idle in record["bubble"].values())


def test_json_ratios_are_measured_over_theory_and_step_time_ratios(monkeypatch):
    medians = {name: 1.0 for name in pipeline.SCHEDULES}
    medians.update({"zb_h1": 0.9, "1f1b_pair": 1.0, "torch_pipelining": 2.0})
    bubbles = {name: 0.2 for name in pipeline.SCHEDULES}
    fake = {"median_s": medians, "bubble": bubbles, "config": {}}
    monkeypatch.setattr(pipeline, "launch_workers", lambda *args: fake)
    result = pipeline.run(quick=True)
    theory = 1 / (pipeline.QUICK.micro_batches + 1)  # (p-1)/(m+p-1) at p=2
    assert result.ratio["bubble_1f1b"] == 0.2 / theory
    assert result.ratio["zb_vs_1f1b"] == 0.9
    assert result.ratio["torch_pipelining"] == 0.5
    assert {f"bubble_{name}" for name in pipeline.SCHEDULES} <= set(result.ratio)
