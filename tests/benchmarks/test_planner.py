"""benchmarks/planner.py's plumbing (its cases run in tests/planner)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from benchmarks import planner as bench_planner
from shardwise.planner.speed import TimePrediction


def test_settings_travel_to_the_workers_as_json():
    job = bench_planner.Settings(cases=["dp-zero0"], layouts=[{"zero": {"stage": 1}}])
    assert bench_planner.Settings(**json.loads(bench_planner._json(job))) == job


def test_every_case_resolves_for_its_ranks():
    from shardwise.run_plan import resolve

    for name, (nproc, sections) in bench_planner.CASES.items():
        plan = resolve(bench_planner.case_config(bench_planner.QUICK, sections), nproc)
        assert plan.world_size == nproc, name


def test_compare_gives_predicted_over_measured(monkeypatch):
    monkeypatch.setattr(bench_planner, "peak_bytes", lambda prediction: 110.0)
    prediction = SimpleNamespace(time=TimePrediction(compute=0.3, update=0.1, comm=0.1))
    case = bench_planner.compare(prediction, {"peak": 100.0, "step_s": 0.4})
    assert case["memory_ratio"] == pytest.approx(1.1)
    assert case["time_ratio"] == pytest.approx(1.25)
