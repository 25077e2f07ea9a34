"""Every rank all-reduces its rank + 1; rank 0 prints the sum and checks it."""

from __future__ import annotations

import torch

from shardwise.distributed.launch import init_worker, run_worker
from tests.distributed.scripts._collective import all_reduce


def main() -> None:
    info = init_worker(timeout_s=30)
    total = all_reduce(torch.full((4,), float(info.rank + 1)))
    expected = info.world_size * (info.world_size + 1) / 2
    assert torch.equal(total, torch.full((4,), expected)), total
    if info.rank == 0:
        print(f"allreduce ok: sum={expected:g} world_size={info.world_size}", flush=True)


if __name__ == "__main__":
    run_worker(main)
