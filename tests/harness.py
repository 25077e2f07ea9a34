"""A pool of N processes that join one gloo group once and then run many test cases.

Process start and group init cost seconds, so a test file spawns its pool once (a
module-scoped fixture in conftest.py) and sends it module-level functions to run on every
rank. Rendezvous goes through a FileStore in a fresh temporary directory: no fixed port.
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

CASE_TIMEOUT_S = 120.0
"""A case that has not finished on every rank after this long fails (and the pool restarts)."""


def _worker(rank: int, world_size: int, store_path: str, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    from shardwise.accelerator import get_accelerator

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group(
        get_accelerator().backend,
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=CASE_TIMEOUT_S / 2),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # report everything, including assertion failures
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()
    # Every result has reached the parent (it asked to stop only after reading them): end now,
    # without waiting for threads a case left behind (disk-tier workers, gloo's own), which
    # would hold the process past `close`'s join and cost seconds per pool.
    os._exit(0)


class DistributedPool:
    """`world_size` ranks in one process group; `run(fn, ...)` returns every rank's result."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="sw-pool-")
        store = os.path.join(self._dir.name, "store")
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, self.world_size, store, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> list:
        """Run `fn(*args, **kwargs)` on every rank; raise if any rank raised or timed out."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        outcomes: dict[int, tuple[bool, Any]] = {}
        try:
            while len(outcomes) < self.world_size:
                rank, ok, value = self._results.get(timeout=CASE_TIMEOUT_S)
                outcomes[rank] = (ok, value)
                if not ok:  # peers may now wait forever on a collective: stop collecting
                    break
        except queue.Empty:
            missing = sorted(set(range(self.world_size)) - set(outcomes))
            self.close()
            raise AssertionError(f"{fn.__name__}: ranks {missing} did not finish") from None
        failed = {r: v for r, (ok, v) in outcomes.items() if not ok}
        if failed:
            self.close()
            rank, tb = next(iter(failed.items()))
            raise AssertionError(f"{fn.__name__} failed on rank {rank}:\n{tb}")
        return [outcomes[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            q.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self._procs = []
        if hasattr(self, "_dir"):
            self._dir.cleanup()
