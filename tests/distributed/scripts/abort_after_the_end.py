"""Started by ``shardwise run --nproc 2 -- abort_after_the_end.py OUT``: both ranks train, then
rank 0 aborts (SIGABRT) after it has left the process group, as gloo's teardown now and then
does; each rank first writes OUT/rank<R>.json."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch

import shardwise as sw
from shardwise.models.gpt import build_gpt


def main(out: Path) -> None:
    if os.environ["RANK"] == "0":
        atexit.register(os.abort)  # before the group is joined: runs after it is left
    cfg = sw.Config.from_file(
        None,
        ["model.n_layers=1", "model.d_model=32", "data.seq_len=16", "train.micro_batch=2"]
        + ["precision.dtype=fp32"],
    )
    engine = sw.initialize(build_gpt(cfg.model, 16, seed=0), None, cfg)
    rows = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = engine.train_step((rows[:, :-1], rows[:, 1:]))
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps({"loss": loss}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
