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
import functools
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from benchmarks import gpt_workload
from shardwise.bench import BenchResult, StepFn, worker_main
from shardwise.config import Config
from shardwise.models.gpt import build_gpt

BUCKET_MB = 25.0
"""Gradient bucket size in MiB for both contenders (torch DDP's default)."""


def run(quick: bool) -> BenchResult:
    """Launch the 2-rank job and report rank 0's medians."""
    return gpt_workload.run_job("benchmarks.dp", quick)


# --------------------------------------------------------------------------- the contenders


def ddp_step(cfg: Config, device: torch.device, dtype: torch.dtype, batches: list) -> StepFn:
    """The peer: plain torch DDP with the same model, optimizer, schedule and clipping."""
    model = build_gpt(cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed)
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    autocast = contextlib.nullcontext
    if dtype != torch.float32:
        autocast = functools.partial(torch.autocast, device.type, dtype=dtype)
    return gpt_workload.torch_peer_step(model, cfg, batches, forward=ddp, autocast=autocast)


# --------------------------------------------------------------------------- the worker


def measure(
    settings: gpt_workload.Settings, rank: int, local_rank: int, world_size: int
) -> dict[str, Any]:
    """Both contenders on this rank; the per-step times are the slowest rank's."""
    work = gpt_workload.prepare(
        settings, rank, local_rank, world_size, distributed={"bucket_mb": BUCKET_MB}
    )
    cfg, device, dtype, batches = work.cfg, work.device, work.dtype, work.batches
    contenders = {
        "ours": gpt_workload.ours_step(cfg, device, batches),
        "torch_ddp": ddp_step(cfg, device, dtype, batches),
    }
    bf16 = dtype == torch.bfloat16
    precision_detail = {
        "ours": "bf16 params, fp32 master weights, fp32 grad reduce" if bf16 else "fp32",
        "torch_ddp": "fp32 params + torch.autocast(bf16)" if bf16 else "fp32",
    }
    record = gpt_workload.measure_contenders(
        "dp", work, contenders, precision_detail, order="alternating"
    )
    record["config"]["bucket_mb"] = BUCKET_MB
    return record


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank (``python -m benchmarks.dp``)."""
    worker_main("benchmarks.dp", gpt_workload.Settings, measure, argv)


if __name__ == "__main__":
    main()
