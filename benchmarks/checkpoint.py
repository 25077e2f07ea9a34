"""Benchmark ``checkpoint``: our save and load against raw sequential file IO of the same
bytes and against torch.distributed.checkpoint (DCP), and the memory of a consolidation.

One process trains a GPT one step in fp32 (Adam states exist), then:

* **save**: ``save_checkpoint`` (fragments with CRC-32s, fsync, atomic rename) against one
  file holding the same tensors' bytes written sequentially and fsynced; ratio
  ``save_vs_raw`` = raw seconds / our seconds (our throughput relative to raw, 1 = as fast).
* **load**: ``load_checkpoint`` into a fresh engine against reading that file back into
  preallocated tensors; both start cold (the files' pages dropped from the page cache with
  ``posix_fadvise(DONTNEED)`` after their fsync). Ratio ``load_vs_raw`` as for save.
* **DCP**: ``dcp.save`` / ``dcp.load`` of the model's and optimizer's state dicts, cold as
  above; ratios ``save_vs_dcp`` and ``load_vs_dcp`` = DCP seconds / ours (above 1: we are
  faster). Reported, no target.
* **asynchronous save** (``checkpoint.async_save``): how long ``save_checkpoint`` holds the
  training thread when a background thread writes (the copy into host memory), over a
  synchronous save: ``async_blocking_vs_save`` (lower is better; reported, no target).
* **consolidation memory**: ``shardwise convert --to safetensors`` in a subprocess; its peak
  resident memory above what it held before the conversion (VmHWM reset through
  ``/proc/self/clear_refs``), over the largest tensor's bytes: ``convert_mem_vs_largest``;
  the same for ``--to single`` (the one-process checkpoint): ``single_mem_vs_largest``.

Targets (the issue): ``save_vs_raw`` and ``load_vs_raw`` >= 0.6, ``convert_mem_vs_largest``
and ``single_mem_vs_largest`` <= 4. ``ours`` is the smaller of the two throughput ratios.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from shardwise.bench import BenchResult, repo_root
from shardwise.checkpoint import AsyncSaver, load_checkpoint, save_checkpoint
from shardwise.checkpoint.shards import raw_bytes
from shardwise.config import Config
from shardwise.engine import initialize
from shardwise.models.gpt import build_gpt


@dataclass(frozen=True)
class Settings:
    n_layers: int
    d_model: int
    n_heads: int
    seq_len: int = 32


QUICK = Settings(n_layers=2, d_model=1024, n_heads=8)
FULL = Settings(n_layers=4, d_model=2048, n_heads=16)


def progress(line: str) -> None:
    print(f"[checkpoint] {line}", file=sys.stderr, flush=True)


def build_engine(settings: Settings):
    """A GPT after one fp32 training step (so the Adam states exist)."""
    cfg = Config().replace(
        model={k: v for k, v in asdict(settings).items() if k != "seq_len"},
        data={"seq_len": settings.seq_len},
        precision={"dtype": "fp32"},
        train={"micro_batch": 1},
    )
    engine = initialize(build_gpt(cfg.model, settings.seq_len), None, cfg)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (1, settings.seq_len + 1), generator=generator)
    engine.train_step((tokens[:, :-1], tokens[:, 1:]))
    return engine


def state_tensors(engine) -> list[torch.Tensor]:
    """What a checkpoint of `engine` holds: master weights and Adam states."""
    masters = [piece.tensor.detach() for piece in engine.store.owned()]
    states = [t for s in engine.optimizer.state.values() for t in s.values() if t.dim() > 0]
    return masters + states


def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages from the page cache (they were fsynced: clean pages)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_save(tensors: list[torch.Tensor], path: Path) -> None:
    with open(path, "wb") as file:
        for tensor in tensors:
            file.write(raw_bytes(tensor.contiguous()))
        file.flush()
        os.fsync(file.fileno())


def raw_load(tensors: list[torch.Tensor], path: Path) -> None:
    with open(path, "rb", buffering=0) as file:
        for tensor in tensors:
            file.readinto(raw_bytes(tensor))


def measure(settings: Settings, root: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    engine = build_engine(settings)
    layout = engine.plan.layout()
    tensors = state_tensors(engine)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    largest = max(t.numel() * t.element_size() for t in tensors)
    progress(f"state: {nbytes / 2**20:.0f} MiB in {len(tensors)} tensors")
    # [Note: first writes] On a thin-provisioned virtual disk the first write of a block is
    # several times slower than a rewrite (measured here: 2.3 GB fsynced in 7.7 s on fresh
    # blocks, 1.2 s on reused ones), which made whoever wrote first look slow. Every writer
    # below gets blocks that were written before: twice the state, written and removed.
    for index in range(2):
        raw_save(tensors, root / f"warm{index}.bin")
    for index in range(2):
        (root / f"warm{index}.bin").unlink()
    ours = root / "ours"
    seconds = {"save": timed(lambda: save_checkpoint(ours, 1, engine, {"data": {}}, 1, layout))}
    saver = AsyncSaver()
    background = root / "async"
    args = (background, 1, engine, {"data": {}}, 1, layout, saver)
    seconds["async_blocking"] = timed(lambda: save_checkpoint(*args))
    seconds["async_written"] = seconds["async_blocking"] + timed(saver.wait)
    shutil.rmtree(background)
    raw = root / "raw.bin"
    seconds["raw_save"] = timed(lambda: raw_save(tensors, raw))
    dcp_dir = root / "dcp"
    dcp_state = {"model": engine.model.state_dict(), "optim": engine.optimizer.state_dict()}
    seconds["dcp_save"] = timed(lambda: dcp.save(dcp_state, checkpoint_id=dcp_dir))
    written = {name: files_under(root / name) for name in ("ours", "dcp")}
    drop_cache([*written["ours"], raw, *written["dcp"]])

    fresh = build_engine(settings)
    seconds["load"] = timed(lambda: load_checkpoint(ours, fresh, layout))
    targets = [torch.empty_like(t) for t in tensors]
    seconds["raw_load"] = timed(lambda: raw_load(targets, raw))
    other = build_engine(settings)
    into = {"model": other.model.state_dict(), "optim": other.optimizer.state_dict()}
    seconds["dcp_load"] = timed(lambda: dcp.load(into, checkpoint_id=dcp_dir))
    for name, seconds_taken in seconds.items():
        progress(f"{name}: {seconds_taken:.3f} s")
    peak = convert_peak(ours, root / "model.safetensors", "safetensors")
    single_peak = convert_peak(ours, root / "single", "single")
    progress(
        f"convert: peak {peak / 2**20:.1f} MiB above its start ({single_peak / 2**20:.1f} MiB "
        f"to one process's checkpoint), largest tensor {largest / 2**20:.1f} MiB"
    )
    return {
        "seconds": seconds,
        "state_bytes": nbytes,
        "checkpoint_bytes": sum(p.stat().st_size for p in written["ours"]),
        "dcp_bytes": sum(p.stat().st_size for p in written["dcp"]),
        "largest_tensor_bytes": largest,
        "convert_peak_bytes": peak,
        "single_peak_bytes": single_peak,
    }


def convert_peak(source: Path, dest: Path, to: str) -> int:
    """Peak resident bytes of ``convert --to to`` above the process's own, in a fresh
    process."""
    env = {**os.environ, "PYTHONPATH": str(repo_root())}
    module = [sys.executable, "-m", "benchmarks.checkpoint"]
    args = [*module, "convert-peak", str(source), str(dest), to]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.splitlines()[-1])["peak_bytes"])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _convert_peak_main(source: str, dest: str, to: str) -> None:
    from shardwise.checkpoint import convert as convert_module  # imported before the baseline

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    convert_module.convert(Path(source), Path(dest), to, None)
    print(json.dumps({"peak_bytes": (_status_kib("VmHWM") - before) * 1024}))


def summarise(settings: Settings, record: dict[str, Any]) -> BenchResult:
    s = record["seconds"]
    ratio = {
        "save_vs_raw": s["raw_save"] / s["save"],
        "load_vs_raw": s["raw_load"] / s["load"],
        "convert_mem_vs_largest": record["convert_peak_bytes"] / record["largest_tensor_bytes"],
        "single_mem_vs_largest": record["single_peak_bytes"] / record["largest_tensor_bytes"],
        "save_vs_dcp": s["dcp_save"] / s["save"],
        "load_vs_dcp": s["dcp_load"] / s["load"],
        "async_blocking_vs_save": s["async_blocking"] / s["save"],
    }
    peers = {
        "save_vs_raw": s["raw_save"],
        "load_vs_raw": s["raw_load"],
        "convert_mem_vs_largest": record["largest_tensor_bytes"],
        "single_mem_vs_largest": record["largest_tensor_bytes"],
        "save_vs_dcp": s["dcp_save"],
        "load_vs_dcp": s["dcp_load"],
        "async_blocking_vs_save": s["save"],
    }
    return BenchResult(
        metric="checkpoint throughput vs raw IO and DCP (seconds), consolidation memory",
        ours=min(ratio["save_vs_raw"], ratio["load_vs_raw"]),
        peers=peers,
        config={"model": asdict(settings), "precision": "fp32", "ranks": 1, **record},
        ratio=ratio,
    )


def run(quick: bool) -> BenchResult:
    settings = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="shardwise-bench-checkpoint-") as root:
        progress(f"GPT {asdict(settings)} under {root}")
        record = measure(settings, Path(root))
    return summarise(settings, record)


if __name__ == "__main__":
    if sys.argv[1:2] == ["convert-peak"]:
        _convert_peak_main(*sys.argv[2:5])
