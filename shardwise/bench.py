"""The benchmark harness behind ``shardwise bench NAME [--quick] [--json]``.

A benchmark is one module of the source checkout's top-level ``benchmarks/`` package,
``benchmarks/<NAME with - replaced by _>.py``, with one function::

    def run(quick: bool) -> BenchResult

It measures our implementation and its peers (e.g. ``torch_ddp``) in one run and returns the
numbers; the harness computes ``ratio = ours / peer`` for every peer and prints, as the last
line of stdout, one JSON object (the CLI contract of DESIGN.md)::

    {"bench": NAME, "metric": "...", "ours": x, "peers": {"torch_ddp": y},
     "ratio": {"torch_ddp": x / y}, "config": {...}}

A benchmark that checks measurements against formulas rather than against a peer process
(e.g. ``zero-memory``: measured bytes / formula bytes per case) names each case as a "peer"
with the formula's value and gives the ratios itself (`BenchResult.ratio`).

A benchmark prints its progress on stderr; stdout belongs to the harness (a summary line, then
the JSON line; ``--json`` keeps only the JSON line).

Helpers for benchmark modules: `median_step_time` and `interleaved_step_times` time steps
after a warm-up; `launch_workers` runs a multi-rank benchmark through
`shardwise.distributed.launch.launch` and returns the record rank 0 saved with
`write_worker_result`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from shardwise.errors import ShardwiseError

StepFn = Callable[[int], object]
"""One training step; receives the step index (0, 1, ...) so contenders can share data."""
SettingsT = TypeVar("SettingsT")
"""A benchmark's settings (a dataclass built from the JSON ``--settings``)."""


@dataclass(frozen=True)
class BenchResult:
    """What a benchmark's ``run(quick)`` returns."""

    metric: str
    """What `ours` and the peers measure, with its unit, e.g. ``"median_step_s"``."""
    ours: float
    """Our implementation's value of `metric`."""
    peers: dict[str, float]
    """Peer name (``"torch_ddp"``) -> its value of `metric`."""
    config: dict[str, Any] = field(default_factory=dict)
    """Everything needed to reproduce the figures (JSON-serialisable)."""
    ratio: dict[str, float] | None = None
    """The ratio of each peer, when it is not ``ours / peer``: for peers that are reference
    values (formulas) of separately measured cases, ``measured / reference`` per case. Same
    keys as `peers`. Default (None): the harness computes ``ours / peer``."""

    def __post_init__(self) -> None:
        values = {"ours": self.ours, **{f"peers[{k!r}]": v for k, v in self.peers.items()}}
        if self.ratio is not None:
            values.update({f"ratio[{k!r}]": v for k, v in self.ratio.items()})
        for name, value in values.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"benchmark {name}={value!r} is not a positive finite number")
        if not self.peers:
            raise ValueError("a benchmark result needs at least one peer to compare with")
        if self.ratio is not None and set(self.ratio) != set(self.peers):
            raise ValueError(
                f"benchmark ratio keys {sorted(self.ratio)} are not its peers {sorted(self.peers)}"
            )


# --------------------------------------------------------------------------- finding benchmarks


def repo_root() -> Path:
    """The source checkout holding the ``shardwise`` package (and ``benchmarks/``)."""
    return Path(__file__).resolve().parent.parent


def benchmarks_dir() -> Path:
    """The ``benchmarks/`` package; only a source checkout has it (it is not installed)."""
    folder = repo_root() / "benchmarks"
    if not (folder / "__init__.py").is_file():
        raise ShardwiseError(
            f"benchmarks need a source checkout: {folder} does not exist (shardwise is "
            "installed without its benchmarks/ folder); run `pip install -e .` in a clone"
        )
    return folder


def available_benchmarks() -> list[str]:
    """Benchmark names, as typed on the command line (``_`` in a file name is ``-``)."""
    files = benchmarks_dir().glob("*.py")
    return sorted(p.stem.replace("_", "-") for p in files if not p.stem.startswith("_"))


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks.<name>``; `ShardwiseError` listing the benchmarks if it is unknown."""
    folder = benchmarks_dir()
    module_name = name.replace("-", "_")
    known = module_name.isidentifier() and not module_name.startswith("_")
    if not known or not (folder / f"{module_name}.py").is_file():
        raise ShardwiseError(
            f"unknown benchmark {name!r}; available: {', '.join(available_benchmarks()) or 'none'}"
        )
    root = str(repo_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module(f"benchmarks.{module_name}")
    if not callable(getattr(module, "run", None)):
        raise ShardwiseError(f"benchmark {name!r} ({module.__file__}) has no run(quick) function")
    return module


# --------------------------------------------------------------------------- running and reporting


def result_record(name: str, result: BenchResult) -> dict[str, Any]:
    """The JSON object of the CLI contract, with ``ratio = ours / peer`` per peer (or the
    benchmark's own `BenchResult.ratio`)."""
    if result.ratio is not None:
        ratio = {peer: result.ratio[peer] for peer in result.peers}
    else:
        ratio = {peer: result.ours / value for peer, value in result.peers.items()}
    return {
        "bench": name,
        "metric": result.metric,
        "ours": result.ours,
        "peers": dict(result.peers),
        "ratio": ratio,
        "config": result.config,
    }


def run_benchmark(name: str, quick: bool, json_only: bool = False) -> dict[str, Any]:
    """Run benchmark `name`; print a summary line (unless `json_only`), then the JSON line."""
    module = load_benchmark(name)
    started = time.perf_counter()
    result = module.run(quick)
    if not isinstance(result, BenchResult):
        raise TypeError(
            f"{module.__name__}.run returned {type(result).__name__}, not a BenchResult"
        )
    record = result_record(name, result)
    if not json_only:
        label = "ours/peer" if result.ratio is None else "ratio"
        print(summary_line(record, time.perf_counter() - started, label), flush=True)
    print(json.dumps(record, allow_nan=False), flush=True)
    return record


def summary_line(record: dict[str, Any], elapsed_s: float, ratio_label: str = "ours/peer") -> str:
    """``bench dp: median_step_s ours 0.512 | torch_ddp 0.498 (ours/peer 1.028) | 95 s``."""
    peers = " | ".join(
        f"{peer} {value:.4g} ({ratio_label} {record['ratio'][peer]:.3f})"
        for peer, value in record["peers"].items()
    )
    return (
        f"bench {record['bench']}: {record['metric']} ours {record['ours']:.4g} | {peers} "
        f"| {elapsed_s:.0f} s"
    )


# --------------------------------------------------------------------------- timing


def interleaved_step_times(
    steps: dict[str, StepFn],
    *,
    warmup: int,
    iters: int,
    before_step: Callable[[], None] | None = None,
    sync: Callable[[], None] | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each of `iters` measured steps per contender, after `warmup` steps each.

    Contenders take turns, one step each per round, and the order rotates every round, so
    machine drift (another process, thermal state, caches) hits all of them alike instead of
    whichever ran last. `before_step` runs untimed before every step (a barrier, so no rank
    starts a step while another still finishes the previous contender's); `sync` runs inside
    the timed region after every step (waiting for queued device work); `on_step(name,
    index, seconds)` runs untimed after every step (progress lines).
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + iters):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            if before_step is not None:
                before_step()
            start = time.perf_counter()
            steps[name](index)
            if sync is not None:
                sync()
            seconds = time.perf_counter() - start
            if index >= warmup:
                times[name].append(seconds)
            if on_step is not None:
                on_step(name, index, seconds)
    return times


def median_step_time(
    fn: StepFn, warmup: int, iters: int, sync: Callable[[], None] | None = None
) -> float:
    """Median seconds of `fn(i)` over `iters` calls after `warmup` untimed ones."""
    times = interleaved_step_times({"only": fn}, warmup=warmup, iters=iters, sync=sync)
    return statistics.median(times["only"])


# --------------------------------------------------------------------------- multi-rank benchmarks


def launch_workers(
    entry_module: str, args: list[str], nproc: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python -m entry_module *args --result FILE`` on `nproc` ranks; rank 0's record.

    The ranks import the checkout's ``benchmarks`` package, so the repository root goes on
    their PYTHONPATH; `env` is added to their environment. Rank 0 writes its record with
    `write_worker_result`; a failed rank raises `LaunchError` (one line per rank) from the
    launcher.
    """
    from shardwise.distributed.launch import launch

    python_path = os.pathsep.join(p for p in (str(repo_root()), os.environ.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="shardwise-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        launch(
            entry_module,
            [*args, "--result", str(result_file)],
            nproc,
            env={**(env or {}), "PYTHONPATH": python_path},
        )
        if not result_file.is_file():
            raise ShardwiseError(
                f"benchmark workers of {entry_module} finished without writing {result_file}"
            )
        return json.loads(result_file.read_text())


def write_worker_result(path: str | Path, record: dict[str, Any]) -> None:
    """Save a worker's record for `launch_workers` (write, then rename: never half a file)."""
    target = Path(path)
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(record, allow_nan=False))
    partial.replace(target)


def worker_main(
    prog: str,
    settings_type: Callable[..., SettingsT],
    measure: Callable[[SettingsT, int, int, int], dict[str, Any]],
    argv: list[str] | None = None,
) -> None:
    """Entry point of each rank `launch_workers` starts: ``--settings`` (a JSON object for
    `settings_type`) and ``--result`` (the file rank 0 writes
    ``measure(settings, rank, local_rank, world_size)`` to). One compute thread per rank."""
    import argparse

    import torch

    from shardwise.config import Config
    from shardwise.distributed.launch import init_worker, run_worker

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--settings", required=True, help="settings as a JSON object")
    parser.add_argument("--result", required=True, help="file rank 0 writes its record to")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = settings_type(**json.loads(args.settings))
        torch.set_num_threads(1)
        info = init_worker(Config().distributed.timeout_s)
        record = measure(settings, info.rank, info.local_rank, info.world_size)
        if info.rank == 0:
            write_worker_result(args.result, record)

    run_worker(body)
