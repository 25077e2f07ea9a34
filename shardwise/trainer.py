"""The training loop behind ``shardwise train``; runs inside every rank.

``python -m shardwise.trainer --config DIR/config.toml --out DIR [--resume CKPT]`` is what the
launcher starts on each rank; `train` is also callable in-process (tests, ``--nproc 1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

import shardwise.models  # noqa: F401  (registers the built-in models)
import shardwise.tensor_parallel.plans  # noqa: F401  (registers their tensor-parallel plans)
from shardwise.accelerator import get_accelerator
from shardwise.checkpoint import load_checkpoint, save_checkpoint
from shardwise.config import Config, resolve_batch
from shardwise.data import build_data
from shardwise.distributed.dims import ParallelDims
from shardwise.engine import Engine, check_offload_policy, check_supported, initialize
from shardwise.metrics import MetricsLog, ProgressDisplay, plot_loss, read_metrics
from shardwise.registry import MODELS, TP_PLANS
from shardwise.tensor_parallel import Plan
from shardwise.zero.offload.adam import check_offload

log = logging.getLogger("shardwise")


@dataclass(frozen=True)
class RunSummary:
    """What a finished `train` call reports (rank 0's view)."""

    losses: list[float]
    """Loss of every step this call ran, in order."""
    checkpoint: Path
    """The final checkpoint directory."""


def validate(cfg: Config, world_size: int) -> ParallelDims:
    """Every check that needs the world size; runs in the CLI before any process starts."""
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    check_supported(dims)
    check_offload_policy(cfg)
    resolve_batch(cfg.train, dims.dp)
    tensor_parallel_plan(cfg, dims)
    check_offload(cfg.offload)
    return dims


def tensor_parallel_plan(cfg: Config, dims: ParallelDims) -> Plan | None:
    """The model's tensor-parallel plan when parallel.tp > 1 (checked against its shapes)."""
    return TP_PLANS.get(cfg.model.name)(cfg, dims) if dims.tp > 1 else None


def checkpoint_layout(cfg: Config, world_size: int) -> dict:
    """What fixes the shapes of each rank's saved state: the resolved degrees, ZeRO stage and,
    with parameters in chunks (sharded over the ranks), what decides the chunk size."""
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    offload = cfg.offload
    chunks = None
    if offload.policy != "none":
        keys = ("chunk_min_mb", "chunk_search_range_mb", "chunk_search_step_mb")
        chunks = {key: getattr(offload, key) for key in keys}
    return {**dataclasses.asdict(dims), "zero_stage": cfg.zero.stage, "chunks": chunks}


def build_engine(cfg: Config, world_size: int) -> tuple[Engine, int, int]:
    """Model + engine for this rank; returns (engine, dp_rank, dp_size)."""
    dims = validate(cfg, world_size)
    accel = get_accelerator()
    mesh = dims.build_mesh(accel.device_type) if world_size > 1 else None
    rank = dist.get_rank() if dist.is_initialized() else 0
    builder = MODELS.get(cfg.model.name)
    # ZeRO-3 builds the model on the meta device and fills it shard by shard, parameter
    # chunks (offload.policy) chunk by chunk; tensor parallelism splits a materialised model.
    sharded = cfg.zero.stage == 3 and dims.dp_shard > 1 and dims.tp == 1
    on_meta = sharded or cfg.offload.policy != "none"
    device = "meta" if on_meta else accel.device(rank)
    model = builder(cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed)
    param_init = partial(model.init_parameter, seed=cfg.train.seed) if on_meta else None
    engine = initialize(
        model, None, cfg, mesh=mesh, param_init=param_init, tp_plan=tensor_parallel_plan(cfg, dims)
    )
    dp_rank = dims.dp_rank(mesh) if mesh is not None else 0
    return engine, dp_rank, dims.dp


def train(cfg: Config, out_dir: Path, resume: Path | None = None) -> RunSummary:
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    torch.manual_seed(cfg.train.seed)
    engine, dp_rank, dp_size = build_engine(cfg, world_size)
    global_batch = cfg.train.micro_batch * dp_size * engine.grad_accum
    data = build_data(cfg.data, global_batch, dp_rank, dp_size, cfg.train.seed)
    if resume is not None:
        layout = checkpoint_layout(cfg, world_size)
        engine_state, trainer_state = load_checkpoint(resume, engine.device, layout)
        engine.load_state_dict(engine_state)
        data.load_state_dict(trainer_state["data"])
    start, total = engine.global_step, cfg.train.steps
    ckpt_root = out_dir / "checkpoints"
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=start) if is_main else None
    progress = ProgressDisplay(total, start, cfg.log.every, enabled=is_main and cfg.log.progress)
    tokens_per_step = global_batch * cfg.data.seq_len
    losses: list[float] = []
    try:
        for step in range(start + 1, total + 1):
            lr = engine.lr  # the rate this step uses; the scheduler advances inside the step
            t0 = time.perf_counter()
            loss = engine.train_step(data.next_batch())
            engine.accelerator.synchronize()
            step_s = time.perf_counter() - t0
            losses.append(loss)
            record = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "tokens_per_s": tokens_per_step / step_s,
                "step_s": step_s,
                "peak_mem_bytes": engine.accelerator.peak_memory_bytes(),
                "grad_norm": engine.last_grad_norm,
            }
            if metrics is not None:
                metrics.write(record)
            progress.update(record, total)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total:
                _save(engine, data, ckpt_root, cfg, world_size)
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    final = _save(engine, data, ckpt_root, cfg, world_size)
    if is_main:
        plot_loss(read_metrics(out_dir / "metrics.jsonl"), out_dir / "loss.png")
    return RunSummary(losses=losses, checkpoint=final)


def _save(engine: Engine, data, root: Path, cfg: Config, world_size: int) -> Path:
    trainer_state = {"step": engine.global_step, "data": data.state_dict()}
    return save_checkpoint(
        root,
        engine.global_step,
        engine.state_dict(),
        trainer_state,
        keep=cfg.checkpoint.keep,
        replicated=engine.state_is_replicated,
        layout=checkpoint_layout(cfg, world_size),
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank."""
    from shardwise.distributed.launch import init_worker, run_worker

    parser = argparse.ArgumentParser(prog="shardwise.trainer")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", type=Path, default=None)
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = Config.from_file(args.config)
        init_worker(cfg.distributed.timeout_s)
        train(cfg, args.out, args.resume)

    run_worker(body)


if __name__ == "__main__":
    main()
