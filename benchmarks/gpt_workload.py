"""The GPT step-time workload shared by the `dp` and `zero3` benchmarks.

Every contender trains the same GPT from the same initial weights on the same data (random
tokens from a fixed seed; each rank its own rows of each global batch), with the same
optimizer (torch AdamW, fused, `shardwise.optim.param_groups`, warm-up + cosine schedule) and
global-norm clipping; contenders run interleaved in one launched job (see
`shardwise.bench.interleaved_step_times`) and a step's time is the slowest rank's.

A benchmark module adds its peers' steps: its ``run`` is `run_job`, its ``measure`` builds
the contenders from `prepare`'s `RankWorkload` (ours: `ours_step`; torch peers:
`torch_peer_step` on their wrapped model) and times them with `measure_contenders`.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from shardwise.accelerator import get_accelerator
from shardwise.bench import BenchResult, StepFn, interleaved_step_times, launch_workers
from shardwise.config import Config
from shardwise.engine import initialize
from shardwise.loss import cross_entropy_loss
from shardwise.models.gpt import GPT, build_gpt, count_params, gpt_config_from
from shardwise.optim import default_optimizer_factory, lr_multiplier, param_groups

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
    n_layers: int | None = None
    """Transformer blocks; None: the preset's."""
    vocab_size: int = 256
    """Vocabulary size in tokens."""
    precision: str = "auto"
    """``auto``: the accelerator's default (fp32, or bf16 where it is fast); or ``fp32``."""
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


def run_job(entry_module: str, quick: bool) -> BenchResult:
    """Launch `entry_module`'s `NPROC`-rank job with `QUICK` or `FULL` settings; rank 0's
    median step times, ``ours`` against every other contender."""
    settings = QUICK if quick else FULL
    record = launch_workers(entry_module, ["--settings", json.dumps(asdict(settings))], NPROC)
    medians = record["median_s"]
    return BenchResult(
        metric="median_step_s",
        ours=medians["ours"],
        peers={name: value for name, value in medians.items() if name != "ours"},
        config=record["config"],
    )


def engine_config(settings: Settings, dtype: torch.dtype, **sections: dict) -> Config:
    """Our engine's config for the workload (also the source of the peers' optimizer), plus
    benchmark-specific `sections` (e.g. ``zero={"stage": 3}``)."""
    model = {"preset": settings.preset, "vocab_size": settings.vocab_size}
    if settings.n_layers is not None:
        model["n_layers"] = settings.n_layers
    return Config.from_dict(
        {
            "model": model,
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


@dataclass(frozen=True)
class RankWorkload:
    """One rank's share of the workload: what every contender's step is built from."""

    settings: Settings
    """The workload."""
    rank: int
    """This rank's index in the job."""
    world_size: int
    """Ranks in the job."""
    device: torch.device
    """This rank's device."""
    dtype: torch.dtype
    """Compute precision: the accelerator's default (fp32, or bf16 where it is fast)."""
    cfg: Config
    """Our engine's config (`engine_config`); the peers' model, optimizer and schedule too."""
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    """(inputs, targets) of every step: this rank's rows (`make_batches`)."""


def prepare(
    settings: Settings, rank: int, local_rank: int, world_size: int, **sections: dict
) -> RankWorkload:
    """This rank's device, precision, config (with the benchmark's `sections`, as in
    `engine_config`) and batches."""
    accel = get_accelerator()
    device = accel.device(local_rank)
    dtype = accel.default_dtype() if settings.precision == "auto" else torch.float32
    cfg = engine_config(settings, dtype, **sections)
    batches = make_batches(settings, rank, world_size, cfg.model.vocab_size, device)
    return RankWorkload(settings, rank, world_size, device, dtype, cfg, batches)


def ours_step(cfg: Config, device: torch.device, batches: list) -> StepFn:
    """Our contender: the engine's whole step (forward, backward, gradient reduction, clip,
    update; at ZeRO-3 also the gathers). Returns the loss averaged over the ranks."""
    model = build_gpt(cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed)
    engine = initialize(model, None, cfg)

    def step(index: int) -> float:
        return engine.train_step(batches[index])

    return step


def torch_peer_step(
    model: torch.nn.Module,
    cfg: Config,
    batches: list,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> StepFn:
    """A plain-torch peer's step with our optimizer, schedule and clipping: `cfg`'s optimizer
    over `model`'s weight-decay groups (build it after any wrapping that replaces the
    parameters), the warm-up + cosine ``LambdaLR``, ``clip_grad_norm_`` on `model`'s
    parameters. The forward pass runs through `forward` (default `model`; e.g. its DDP
    wrapper) inside a fresh `autocast()` context. Returns this rank's loss."""
    run = model if forward is None else forward
    optimizer = default_optimizer_factory(cfg.optim)(param_groups(model, cfg.optim.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg.optim, cfg.train.steps)
    )

    def step(index: int) -> float:
        inputs, targets = batches[index]
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = cross_entropy_loss(run(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        return loss.item()

    return step


def measure_contenders(
    label: str,
    work: RankWorkload,
    contenders: dict[str, StepFn],
    precision_detail: dict[str, str],
    order: str,
) -> dict[str, Any]:
    """Time `contenders` (`time_contenders`); the worker's record: each one's median step
    time and the JSON ``config`` (`describe_workload`, `precision_detail` of each contender,
    the last losses). `order` names the turn order in the config (e.g. ``"alternating"``)."""
    slowest, losses = time_contenders(label, work, contenders)
    config = describe_workload(work, slowest, precision_detail, order)
    config["last_loss"] = {name: values[-1] for name, values in losses.items()}
    return {
        "median_s": {name: statistics.median(values) for name, values in slowest.items()},
        "config": config,
    }


def time_contenders(
    label: str, work: RankWorkload, contenders: dict[str, StepFn]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run the contenders interleaved; per-step seconds of the slowest rank, and the losses
    averaged over the ranks (``ours`` already returns the mean over ranks; peers return
    their own rows' loss). Rank 0 prints a progress line per step on stderr."""
    accel = get_accelerator()
    settings = work.settings
    losses: dict[str, list[float]] = {name: [] for name in contenders}
    total = settings.warmup + settings.iters

    def recorded(name: str) -> StepFn:
        def step(index: int) -> float:
            losses[name].append(contenders[name](index))
            return losses[name][-1]

        return step

    def progress(name: str, index: int, seconds: float) -> None:
        if work.rank == 0:
            phase = "warm-up" if index < settings.warmup else "measured"
            whose = "mean over ranks" if name == "ours" else "rank 0"
            print(
                f"[{label}] step {index + 1}/{total} ({phase}) {name:15s} {seconds:.3f} s "
                f"loss {losses[name][-1]:.4f} ({whose})",
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
    slowest = {name: over_ranks(t, work.device, dist.ReduceOp.MAX) for name, t in times.items()}
    for name in losses:
        if name != "ours":
            summed = over_ranks(losses[name], work.device, dist.ReduceOp.SUM)
            losses[name] = [value / work.world_size for value in summed]
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
    work: RankWorkload,
    seconds: dict[str, list[float]],
    precision_detail: dict[str, str],
    order: str,
) -> dict[str, Any]:
    """The JSON ``config`` keys every GPT step-time benchmark reports; `order` names the
    turn order of the contenders (``"alternating"``, ``"rotating"``)."""
    accel = get_accelerator()
    settings, cfg = work.settings, work.cfg
    with torch.device("meta"):
        params = count_params(GPT(gpt_config_from(cfg.model, cfg.data.seq_len)))
    return {
        "model": f"gpt-{settings.preset}"
        + (f", {settings.n_layers} layers" if settings.n_layers else "")
        + f", vocab {settings.vocab_size}",
        "params": params,
        "seq_len": settings.seq_len,
        "nproc": work.world_size,
        "micro_batch_per_rank": settings.micro_batch,
        "grad_accum": 1,
        "precision": "bf16" if work.dtype == torch.bfloat16 else "fp32",
        "precision_detail": precision_detail,
        "optimizer": "torch AdamW fused, shardwise.optim.param_groups, warm-up + cosine lr",
        "grad_clip": settings.grad_clip,
        "device": accel.device_type,
        "backend": accel.backend,
        "threads_per_rank": torch.get_num_threads(),
        "torch": torch.__version__.split("+")[0],
        "warmup_steps": settings.warmup,
        "measured_steps": settings.iters,
        "schedule": f"interleaved, one step each per round, order {order}; "
        "barrier before each step; time = slowest rank",
        "min_s": {name: min(values) for name, values in seconds.items()},
        "max_s": {name: max(values) for name, values in seconds.items()},
    }
