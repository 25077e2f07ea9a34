"""Benchmark ``dp``: our data-parallel engine against torch DDP, median step time.

Both contenders train the same GPT (preset "mini", ~25M parameters, 128 tokens) from the same
initial weights on the same data (random tokens from a fixed seed; each rank its own rows),
4 sequences per rank per step, no gradient accumulation, with the same optimizer (torch AdamW,
fused, the weight-decay groups of `shardwise.optim.param_groups`, the same warm-up + cosine
schedule) and global-norm clipping at 1.0, gradients reduced in 25 MiB buckets.

- ours: `shardwise.initialize` -> ``Engine.train_step`` (bucketed all-reduce overlapped with
  backward, clipping inside the engine).
- torch_ddp: ``torch.nn.parallel.DistributedDataParallel(model)`` with its defaults (25 MiB
  buckets), ``clip_grad_norm_``, ``optimizer.step()``. Written with plain torch here: DDP is
  the peer, never a dependency of shardwise.

Precision is the accelerator's default: fp32, or where bf16 is fast, ours with
``precision.dtype = "bf16"`` (fp32 master weights) against DDP with fp32 parameters under
``torch.autocast(bf16)``.

[Note: fair timing] One launched 2-rank job runs both contenders, one step each per round, the
order alternating every round, so machine drift hits both alike. Each rank computes on one
thread. A barrier precedes every step (untimed), so a step starts when both ranks are free;
a step's time is that of the slowest rank (the job waits for it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shardwise.accelerator import get_accelerator
from shardwise.bench import (
    BenchResult,
    StepFn,
    interleaved_step_times,
    launch_workers,
    write_worker_result,
)
from shardwise.config import Config
from shardwise.engine import cross_entropy_loss, initialize
from shardwise.models.gpt import GPT, build_gpt, count_params, gpt_config_from
from shardwise.optim import default_optimizer_factory, lr_multiplier, param_groups

NPROC = 2
"""Ranks of the benchmark job."""
CONTENDERS = ("ours", "torch_ddp")


@dataclass(frozen=True)
class Settings:
    """The workload; the same for both contenders."""

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
    bucket_mb: float = 25.0
    """Gradient bucket size in MiB (torch DDP's default)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 1234
    """Seed of the initial weights and of the data."""


QUICK = Settings(warmup=3, iters=10)
FULL = Settings(warmup=5, iters=40)


def run(quick: bool) -> BenchResult:
    """Launch the 2-rank job and report rank 0's medians."""
    settings = QUICK if quick else FULL
    record = launch_workers("benchmarks.dp", ["--settings", json.dumps(asdict(settings))], NPROC)
    return BenchResult(
        metric="median_step_s",
        ours=record["median_s"]["ours"],
        peers={"torch_ddp": record["median_s"]["torch_ddp"]},
        config=record["config"],
    )


# --------------------------------------------------------------------------- the contenders


def engine_config(settings: Settings, dtype: torch.dtype) -> Config:
    """Our engine's config for the workload (also the source of the peer's optimizer)."""
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
            "distributed": {"bucket_mb": settings.bucket_mb},
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
    """Our contender: the engine's whole step (forward, backward, reduce, clip, update)."""
    model = build_gpt(cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed)
    engine = initialize(model, default_optimizer_factory(cfg.optim), cfg)

    def step(index: int) -> float:
        return engine.train_step(batches[index])

    return step


def ddp_step(cfg: Config, device: torch.device, dtype: torch.dtype, batches: list) -> StepFn:
    """The peer: plain torch DDP with the same model, optimizer, schedule and clipping."""
    model = build_gpt(cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed)
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = default_optimizer_factory(cfg.optim)(param_groups(model, cfg.optim.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg.optim, cfg.train.steps)
    )
    use_autocast = dtype != torch.float32

    def step(index: int) -> float:
        inputs, targets = batches[index]
        optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(device.type, dtype=dtype) if use_autocast else contextlib.nullcontext()
        )
        with autocast:
            loss = cross_entropy_loss(ddp(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        return loss.item()

    return step


def recording(step: StepFn, losses: list[float]) -> StepFn:
    """`step`, appending each loss it returns to `losses` (for the progress lines)."""

    def recorded(index: int) -> float:
        loss = step(index)
        losses.append(loss)
        return loss

    return recorded


# --------------------------------------------------------------------------- the worker


def measure(settings: Settings, rank: int, local_rank: int, world_size: int) -> dict[str, Any]:
    """Both contenders on this rank; the per-step times are the slowest rank's."""
    accel = get_accelerator()
    device = accel.device(local_rank)
    dtype = accel.default_dtype()
    cfg = engine_config(settings, dtype)
    batches = make_batches(settings, rank, world_size, cfg.model.vocab_size, device)
    losses: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    steps = {
        "ours": recording(ours_step(cfg, device, batches), losses["ours"]),
        "torch_ddp": recording(ddp_step(cfg, device, dtype, batches), losses["torch_ddp"]),
    }
    total = settings.warmup + settings.iters

    def progress(name: str, index: int, seconds: float) -> None:
        if rank == 0:
            phase = "warm-up" if index < settings.warmup else "measured"
            print(
                f"[dp] step {index + 1}/{total} ({phase}) {name:9s} {seconds:.3f} s "
                f"loss {losses[name][-1]:.4f}",
                file=sys.stderr,
                flush=True,
            )

    times = interleaved_step_times(
        steps,
        warmup=settings.warmup,
        iters=settings.iters,
        before_step=dist.barrier if dist.is_initialized() else None,
        sync=accel.synchronize,
        on_step=progress,
    )
    slowest = {name: over_ranks(t, device, dist.ReduceOp.MAX) for name, t in times.items()}
    # train_step returns the loss averaged over the ranks; the peer's loop saw its own rows only.
    world_mean = over_ranks(losses["torch_ddp"], device, dist.ReduceOp.SUM)
    losses["torch_ddp"] = [value / world_size for value in world_mean]
    return {
        "median_s": {name: statistics.median(values) for name, values in slowest.items()},
        "config": describe(settings, cfg, dtype, world_size, slowest, losses),
    }


def over_ranks(
    values: list[float], device: torch.device, op: dist.ReduceOp.RedOpType
) -> list[float]:
    """Element-wise reduction of a list of numbers over the ranks (run after the timing)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def describe(
    settings: Settings,
    cfg: Config,
    dtype: torch.dtype,
    world_size: int,
    seconds: dict[str, list[float]],
    losses: dict[str, list[float]],
) -> dict[str, Any]:
    """The JSON ``config``: the workload, the precision of each side, the spread of times."""
    accel = get_accelerator()
    bf16 = dtype == torch.bfloat16
    with torch.device("meta"):
        params = count_params(GPT(gpt_config_from(cfg.model, cfg.data.seq_len)))
    return {
        "model": f"gpt-{settings.preset}",
        "params": params,
        "seq_len": settings.seq_len,
        "nproc": world_size,
        "micro_batch_per_rank": settings.micro_batch,
        "grad_accum": 1,
        "precision": "bf16" if bf16 else "fp32",
        "precision_detail": {
            "ours": "bf16 params, fp32 master weights, fp32 grad reduce" if bf16 else "fp32",
            "torch_ddp": "fp32 params + torch.autocast(bf16)" if bf16 else "fp32",
        },
        "optimizer": "torch AdamW fused, shardwise.optim.param_groups, warm-up + cosine lr",
        "grad_clip": settings.grad_clip,
        "bucket_mb": settings.bucket_mb,
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
        "last_loss": {name: values[-1] for name, values in losses.items()},
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank (``python -m benchmarks.dp``)."""
    from shardwise.distributed.launch import init_worker, run_worker

    parser = argparse.ArgumentParser(prog="benchmarks.dp")
    parser.add_argument("--settings", required=True, help="Settings as a JSON object")
    parser.add_argument("--result", required=True, help="file rank 0 writes its record to")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = Settings(**json.loads(args.settings))
        torch.set_num_threads(1)
        info = init_worker(Config().distributed.timeout_s)
        record = measure(settings, info.rank, info.local_rank, info.world_size)
        if info.rank == 0:
            write_worker_result(args.result, record)

    run_worker(body)


if __name__ == "__main__":
    main()
