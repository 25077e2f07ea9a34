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

import contextlib
import json
import statistics
from dataclasses import asdict
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from benchmarks.gpt_workload import (
    FULL,
    NPROC,
    QUICK,
    Settings,
    describe_workload,
    engine_config,
    make_batches,
    ours_step,
    time_contenders,
)
from shardwise.accelerator import get_accelerator
from shardwise.bench import BenchResult, StepFn, launch_workers, worker_main
from shardwise.config import Config
from shardwise.engine import cross_entropy_loss
from shardwise.models.gpt import build_gpt
from shardwise.optim import default_optimizer_factory, lr_multiplier, param_groups

BUCKET_MB = 25.0
"""Gradient bucket size in MiB for both contenders (torch DDP's default)."""


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


# --------------------------------------------------------------------------- the worker


def measure(settings: Settings, rank: int, local_rank: int, world_size: int) -> dict[str, Any]:
    """Both contenders on this rank; the per-step times are the slowest rank's."""
    accel = get_accelerator()
    device = accel.device(local_rank)
    dtype = accel.default_dtype()
    cfg = engine_config(settings, dtype, distributed={"bucket_mb": BUCKET_MB})
    batches = make_batches(settings, rank, world_size, cfg.model.vocab_size, device)
    contenders = {
        "ours": ours_step(cfg, device, batches),
        "torch_ddp": ddp_step(cfg, device, dtype, batches),
    }
    slowest, losses = time_contenders("dp", settings, contenders, rank, device)
    bf16 = dtype == torch.bfloat16
    config = describe_workload(settings, cfg, dtype, world_size, slowest)
    config["precision_detail"] = {
        "ours": "bf16 params, fp32 master weights, fp32 grad reduce" if bf16 else "fp32",
        "torch_ddp": "fp32 params + torch.autocast(bf16)" if bf16 else "fp32",
    }
    config["bucket_mb"] = BUCKET_MB
    config["last_loss"] = {name: values[-1] for name, values in losses.items()}
    return {
        "median_s": {name: statistics.median(values) for name, values in slowest.items()},
        "config": config,
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank (``python -m benchmarks.dp``)."""
    worker_main("benchmarks.dp", Settings, measure, argv)


if __name__ == "__main__":
    main()
