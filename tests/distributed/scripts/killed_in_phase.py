"""Trains a small GPT for 3 steps on every rank, saving a checkpoint under argv[3] after each
step. At step 2 the rank argv[2] kills itself (SIGKILL: no exception, no message) in the
phase argv[1]: ``forward`` (before the first block runs), ``backward`` (as the first gradient
arrives), ``optimizer`` (before the optimizer step) or ``save`` (while writing its files of
the step's checkpoint); or freezes (SIGSTOP) as the first gradient arrives, in phase
``stop``, under a 5 s collective timeout (set after the rendezvous). Phase ``resume``
(argv[2] ignored) resumes from the newest checkpoint under argv[3] and trains the remaining
steps. Rank 0 writes the losses it saw to ``<argv[3]>/losses_<phase>.json`` after every
step."""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import shardwise.checkpoint.io as checkpoint_io
from shardwise.checkpoint import load_checkpoint, save_checkpoint
from shardwise.config import Config
from shardwise.distributed.launch import init_worker, run_worker
from shardwise.engine import initialize
from shardwise.models.gpt import build_gpt

STEPS = 3


def die(*_args: object, **_kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def freeze(*_args: object, **_kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def arm(phase: str, engine) -> None:
    """Make this rank die (or freeze) in `phase` of what runs next."""
    if phase == "forward":
        engine.model.blocks[0].register_forward_pre_hook(die)
    elif phase == "backward":
        next(engine.model.parameters()).register_hook(die)
    elif phase == "stop":
        next(engine.model.parameters()).register_hook(freeze)
    elif phase == "optimizer":
        engine.optimizer.register_step_pre_hook(die)
    elif phase == "save":
        checkpoint_io.durable = die
    else:
        raise ValueError(f"unknown phase {phase!r}")


def run_config(world_size: int) -> Config:
    """The run's config (the test's single-process reference builds the same)."""
    return Config().replace(
        model={"n_layers": 2, "d_model": 32, "n_heads": 2},
        data={"seq_len": 16},
        precision={"dtype": "fp32"},
        train={"micro_batch": 1, "global_batch": world_size},
    )


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s (inputs, targets), the same at every step."""
    ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(rank))
    return ids[:, :-1], ids[:, 1:]


def main() -> None:
    phase, victim, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    info = init_worker(timeout_s=30.0)
    if phase == "stop":  # the others wait 5 s for the frozen rank; set after the rendezvous,
        # which a loaded machine may slow down by more
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=5))
    cfg = run_config(info.world_size)
    engine = initialize(build_gpt(cfg.model, 16, seed=1), None, cfg)
    layout = engine.plan.layout()
    first = 1
    if phase == "resume":
        first = load_checkpoint(out / "checkpoints", engine, layout)["step"] + 1
    losses = {}
    for step in range(first, STEPS + 1):
        if step == 2 and info.rank == victim and phase != "resume":
            arm(phase, engine)
        losses[step] = engine.train_step(rank_batch(info.rank))
        if info.rank == 0:
            (out / f"losses_{phase}.json").write_text(json.dumps(losses))
        save_checkpoint(out / "checkpoints", step, engine, {"step": step}, keep=2, layout=layout)


if __name__ == "__main__":
    run_worker(main)
