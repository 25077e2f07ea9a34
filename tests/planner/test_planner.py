"""`shardwise plan` against measured runs: peak memory of every case of benchmarks/planner.py
within 10%, communication bytes equal to CommStats recordings, and the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.planner import CASES, IN_CI, QUICK, case_config, measure_case
from shardwise.accelerator import get_accelerator
from shardwise.distributed.comm import CommStats
from shardwise.engine import initialize
from shardwise.models import spec_of
from shardwise.models.gpt import build_gpt
from shardwise.planner import PeakTensorBytes, live_storages, predict
from shardwise.planner.activations import trace_micro_batch
from shardwise.planner.auto import peak_bytes
from shardwise.planner.comm import step_wire_bytes
from shardwise.planner.speed import MachineSpeeds
from shardwise.run_plan import meta_model, resolve
from shardwise.zero.chunks.chunk import alloc_storage, free_storage
from tests.cli_runs import run_cli

TOLERANCE = 0.10
"""The issue's bound on |predicted / measured - 1| of the per-rank peak."""


def _measured_peak(name: str) -> float:
    device = get_accelerator().device(dist.get_rank())
    return measure_case(case_config(QUICK, CASES[name][1]), 0, device)["peak"]


def _check_case(pool, name: str) -> None:
    nproc, sections = CASES[name]
    measured = pool.run(_measured_peak, name)[0]  # every rank has the largest rank's
    predicted = peak_bytes(predict(resolve(case_config(QUICK, sections), nproc)))
    assert predicted / measured == pytest.approx(1, abs=TOLERANCE), (predicted, measured)


@pytest.mark.parametrize("name", [name for name in IN_CI if CASES[name][0] == 2])
def test_peak_memory_is_predicted_within_ten_percent_on_two_ranks(pool2, name):
    _check_case(pool2, name)


@pytest.mark.parametrize("name", [name for name in IN_CI if CASES[name][0] == 4])
def test_peak_memory_is_predicted_within_ten_percent_on_four_ranks(pool4, name):
    _check_case(pool4, name)


@pytest.mark.parametrize("name", [name for name in IN_CI if CASES[name][0] == 8])
def test_peak_memory_is_predicted_within_ten_percent_on_eight_ranks(pool8, name):
    _check_case(pool8, name)


def _pipeline_peak(global_batch: int) -> float:
    sections = {"parallel": {"pp": 2}, "train": {"global_batch": global_batch}}
    device = get_accelerator().device(dist.get_rank())
    return measure_case(case_config(QUICK, sections), 0, device)["peak"]


def test_a_pipeline_peak_does_not_grow_with_its_micro_batches(pool2):
    """1F1B holds at most p micro-batches' activations, whatever m, and so does the runtime's
    peak since it lets sent tensors go once a later receive shows them complete: held to the
    step's end, the peak at 8 micro-batches was 6% above the one at 4 (+262 KB: 4 more hidden
    states), and the prediction (which does not depend on m) 0.90 of it."""
    four, eight = pool2.run(_pipeline_peak, 16)[0], pool2.run(_pipeline_peak, 32)[0]
    assert eight <= 1.01 * four, (four, eight)


def test_cases_span_the_layouts_the_issue_names():
    assert len(IN_CI) >= 12
    text = json.dumps([CASES[name] for name in IN_CI])
    for needle in ('"stage": 1', '"stage": 2', '"stage": 3', '"tp": 2', '"2d"', '"3d"', '"full"'):
        assert needle in text
    for needle in ('"policy": "static"', '"pp": 2', '"sp": 2', '"bf16"'):
        assert needle in text


def test_fake_trace_counts_what_a_real_step_holds():
    """The trace on fake tensors and a real forward + backward on the CPU: the same bytes."""
    cfg = case_config(QUICK, {})
    seq, batch = cfg.data.seq_len, cfg.train.micro_batch
    model = meta_model(cfg)
    trace = trace_micro_batch(model, spec_of(model), batch, seq)
    real = build_gpt(cfg.model, seq, device="cpu", seed=1)
    for param in real.parameters():
        param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    ids = torch.randint(0, 256, (batch, seq + 1))
    with PeakTensorBytes("cpu") as tracker:
        start = tracker.live
        F.cross_entropy(real(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert trace.peak == tracker.peak - start
    assert trace.flops > 6 * sum(p.numel() for p in real.blocks.parameters()) * batch * seq


def test_tracker_counts_storages_once_and_sees_resizes():
    keep = torch.zeros(1000)
    with PeakTensorBytes("cpu", live_storages("cpu")) as tracker:
        assert tracker.live == 0  # `keep` existed before: ignored
        a = torch.ones(256)  # 1 KiB
        view = a[:128]
        b = view * 2  # 512 B more
        assert tracker.live == 1024 + 512
        free_storage(a)
        torch.ones(1)  # the next operator reads the sizes again
        assert tracker.live == 512 + 4
        alloc_storage(a)
        del b, view
        torch.ones(1)
        assert tracker.live == 1024 + 4  # the operator's own output is alive as it returns
    assert tracker.peak == 1024 + 512
    del keep


def _wire_of_one_step(stage: int) -> dict[str, float]:
    cfg = case_config(QUICK, {"zero": {"stage": stage}, "train": {"global_batch": 16}})
    engine = initialize(build_gpt(cfg.model, cfg.data.seq_len, seed=1), None, cfg)
    ids = torch.randint(
        0, 256, (8, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(0)
    )
    engine.train_step((ids[:, :-1], ids[:, 1:]))
    with CommStats() as stats:
        engine.train_step((ids[:, :-1], ids[:, 1:]))
    return {op: stats.total(op=op) for op in ("all_reduce", "reduce_scatter", "all_gather")}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_step_communication_is_the_closed_form(pool2, stage):
    """Two micro-batches per step: stage 3 gathers every unit twice for each."""
    recorded = pool2.run(_wire_of_one_step, stage)[0]
    cfg = case_config(QUICK, {"zero": {"stage": stage}, "train": {"global_batch": 16}})
    plan = resolve(cfg, 2)
    assert plan.micro_batches == 2
    predicted = step_wire_bytes(plan, None)["dp"]
    for op, nbytes in recorded.items():
        # the recording adds the step's two fp32 scalars and the buckets' padding
        assert predicted.get(op, 0.0) == pytest.approx(nbytes, rel=0.01, abs=64), op


SPEEDS = MachineSpeeds({}, 1e-9, 1e9, 1e-4, 1e-5, 1e-4, 2)


@pytest.fixture
def speeds_cache(tmp_path, monkeypatch):
    """A cache of made-up machine speeds, so that no test probes (the probe spawns ranks)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from shardwise.cli import _speeds_cache

    SPEEDS.save(_speeds_cache())
    return SPEEDS


TINY = ["--set", "model.n_layers=2", "--set", "model.d_model=64", "--set", "data.seq_len=64"]


def test_plan_prints_the_table_and_json(speeds_cache, capsys):
    with pytest.raises(SystemExit) as code:
        from shardwise.cli import main

        main(["plan", "--nproc", "2", "--set", "zero.stage=3", *TINY])
    out = capsys.readouterr().out
    assert code.value.code == 0
    for row in (
        "optimizer_states",
        "activations",
        "gathered units",
        "peak",
        "comm dp",
        "step time",
    ):
        assert row in out
    with pytest.raises(SystemExit):
        main(["plan", "--nproc", "2", "--json", *TINY])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["memory_bytes"]["memory_peak"] > 0 and record["step_s"]["step"] > 0
    assert record["wire_bytes_per_step"]["dp"]["all_reduce"] > 0


def test_plan_shows_the_pipeline_timeline(capsys):
    """1F1B over 2 ranks and 4 micro-batches at unit cost: the makespan's (m + p - 1) * 2
    slots, rank 1 starting one slot late, the formula's bubble and 1F1B's in-flight counts."""
    from shardwise.cli import main

    pp = ["--set", "parallel.pp=2", "--set", "train.micro_batch=2", "--set", "train.global_batch=8"]
    with pytest.raises(SystemExit):
        main(["plan", "--nproc", "2", "--json", "--no-time", *TINY, *pp])
    pipeline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pipeline"]
    assert pipeline["timeline"] == [
        "r0 F0 F1 .  B0 F2 B1 F3 B2 .  B3",
        "r1 .  F0 B0 F1 B1 F2 B2 F3 B3 .",
    ]
    assert pipeline["bubble"] == pytest.approx(1 / 5) and pipeline["in_flight"] == [2, 1]
    with pytest.raises(SystemExit):
        main(["plan", "--nproc", "2", "--no-time", *TINY, *pp])
    out = capsys.readouterr().out
    assert "pipeline timeline at unit cost" in out and "r1 .  F0 B0 F1 B1" in out


def test_auto_ranks_the_fitting_layouts_by_predicted_time(speeds_cache, capsys):
    from shardwise.cli import main

    with pytest.raises(SystemExit) as code:
        main(["plan", "--nproc", "4", "--auto", "--memory-cap", "64MiB", "--json", *TINY])
    assert code.value.code == 0
    chosen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    times = [c["step_s"]["step"] for c in chosen]
    assert len(chosen) > 4 and times == sorted(times)
    assert all(c["memory_bytes"]["memory_peak"] <= 64 * 2**20 for c in chosen)
    layouts = {tuple(c["set"]) for c in chosen}
    assert len(layouts) == len(chosen)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--auto", "--memory-cap", "1KiB"],
            "no layout of 2 ranks fits --memory-cap 0.0 MiB: the smallest predicted peak is ",
        ),
        (["--auto"], "--auto needs --memory-cap SIZE"),
        (["--auto", "--memory-cap", "8GiB", "--top", "0"], "--top 0 must be at least 1"),
        (["--auto", "--memory-cap", "12"], "--memory-cap '12' is not a size"),
        (["--nproc", "0"], "--nproc 0 must be at least 1"),
    ],
)
def test_bad_plan_input_is_one_line(speeds_cache, capsys, args, message):
    code, err = run_cli(["plan", "--no-time", *TINY, *args], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    if "smallest predicted peak" in message:  # and the layout that gets there
        assert re.search(r"peak is [\d.]+ MiB per rank, with parallel\.tp=\d", err), err
