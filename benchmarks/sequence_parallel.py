"""Benchmark ``sequence-parallel``: the longest sequence that trains under a per-rank memory
cap, at sp = 1, 2 and 4, for ring and Ulysses attention; and their step times at one length.

A GPT of 2 blocks of width 64 (4 heads), vocabulary 256, fp32, one sequence per step, trained
one step at a time (AdamW) through `shardwise.initialize` with ``parallel.sp`` = the job's
ranks and ``attention.sequence_parallel`` = ring or ulysses (sp = 1: plain attention, torch's
SDPA). A job tries sequence lengths on a grid of `GRID` tokens — doubling until a step's
peak exceeds the cap on some rank, then bisecting — and reports the longest that stayed
under it. A step's peak: the rank's peak resident set during the step (``VmHWM``, reset
through /proc/self/clear_refs before it) above its resident set just before; glibc maps
blocks of 64 KiB and more on their own (`LIVE_BYTES_MALLOC`), so freed memory leaves the
resident set. The cap is the same for every job, so the longest sequence grows with sp only
if each rank's memory falls as 1/sp.

JSON ``ratio`` keys: ``longest_sp4_vs_sp1_ring`` and ``longest_sp4_vs_sp1_ulysses`` (the
longest sequence at sp = 4 over that at sp = 1; target >= 3.5) and ``ring_vs_ulysses_step``
(ring's step time over Ulysses' at sp = 4 and `STEP_LENGTH` tokens, the median of
`Settings.iters` steps). ``config`` holds every job's tries.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.offload import current_rss_bytes, peak_rss_bytes
from benchmarks.sparse_attention import LIVE_BYTES_MALLOC
from shardwise.bench import BenchResult, launch_workers, worker_main
from shardwise.config import Config
from shardwise.engine import initialize
from shardwise.models.gpt import build_gpt

GRID = 512
"""Sequence lengths tried are multiples of this (2 x sp divides it, for ring's zig-zag)."""
STEP_LENGTH = 4096
"""The length at which ring's and Ulysses' step times are compared (sp = 4)."""
JOBS = [("dense", 1), ("ring", 2), ("ring", 4), ("ulysses", 2), ("ulysses", 4)]
"""(attention kind, sp) of each job; sp = 1 is the baseline of both kinds."""


@dataclass(frozen=True)
class Settings:
    cap_mb: float
    """Per-rank peak a step may reach (MiB above the resident set before it)."""
    longest: int
    """Longest length tried."""
    iters: int
    kind: str = "dense"
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4


QUICK = Settings(cap_mb=24.0, longest=16384, iters=2)
FULL = Settings(cap_mb=48.0, longest=32768, iters=4)


def run(quick: bool) -> BenchResult:
    settings = QUICK if quick else FULL
    jobs = {}
    for kind, sp in JOBS:
        progress(f"{kind} at sp={sp}: longest sequence under {settings.cap_mb:g} MiB per rank")
        job = Settings(**{**asdict(settings), "kind": kind})
        args = ["--settings", json.dumps(asdict(job))]
        jobs[f"{kind}@{sp}"] = launch_workers(
            "benchmarks.sequence_parallel", args, sp, env=LIVE_BYTES_MALLOC
        )
        progress(f"{kind} at sp={sp}: {jobs[f'{kind}@{sp}']['longest']} tokens")
    return summarise(settings, jobs)


def summarise(settings: Settings, jobs: dict[str, dict[str, Any]]) -> BenchResult:
    longest = {name: job["longest"] for name, job in jobs.items()}
    base = longest["dense@1"]
    steps = {name: job["step_s"] for name, job in jobs.items() if job.get("step_s")}
    peers = {
        "longest_sp4_vs_sp1_ring": float(base),
        "longest_sp4_vs_sp1_ulysses": float(base),
        "ring_vs_ulysses_step": steps["ulysses@4"],
    }
    ratio = {
        "longest_sp4_vs_sp1_ring": longest["ring@4"] / base,
        "longest_sp4_vs_sp1_ulysses": longest["ulysses@4"] / base,
        "ring_vs_ulysses_step": steps["ring@4"] / steps["ulysses@4"],
    }
    config = {
        "model": f"gpt n_layers={settings.n_layers} d_model={settings.d_model} "
        f"n_heads={settings.n_heads} vocab=256, fp32, 1 sequence per step",
        "cap_mb_per_rank": settings.cap_mb,
        "grid": GRID,
        "step_length": STEP_LENGTH,
        "longest": longest,
        "step_s": steps,
        "tries": {name: job["tries"] for name, job in jobs.items()},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    return BenchResult(
        metric="longest_tokens_ring_sp4",
        ours=float(longest["ring@4"]),
        peers=peers,
        config=config,
        ratio=ratio,
    )


def progress(line: str) -> None:
    print(f"[sequence-parallel] {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- one job's ranks


def job_config(settings: Settings, seq_len: int, sp: int) -> Config:
    return Config.from_dict(
        {
            "model": {
                "n_layers": settings.n_layers,
                "d_model": settings.d_model,
                "n_heads": settings.n_heads,
                "vocab_size": 256,
            },
            "data": {"seq_len": seq_len},
            "parallel": {"sp": sp},
            "attention": {
                "sequence_parallel": "ring" if settings.kind == "dense" else settings.kind
            },
            "precision": {"dtype": "fp32"},
            "train": {"micro_batch": 1, "global_batch": 1, "steps": 1},
            "optim": {"warmup_steps": 0},
        }
    )


def one_step(settings: Settings, seq_len: int, sp: int, iters: int = 1) -> tuple[int, float]:
    """(this rank's peak bytes during the first step, median seconds of `iters` steps) of a
    fresh engine at `seq_len` tokens."""
    gc.collect()  # the previous length's engine (its hooks hold reference cycles)
    cfg = job_config(settings, seq_len, sp)
    model = build_gpt(cfg.model, seq_len, seed=0)
    engine = initialize(model, None, cfg)
    tokens = torch.randint(0, 256, (1, seq_len + 1), generator=torch.Generator().manual_seed(1))
    batch = (tokens[:, :-1], tokens[:, 1:])
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")
    before = current_rss_bytes()
    times = []
    for index in range(iters):
        start = time.perf_counter()
        engine.train_step(batch)
        times.append(time.perf_counter() - start)
        if index == 0:
            peak = peak_rss_bytes() - before
    return peak, statistics.median(times)


def fits(settings: Settings, seq_len: int, sp: int, tries: list) -> bool:
    peak, seconds = one_step(settings, seq_len, sp)
    worst = torch.tensor([float(peak)])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    tries.append({"tokens": seq_len, "peak_mb": worst.item() / 2**20, "step_s": seconds})
    return worst.item() <= settings.cap_mb * 2**20


def measure(settings: Settings, rank: int, local_rank: int, world_size: int) -> dict[str, Any]:
    sp = world_size
    one_step(settings, GRID, sp)  # warm-up: threads, allocator, first collectives
    tries: list = []
    good, bad = 0, None
    length = GRID
    while length <= settings.longest:  # double until a step does not fit
        if not fits(settings, length, sp, tries):
            bad = length
            break
        good, length = length, 2 * length
    if bad is not None:
        while bad - good > GRID:  # bisect on the grid
            middle = (good + bad) // 2 // GRID * GRID
            if fits(settings, middle, sp, tries):
                good = middle
            else:
                bad = middle
    step_s = None
    if sp == 4:
        step_s = one_step(settings, STEP_LENGTH, sp, iters=settings.iters)[1]
    return {"longest": good, "tries": tries, "step_s": step_s}


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank (``python -m benchmarks.sequence_parallel``)."""
    worker_main("benchmarks.sequence_parallel", Settings, measure, argv)


if __name__ == "__main__":
    main()
