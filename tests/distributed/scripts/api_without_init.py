"""Started by ``shardwise run --nproc 2 -- api_without_init.py OUT``: the public API only, no
``init_process_group``; each rank writes its world size and losses to OUT/rank<R>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import shardwise as sw
from shardwise.models.gpt import build_gpt


def main(out: Path) -> None:
    cfg = sw.Config.from_file(
        None,
        ["model.n_layers=2", "model.d_model=32", "data.seq_len=16", "train.micro_batch=2"]
        + ["precision.dtype=fp32", "zero.stage=2"],
    )
    engine = sw.initialize(build_gpt(cfg.model, 16, seed=0), None, cfg)
    rank = torch.distributed.get_rank()
    generator = torch.Generator().manual_seed(rank)  # each rank its own rows
    losses = []
    for _ in range(2):
        rows = torch.randint(0, 256, (2, 17), generator=generator)
        losses.append(engine.train_step((rows[:, :-1], rows[:, 1:])))
    record = {"world_size": torch.distributed.get_world_size(), "losses": losses}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
