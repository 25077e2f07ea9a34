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

A second shape, ``wide`` (ratio key ``torch_ddp_wide``): 6 layers, d_model 512, 8 heads,
vocabulary 8192, 256 tokens, 8 sequences per rank, always fp32 — a large tied embedding/head
whose gradient is complete only at the very end of backward, and long sequences. Our ZeRO-3
(``zero.stage = 3``) runs on it too, against DDP again in a pair of its own; its step time
over DDP's is recorded (``config.wide.zero3_over_torch_ddp``) without a target.

[Note: fair timing] One launched 2-rank job runs both contenders, one step each per round, the
order alternating every round, so machine drift hits both alike. Each rank computes on one
thread. A barrier precedes every step (untimed), so a step starts when both ranks are free;
a step's time is that of the slowest rank (the job waits for it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from benchmarks import gpt_workload
from shardwise.bench import BenchResult, StepFn, launch_workers, worker_main
from shardwise.config import Config
from shardwise.models.gpt import build_gpt

BUCKET_MB = 25.0
"""Gradient bucket size in MiB for both contenders (torch DDP's default)."""


WIDE = {
    "preset": "mini",  # d_model 512, 8 heads
    "n_layers": 6,
    "vocab_size": 8192,
    "seq_len": 256,
    "micro_batch": 8,
    "precision": "fp32",
}
"""The ``wide`` shape: `gpt_workload.Settings` fields replaced in the quick or full run's."""


def run(quick: bool) -> BenchResult:
    """Launch the 2-rank job (both shapes) and report rank 0's medians."""
    settings = gpt_workload.QUICK if quick else gpt_workload.FULL
    args = ["--settings", json.dumps(dataclasses.asdict(settings))]
    record = launch_workers("benchmarks.dp", args, gpt_workload.NPROC)
    mini, wide, zero3 = record["mini"], record["wide"], record["wide_zero3"]
    config = mini["config"]
    config["wide"] = {**wide["config"], "median_s": wide["median_s"]}
    config["wide"]["zero3_median_s"] = zero3["median_s"]
    config["wide"]["zero3_over_torch_ddp"] = (
        zero3["median_s"]["ours"] / zero3["median_s"]["torch_ddp"]
    )
    peers = {
        "torch_ddp": mini["median_s"]["torch_ddp"],
        "torch_ddp_wide": wide["median_s"]["torch_ddp"],
    }
    ratio = {
        "torch_ddp": mini["median_s"]["ours"] / peers["torch_ddp"],
        "torch_ddp_wide": wide["median_s"]["ours"] / peers["torch_ddp_wide"],
    }
    return BenchResult("median_step_s", mini["median_s"]["ours"], peers, config, ratio)


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
    """Both shapes, one after the other: ``mini`` (`settings`) and ``wide`` (`WIDE`), and
    on the wide one our ZeRO-3 against DDP again."""
    wide = dataclasses.replace(settings, **WIDE)
    return {
        "mini": measure_shape("dp", settings, rank, local_rank, world_size),
        "wide": measure_shape("dp-wide", wide, rank, local_rank, world_size),
        "wide_zero3": measure_shape("dp-wide-zero3", wide, rank, local_rank, world_size, 3),
    }


def measure_shape(
    label: str,
    settings: gpt_workload.Settings,
    rank: int,
    local_rank: int,
    world_size: int,
    stage: int = 0,
) -> dict[str, Any]:
    """Ours at ZeRO `stage` against DDP on one shape, on this rank; the per-step times are
    the slowest rank's. One pair per job: a third contender between them would change
    what each one's allocations find (ZeRO-3 frees and reallocates unit buffers)."""
    work = gpt_workload.prepare(
        settings,
        rank,
        local_rank,
        world_size,
        distributed={"bucket_mb": BUCKET_MB},
        zero={"stage": stage},
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
        label, work, contenders, precision_detail, order="alternating"
    )
    record["config"]["bucket_mb"] = BUCKET_MB
    record["config"]["zero_stage"] = stage
    return record


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank (``python -m benchmarks.dp``)."""
    worker_main("benchmarks.dp", gpt_workload.Settings, measure, argv)


if __name__ == "__main__":
    main()
