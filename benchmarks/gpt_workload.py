"""The GPT step-time workload shared by the `dp` and `zero3` benchmarks.

Every contender trains the same GPT from the same initial weights on the same data (random
tokens from a fixed seed; each rank its own rows of each global batch), with the same
optimizer (torch AdamW, fused, `shardwise.optim.param_groups`, warm-up + cosine schedule) and
global-norm clipping; contenders run interleaved in one launched job (see
`shardwise.bench.interleaved_step_times`) and a step's time is the slowest rank's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shardwise.accelerator import get_accelerator
from shardwise.bench import StepFn, interleaved_step_times
from shardwise.config import Config
from shardwise.engine import initialize
from shardwise.models.gpt import GPT, build_gpt, count_params, gpt_config_from
from shardwise.optim import default_optimizer_factory

NPROC = 2
"""Ranks of the benchmark job."""


@dataclass(frozen=True)
class Settings:
    """The workload; the same for every contender."""

    warmup: int
    """Untimed steps per contender before the measured ones."""
    iters: int
    """Measured steps per contender."""
    preset: str = "mini"
    """GPT size preset."""
    seq_len: int = 128
    """Tokens per sequence."""
    micro_batch: int = 4
    """Sequences per rank per step."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 1234
    """Seed of the initial weights and of the data."""


QUICK = Settings(warmup=3, iters=10)
FULL = Settings(warmup=5, iters=40)


def engine_config(settings: Settings, dtype: torch.dtype, **sections: dict) -> Config:
    """Our engine's config for the workload (also the source of the peers' optimizer), plus
    benchmark-specific `sections` (e.g. ``zero={"stage": 3}``)."""
    return Config.from_dict(
        {
            "model": {"preset": settings.preset},
            "data": {"seq_len": settings.seq_len},
            "train": {
                "micro_batch": settings.micro_batch,
                "steps": settings.warmup + settings.iters,
                "seed": settings.seed,
            },
            "precision": {"dtype": "bf16" if dtype == torch.bfloat16 else "fp32"},
            "optim": {"grad_clip": settings.grad_clip},
            **sections,
        }
    )


def make_batches(
    settings: Settings, rank: int, world_size: int, vocab_size: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of every step: this rank's rows of a seeded global batch."""
    generator = torch.Generator().manual_seed(settings.seed)
    rows = slice(rank * settings.micro_batch, (rank + 1) * settings.micro_batch)
    batches = []
    for _ in range(settings.warmup + settings.iters):
        shape = (world_size * settings.micro_batch, settings.seq_len + 1)
        tokens = torch.randint(0, vocab_size, shape, generator=generator)[rows].to(device)
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    return batches


def ours_step(cfg: Config, device: torch.device, batches: list) -> StepFn:
    """Our contender: the engine's whole step (forward, backward, gradient reduction, clip,
    update; at ZeRO-3 also the gathers). Returns the loss averaged over the ranks."""
    model = build_gpt(cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed)
    engine = initialize(model, default_optimizer_factory(cfg.optim), cfg)

    def step(index: int) -> float:
        return engine.train_step(batches[index])

    return step


def time_contenders(
    label: str, settings: Settings, contenders: dict[str, StepFn], rank: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run the contenders interleaved; per-step seconds of the slowest rank, and the losses
    averaged over the ranks (``ours`` already returns the mean over ranks; peers return
    their own rows' loss)."""
    accel = get_accelerator()
    losses: dict[str, list[float]] = {name: [] for name in contenders}
    total = settings.warmup + settings.iters

    def recorded(name: str) -> StepFn:
        def step(index: int) -> float:
            losses[name].append(contenders[name](index))
            return losses[name][-1]

        return step

    def progress(name: str, index: int, seconds: float) -> None:
        if rank == 0:
            phase = "warm-up" if index < settings.warmup else "measured"
            print(
                f"[{label}] step {index + 1}/{total} ({phase}) {name:15s} {seconds:.3f} s "
                f"loss {losses[name][-1]:.4f}",
                file=sys.stderr,
                flush=True,
            )

    times = interleaved_step_times(
        {name: recorded(name) for name in contenders},
        warmup=settings.warmup,
        iters=settings.iters,
        before_step=dist.barrier if dist.is_initialized() else None,
        sync=accel.synchronize,
        on_step=progress,
    )
    slowest = {name: over_ranks(t, device, dist.ReduceOp.MAX) for name, t in times.items()}
    world = dist.get_world_size() if dist.is_initialized() else 1
    for name in losses:
        if name != "ours":
            summed = over_ranks(losses[name], device, dist.ReduceOp.SUM)
            losses[name] = [value / world for value in summed]
    return slowest, losses


def over_ranks(
    values: list[float], device: torch.device, op: dist.ReduceOp.RedOpType
) -> list[float]:
    """Element-wise reduction of a list of numbers over the ranks (run after the timing)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def describe_workload(
    settings: Settings,
    cfg: Config,
    dtype: torch.dtype,
    world_size: int,
    seconds: dict[str, list[float]],
) -> dict[str, Any]:
    """The JSON ``config`` keys every GPT step-time benchmark reports."""
    accel = get_accelerator()
    with torch.device("meta"):
        params = count_params(GPT(gpt_config_from(cfg.model, cfg.data.seq_len)))
    return {
        "model": f"gpt-{settings.preset}",
        "params": params,
        "seq_len": settings.seq_len,
        "nproc": world_size,
        "micro_batch_per_rank": settings.micro_batch,
        "grad_accum": 1,
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "optimizer": "torch AdamW fused, shardwise.optim.param_groups, warm-up + cosine lr",
        "grad_clip": settings.grad_clip,
        "device": accel.device_type,
        "backend": accel.backend,
        "threads_per_rank": torch.get_num_threads(),
        "torch": torch.__version__.split("+")[0],
        "warmup_steps": settings.warmup,
        "measured_steps": settings.iters,
        "schedule": "interleaved, one step each per round, order alternating; "
        "barrier before each step; time = slowest rank",
        "min_s": {name: min(values) for name, values in seconds.items()},
        "max_s": {name: max(values) for name, values in seconds.items()},
    }
