"""Atomic checkpoint directories.

Layout of ``<root>/step_00000100/``: ``engine.pt`` (written by rank 0 when every rank holds
the same state) or ``engine_rank<R>.pt`` (one per rank when optimizer state is sharded),
``rank<R>.pt`` (per-rank RNG state), ``trainer.json`` (step, data position) and
``manifest.json`` (written last). Everything is written into ``.step_00000100.tmp/`` and
renamed once complete, and ``<root>/latest`` names the newest finished checkpoint, so a
crash during a save leaves the previous checkpoint intact and never a half one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shardwise.errors import CheckpointError

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


def _engine_file(replicated: bool, rank: int) -> str:
    return "engine.pt" if replicated else f"engine_rank{rank}.pt"


def save_checkpoint(
    root: Path,
    step: int,
    engine_state: dict,
    trainer_state: dict,
    keep: int,
    replicated: bool,
    layout: dict | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the finished checkpoint directory.

    `replicated`: every rank's `engine_state` is the same (rank 0 writes it alone).
    `layout`: what decides the shapes of per-rank state (parallel degrees, ZeRO stage); a
    resume must match it (`check_resumable`)."""
    rank, world = _rank_and_world()
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if rank == 0 or not replicated:
        torch.save(engine_state, tmp / _engine_file(replicated, rank))
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state))
    torch.save(_rng_state(), tmp / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        manifest = {
            "step": step,
            "world_size": world,
            "replicated": replicated,
            "layout": layout or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep)
    _barrier()
    return final


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


def check_resumable(path: Path, world_size: int, layout: dict | None = None) -> dict:
    """The manifest of the checkpoint at `path`, after checking that a run of `world_size`
    ranks with `layout` can load it (before any process starts, and again on load)."""
    ckpt = find_checkpoint(path)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    later = "resharding to another layout comes with the checkpoint-resharding feature"
    if manifest["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} was saved by {manifest['world_size']} ranks, this run has "
            f"{world_size}; resume with --nproc {manifest['world_size']} ({later})"
        )
    saved = manifest.get("layout") or {}
    if layout and saved and not manifest["replicated"]:
        changed = [f"{k}={saved.get(k)} (now {v})" for k, v in layout.items() if saved.get(k) != v]
        if changed:
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r} holds per-rank shards of another layout: "
                f"{', '.join(changed)}; resume with the saved settings ({later})"
            )
    return manifest


def load_checkpoint(
    path: Path, device: torch.device, layout: dict | None = None
) -> tuple[dict, dict]:
    """Engine state and trainer state; restores this rank's RNG state when it was saved."""
    ckpt = find_checkpoint(path)
    rank, world = _rank_and_world()
    manifest = check_resumable(ckpt, world, layout)
    engine_file = ckpt / _engine_file(manifest["replicated"], rank)
    engine_state = torch.load(engine_file, map_location=device, weights_only=False)
    trainer_state = json.loads((ckpt / "trainer.json").read_text())
    rng = torch.load(ckpt / f"rank{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return engine_state, trainer_state
