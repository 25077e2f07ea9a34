"""Rank 0 waits in an all-reduce while rank 1 fails in the way named by argv[1].

exit: rank 1 calls os._exit(3).  sleep: rank 1 sleeps 30 s (rank 0's timeout is argv[2]).
config: rank 1 raises a ConfigError.  crash: rank 1 raises a ValueError.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from shardwise.distributed.launch import init_worker, run_worker
from shardwise.errors import ConfigError
from tests.distributed.scripts._collective import all_reduce


def main() -> None:
    mode = sys.argv[1]
    info = init_worker(timeout_s=float(sys.argv[2]) if len(sys.argv) > 2 else 30.0)
    if info.rank == 1:
        time.sleep(0.5)  # let rank 0 enter the collective first
        if mode == "exit":
            os._exit(3)
        if mode == "sleep":
            time.sleep(30)
        if mode == "config":
            raise ConfigError("parallel.tp=3 does not divide n_heads=8; use 1, 2, 4 or 8")
        if mode == "crash":
            raise ValueError("bad value in user code")
    all_reduce(torch.ones(4))


if __name__ == "__main__":
    run_worker(main)
