"""Trains a small GPT for 3 steps on every rank; at step 2 the rank argv[2] kills itself
(SIGKILL: no exception, no message) in the phase argv[1]: ``forward`` (before the first
block runs), ``backward`` (as the first gradient arrives), ``optimizer`` (before the
optimizer step) or ``save`` (while writing its files of the step's checkpoint under
argv[3])."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

import shardwise.checkpoint.io as checkpoint_io
from shardwise.checkpoint import save_checkpoint
from shardwise.config import Config
from shardwise.distributed.launch import init_worker, run_worker
from shardwise.engine import initialize
from shardwise.models.gpt import build_gpt


def die(*_args: object, **_kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(phase: str, engine) -> None:
    """Make this rank die in `phase` of what runs next."""
    if phase == "forward":
        engine.model.blocks[0].register_forward_pre_hook(die)
    elif phase == "backward":
        next(engine.model.parameters()).register_hook(die)
    elif phase == "optimizer":
        engine.optimizer.register_step_pre_hook(die)
    elif phase == "save":
        checkpoint_io.durable = die
    else:
        raise ValueError(f"unknown phase {phase!r}")


def main() -> None:
    phase, victim, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    info = init_worker(timeout_s=30.0)
    cfg = Config().replace(
        model={"n_layers": 2, "d_model": 32, "n_heads": 2},
        data={"seq_len": 16},
        precision={"dtype": "fp32"},
        train={"micro_batch": 1, "global_batch": info.world_size},
    )
    engine = initialize(build_gpt(cfg.model, 16, seed=1), None, cfg)
    ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(info.rank))
    for step in (1, 2, 3):
        if step == 2 and info.rank == victim:
            arm(phase, engine)
        engine.train_step((ids[:, :-1], ids[:, 1:]))
        if phase == "save":
            save_checkpoint(out, step, engine, {"step": step}, keep=2, layout=engine.plan.layout())


if __name__ == "__main__":
    run_worker(main)
