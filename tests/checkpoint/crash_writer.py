"""Saves checkpoints in a forked child and kills it with SIGKILL at random moments; after
each kill checks that `latest` names a complete checkpoint and that it loads. Run by
tests/checkpoint/test_integrity.py as ``python -m tests.checkpoint.crash_writer ROOT KILLS
SEED``; prints a JSON report as its last line."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch


def main(root: Path, kills: int, seed: int) -> dict:
    torch.set_num_threads(1)  # no thread pool for the forked children to inherit
    from shardwise.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
    from shardwise.checkpoint.io import LATEST, MANIFEST
    from shardwise.engine import initialize
    from tests.parity import build_model, global_batches, make_config

    cfg = make_config(micro_batch=1, global_batch=1)
    engine = initialize(build_model(cfg), None, cfg)
    engine.train_step(global_batches(cfg, 1)[0])  # Adam states to save
    layout = engine.plan.layout()
    rng = random.Random(seed)
    report = {"kills": 0, "loaded": 0, "latest_complete": 0, "killed_mid_save": 0}
    step = 0
    for _ in range(kills):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: saves until killed
            os.close(read)
            for next_step in range(step + 1, step + 10**6):
                save_checkpoint(root, next_step, engine, {"data": {}}, keep=2, layout=layout)
                os.write(write, b".")
        os.close(write)
        os.read(read, 1)  # one save finished: the kill lands during a later one
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        report["kills"] += 1
        report["killed_mid_save"] += any(root.glob(".step_*.tmp"))
        named = root / (root / LATEST).read_text().strip()
        report["latest_complete"] += (named / MANIFEST).is_file()
        checkpoint = find_checkpoint(root)
        load_checkpoint(checkpoint, engine, layout)
        report["loaded"] += 1
        step = int(checkpoint.name.removeprefix("step_"))
    return report


if __name__ == "__main__":
    root, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(main(root, kills, seed)))
