"""benchmarks.offload: the disk-tier measurement on a few MB, the RSS readers, the step-time,
one-process and capacity jobs on a tiny model in this process, and the JSON line's ratio keys.

The whole benchmark (hundreds of MB of IO, a 2-rank and two 1-rank launched jobs training
models of 25M and 300M parameters) takes minutes and is not run here; neither is the 2-rank
sharding of the chunks (tests/zero/chunks/test_sharding.py covers it).
"""

from __future__ import annotations

import json
import resource
import statistics
import threading
from concurrent.futures import Future
from dataclasses import asdict, replace

import pytest
import torch

from benchmarks import offload
from shardwise import bench
from shardwise.accelerator import get_accelerator
from shardwise.bench import result_record
from tests.parity import BF16_RTOL

SMALL_DISK = offload.DiskSettings(chunk_bytes=1 << 20, chunks=3, in_flight=2, rounds=2)
"""Three 1 MiB chunks: the benchmark's pattern on a few MB."""


# --------------------------------------------------------------------------- settings


def test_offload_is_a_benchmark():
    assert "offload" in bench.available_benchmarks()
    assert callable(bench.load_benchmark("offload").run)


def test_quick_plan_moves_a_few_hundred_mb_of_64_mb_chunks():
    disk = offload.QUICK.disk
    assert disk.chunk_bytes == 64 << 20 and disk.in_flight > 1
    assert 256 << 20 <= disk.chunk_bytes * disk.chunks <= 1 << 30
    steps = offload.QUICK.steps
    assert (steps.preset, steps.seq_len) == ("mini", 128)
    assert offload.FULL.steps.iters > steps.iters


def test_job_round_trips_through_json_and_unknown_kinds_fail():
    job = offload.Job("capacity", asdict(offload.CapacitySettings(preset="tiny")))
    assert offload.Job(**json.loads(json.dumps(asdict(job)))) == job
    with pytest.raises(ValueError, match="unknown offload benchmark job 'nope'"):
        offload.measure(offload.Job("nope"), 0, 0, 1)


# --------------------------------------------------------------------------- disk tier vs raw


def test_pipelined_keeps_at_most_in_flight_operations_pending():
    issued: list[Future] = []
    most = 0

    def issue(index: int) -> Future:
        nonlocal most
        future: Future = Future()
        issued.append(future)
        most = max(most, sum(not f.done() for f in issued))
        threading.Timer(0.01, future.set_result, (None,)).start()
        return future

    seconds = offload.pipelined(issue, 6, SMALL_DISK)
    assert len(issued) == 6 and all(f.done() for f in issued)
    assert most == SMALL_DISK.in_flight
    assert seconds >= 0.01 * 6 / SMALL_DISK.in_flight


def test_disk_measurement_on_a_few_mb(tmp_path):
    measured = offload.measure_disk(tmp_path, SMALL_DISK)
    assert measured["bytes_per_round"] == 3 << 20
    assert len(measured["round_ratios"]) == SMALL_DISK.rounds
    assert measured["ratio"] == pytest.approx(statistics.median(measured["round_ratios"]))
    for side in ("tier", "raw"):
        rates = measured[side]
        assert set(rates) == {"write_bytes_per_s", "read_bytes_per_s", "bytes_per_s"}
        assert all(value > 0 for value in rates.values())
        assert len(measured[f"{side}_rounds_bytes_per_s"]) == SMALL_DISK.rounds
        assert measured["fsync"][side]["bytes_per_s"] > 0
    assert measured["filesystem"] != "unknown"
    assert list(tmp_path.iterdir()) == []  # every file and run directory is gone


def test_tier_round_reads_back_what_it_wrote_and_resets_the_targets(tmp_path):
    sources = [offload.random_bytes(1 << 20, seed) for seed in range(2)]
    assert not torch.equal(sources[0], sources[1])
    assert torch.equal(sources[0], offload.random_bytes(1 << 20, 0))
    outs = [torch.ones(1 << 20, dtype=torch.uint8) for _ in sources]
    rates = offload.tier_round(tmp_path, sources, outs, SMALL_DISK)
    assert rates["bytes_per_s"] > 0
    assert all(bool((out == 1).all()) for out in outs)


def test_combined_rate_is_bytes_moved_over_seconds():
    # 1 B written at 1 B/s and read at 3 B/s: 2 B in 4/3 s.
    combined = offload.with_combined({"write_bytes_per_s": 1.0, "read_bytes_per_s": 3.0})
    assert combined["bytes_per_s"] == pytest.approx(1.5)


# --------------------------------------------------------------------------- memory readings


def test_rss_readers_see_touched_memory():
    before = offload.peak_rss_bytes()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # touched: resident
    now = offload.current_rss_bytes()
    peak = offload.peak_rss_bytes()
    assert block.sum() > 0
    assert now > 64 << 20
    assert peak >= max(before, now)
    # ru_maxrss also covers the image this process replaced by exec (the forking parent's).
    assert peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_peak_rss_falls_back_to_getrusage(monkeypatch):
    monkeypatch.setattr(offload, "_status_kib", lambda name: 0)
    assert offload.peak_rss_bytes() == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- the jobs


def test_step_job_on_a_tiny_model(tmp_path):
    settings = offload.StepSettings(
        warmup=1, iters=2, preset="tiny", seq_len=16, micro_batch=2, disk_path=str(tmp_path)
    )
    record = offload.measure_steps(settings, 0, 0, 1)
    assert set(offload.OPTIMIZER_TIERS) <= set(record["median_s"])
    last = record["config"]["last_loss"]
    # OffloadedAdamW runs torch's fused AdamW kernel chunk by chunk: bit-identical training.
    assert last["host"] == last["device"] == last["disk"]
    reports = record["memory_report"]
    assert reports["device"]["offloaded_host"] == reports["device"]["offloaded_disk"] == 0
    assert reports["host"]["offloaded_host"] > 0 and reports["disk"]["offloaded_disk"] > 0
    assert "deepspeed" in record["config"]
    # One process: the "sharded" contender's chunks are whole (its homes are the chunks).
    assert offload.SHARDED in record["median_s"]
    # The workload runs in the accelerator's default precision (bf16 on a CPU with AMX): the
    # chunked contender keeps its fp32 masters in the host optimizer, the flat one in its
    # shards, so bf16 rounds at other places (tests/parity.py's BF16_RTOL).
    fp32 = get_accelerator().default_dtype() == torch.float32
    rel = 1e-5 if fp32 else BF16_RTOL
    assert last[offload.SHARDED] == pytest.approx(last["device"], rel=rel)
    sharded = record["sharded"]
    assert (sharded["nproc"], sharded["sharded"]) == (1, False)
    report = reports[offload.SHARDED]
    assert sharded["state_bytes_per_rank"] == [offload.model_state_bytes(report)]
    assert sharded["homes_bytes_per_rank"] == [sum(sharded["chunk_bytes"])]
    assert sum(sharded["homes_on"].values()) == sum(sharded["chunk_bytes"])
    assert report["offloaded_host"] > 0 and sharded["offload"]["policy"] == "static"


def test_single_job_holds_every_chunk_and_all_adam_states():
    settings = offload.StepSettings(warmup=1, iters=1, preset="tiny", seq_len=16, micro_batch=2)
    record = offload.measure(offload.Job("single", asdict(settings)), 0, 0, 1)
    assert (record["nproc"], record["sharded"]) == (1, False)
    assert len(record["step_s"]) == 1 and len(record["losses"]) == 2
    psi, report = record["psi"], record["memory_report"]
    homes = sum(record["chunk_bytes"])
    param_bytes = torch.finfo(get_accelerator().default_dtype()).bits // 8  # the workload's
    assert record["homes_bytes_per_rank"] == [homes] and homes >= param_bytes * psi  # padded
    assert report["offloaded_host"] == 8 * psi  # Adam m, v of every parameter, in host memory
    assert record["state_bytes_per_rank"] == [offload.model_state_bytes(report)]
    assert record["state_bytes_per_rank"][0] >= homes + 8 * psi


def test_model_state_bytes_counts_chunks_masters_and_adam_states_not_gradients():
    report = {
        "chunks_device": 1,
        "chunks_host": 10,
        "chunks_disk": 100,
        "grad_chunks_device": 10**6,
        "grad_chunks_host": 10**6,
        "master_params": 1000,
        "optimizer_states": 10**4,
        "offloaded_host": 10**5,
        "offloaded_disk": 10**6,
    }
    assert offload.model_state_bytes(report) == 1_111_111


@pytest.mark.parametrize("param_offload", [False, True])
def test_capacity_job_on_a_tiny_model(tmp_path, param_offload):
    settings = offload.CapacitySettings(
        preset="tiny", seq_len=16, steps=2, chunk_mb=1, threads=1, disk_path=str(tmp_path)
    )
    threads = torch.get_num_threads()
    try:
        record = offload.measure_capacity(replace(settings, param_offload=param_offload), 0)
    finally:
        torch.set_num_threads(threads)
    psi = record["psi"]
    assert record["state_bytes"] == 16 * psi
    report = record["memory_report"]
    assert report["offloaded_disk"] == 8 * psi  # Adam m, v: all on disk
    assert record["param_offload"] == param_offload
    if param_offload:
        assert record["offload"]["policy"] == "static"
        chunk_bytes = report["chunks_device"] + report["chunks_host"] + report["chunks_disk"]
        assert chunk_bytes >= 4 * psi  # every fp32 parameter is in a chunk (padding on top)
    assert record["peak_rss_bytes"] >= record["rss_after_init_bytes"] > 0
    assert len(record["step_s"]) == len(record["losses"]) == 2
    assert record["offload"]["optimizer"] == "disk"
    moved = record["disk_bytes_per_step"][1]  # Adam m, v read and written back, at least
    assert moved["bytes_read"] >= 8 * psi and moved["bytes_written"] >= 8 * psi


def test_capacity_job_in_memory_is_the_reference(tmp_path):
    settings = offload.CapacitySettings(preset="tiny", seq_len=16, steps=2, threads=1)
    threads = torch.get_num_threads()
    try:
        record = offload.measure_capacity(replace(settings, in_memory=True), 0)
    finally:
        torch.set_num_threads(threads)
    assert record["offload"]["optimizer"] == "device" and record["offload"]["policy"] == "none"
    assert record["memory_report"]["offloaded_disk"] == 0
    assert record["disk_bytes_per_step"] == [{"bytes_read": 0, "bytes_written": 0}] * 2


def test_capacity_config_offloads_parameters_when_asked():
    settings = offload.CapacitySettings(disk_path="/tmp")
    cfg = offload.capacity_config(replace(settings, param_offload=False))
    assert cfg.offload.optimizer == "disk" and cfg.precision.dtype == "fp32"
    assert cfg.offload.policy == "none"
    wanted = offload.capacity_config(settings)
    assert wanted.offload.policy == "static"
    assert wanted.offload.param_device_fraction == 0.0


# --------------------------------------------------------------------------- the JSON line


def fake_records(peak_rss: int, deepspeed: float | None = None) -> tuple[dict, ...]:
    """Records of the four measurements; the sharded contender holds 510 and 490 bytes of
    model state on its two ranks against 1000 in one process."""
    disk = {
        "ratio": 0.8,
        "tier": {"bytes_per_s": 4e9},
        "raw": {"bytes_per_s": 5e9},
        "fsync": {},
        "bytes_per_round": 1,
    }
    medians = {"device": 1.0, "host": 1.1, "disk": 1.5, offload.SHARDED: 2.0}
    if deepspeed is not None:
        medians[offload.DEEPSPEED] = deepspeed
    steps = {
        "median_s": medians,
        "config": {"last_loss": {name: 5.0 for name in medians}},
        "memory_report": {},
        "sharded": {"nproc": 2, "sharded": True, "state_bytes_per_rank": [510, 490]},
    }
    capacity = {
        "psi": 100,
        "state_bytes": 1600,
        "peak_rss_bytes": peak_rss,
        "param_offload": False,
        "memory_report": {},
        "step_s": [9.0, 2.4, 2.4],
    }
    single = {"nproc": 1, "sharded": False, "state_bytes_per_rank": [1000]}
    resident = {"step_s": [5.0, 2.0, 2.0]}
    return disk, steps, capacity, single, resident


def test_json_line_has_every_ratio_key_against_its_target():
    result = offload.summarise(offload.QUICK, *fake_records(peak_rss=1000))
    record = json.loads(json.dumps(result_record("offload", result), allow_nan=False))
    assert set(record["ratio"]) == set(record["peers"])
    assert set(record["ratio"]) == {*offload.TARGETS, "sharded_state_fraction"}
    assert record["ratio"]["disk_vs_raw"] == pytest.approx(0.8)
    assert record["ratio"]["step_vs_inmemory"] == pytest.approx(1.1)
    assert record["ratio"]["state_over_rss"] == pytest.approx(1.6)
    assert record["peers"]["state_over_rss"] == 1000
    assert record["ratio"]["all_disk_vs_inmemory"] == pytest.approx(1.2)  # medians after step 1
    assert record["peers"]["all_disk_vs_inmemory"] == 2.0
    assert record["config"]["meets_target"] == {
        "disk_vs_raw": True,
        "step_vs_inmemory": True,
        "state_over_rss": False,
        "all_disk_vs_inmemory": True,
    }
    assert record["ours"] == pytest.approx(1.6 / 3)  # the worst attainment: state_over_rss
    assert record["config"]["steps"]["vs_device"]["disk"] == pytest.approx(1.5)
    assert "Adam" in record["config"]["capacity"]["offloaded"]
    # Without DeepSpeed: no step ratio for the sharded contender, its seconds in the config.
    assert set(record["config"]["no_target"]) == {"sharded_state_fraction"}
    assert record["config"]["sharded"]["median_s"] == 2.0
    assert record["config"]["sharded"]["deepspeed_median_s"] is None


def test_sharded_ratios_are_the_most_any_rank_holds_and_the_step_over_deepspeed():
    result = offload.summarise(offload.QUICK, *fake_records(peak_rss=400, deepspeed=4.0))
    record = json.loads(json.dumps(result_record("offload", result), allow_nan=False))
    assert record["ratio"]["sharded_state_fraction"] == pytest.approx(0.51)
    assert record["peers"]["sharded_state_fraction"] == 1000
    assert record["ratio"]["sharded_vs_deepspeed"] == pytest.approx(0.5)
    assert record["peers"]["sharded_vs_deepspeed"] == 4.0
    sharded = record["config"]["sharded"]
    assert sharded["state_fraction_per_rank"] == pytest.approx([0.51, 0.49])
    assert sharded["state_sum_over_single"] == pytest.approx(1.0)
    assert set(record["config"]["no_target"]) == set(offload.NO_TARGET)
    # Keys without a target do not enter ours: every target is met here.
    assert record["ours"] == pytest.approx(min(0.8 / 0.7, 1.3 / 1.1, 4.0 / 3))


def test_every_target_met_gives_ours_at_least_one():
    result = offload.summarise(offload.QUICK, *fake_records(peak_rss=400))
    assert result.ours >= 1
    assert all(result_record("offload", result)["config"]["meets_target"].values())


@pytest.mark.parametrize(
    "param_offload, report, offloaded",
    [
        (False, {}, "Adam m, v (8Ψ) on disk"),
        (True, {}, "fp32 parameters (4Ψ, chunks"),
        (True, {"grad_chunks_disk": 0}, "gradients (4Ψ) in chunks"),
    ],
)
def test_capacity_summary_says_what_was_offloaded(param_offload, report, offloaded):
    record = {
        "state_bytes": 1600,
        "peak_rss_bytes": 400,
        "param_offload": param_offload,
        "memory_report": report,
    }
    summary = offload.capacity_summary(record)
    assert offloaded in summary["offloaded"]
    assert summary["state_over_rss"] == 4.0
