"""The benchmark harness: finding benchmarks, the JSON-line contract, timing helpers.

The real benchmarks take minutes and are not run here; a fake benchmark module stands in for
them, and `benchmarks.dp`'s contenders run for two steps on a tiny model in one process.
"""

from __future__ import annotations

import json
import math
import types
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from shardwise import bench
from shardwise.bench import BenchResult
from shardwise.cli import main
from shardwise.errors import ShardwiseError


def fake_module(result: BenchResult) -> types.ModuleType:
    module = types.ModuleType("benchmarks.fake")
    calls = []

    def run(quick: bool) -> BenchResult:
        calls.append(quick)
        return result

    module.run = run
    module.calls = calls
    return module


FAKE = BenchResult(
    metric="median_step_s",
    ours=0.5,
    peers={"torch_ddp": 0.4, "other": 2.0},
    config={"nproc": 2, "precision": "fp32"},
)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# --------------------------------------------------------------------------- finding benchmarks


def test_unknown_benchmark_lists_the_available_ones():
    with pytest.raises(ShardwiseError, match=r"unknown benchmark 'nope'; available: .*\bdp\b"):
        bench.load_benchmark("nope")


def test_unknown_benchmark_through_the_cli(capsys):
    code, out, err = run_cli(["bench", "no-such-bench"], capsys)
    assert code == 2
    assert "shardwise: error: unknown benchmark 'no-such-bench'; available:" in err
    assert "dp" in err and "Traceback" not in err and out == ""


def test_names_that_are_not_modules_are_unknown():
    for name in ("../dp", "dp.py", "__init__", ""):
        with pytest.raises(ShardwiseError, match="unknown benchmark"):
            bench.load_benchmark(name)


def test_dash_in_a_name_is_an_underscore_in_the_module(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "zero_offload.py").write_text("")
    monkeypatch.setattr(bench, "repo_root", lambda: tmp_path)
    assert bench.available_benchmarks() == ["zero-offload"]


def test_dp_is_found_and_has_run():
    assert "dp" in bench.available_benchmarks()
    assert callable(bench.load_benchmark("dp").run)


def test_without_a_source_checkout_the_error_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "repo_root", lambda: tmp_path)
    with pytest.raises(ShardwiseError, match="benchmarks need a source checkout"):
        bench.load_benchmark("dp")


# --------------------------------------------------------------------------- the JSON line


def check_contract(line: str, name: str, result: BenchResult) -> dict:
    record = json.loads(line)
    assert set(record) == {"bench", "metric", "ours", "peers", "ratio", "config"}
    assert record["bench"] == name
    assert record["metric"] == result.metric
    assert record["ours"] == result.ours
    assert record["peers"] == result.peers
    assert record["config"] == result.config
    assert set(record["ratio"]) == set(result.peers)
    for peer, value in result.peers.items():
        assert math.isclose(record["ratio"][peer], result.ours / value)
    return record


def test_last_stdout_line_is_the_json_object(monkeypatch, capsys):
    module = fake_module(FAKE)
    monkeypatch.setattr(bench, "load_benchmark", lambda name: module)
    code, out, _ = run_cli(["bench", "fake", "--quick"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2, out  # a human-readable summary, then the JSON line
    assert "torch_ddp" in lines[0]
    record = check_contract(lines[-1], "fake", FAKE)
    assert record["ratio"]["torch_ddp"] == pytest.approx(1.25)
    assert module.calls == [True]


def test_json_flag_prints_only_the_json_line(monkeypatch, capsys):
    module = fake_module(FAKE)
    monkeypatch.setattr(bench, "load_benchmark", lambda name: module)
    code, out, _ = run_cli(["bench", "fake", "--json"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    check_contract(lines[0], "fake", FAKE)
    assert module.calls == [False]


@pytest.mark.parametrize(
    "ours, peers",
    [
        (0.0, {"torch_ddp": 1.0}),
        (1.0, {"torch_ddp": 0.0}),
        (float("nan"), {"torch_ddp": 1.0}),
        (1.0, {}),
    ],
)
def test_results_that_cannot_give_a_ratio_are_rejected(ours, peers):
    with pytest.raises(ValueError):
        BenchResult(metric="median_step_s", ours=ours, peers=peers)


def test_worker_result_round_trip(tmp_path):
    path = tmp_path / "result.json"
    bench.write_worker_result(path, {"median_s": {"ours": 0.1}})
    assert json.loads(path.read_text()) == {"median_s": {"ours": 0.1}}
    assert list(tmp_path.iterdir()) == [path]


# --------------------------------------------------------------------------- timing


def test_interleaved_rounds_alternate_the_order_and_skip_the_warmup():
    order = []
    steps = {name: (lambda i, name=name: order.append((name, i))) for name in ("a", "b")}
    times = bench.interleaved_step_times(steps, warmup=1, iters=3)
    assert order == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for values in times.values() for t in values)


def test_median_step_time_times_only_the_measured_steps():
    seen = []
    median = bench.median_step_time(seen.append, warmup=2, iters=3)
    assert seen == [0, 1, 2, 3, 4]
    assert 0 <= median < 1


# --------------------------------------------------------------------------- benchmarks.dp


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
    )
    yield
    dist.destroy_process_group()


def test_dp_contenders_train_identically_on_a_tiny_model(one_rank_group):
    from benchmarks import dp, gpt_workload

    settings = gpt_workload.Settings(warmup=1, iters=2, preset="tiny", seq_len=16, micro_batch=2)
    cfg = gpt_workload.engine_config(settings, torch.float32)
    device = torch.device("cpu")
    batches = gpt_workload.make_batches(settings, 0, 1, cfg.model.vocab_size, device)
    ours = gpt_workload.ours_step(cfg, device, batches)
    ddp = dp.ddp_step(cfg, device, torch.float32, batches)
    for index in range(3):
        # Same weights, data, optimizer and clipping: the losses agree step after step.
        assert ours(index) == pytest.approx(ddp(index), rel=1e-5)


def test_dp_rows_differ_per_rank_and_repeat_per_seed():
    from benchmarks.gpt_workload import Settings, make_batches

    settings = Settings(warmup=1, iters=1, seq_len=8, micro_batch=2)
    rank0 = make_batches(settings, 0, 2, 256, torch.device("cpu"))
    rank1 = make_batches(settings, 1, 2, 256, torch.device("cpu"))
    again = make_batches(settings, 0, 2, 256, torch.device("cpu"))
    assert len(rank0) == 2 and rank0[0][0].shape == (2, 8)
    assert not torch.equal(rank0[0][0], rank1[0][0])
    assert torch.equal(rank0[1][0], again[1][0])
    assert torch.equal(rank0[0][0][:, 1:], rank0[0][1][:, :-1])  # targets are inputs shifted


def test_dp_measures_both_shapes_with_zero3_on_the_wide_one(one_rank_group, monkeypatch):
    from benchmarks import dp, gpt_workload

    small_wide = {**dp.WIDE, "n_layers": 1, "vocab_size": 512, "seq_len": 16, "micro_batch": 2}
    monkeypatch.setattr(dp, "WIDE", small_wide)
    settings = gpt_workload.Settings(
        warmup=1, iters=1, preset="tiny", seq_len=16, micro_batch=2, precision="fp32"
    )
    record = dp.measure(settings, 0, 0, 1)
    assert set(record) == {"mini", "wide", "wide_zero3"}
    for shape, stage in (("mini", 0), ("wide", 0), ("wide_zero3", 3)):
        config = record[shape]["config"]
        assert set(record[shape]["median_s"]) == {"ours", "torch_ddp"}
        assert config["zero_stage"] == stage
        last = config["last_loss"]
        assert last["ours"] == pytest.approx(last["torch_ddp"], rel=1e-5), shape
    wide = record["wide"]["config"]
    assert wide["precision"] == "fp32" and "vocab 512" in wide["model"]
