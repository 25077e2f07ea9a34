"""The training loop behind ``shardwise train``; runs inside every rank.

``python -m shardwise.trainer --plan DIR/plan.pkl --out DIR [--resume CKPT [--reshard]]`` is
what the launcher starts on each rank, with the plan the CLI resolved (`save_plan`); `train`
and `reshard` are also callable in-process (tests, ``--nproc 1``).
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from shardwise.accelerator import get_accelerator
from shardwise.checkpoint import AsyncSaver, load_checkpoint, save_checkpoint
from shardwise.checkpoint.convert import initial_weights
from shardwise.data import build_data
from shardwise.engine import Engine, initialize
from shardwise.errors import TrainingError
from shardwise.metrics import MetricsLog, ProgressDisplay, plot_loss, plot_memory, read_metrics
from shardwise.models import MODELS
from shardwise.precision import DynamicLossScaler
from shardwise.run_plan import RunPlan
from shardwise.zero.store import memory_tiers

log = logging.getLogger("shardwise")


@dataclass(frozen=True)
class RunSummary:
    """What a finished `train` call reports (rank 0's view)."""

    losses: list[float]
    """Loss of every step this call ran, in order."""
    checkpoint: Path
    """The final checkpoint directory."""


def build_engine(plan: RunPlan) -> tuple[Engine, int]:
    """Model + engine for this rank; returns (engine, dp_rank)."""
    cfg, dims = plan.config, plan.dims
    accel = get_accelerator()
    mesh = dims.build_mesh(accel.device_type) if plan.world_size > 1 else None
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Sharded parameters (ZeRO-3, chunks) are built on the meta device and filled shard by
    # shard or chunk by chunk, unless tensor parallelism splits the model: it splits a
    # materialised one. A builder that cannot build in pieces returns a materialised model
    # even so.
    on_meta = plan.chunks and dims.tp == 1
    device = "meta" if on_meta else accel.device(rank)
    model = MODELS.get(cfg.model.name)(
        cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed
    )
    meta = any(p.is_meta for p in model.parameters())
    param_init = partial(model.init_parameter, seed=cfg.train.seed) if meta else None
    if cfg.model.init_from is not None:
        param_init = initial_weights(model, Path(cfg.model.init_from))
    engine = initialize(model, None, plan=plan, mesh=mesh, param_init=param_init)
    return engine, dims.dp_rank(mesh) if mesh is not None else 0


def train(plan: RunPlan, out_dir: Path, resume: Path | None = None) -> RunSummary:
    """Train as `plan` says (resolved for this world size), writing to `out_dir`."""
    cfg = plan.config
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    engine, data = _start(plan, resume)
    start, total = engine.global_step, cfg.train.steps
    ckpt_root = out_dir / "checkpoints"
    metrics = None
    if is_main:
        board = out_dir / "tensorboard" if cfg.log.tensorboard else None
        metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=start, tensorboard=board)
    progress = ProgressDisplay(total, start, cfg.log.every, enabled=is_main and cfg.log.progress)
    tokens_per_step = plan.global_batch * cfg.data.seq_len
    losses: list[float] = []
    saver = AsyncSaver(cfg.distributed.timeout_s) if cfg.checkpoint.async_save else None
    tiered = plan.tiered or plan.offload.optimizer != "device"  # memory by tier: memory.png
    overflows = None
    if engine.scaler is not None:
        overflows = OverflowWatch(engine.scaler, cfg.precision.max_skipped_in_a_row)
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
            if tiered:
                tiers = memory_tiers(engine.memory_report(), plan.offload.optimizer)
                record.update({f"mem_{tier}_bytes": n for tier, n in tiers.items()})
            if overflows is not None:
                overflows.note(record)
            if metrics is not None:
                metrics.write(record)
            progress.update(record, total)
            if overflows is not None:
                overflows.check()
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total:
                _save(engine, data, ckpt_root, plan, saver)
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    if saver is not None:
        saver.wait()  # the periodic save in flight lands first, whatever follows
    if losses and not math.isfinite(losses[-1]):
        raise TrainingError(
            f"the last step's loss is {losses[-1]} (fp16 overflow): no checkpoint written for "
            f"step {engine.global_step}; the earlier ones in {ckpt_root} are intact"
        )
    final = _save(engine, data, ckpt_root, plan, saver)
    if saver is not None:
        saver.wait()
    if is_main:
        records = read_metrics(out_dir / "metrics.jsonl")
        plot_loss(records, out_dir / "loss.png")
        if tiered:
            plot_memory(records, out_dir / "memory.png")
    return RunSummary(losses=losses, checkpoint=final)


class OverflowWatch:
    """fp16: the loss scale and the steps skipped so far go into each step's record; the run
    ends once `limit` optimizer steps in a row were skipped (0: never)."""

    def __init__(self, scaler: DynamicLossScaler, limit: int) -> None:
        self.scaler, self.limit = scaler, limit
        self.seen = scaler.skipped_steps
        self.in_a_row = 0

    def note(self, record: dict) -> None:
        """Add this step's loss scale and skip count to its record."""
        skipped = self.scaler.skipped_steps
        record |= {"loss_scale": self.scaler.scale, "skipped": skipped}
        self.in_a_row = self.in_a_row + 1 if skipped > self.seen else 0
        self.seen = skipped

    def check(self) -> None:
        """Raise once `limit` steps in a row were skipped (after the step is logged)."""
        if self.limit and self.in_a_row >= self.limit:
            raise TrainingError(
                f"fp16: {self.in_a_row} optimizer steps in a row skipped, the gradients "
                f"overflow even at loss scale {self.scaler.scale:g}: training diverged; lower "
                "optim.lr or use bf16/fp32 (limit: precision.max_skipped_in_a_row)"
            )


def _start(plan: RunPlan, resume: Path | None):
    """This rank's engine and data loader, from the checkpoint at `resume` when given."""
    cfg = plan.config
    torch.manual_seed(cfg.train.seed)
    engine, dp_rank = build_engine(plan)
    data = build_data(cfg.data, plan.global_batch, dp_rank, plan.dims.dp, cfg.train.seed)
    if resume is not None:
        trainer_state = load_checkpoint(resume, engine, plan.layout())
        data.load_state_dict(trainer_state["data"])
    return engine, data


def reshard(plan: RunPlan, out_dir: Path, source: Path) -> Path:
    """Load the checkpoint at `source` into `plan`'s layout and save it at once, at its step,
    under `out_dir` (``shardwise convert --to layout:CONFIG``). Returns the new checkpoint."""
    engine, data = _start(plan, source)
    return _save(engine, data, out_dir / "checkpoints", plan, saver=None)


def _save(engine: Engine, data, root: Path, plan: RunPlan, saver: AsyncSaver | None) -> Path:
    trainer_state = {"step": engine.global_step, "data": data.state_dict()}
    keep, layout = plan.config.checkpoint.keep, plan.layout()
    return save_checkpoint(root, engine.global_step, engine, trainer_state, keep, layout, saver)


def save_plan(plan: RunPlan, path: Path) -> None:
    """Hand the resolved plan to the workers (they neither parse nor validate again)."""
    path.write_bytes(pickle.dumps(plan))


def load_plan(path: Path) -> RunPlan:
    return pickle.loads(path.read_bytes())


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank."""
    from shardwise.distributed.launch import init_worker, run_worker

    parser = argparse.ArgumentParser(prog="shardwise.trainer")
    parser.add_argument("--plan", type=Path, required=True, help="the resolved plan (pickle)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument(
        "--reshard", action="store_true", help="save --resume's checkpoint in the plan's layout"
    )
    args = parser.parse_args(argv)

    def body() -> None:
        plan = load_plan(args.plan)
        init_worker(plan.config.distributed.timeout_s)
        if args.reshard:
            reshard(plan, args.out, args.resume)
        else:
            train(plan, args.out, args.resume)

    run_worker(body)


if __name__ == "__main__":
    main()
