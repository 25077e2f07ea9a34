"""Benchmark ``offload``: the disk tier, the offloaded optimizer's step time, and capacity.

Four ratios with targets, each measured against its own reference in the same run (issue 6,
"must show"; the last from issue 19):

- ``disk_vs_raw`` (target >= 0.7): `DiskTier` throughput over plain file IO on the same
  directory. The tier writes N chunks of 64 MiB (random bytes), several operations in flight,
  then reads them all back into preallocated tensors; throughput = bytes moved (written + read)
  / wall seconds of the two phases. The reference is `measure_raw_throughput` of the same
  number of bytes (one ``write``, one ``readinto``), as ``2 B / (B / write_rate + B /
  read_rate)``. Each round runs both, alternating which goes first; the ratio is the median
  over rounds of tier / raw within a round (neighbours in time share the machine's load).
  [Note: page cache] Files of a few hundred MB stay in the page cache of a machine with GBs of
  RAM: both sides then run at memory speed and the ratio measures the tier's own overhead
  (threads, 4 MiB pieces, checksums), not the disk. One extra round with ``fsync=True`` on
  both sides (reported in the config, no target) makes writes wait for the device; reads still
  come from the cache. Set ``TMPDIR`` to benchmark another file system.
- ``step_vs_inmemory`` (target <= 1.3): median step time of our engine with
  ``offload.optimizer = "host"`` (Adam states in host memory, `OffloadedAdamW`) over the same
  engine with everything resident (``offload.optimizer = "device"``), same GPT (preset
  "mini", seq 128, 4 sequences per rank, 2 ranks, the accelerator's default precision),
  interleaved step by step in one launched job as in benchmarks/dp.py. The config also
  reports ``offload.optimizer = "disk"`` (states streamed from the disk tier), and DeepSpeed
  ZeRO-3 with CPU offload of parameters and optimizer where ``deepspeed`` is importable (no
  target). On a CPU-only machine "host" and "device" are the same memory: the ratio is then
  the cost of the chunked optimizer, not of PCIe transfers.
- ``sharded_state_fraction`` and ``sharded_vs_deepspeed`` (no target): the sharded parameter
  chunks (zero/chunks/sharding.py) in the same 2-rank job: ``offload.policy = "static"``,
  ``param_device_fraction = 0``, ``offload.optimizer = "host"`` (each rank keeps 1/N of every
  parameter chunk, of its gradients and of its Adam states; full chunks gathered for compute,
  gradients reduce-scattered). ``sharded_state_fraction``: the most model-state bytes any
  rank holds between steps (its shards, master weights and Adam states, from
  ``memory_report``) over those of the same engine in one process (a 1-rank job of a few
  steps): about 1/N. ``sharded_vs_deepspeed``: its median step time over DeepSpeed ZeRO-3's
  with parameters and optimizer offloaded to the CPU, in the same job (only where
  ``deepspeed`` runs; else ``config.steps.deepspeed`` says why it is absent).
- ``state_over_rss`` (target >= 3): model-state bytes 16Ψ (fp32: parameters 4Ψ, gradients 4Ψ,
  Adam m and v 8Ψ) over the peak resident set (``VmHWM``) of a fresh launched process that
  trains the model for a few steps with the offload this version has. With the parameter-chunk
  offload (``offload.policy``, when the config has it) parameter and gradient chunks live on
  disk between uses and memory holds the computing module's chunks, activations and IO
  buffers (without gradient chunks, ``param.grad`` would keep 4Ψ and cap the ratio below 4).
  With the optimizer-state offload alone (``offload.optimizer = "disk"``) parameters and
  gradients stay in memory and the ratio is below 16Ψ / 8Ψ = 2 whatever the model size.

- ``all_disk_vs_inmemory`` (target <= 1.5, issue 19): the capacity run's median step time
  (after the first step) over that of the same model trained in a fresh process with no
  offload at all (everything in host memory). The capacity record also gives the bytes the
  disk tiers read and wrote in each step (``disk_bytes_per_step``).

Each ratio key is a "peer" whose value is its reference (raw bytes per second, resident
seconds per step, peak RSS bytes, one process's model-state bytes, DeepSpeed's seconds per
step; see ``config.peer_values``). ``ours`` is the worst attainment of a target (`TARGETS`):
ratio / target for ">=" targets, target / ratio for "<=" ones, so ``ours >= 1`` means every
target is met; the keys without a target (``config.no_target``) do not enter it.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks import gpt_workload
from shardwise.accelerator import get_accelerator
from shardwise.bench import BenchResult, StepFn, launch_workers, worker_main
from shardwise.config import Config
from shardwise.engine import Engine, initialize
from shardwise.errors import ShardwiseError
from shardwise.models.gpt import build_gpt
from shardwise.zero.offload import DiskTier, measure_raw_throughput

TARGETS: dict[str, tuple[str, float]] = {
    "disk_vs_raw": (">=", 0.7),
    "step_vs_inmemory": ("<=", 1.3),
    "state_over_rss": (">=", 3.0),
    "all_disk_vs_inmemory": ("<=", 1.5),
}
"""Ratio key -> (comparison, target) from issues 6 and 19."""
STEP_NPROC = 2
"""Ranks of the step-time job (as benchmarks/dp.py)."""
OPTIMIZER_TIERS = ("device", "host", "disk")
"""The step-time contenders: where ``offload.optimizer`` keeps Adam's states."""
DEEPSPEED = "deepspeed_zero3_offload"
"""Name of the optional DeepSpeed contender of the step-time job."""
SHARDED = "sharded_host"
"""Name of the step-time job's contender with sharded parameter chunks (`SHARDED_OFFLOAD`)."""
SHARDED_OFFLOAD: dict[str, Any] = {
    "policy": "static",
    "param_device_fraction": 0.0,
    "optimizer": "host",
}
"""``offload`` of the sharded contender: parameter chunks (over N > 1 ranks, each rank's
shards of them, with their gradients and Adam states) off the device between uses, Adam states
in host memory."""
NO_TARGET: dict[str, str] = {
    "sharded_state_fraction": "about 1 / nproc: each rank keeps 1/N of every chunk and of its "
    "Adam states (padding and how parameters fall into shards make it slightly uneven)",
    "sharded_vs_deepspeed": "recorded; present only where DeepSpeed ran",
}
"""Ratio keys recorded without a target (they do not enter ``ours``)."""
SINGLE_STEPS = (1, 2)
"""(warm-up, measured) steps of the one-process reference of the sharded contender."""
HOST_BUDGET_MB = 1.0
"""Host memory for parameter chunks in the capacity run (``offload.host_budget_mb``): next to
nothing, so chunks that leave the device go to disk."""
STATE_BYTES_PER_PARAM = 16
"""Model-state bytes per parameter of Adam training (ZeRO's 16Ψ: fp32 parameters,
gradients, m and v; or bf16 parameters and gradients with fp32 master weights, m and v)."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DiskSettings:
    """The disk-tier throughput pattern."""

    chunk_bytes: int = 64 << 20
    """Bytes per chunk (one key of the tier)."""
    chunks: int = 6
    """Chunks written, then read back, per round."""
    in_flight: int = 4
    """Operations issued before waiting for the oldest (the tier's queue depth)."""
    workers: int = 2
    """IO threads of the tier."""
    rounds: int = 5
    """Rounds of (raw, tier), alternating which goes first; medians are reported."""


@dataclass(frozen=True)
class StepSettings(gpt_workload.Settings):
    """The step-time workload (`gpt_workload.Settings`) plus where the disk tier writes."""

    disk_path: str = ""
    """Directory of the disk-tier contender's files."""


@dataclass(frozen=True)
class CapacitySettings:
    """The model of the capacity run (one fresh process, fp32, micro-batch 1)."""

    preset: str = "medium"
    """GPT size preset."""
    seq_len: int = 128
    """Tokens per sequence."""
    micro_batch: int = 1
    """Sequences per step."""
    steps: int = 3
    """Training steps (the first one allocates the optimizer states)."""
    chunk_mb: int = 64
    """``offload.chunk_mb``: Adam states streamed per chunk, in MiB."""
    threads: int = 2
    """Compute threads of the single process."""
    seed: int = 1234
    """Seed of the weights and of the data."""
    disk_path: str = ""
    """Directory of the disk tier."""
    param_offload: bool = True
    """Offload parameter chunks too (``offload.policy``) when this version's config has it."""
    in_memory: bool = False
    """No offload at all: everything in host memory (the reference of
    ``all_disk_vs_inmemory``)."""


@dataclass(frozen=True)
class Plan:
    """Everything one run measures."""

    disk: DiskSettings
    steps: StepSettings
    capacity: CapacitySettings


QUICK = Plan(DiskSettings(), StepSettings(warmup=3, iters=10), CapacitySettings())
FULL = Plan(
    DiskSettings(chunks=16, rounds=9),
    StepSettings(warmup=5, iters=30),
    CapacitySettings(preset="large", steps=4),
)


@dataclass(frozen=True)
class Job:
    """What one launched job measures: ``kind`` "steps" or "single" (`StepSettings`) or
    "capacity" (`CapacitySettings`), with its settings as a dict."""

    kind: str
    settings: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- the run


def run(quick: bool) -> BenchResult:
    """Disk throughput here, then the step-time job (2 ranks), the one-process reference of
    its sharded contender (1 rank), then the capacity job (1 rank), all under one temporary
    directory of ``TMPDIR``."""
    plan = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="shardwise-bench-offload-") as root:
        progress(f"disk tier vs raw file IO under {root}")
        disk = measure_disk(root, plan.disk)
        progress(f"step time: launching {STEP_NPROC} ranks")
        steps = launch_job(Job("steps", asdict(replace(plan.steps, disk_path=root))), STEP_NPROC)
        warmup, iters = SINGLE_STEPS
        progress(f"{SHARDED} in one process: launching 1 rank ({warmup + iters} steps)")
        single = launch_job(
            Job("single", asdict(replace(plan.steps, warmup=warmup, iters=iters))), 1
        )
        capacity = run_capacity(replace(plan.capacity, disk_path=root))
        resident = run_capacity(replace(plan.capacity, in_memory=True))
    return summarise(plan, disk, steps, capacity, single, resident)


def launch_job(job: Job, nproc: int) -> dict[str, Any]:
    return launch_workers("benchmarks.offload", ["--settings", json.dumps(asdict(job))], nproc)


def run_capacity(settings: CapacitySettings) -> dict[str, Any]:
    """The capacity job in a fresh process (its peak RSS is that run's own)."""
    kind = "parameter + optimizer" if settings.param_offload else "optimizer-state"
    kind = "no" if settings.in_memory else kind
    progress(f"capacity: launching 1 rank, gpt-{settings.preset}, {kind} offload")
    return launch_job(Job("capacity", asdict(settings)), 1)


def progress(line: str) -> None:
    print(f"[offload] {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- disk tier vs raw


def measure_disk(root: str | os.PathLike[str], settings: DiskSettings) -> dict[str, Any]:
    """Rounds of raw file IO and of the tier's write-then-read pattern (`tier_round`), plus
    one round of each with fsync; every read is checked against what was written."""
    nbytes = settings.chunk_bytes * settings.chunks
    sources = [random_bytes(settings.chunk_bytes, seed) for seed in range(settings.chunks)]
    outs = [torch.ones(settings.chunk_bytes, dtype=torch.uint8) for _ in sources]  # touched
    raw_rounds, tier_rounds = [], []
    for index in range(settings.rounds):
        for side in ("raw", "tier") if index % 2 == 0 else ("tier", "raw"):
            if side == "raw":
                raw_rounds.append(with_combined(measure_raw_throughput(root, nbytes)))
            else:
                tier_rounds.append(tier_round(root, sources, outs, settings))
        progress(
            f"disk round {index + 1}/{settings.rounds}: tier "
            f"{tier_rounds[-1]['bytes_per_s'] / 1e9:.2f} GB/s, raw "
            f"{raw_rounds[-1]['bytes_per_s'] / 1e9:.2f} GB/s"
        )
    raw_fsync = with_combined(measure_raw_throughput(root, nbytes, fsync=True))
    tier_fsync = tier_round(root, sources, outs, settings, fsync=True)
    progress(
        f"disk with fsync: tier {tier_fsync['bytes_per_s'] / 1e9:.2f} GB/s, raw "
        f"{raw_fsync['bytes_per_s'] / 1e9:.2f} GB/s"
    )
    pairs = zip(tier_rounds, raw_rounds, strict=True)
    round_ratios = [tier["bytes_per_s"] / raw["bytes_per_s"] for tier, raw in pairs]
    return {
        "ratio": statistics.median(round_ratios),
        "round_ratios": round_ratios,
        "tier": median_rates(tier_rounds),
        "raw": median_rates(raw_rounds),
        "tier_rounds_bytes_per_s": [r["bytes_per_s"] for r in tier_rounds],
        "raw_rounds_bytes_per_s": [r["bytes_per_s"] for r in raw_rounds],
        "fsync": {"tier": tier_fsync, "raw": raw_fsync},
        "bytes_per_round": nbytes,
        "filesystem": filesystem_of(root),
    }


def tier_round(
    root: str | os.PathLike[str],
    sources: list[torch.Tensor],
    outs: list[torch.Tensor],
    settings: DiskSettings,
    fsync: bool = False,
) -> dict[str, float]:
    """Write every source chunk to a fresh `DiskTier`, then read every chunk back into
    `outs`, at most `settings.in_flight` operations pending; bytes per second of each phase
    and of both together. Raises if a chunk read back differs from what was written."""
    nbytes = sum(s.numel() for s in sources)
    with DiskTier(root, workers=settings.workers, fsync=fsync) as tier:
        write_s = pipelined(lambda i: tier.write(f"chunk{i}", sources[i]), len(sources), settings)
        read_s = pipelined(lambda i: tier.read(f"chunk{i}", outs[i]), len(sources), settings)
    for index, (source, out) in enumerate(zip(sources, outs, strict=True)):
        if not torch.equal(source, out):
            raise ShardwiseError(f"disk tier read back chunk {index} with different bytes")
        out.fill_(1)  # the next round must not find the right bytes already there
    return {
        "write_bytes_per_s": nbytes / write_s,
        "read_bytes_per_s": nbytes / read_s,
        "bytes_per_s": 2 * nbytes / (write_s + read_s),
    }


def pipelined(issue: Callable[[int], Future], count: int, settings: DiskSettings) -> float:
    """Wall seconds to run ``issue(0) .. issue(count - 1)`` with at most `settings.in_flight`
    of their futures pending (waiting for the oldest before issuing more), until all are done."""
    pending: collections.deque[Future] = collections.deque()
    started = time.perf_counter()
    for index in range(count):
        if len(pending) >= settings.in_flight:
            pending.popleft().result()
        pending.append(issue(index))
    while pending:
        pending.popleft().result()
    return time.perf_counter() - started


def random_bytes(nbytes: int, seed: int) -> torch.Tensor:
    """`nbytes` random bytes (incompressible, like trained weights)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)


def with_combined(rates: dict[str, float]) -> dict[str, float]:
    """Add ``bytes_per_s``: writing then reading the same bytes, ``2 / (1/w + 1/r)``."""
    write, read = rates["write_bytes_per_s"], rates["read_bytes_per_s"]
    return {**rates, "bytes_per_s": 2 / (1 / write + 1 / read)}


def median_rates(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def filesystem_of(path: str | os.PathLike[str]) -> str:
    """The type and mount point of the file system holding `path` (from /proc/mounts)."""
    target = os.path.realpath(path)
    best = ("?", "")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        _, mount, fstype, *_ = line.split()
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[1]):
            best = (fstype, mount)
    return f"{best[0]} at {best[1]}"


# --------------------------------------------------------------------------- memory readings


def peak_rss_bytes() -> int:
    """This process's peak resident set in bytes: ``VmHWM`` of /proc/self/status, else
    ``getrusage``'s ``ru_maxrss`` (KiB on Linux). VmHWM first: Linux carries ru_maxrss over
    ``exec``, so a launched process would report its forking parent's peak if that was larger
    (measured: 819 MiB of ru_maxrss against 305 MiB of VmHWM in a pytest process)."""
    return _status_kib("VmHWM") * 1024 or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """This process's resident set in bytes now (``VmRSS``; 0 where /proc is missing)."""
    return _status_kib("VmRSS") * 1024


def _status_kib(field_name: str) -> int:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, value = line.partition(":")
        if name == field_name:
            return int(value.split()[0])
    return 0


# --------------------------------------------------------------------------- step-time job


def measure_steps(
    settings: StepSettings, rank: int, local_rank: int, world_size: int
) -> dict[str, Any]:
    """Our engine with Adam's states on each tier, with sharded parameter chunks (`SHARDED`),
    and DeepSpeed ZeRO-3 with CPU offload where it imports, interleaved; medians and memory
    reports of rank 0, and every rank's model-state bytes of the sharded contender."""
    work = gpt_workload.prepare(settings, rank, local_rank, world_size)
    engines = {}
    for tier in OPTIMIZER_TIERS:
        offload = {"optimizer": tier, "disk_path": settings.disk_path if tier == "disk" else None}
        engines[tier] = build_engine(work.cfg.replace(offload=offload), work.device)
    engines[SHARDED] = build_engine(work.cfg.replace(offload=SHARDED_OFFLOAD), work.device)
    contenders = {tier: engine_step(engine, work.batches) for tier, engine in engines.items()}
    deepspeed_note = add_deepspeed(contenders, work)
    detail = {name: describe_precision(work.dtype, name) for name in contenders}
    record = gpt_workload.measure_contenders("offload", work, contenders, detail, "rotating")
    record["config"]["deepspeed"] = deepspeed_note
    record["memory_report"] = {tier: engine.memory_report() for tier, engine in engines.items()}
    record["sharded"] = chunk_state(engines[SHARDED], work)
    return record


def measure_single(settings: StepSettings) -> dict[str, Any]:
    """The sharded contender's engine (`SHARDED_OFFLOAD`) in one process, the same model and
    micro-batch: its step times and model-state bytes (the reference of
    ``sharded_state_fraction``)."""
    work = gpt_workload.prepare(settings, 0, 0, 1)
    engine = build_engine(work.cfg.replace(offload=SHARDED_OFFLOAD), work.device)
    step_s, losses = [], []
    for index in range(settings.warmup + settings.iters):
        started = time.perf_counter()
        losses.append(engine.train_step(work.batches[index]))
        get_accelerator().synchronize()
        step_s.append(time.perf_counter() - started)
    return {
        **chunk_state(engine, work),
        "step_s": step_s[settings.warmup :],
        "warmup_steps": settings.warmup,
        "losses": losses,
        "memory_report": engine.memory_report(),
    }


def chunk_state(engine: Engine, work: gpt_workload.RankWorkload) -> dict[str, Any]:
    """Model-state bytes (`model_state_bytes`) of a chunked engine between steps, every rank's
    (collective), with the bytes of its homes counted directly and where they are."""
    report = engine.memory_report()
    chunked = engine.store
    mine = torch.zeros(2, work.world_size, dtype=torch.float64, device=work.device)
    mine[:, work.rank] = torch.tensor([model_state_bytes(report), homes_bytes(engine)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(mine)
    state, homes = mine.tolist()
    return {
        "nproc": work.world_size,
        "sharded": chunked.sharded,
        "chunks": len(chunked.chunks),
        "chunk_bytes": [c.nbytes for c in chunked.chunks],
        "psi": sum(p.numel() for p in engine.params),
        "state_bytes_per_rank": [int(v) for v in state],
        "homes_bytes_per_rank": [int(v) for v in homes],
        "homes_on": {f"chunks_{t}": report[f"chunks_{t}"] for t in ("device", "host", "disk")},
        "offload": engine.plan.config.offload.model_dump(),
    }


def model_state_bytes(report: dict[str, int]) -> int:
    """Model-state bytes a chunked engine holds between steps, from its ``memory_report``:
    parameter chunks on every tier (between steps, the homes: gathered chunks are freed), fp32
    master weights and Adam states wherever they are. Gradient chunks exist only during a
    step and are not counted."""
    chunks = sum(report[f"chunks_{tier}"] for tier in ("device", "host", "disk"))
    adam = report["optimizer_states"] + report["offloaded_host"] + report["offloaded_disk"]
    return chunks + report["master_params"] + adam


def homes_bytes(engine: Engine) -> int:
    """Bytes of the engine's homes (this rank's shard chunks, or the chunks in one process)."""
    return sum(home.nbytes for home in engine.store.homes)


def build_engine(cfg: Config, device: torch.device) -> Engine:
    model = build_gpt(cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed)
    return initialize(model, None, cfg)


def engine_step(engine: Engine, batches: list) -> StepFn:
    def step(index: int) -> float:
        return engine.train_step(batches[index])

    return step


def describe_precision(dtype: torch.dtype, contender: str) -> str:
    if dtype == torch.float32:
        return "fp32"
    if contender == DEEPSPEED:
        return "bf16.enabled (bf16 params, fp32 master weights)"
    return "bf16 params, fp32 master weights, fp32 grad reduce"


def add_deepspeed(contenders: dict[str, StepFn], work: gpt_workload.RankWorkload) -> str:
    """Add the DeepSpeed contender when it imports and sets up on every rank; the line saying
    what happened (for the JSON config)."""
    if importlib.util.find_spec("deepspeed") is None:
        return f"not installed: contender {DEEPSPEED} omitted"
    from benchmarks.zero3 import deepspeed_contender, deepspeed_version  # DS_ACCELERATOR=cpu

    version, import_error = deepspeed_version()
    if version is None:
        return f"not importable ({import_error}): contender {DEEPSPEED} omitted"
    cpu = {"device": "cpu", "pin_memory": get_accelerator().supports_pinned_memory}
    zero = {"stage": 3, "offload_param": cpu, "offload_optimizer": cpu}
    step, line = deepspeed_contender(work.cfg, work.device, work.dtype, work.batches, version, zero)
    if step is not None:
        contenders[DEEPSPEED] = step
    return f"{line} (ZeRO-3, params + optimizer on cpu)"


# --------------------------------------------------------------------------- capacity job


def capacity_config(settings: CapacitySettings) -> Config:
    """fp32 training of the preset with Adam's states on disk and, with
    `settings.param_offload` where the config has it, every parameter chunk streamed from disk
    (``offload.policy = "static"``, no chunk pinned on the device, `HOST_BUDGET_MB` of host
    memory for chunks: the device holds the chunks of the module computing, the disk the rest)."""
    offload: dict[str, Any] = {
        "optimizer": "disk",
        "disk_path": settings.disk_path,
        "chunk_mb": settings.chunk_mb,
    }
    if settings.param_offload:
        offload.update(policy="static", param_device_fraction=0.0, host_budget_mb=HOST_BUDGET_MB)
    if settings.in_memory:
        offload = {}
    return Config().replace(
        model={"preset": settings.preset},
        data={"seq_len": settings.seq_len},
        precision={"dtype": "fp32"},
        train={"micro_batch": settings.micro_batch, "steps": settings.steps, "seed": settings.seed},
        offload=offload,
    )


def measure_capacity(settings: CapacitySettings, rank: int) -> dict[str, Any]:
    """Train `capacity_config` for `settings.steps` steps in this (fresh) process; Ψ, the
    model-state bytes and this process's peak RSS."""
    torch.set_num_threads(settings.threads)
    rss_at_start = current_rss_bytes()
    cfg = capacity_config(settings)
    device = get_accelerator().device(0)
    # Built on the meta device and filled by the engine where the parameters land (a chunk,
    # a bucket), so the full model is never materialised first.
    model = build_gpt(cfg.model, cfg.data.seq_len, device="meta")
    param_init = functools.partial(model.init_parameter, seed=settings.seed)
    engine = initialize(model, None, cfg, param_init=param_init)
    psi = sum(p.numel() for p in engine.params)
    rss_after_init = current_rss_bytes()
    disks = {
        id(d): d
        for d in (getattr(engine.store, "disk", None), engine.optimizer.__dict__.get("disk"))
        if d is not None
    }
    moved = []
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.micro_batch, settings.seq_len + 1)
    step_s, losses = [], []
    for index in range(settings.steps):
        tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=generator).to(device)
        before = disk_bytes(disks.values())
        started = time.perf_counter()
        losses.append(engine.train_step((tokens[:, :-1], tokens[:, 1:])))
        get_accelerator().synchronize()
        step_s.append(time.perf_counter() - started)
        moved.append({k: v - before[k] for k, v in disk_bytes(disks.values()).items()})
        if rank == 0:
            progress(
                f"capacity step {index + 1}/{settings.steps}: {step_s[-1]:.2f} s, loss "
                f"{losses[-1]:.4f}, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB"
            )
    return {
        "model": f"gpt-{settings.preset}",
        "psi": psi,
        "state_bytes": STATE_BYTES_PER_PARAM * psi,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_at_start_bytes": rss_at_start,
        "rss_after_init_bytes": rss_after_init,
        "step_s": step_s,
        "disk_bytes_per_step": moved,
        "losses": losses,
        "memory_report": engine.memory_report(),
        "offload": cfg.offload.model_dump(),
        "param_offload": settings.param_offload,
        "threads": torch.get_num_threads(),
        "device": get_accelerator().device_type,
    }


def disk_bytes(disks) -> dict[str, int]:
    """Bytes the disk tiers have read and written so far."""
    stats = [d.stats for d in disks]
    return {key: int(sum(s[key] for s in stats)) for key in ("bytes_read", "bytes_written")}


# --------------------------------------------------------------------------- the result


def summarise(
    plan: Plan,
    disk: dict[str, Any],
    steps: dict[str, Any],
    capacity: dict[str, Any],
    single: dict[str, Any],
    resident: dict[str, Any],
) -> BenchResult:
    """The ratios, each against its reference (the "peer" values), and the config; `single`
    is the one-process reference of the sharded contender (`measure_single`), `resident` the
    capacity model trained without offload."""
    medians = steps["median_s"]
    sharded = sharded_summary(steps, single)
    peers = {
        "disk_vs_raw": disk["raw"]["bytes_per_s"],
        "step_vs_inmemory": medians["device"],
        "state_over_rss": float(capacity["peak_rss_bytes"]),
        "sharded_state_fraction": float(sharded["single_process_state_bytes"]),
        "all_disk_vs_inmemory": statistics.median(resident["step_s"][1:]),
    }
    ratio = {
        "disk_vs_raw": disk["ratio"],
        "step_vs_inmemory": medians["host"] / medians["device"],
        "state_over_rss": capacity["state_bytes"] / peers["state_over_rss"],
        "sharded_state_fraction": sharded["state_fraction"],
        "all_disk_vs_inmemory": statistics.median(capacity["step_s"][1:])
        / peers["all_disk_vs_inmemory"],
    }
    if DEEPSPEED in medians:
        peers["sharded_vs_deepspeed"] = medians[DEEPSPEED]
        ratio["sharded_vs_deepspeed"] = medians[SHARDED] / medians[DEEPSPEED]
    attainment = {key: attained(key, ratio[key]) for key in TARGETS}
    config = {
        "targets": {key: f"{op} {target}" for key, (op, target) in TARGETS.items()},
        "meets_target": {key: value >= 1 for key, value in attainment.items()},
        "no_target": {key: note for key, note in NO_TARGET.items() if key in ratio},
        "peer_values": {
            "disk_vs_raw": "raw sequential write + read, bytes/s (measure_raw_throughput), "
            "median of the rounds; the ratio is the median of the rounds' tier / raw",
            "step_vs_inmemory": "median step s, offload.optimizer='device' (all resident)",
            "state_over_rss": "peak RSS bytes (VmHWM) of the capacity process",
            "all_disk_vs_inmemory": "median step s (after the first) of the capacity model "
            "without offload; the ratio is the capacity run's over it",
            "sharded_state_fraction": f"model-state bytes of {SHARDED}'s engine in one process; "
            "the ratio is the most any rank of the job holds over it",
            "sharded_vs_deepspeed": f"median step s of {DEEPSPEED} in the same job; the ratio "
            f"is {SHARDED}'s over it",
        },
        "disk": {**disk, "settings": asdict(plan.disk), "page_cache": PAGE_CACHE_NOTE},
        "steps": steps_config(steps),
        "sharded": sharded,
        "capacity": capacity_summary(capacity),
        "in_memory": resident,
        "cpu": cpu_model(),
        "torch": torch.__version__.split("+")[0],
    }
    return BenchResult(
        metric="worst_target_attainment",
        ours=min(attainment.values()),
        peers=peers,
        config=config,
        ratio=ratio,
    )


PAGE_CACHE_NOTE = (
    "files of this size stay in the page cache: both sides run at memory speed and the ratio "
    "is the tier's own overhead; 'fsync' makes writes wait for the device (reads stay cached)"
)


def attained(key: str, ratio: float) -> float:
    """How far `ratio` reaches its target: >= 1 when the target is met."""
    op, target = TARGETS[key]
    return ratio / target if op == ">=" else target / ratio


def steps_config(steps: dict[str, Any]) -> dict[str, Any]:
    """The step-time job's config, with every contender's median and its ratio to resident."""
    medians = steps["median_s"]
    last = steps["config"]["last_loss"]
    return {
        **steps["config"],
        "last_loss_max_abs_diff": max(last.values()) - min(last.values()),
        "median_s": medians,
        "vs_device": {name: value / medians["device"] for name, value in medians.items()},
        "memory_report": steps["memory_report"],
    }


def sharded_summary(steps: dict[str, Any], single: dict[str, Any]) -> dict[str, Any]:
    """The sharded contender: its median step time (and DeepSpeed's, when it ran), every
    rank's model-state bytes and their fraction of the one-process figure."""
    medians, job = steps["median_s"], steps["sharded"]
    reference = single["state_bytes_per_rank"][0]
    per_rank = job["state_bytes_per_rank"]
    return {
        **job,
        "median_s": medians[SHARDED],
        "deepspeed_median_s": medians.get(DEEPSPEED),
        "state_fraction": max(per_rank) / reference,
        "state_fraction_per_rank": [value / reference for value in per_rank],
        "state_sum_over_single": sum(per_rank) / reference,
        "single_process_state_bytes": reference,
        "single_process": single,
        "state_counted": "parameter chunks on every tier (between steps: the homes), "
        "master weights, Adam states (memory_report)",
    }


def capacity_summary(capacity: dict[str, Any]) -> dict[str, Any]:
    """The capacity record plus what was offloaded and what stayed in memory."""
    grad_chunks = "grad_chunks_disk" in capacity["memory_report"]
    if capacity["param_offload"] and grad_chunks:
        offloaded = (
            "fp32 parameters (4Ψ) and gradients (4Ψ) in chunks (offload.policy), Adam m, v (8Ψ): "
            "on disk between uses"
        )
        resident = "the computing module's parameter and gradient chunks, activations, IO buffers"
    elif capacity["param_offload"]:
        offloaded = "fp32 parameters (4Ψ, chunks, offload.policy) and Adam m, v (8Ψ) on disk"
        resident = "gradients (4Ψ, param.grad), the computing module's chunks, activations"
    else:
        offloaded = "Adam m, v (8Ψ) on disk (offload.optimizer='disk')"
        resident = "fp32 parameters (4Ψ) and gradients (4Ψ), activations, streamed Adam chunks"
    return {
        **capacity,
        "state_over_rss": capacity["state_bytes"] / capacity["peak_rss_bytes"],
        "offloaded": offloaded,
        "in_memory": resident,
    }


def cpu_model() -> str:
    """The CPU's model name (as ``lscpu`` prints it), and its core count."""
    name = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


# --------------------------------------------------------------------------- the worker


def measure(job: Job, rank: int, local_rank: int, world_size: int) -> dict[str, Any]:
    """The launched job's measurement, by kind."""
    if job.kind == "steps":
        return measure_steps(StepSettings(**job.settings), rank, local_rank, world_size)
    if job.kind == "capacity":
        return measure_capacity(CapacitySettings(**job.settings), rank)
    if job.kind == "single":
        return measure_single(StepSettings(**job.settings))
    raise ValueError(f"unknown offload benchmark job {job.kind!r}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank (``python -m benchmarks.offload``)."""
    worker_main("benchmarks.offload", Job, measure, argv)


if __name__ == "__main__":
    main()
