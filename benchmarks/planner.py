"""Benchmark ``planner``: `shardwise plan`'s predictions against measured runs.

Part 1 — memory. Each case of `CASES` (a layout of 2, 4 or 8 ranks: data parallelism,
ZeRO 1-3, activation checkpointing, bf16, 1D tensor parallelism with and without
Megatron-SP, 2D, 2.5D and 3D tensor parallelism, hybrid tp x ZeRO, Adam states and
parameter chunks offloaded, pipeline and sequence parallelism) trains the same small GPT
with `shardwise.initialize` + ``train_step``. After a warm-up step (Adam's states exist),
the next step's peak is measured with `PeakTensorBytes` ([Note: measuring peak memory]:
every tensor storage of the device type, as CUDA's allocator would count; on the CPU,
host-resident states are in the same memory and counted too); a case's figure is its
largest rank's. The prediction is `predict(resolve(config, nproc))`'s peak (device + host
on the CPU). ``max_rel_error`` = the largest |predicted / measured - 1| over the cases
(goal <= 0.10).

Part 2 — time. The same runs time `ITERS` steps after the tracked one (one compute thread
per rank, a barrier before every step, a step's time is the slowest rank's, the median
counts), against the predicted step time from the probed machine speeds ([Note: the time
model]). ``time_rel_error`` = the median over the cases of |predicted / measured - 1|
(goal <= 0.25; the worst case is in ``config``).

Part 3 — `--auto`. Every candidate layout of 4 ranks is predicted; the cap is the median of
their predicted peaks, so about half fit. Every fitting layout is then measured (median
step time) in one 4-rank job. ``auto_vs_best`` = the measured time of the planner's first
choice / the fastest measured (goal <= 1.10).

The JSON line: ``ours`` = max_rel_error; peers ``max_rel_error`` (goal 0.10, ratio
ours/goal), ``time_rel_error`` and ``auto_vs_best`` each as their own ratio (value / 1).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from shardwise.accelerator import get_accelerator
from shardwise.bench import BenchResult, launch_workers, worker_main
from shardwise.config import Config
from shardwise.engine import initialize
from shardwise.models.gpt import build_gpt
from shardwise.planner import PeakTensorBytes, live_storages, predict
from shardwise.planner.auto import choose_layouts, peak_bytes
from shardwise.planner.speed import MachineSpeeds, probe_machine
from shardwise.run_plan import resolve

CASES: dict[str, tuple[int, dict[str, dict]]] = {
    "dp-zero0": (2, {}),
    "dp-zero1": (2, {"zero": {"stage": 1}}),
    "dp-zero2": (2, {"zero": {"stage": 2}}),
    "dp-zero3": (2, {"zero": {"stage": 3}}),
    "dp-checkpointing": (2, {"train": {"activation_checkpointing": "full"}}),
    "zero3-checkpointing": (
        2,
        {"zero": {"stage": 3}, "train": {"activation_checkpointing": "full"}},
    ),
    "zero2-bf16": (2, {"zero": {"stage": 2}, "precision": {"dtype": "bf16"}}),
    "tp2-1d": (2, {"parallel": {"tp": 2}}),
    "tp2-1d-sp": (2, {"parallel": {"tp": 2, "tp_sequence_parallel": True}}),
    "offload-adam-host": (2, {"offload": {"optimizer": "host"}}),
    "offload-chunks-static": (2, {"offload": {"policy": "static", "param_device_fraction": 0.5}}),
    "pipeline-1f1b": (2, {"parallel": {"pp": 2}, "train": {"global_batch": 16}}),
    "ring-sp2": (2, {"parallel": {"sp": 2}}),
    "tp4-2d": (4, {"parallel": {"tp": 4, "tp_mode": "2d"}}),
    "tp2-dp2-zero1": (4, {"parallel": {"tp": 2, "dp_shard": 2}, "zero": {"stage": 1}}),
    "pipeline-tp2": (4, {"parallel": {"pp": 2, "tp": 2}, "train": {"global_batch": 16}}),
    "tp8-2p5d": (8, {"parallel": {"tp": 8, "tp_mode": "2.5d", "tp_depth": 2}}),
    "tp8-3d": (8, {"parallel": {"tp": 8, "tp_mode": "3d"}}),
    "tp4-2d-dp2-zero2": (8, {"parallel": {"tp": 4, "tp_mode": "2d"}, "zero": {"stage": 2}}),
    "dp4-zero3-checkpointing": (
        4,
        {"zero": {"stage": 3}, "train": {"activation_checkpointing": "full"}},
    ),
}
"""Case name -> (ranks, config sections over `case_config`'s base)."""
BENCH_ONLY = {
    "dp-zero1": "ZeRO-1 runs in tp2-dp2-zero1",
    "dp-checkpointing": "checkpointing runs in zero3-checkpointing",
    "tp2-1d": "1D runs in tp2-1d-sp and tp2-dp2-zero1",
    "offload-adam-host": "on the CPU it measures as dp-zero0: one memory holds both tiers",
    "tp8-2p5d": "SUMMA runs in tp4-2d",
    "tp4-2d-dp2-zero2": "its filling bucket is one formula; 8 ranks cost CI time",
}
"""Cases the benchmark runs but CI does not, and why that leaves nothing unchecked."""
IN_CI = [name for name in CASES if name not in BENCH_ONLY]
"""The cases tests/planner checks on every CI run."""
GOAL = 0.10
"""Predicted peak within 10% of the measured one (the issue's bound)."""


@dataclass(frozen=True)
class Settings:
    """The model every case trains and what a job measures."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    seq_len: int = 64
    micro_batch: int = 4
    iters: int = 5
    """Timed steps per case (after the warm-up and the tracked step)."""
    cases: list[str] = field(default_factory=list)
    """Names of `CASES` the job measures."""
    layouts: list[dict] = field(default_factory=list)
    """Config sections of the `--auto` candidates the job times (part 3)."""


QUICK = Settings()
FULL = Settings(n_layers=4, d_model=128, seq_len=128, iters=10)


def case_config(settings: Settings, sections: dict[str, dict]) -> Config:
    """The base every case shares (fp32, gradients reduced in fp32), with `sections` over it."""
    base = Config().replace(
        model={
            "n_layers": settings.n_layers,
            "d_model": settings.d_model,
            "n_heads": settings.n_heads,
        },
        data={"seq_len": settings.seq_len},
        precision={"dtype": "fp32", "reduce_dtype": "fp32"},
        train={"micro_batch": settings.micro_batch, "steps": 2},
    )
    return base.replace(**sections)


def run(quick: bool) -> BenchResult:
    settings = QUICK if quick else FULL
    print("[planner] probing this machine's speeds", file=sys.stderr, flush=True)
    speeds = probe_machine()
    cases: dict[str, Any] = {}
    for nproc in sorted({n for n, _ in CASES.values()}):
        names = [name for name, (n, _) in CASES.items() if n == nproc]
        print(f"[planner] {nproc} ranks: {', '.join(names)}", file=sys.stderr, flush=True)
        job = Settings(**{**asdict(settings), "cases": names})
        measured = launch_workers("benchmarks.planner", ["--settings", _json(job)], nproc)
        for name in names:
            cfg = case_config(settings, CASES[name][1])
            prediction = predict(resolve(cfg, nproc), speeds)
            cases[name] = compare(prediction, measured[name])
    auto = auto_choice(settings, speeds)
    memory_errors = {name: abs(case["memory_ratio"] - 1) for name, case in cases.items()}
    time_errors = {name: abs(case["time_ratio"] - 1) for name, case in cases.items()}
    max_error = max(memory_errors.values())
    time_error = statistics.median(time_errors.values())
    config = {
        "model": {k: v for k, v in asdict(settings).items() if k not in ("cases", "layouts")},
        "precision": "fp32 (gradients reduced in fp32); zero2-bf16 in bf16",
        "device": get_accelerator().device_type,
        "torch": torch.__version__.split("+")[0],
        "speeds": asdict(speeds),
        "cases": cases,
        "worst_memory_case": max(memory_errors, key=memory_errors.get),
        "worst_time_case": max(time_errors, key=time_errors.get),
        "auto": auto,
    }
    return BenchResult(
        metric="planner_max_rel_error_of_peak_memory",
        ours=max(max_error, 1e-6),
        peers={"max_rel_error": GOAL, "time_rel_error": 1.0, "auto_vs_best": 1.0},
        config=config,
        ratio={
            "max_rel_error": max(max_error, 1e-6),
            "time_rel_error": max(time_error, 1e-6),
            "auto_vs_best": auto["auto_vs_best"],
        },
    )


def compare(prediction, measured: dict[str, float]) -> dict[str, Any]:
    """A case's prediction against its measurement (bytes, seconds, ratios)."""
    return {
        "measured_peak_bytes": measured["peak"],
        "predicted_peak_bytes": peak_bytes(prediction),
        "memory_ratio": peak_bytes(prediction) / measured["peak"],
        "measured_step_s": measured["step_s"],
        "predicted_step_s": prediction.time.step,
        "time_ratio": prediction.time.step / measured["step_s"],
    }


def auto_choice(settings: Settings, speeds: MachineSpeeds) -> dict[str, Any]:
    """Part 3: the cap, the fitting layouts measured, and the first choice against the best."""
    nproc = 4
    base = case_config(settings, {})
    everything = choose_layouts(base, nproc, float("inf"), speeds)
    cap = statistics.median(c.peak for c in everything)
    fitting = choose_layouts(base, nproc, cap, speeds)
    print(
        f"[planner] --auto: {len(fitting)} of {len(everything)} layouts fit "
        f"{cap / 2**20:.2f} MiB; timing them on {nproc} ranks",
        file=sys.stderr,
        flush=True,
    )
    layouts = [c.sections for c in fitting]
    job = Settings(**{**asdict(settings), "layouts": layouts})
    measured = launch_workers("benchmarks.planner", ["--settings", _json(job)], nproc)["layouts"]
    best = min(measured)
    return {
        "nproc": nproc,
        "cap_bytes": cap,
        "candidates": len(everything),
        "fitting": [
            {"set": c.settings, "predicted_step_s": c.prediction.time.step, "measured_step_s": s}
            for c, s in zip(fitting, measured, strict=True)
        ],
        "auto_vs_best": measured[0] / best,
    }


def _json(settings: Settings) -> str:
    return json.dumps(asdict(settings))


# --------------------------------------------------------------------------- the worker


def measure_case(config: Config, iters: int, device: torch.device) -> dict[str, float]:
    """On every rank: the peak tensor bytes of a step after a warm-up one (largest rank) and
    the median step time (slowest rank) of `iters` more; the ranks train the same rows."""
    plan = resolve(config, dist.get_world_size())
    before = live_storages(device.type)
    model = build_gpt(config.model, config.data.seq_len, device=device, seed=1)
    engine = initialize(model, None, config)
    generator = torch.Generator().manual_seed(0)
    rows = config.train.micro_batch * plan.micro_batches
    tokens = torch.randint(0, 256, (rows, config.data.seq_len + 1), generator=generator)
    batch = (tokens[:, :-1].to(device), tokens[:, 1:].to(device))
    engine.train_step(batch)
    with PeakTensorBytes(device.type, before) as tracker:
        engine.train_step(batch)
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        engine.train_step(batch)
        get_accelerator().synchronize()
        times.append(time.perf_counter() - start)
    del engine, model
    gc.collect()
    worst = torch.tensor([float(tracker.peak), *times])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    peak, *slowest = worst.tolist()
    return {"peak": peak, "step_s": statistics.median(slowest) if slowest else float("nan")}


def measure(settings: Settings, rank: int, local_rank: int, world_size: int) -> dict[str, Any]:
    """Rank 0's record: every case of the job (part 1 and 2), or every layout's time (3)."""
    device = get_accelerator().device(local_rank)
    if settings.layouts:
        base = case_config(settings, {})
        times = [
            measure_case(base.replace(**sections), settings.iters, device)["step_s"]
            for sections in settings.layouts
        ]
        return {"layouts": times}
    return {
        name: measure_case(case_config(settings, CASES[name][1]), settings.iters, device)
        for name in settings.cases
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank (``python -m benchmarks.planner``)."""
    worker_main("benchmarks.planner", Settings, measure, argv)


if __name__ == "__main__":
    main()
