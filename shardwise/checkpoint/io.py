"""Atomic checkpoint directories that any layout can resume from.

Layout of ``<root>/step_00000100/``: ``shards_rank<R>.pt`` (each rank's fragments of the
named full tensors, [Note: layout-free checkpoints] in shards.py), ``engine.pt`` (the step,
LR schedule and loss scale, written by rank 0), ``rank<R>.pt`` (per-rank RNG state),
``trainer.json`` (step, data position) and ``manifest.json`` (written last). Everything is
written into ``.step_00000100.tmp/`` and renamed once complete, and ``<root>/latest`` names
the newest finished checkpoint, so a crash during a save leaves the previous checkpoint
intact and never a half one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from shardwise.checkpoint.shards import ShardReader, load_rank_shards, rank_shards
from shardwise.errors import CheckpointError

if TYPE_CHECKING:
    from shardwise.engine import Engine

MANIFEST = "manifest.json"
LATEST = "latest"


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _shards_file(rank: int) -> str:
    return f"shards_rank{rank}.pt"


def save_checkpoint(
    root: Path, step: int, engine: Engine, trainer_state: dict, keep: int, layout: dict
) -> Path:
    """Collective: every rank calls it. Returns the finished checkpoint directory.

    `layout`: the run's parallel layout (`RunPlan.layout`); any layout can load the
    checkpoint, except where per-rank state (1-bit Adam's error buffers) ties it to this one
    (`check_resumable`)."""
    rank, world = _rank_and_world()
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    shards = rank_shards(engine)
    torch.save(shards, tmp / _shards_file(rank))
    if rank == 0:
        torch.save(engine.state_dict(), tmp / "engine.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state))
    torch.save(_rng_state(), tmp / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        manifest = {
            "step": step,
            "world_size": world,
            "layout": layout,
            "rank_state": shards["rank_state"] is not None,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep)
    _barrier()
    return final


def _per_group(scheduler: dict, groups: int) -> dict:
    """The LR scheduler's state for `groups` param groups: layouts group pieces differently
    (chunks split groups per chunk), all with the one learning rate of the config."""
    per_group = {k: v for k, v in scheduler.items() if isinstance(v, list)}
    if any(len(set(v)) > 1 for v in per_group.values()):
        raise CheckpointError("the checkpoint's param groups have different learning rates")
    return {**scheduler, **{k: v[:1] * groups for k, v in per_group.items()}}


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep: int) -> None:
    finished = sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file())
    for old in finished[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: Path) -> Path:
    """Resolve a run directory, a checkpoints directory or a step directory to a finished
    checkpoint directory."""
    for candidate in (path, path / "checkpoints"):
        if (candidate / MANIFEST).is_file():
            return candidate
        latest = candidate / LATEST
        if latest.is_file():
            step_dir = candidate / latest.read_text().strip()
            if (step_dir / MANIFEST).is_file():
                return step_dir
    raise CheckpointError(f"no finished checkpoint under {str(path)!r} (looked for {MANIFEST})")


def check_resumable(
    path: Path, world_size: int, layout: dict, global_batch: int | None = None
) -> dict:
    """The manifest of the checkpoint at `path`, after checking that a run of `world_size`
    ranks with `layout` (and `global_batch` samples per step, when given) can load it (before
    any process starts, and again on load)."""
    ckpt = find_checkpoint(path)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    trained = json.loads((ckpt / "trainer.json").read_text())["data"].get("global_batch")
    if global_batch is not None and trained not in (None, global_batch):
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} was trained with {trained} samples per step, this run "
            f"takes {global_batch}; set train.global_batch={trained} (and a train.micro_batch "
            "that divides it over the data-parallel ranks) to continue its data order"
        )
    saved = manifest["layout"]
    if saved["optimizer"] != layout["optimizer"]:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} was saved with optim.name={saved['optimizer']!r}, this "
            f"run has {layout['optimizer']!r}; resume with the optimizer it was saved with"
        )
    if manifest["rank_state"] and (manifest["world_size"] != world_size or saved != layout):
        changed = [f"{k}={saved.get(k)} (now {v})" for k, v in layout.items() if saved.get(k) != v]
        if manifest["world_size"] != world_size:
            changed.insert(0, f"{manifest['world_size']} ranks (now {world_size})")
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} holds per-rank state (1-bit Adam's error buffers) that "
            f"only its own layout can load: {', '.join(changed)}; resume with the saved layout"
        )
    return manifest


def load_checkpoint(path: Path, engine: Engine, layout: dict) -> dict:
    """Load `engine`'s state from the checkpoint at `path`, whatever layout saved it; restore
    this rank's RNG state where the saving run had this rank. Returns the trainer state."""
    ckpt = find_checkpoint(path)
    rank, world = _rank_and_world()
    manifest = check_resumable(ckpt, world, layout)
    files = [ckpt / _shards_file(r) for r in range(manifest["world_size"])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint file {missing[0]!r} is missing")
    own = None
    if manifest["rank_state"]:
        own = torch.load(files[rank], map_location="cpu", weights_only=True)["rank_state"]
    shared = torch.load(ckpt / "engine.pt", weights_only=True)
    if shared["scheduler"] is not None:
        shared["scheduler"] = _per_group(shared["scheduler"], len(engine.optimizer.param_groups))
    engine.load_state_dict(shared)
    load_rank_shards(engine, ShardReader(files), own)
    rng_file = ckpt / f"rank{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((ckpt / "trainer.json").read_text())
