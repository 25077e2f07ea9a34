"""Benchmark ``onebit``: 1-bit Adam and 0/1 Adam against AdamW at 2 ranks (data parallel, ZeRO
stage 0, fp32).

Three figures for 1-bit Adam, each against AdamW measured in the same run:

* ``bytes_vs_allreduce``: wire bytes one rank sends in a compressed step (the all-to-all and
  all-gather of packed signs and scales, plus the loss's scalar all-reduce) over those of an
  AdamW step (the fp32 gradient all-reduce plus the same scalar); recorded by CommStats on the
  ``speed`` model. Target <= 0.05.
* ``loss_vs_adam``: the default ``shardwise train`` run (preset tiny, 300 steps, the embedded
  corpus), trained by the trainer with ``optim.name = onebit_adam`` (freeze at 20%: step 60,
  the variance refreshed every 10 steps, 64 elements per scale) and with AdamW; the mean loss
  of the last 10 steps of each, ratio 1-bit / AdamW. The full run repeats it for preset mini
  (ratio key ``loss_vs_adam_mini``). Target <= 1.03.
* ``step_vs_adam_slow_link``: under ``distributed.emulate_gbps = 1`` (every collective waits
  its wire bytes at 1 Gbit/s, [Note: emulated link] in distributed/link.py), preset mini
  (25M parameters), 64 tokens and one sequence per rank, the mean step time of 1-bit Adam
  over one refresh cycle (9 compressed steps and 1 exact one) over AdamW's mean; contenders
  interleaved step by step, a barrier before each step, a step timed on each rank. Target
  <= 0.5.

The same for 0/1 Adam (``optim.name = zero_one_adam``, its defaults; docs/onebit_adam.md), keys
prefixed ``zero_one_``: its loss on the same runs, its mean step time on the slow link over
one interval of ``sync_interval_max`` local steps (their last one synchronises), and
``zero_one_bytes_per_step_vs_allreduce``, the mean wire bytes per step over that interval over
AdamW's step. Both are measured over 40 steps (4 refresh cycles, 5 intervals).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shardwise.bench import BenchResult, interleaved_step_times, launch_workers, worker_main
from shardwise.config import Config
from shardwise.distributed.comm import CommStats
from shardwise.engine import initialize
from shardwise.models.gpt import build_gpt
from shardwise.run_plan import resolve

NPROC = 2
LINK_GBPS = 1.0
ONEBIT_KEYS = {"freeze_step", "compression_chunk", "variance_refresh", "update_bound"}
"""The 1-bit Adam settings the JSON ``config`` records (defaults; freeze None = 20%)."""
ZERO_ONE_KEYS = {
    "freeze_step",
    "compression_chunk",
    "update_bound",
    "variance_gap_doubles_after",
    "sync_interval_doubles_after",
    "sync_interval_max",
}
"""The 0/1 Adam settings the JSON ``config`` records."""
CONTENDERS = ("adamw", "onebit_adam", "zero_one_adam")
RATIO_KEYS = {
    "onebit_adam": ("", "bytes_vs_allreduce"),
    "zero_one_adam": ("zero_one_", "bytes_per_step_vs_allreduce"),
}
"""Each compressed optimizer's ratio key prefix and the name of its bytes figure."""


@dataclass(frozen=True)
class Settings:
    presets: tuple[str, ...]
    """Presets of the convergence runs (the default run's first)."""
    steps: int = 300
    speed_iters: int = 40
    """Measured steps per contender on the slow link: whole refresh cycles of 1-bit Adam
    (10 steps) and intervals of 0/1 Adam's local steps (8)."""
    out: str = ""
    """Folder of the convergence runs (set by `run`)."""


QUICK = Settings(presets=("tiny",))
FULL = Settings(presets=("tiny", "mini"))


def run(quick: bool) -> BenchResult:
    settings = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="shardwise-onebit-") as out:
        job = Settings(**{**asdict(settings), "out": out})
        record = launch_workers("benchmarks.onebit", ["--settings", json.dumps(asdict(job))], NPROC)
    return summarise(settings, record)


def summarise(settings: Settings, record: dict[str, Any]) -> BenchResult:
    """The JSON ratios from rank 0's record: each compressed optimizer's figure over AdamW's,
    per key (0/1 Adam's prefixed ``zero_one_``)."""
    speed, losses = record["speed"], record["losses"]
    peers, ratio = {}, {}
    for name, (prefix, bytes_key) in RATIO_KEYS.items():
        figures = {
            bytes_key: speed["wire_bytes"],
            "step_vs_adam_slow_link": speed["mean_step_s"],
            **{
                "loss_vs_adam" if p == settings.presets[0] else f"loss_vs_adam_{p}": losses[p]
                for p in settings.presets
            },
        }
        for key, figure in figures.items():
            peers[prefix + key] = figure["adamw"]
            ratio[prefix + key] = figure[name] / figure["adamw"]
    config = {
        "ranks": NPROC,
        "precision": "fp32",
        "zero_stage": 0,
        "link_gbps": LINK_GBPS,
        "speed": speed,
        "losses": losses,
        "steps": settings.steps,
        "onebit": Config().optim.model_dump(include=ONEBIT_KEYS),
        "zero_one": Config().optim.model_dump(include=ZERO_ONE_KEYS),
    }
    return BenchResult(
        metric="onebit_over_adamw (bytes, loss, step time)",
        ours=ratio["step_vs_adam_slow_link"],
        peers=peers,
        config=config,
        ratio=ratio,
    )


def progress(line: str) -> None:
    if dist.get_rank() == 0:
        print(f"[onebit] {line}", file=sys.stderr, flush=True)


def converge(settings: Settings, preset: str) -> dict[str, float]:
    """The default run (at `preset`) with each optimizer: mean loss of the last 10 steps."""
    from shardwise.trainer import train

    means = {}
    for name in CONTENDERS:
        cfg = Config().replace(
            model={"preset": preset},
            precision={"dtype": "fp32"},
            optim={"name": name},
            train={"steps": settings.steps},
            log={"progress": False},
        )
        out = Path(settings.out) / f"{preset}-{name}"
        out.mkdir(parents=True, exist_ok=True)
        losses = train(resolve(cfg, dist.get_world_size()), out).losses
        means[name] = statistics.fmean(losses[-10:])
        progress(f"{preset} {name}: last-10 mean loss {means[name]:.4f}")
    return means


def speed(settings: Settings) -> dict[str, Any]:
    """Step times on the emulated 1 Gbit/s link and the bytes of a step of each: AdamW's, a
    compressed step of 1-bit Adam, the mean over an interval of 0/1 Adam's local steps."""
    rank = dist.get_rank()
    engines = {}
    for name in CONTENDERS:
        cfg = Config().replace(
            model={"preset": "mini"},
            data={"seq_len": 64},
            precision={"dtype": "fp32"},
            optim={"name": name, "freeze_step": 1}
            | ({"sync_interval_doubles_after": 1} if name == "zero_one_adam" else {}),
            train={"micro_batch": 1, "steps": 1000},
            distributed={"emulate_gbps": LINK_GBPS},
        )
        model = build_gpt(cfg.model, 64, device="cpu", seed=cfg.train.seed)
        engines[name] = initialize(model, None, cfg)
    gen = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 256, (1, 65), generator=gen) for _ in range(4)]

    def step_of(name):
        def step(index: int) -> None:
            row = batches[index % len(batches)]
            engines[name].train_step((row[:, :-1], row[:, 1:]))

        return step

    wire = {}
    interval = Config().optim.sync_interval_max
    for name in engines:  # step 1 (exact for all), 0/1 Adam then to its longest interval
        step_of(name)(0)
        zero_one = name == "zero_one_adam"
        for index in range(interval.bit_length() - 1 if zero_one else 0):
            step_of(name)(index)  # intervals 1, 2, 4 ...
        recorded = interval if zero_one else 1
        with CommStats() as stats:
            for index in range(recorded):
                step_of(name)(index)
        wire[name] = stats.total("wire_bytes") / recorded
    times = interleaved_step_times(
        {name: step_of(name) for name in engines},
        warmup=0,
        iters=settings.speed_iters,
        before_step=dist.barrier,
        on_step=lambda name, i, s: progress(f"{name} step {i}: {s:.3f} s"),
    )
    return {
        "wire_bytes": wire,
        "mean_step_s": {name: statistics.fmean(t) for name, t in times.items()},
        "median_step_s": {name: statistics.median(t) for name, t in times.items()},
        "model": "mini, seq 64, 1 sequence per rank",
    }


def measure(settings: Settings, rank: int, local_rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    record = {"speed": speed(settings)}
    progress(f"slow link: {record['speed']['mean_step_s']}")
    record["losses"] = {preset: converge(settings, preset) for preset in settings.presets}
    return record


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank (``python -m benchmarks.onebit``)."""
    worker_main("benchmarks.onebit", Settings, measure, argv)


if __name__ == "__main__":
    main()
