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

import copy
import json
import os
import shutil
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from shardwise.checkpoint.shards import (
    FragmentWriter,
    ShardReader,
    durable,
    fit_problems,
    load_rank_shards,
    read_torch,
    saved_shapes,
    snapshot_rank_shards,
    write_rank_shards,
    write_states,
)
from shardwise.errors import CheckpointError, ShardwiseError

if TYPE_CHECKING:
    from shardwise.engine import Engine

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = 2
"""The manifest's ``format``: 2 = layout-free fragments (shards.py); before it, per-rank
engine files (no ``format`` key)."""


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group)


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def shard_files(checkpoint: Path, world: int) -> tuple[list[Path], list[Path]]:
    """Every rank's fragment file and optimizer-scalars file in `checkpoint`."""
    return (
        [checkpoint / f"shards_rank{r}.bin" for r in range(world)],
        [checkpoint / f"states_rank{r}.pt" for r in range(world)],
    )


def save_checkpoint(
    root: Path,
    step: int,
    engine: Engine,
    trainer_state: dict,
    keep: int,
    layout: dict,
    saver: AsyncSaver | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory: finished, or with
    a `saver`, being written in the background ([Note: asynchronous saves]; `saver.wait()`).

    `layout`: the run's parallel layout (`RunPlan.layout`); any layout can load the
    checkpoint, except where per-rank state (1-bit Adam's error buffers) ties it to this one
    (`check_resumable`)."""
    rank, world = _rank_and_world()
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if saver is not None:
        saver.wait()  # one save in flight at a time
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.store.sync_update(engine.optimizer)  # an update running in the background first
    snapshot = saver is not None  # training goes on: copy what it may change
    write_shards = (
        snapshot_rank_shards(engine).write if snapshot else partial(write_rank_shards, engine)
    )
    saved = _SavedState(
        shards=write_shards,
        engine=copy.deepcopy(engine.state_dict()) if snapshot else engine.state_dict(),
        trainer=copy.deepcopy(trainer_state),
        rng=_rng_state(),
        manifest={"format": FORMAT, "step": step, "world_size": world, "layout": layout},
    )
    if saver is None:
        _write_and_commit(saved, tmp, final, keep, group=None)
    else:
        saver.start(partial(_write_and_commit, saved, tmp, final, keep))
    return final


def consolidate(source: Path, root: Path) -> Path:
    """The checkpoint at `source`, as one process would have saved it, into the checkpoints
    directory `root`: every tensor whole in one fragment file, assembled and written one at a
    time (so never more than the largest tensor in memory), with the step, schedules, data
    position and rank 0's RNG state; committed as a save is. Returns the new checkpoint."""
    from shardwise.config import ParallelConfig
    from shardwise.distributed.dims import ParallelDims

    ckpt = find_checkpoint(source)
    manifest = read_json(ckpt / MANIFEST)
    if manifest["rank_state"]:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} holds per-rank state (1-bit Adam's error buffers) that "
            "only its own layout can load; it cannot be consolidated"
        )
    fragments, states = _checked_files(ckpt, manifest["world_size"])

    def write_whole(into: Path, scalars: Path) -> bool:
        writer = FragmentWriter(into)
        with ShardReader(fragments, states) as reader:
            for kind, name in reader.keys():  # no reference kept: one whole tensor at a time
                shape, _ = reader.shape_and_dtype(kind, name)
                whole = torch.tensor([[0, shape.numel()]])
                writer.add(kind, name, shape, whole, reader.full(kind, name))
            reader.verify()
            params = reader.params
        writer.close()
        return write_states(scalars, params, rank_state=None)

    single = vars(ParallelDims.from_config(ParallelConfig(), 1))
    layout = {"optimizer": manifest["layout"]["optimizer"]}
    layout.update(single, zero_stage=0, chunks=None, pipeline=None)
    step = manifest["step"]
    saved = _SavedState(
        shards=write_whole,
        engine=read_torch(ckpt / "engine.pt"),
        trainer=read_json(ckpt / "trainer.json"),
        rng=read_torch(ckpt / "rank0.pt"),
        manifest={"format": FORMAT, "step": step, "world_size": 1, "layout": layout},
    )
    tmp, final = root / f".step_{step:08d}.tmp", root / f"step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keep = 1 + sum(1 for p in root.glob("step_*") if (p / MANIFEST).is_file())  # prunes none
    _write_and_commit(saved, tmp, final, keep=keep, group=None)
    return final


@dataclass
class _SavedState:
    """Everything one rank writes into a checkpoint, taken at the step of the save."""

    shards: Callable[[Path, Path], bool]
    """Writes this rank's fragments and scalars (from the training state, or a snapshot)."""
    engine: dict
    trainer: dict
    rng: dict
    manifest: dict


def _write_and_commit(saved: _SavedState, tmp: Path, final: Path, keep: int, group) -> None:
    """Write this rank's files; once every rank has, rank 0 writes the manifest and commits.
    `group`: the process group of the barriers (None: the default one)."""
    rank, world = _rank_and_world()
    fragments, states = shard_files(tmp, world)
    rank_state = saved.shards(fragments[rank], states[rank])
    mine = [states[rank], tmp / f"rank{rank}.pt"]
    if rank == 0:
        durable(tmp / "engine.pt", lambda f: torch.save(saved.engine, f))
        durable(tmp / "trainer.json", lambda f: f.write(json.dumps(saved.trainer).encode()))
        mine += [tmp / "engine.pt", tmp / "trainer.json"]
    durable(tmp / f"rank{rank}.pt", lambda f: torch.save(saved.rng, f))
    sums = json.dumps({path.name: _crc32(path) for path in mine}).encode()
    durable(tmp / f"checksums_rank{rank}.json", lambda f: f.write(sums))
    _barrier(group)
    if rank == 0:
        manifest = {**saved.manifest, "rank_state": rank_state}
        durable(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest).encode()))
        _commit(tmp, final)
        _prune(root=final.parent, keep=keep)
    _barrier(group)


class AsyncSaver:
    """Writes checkpoints on a background thread ([Note: asynchronous saves]).

    [Note: asynchronous saves] With ``checkpoint.async_save`` a save copies this rank's state
    into host memory (one more copy of it, held until written) and returns; a thread writes
    the files while training goes on, and the barriers before the manifest and after the
    commit run over a process group of their own (gloo, made at the first save), so they
    never interleave with the training collectives. The next save, and the end of the run,
    wait for the one in flight; a failure in the thread is raised there. A crash while the
    thread writes leaves the temporary directory, never a half checkpoint (`_commit`).
    """

    def __init__(self, timeout_s: float = 300.0) -> None:
        """`timeout_s`: how long the thread's barriers wait for the other ranks."""
        self.timeout_s = timeout_s
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._group = None

    def start(self, job) -> None:
        """Run ``job(group)`` on a new thread (after `wait`)."""
        if self._group is None and dist.is_initialized():
            timeout = timedelta(seconds=self.timeout_s)  # collective: every rank saves
            self._group = dist.new_group(backend="gloo", timeout=timeout)
        self._thread = threading.Thread(target=self._run, args=(job,), name="async-save")
        self._thread.daemon = True  # a crashed run leaves a .tmp directory, nothing more
        self._thread.start()

    def _run(self, job) -> None:
        try:
            job(self._group)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread
            self._error = err

    def wait(self) -> None:
        """Block until the save in flight is committed; raise what it failed with."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if isinstance(error, ShardwiseError):
            raise error
        if error is not None:
            raise CheckpointError(f"background checkpoint save failed: {error!r}") from error


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    """Make the complete directory `tmp` the checkpoint `final` and point `latest` at it.
    A checkpoint of the same step already there is moved aside first and removed last, so at
    every moment `find_checkpoint` finds a complete checkpoint (the newest one whose manifest
    exists, if `latest` names a directory not there)."""
    root = final.parent
    _fsync_dir(tmp)
    aside = root / f".{final.name}.old"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    latest = root / f".{LATEST}.tmp"
    durable(latest, lambda f: f.write((final.name + "\n").encode()))
    os.replace(latest, root / LATEST)
    _fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)


def _per_group(scheduler: dict, groups: int) -> dict:
    """The LR scheduler's state for `groups` param groups: layouts group pieces differently
    (chunks split groups per chunk), all with the one learning rate of the config."""
    per_group = {k: v for k, v in scheduler.items() if isinstance(v, list)}
    if any(len(set(v)) > 1 for v in per_group.values()):
        raise CheckpointError("the checkpoint's param groups have different learning rates")
    return {**scheduler, **{k: v[:1] * groups for k, v in per_group.items()}}


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove what crashed saves left behind."""
    finished = sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file())
    for old in finished[:-keep] + sorted(root.glob(".step_*.tmp")):
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: Path) -> Path:
    """Resolve a run directory, a checkpoints directory or a step directory to a finished
    checkpoint directory (`latest`, or the newest complete one if `latest` names none)."""
    for candidate in (path, path / "checkpoints"):
        if (candidate / MANIFEST).is_file():
            return candidate
        latest = candidate / LATEST
        if latest.is_file():
            step_dir = candidate / latest.read_text().strip()
            if (step_dir / MANIFEST).is_file():
                return step_dir
        finished = sorted(p for p in candidate.glob("step_*") if (p / MANIFEST).is_file())
        if finished:
            return finished[-1]
    raise CheckpointError(f"no finished checkpoint under {str(path)!r} (looked for {MANIFEST})")


def intact_checkpoint(path: Path) -> tuple[Path, list[str]]:
    """The checkpoint to resume from, read whole and verified (`verify_checkpoint`): the one
    `path` names if it is a step directory (damage raises), else the newest intact one under
    the run, `latest` first; with why each newer one was passed over."""
    if (path / MANIFEST).is_file():
        verify_checkpoint(path)
        return path, []
    newest = find_checkpoint(path)
    older = sorted(
        (p for p in newest.parent.glob("step_*") if (p / MANIFEST).is_file()), reverse=True
    )
    skipped = []
    for candidate in [newest, *(p for p in older if p != newest)]:
        try:
            verify_checkpoint(candidate)
        except CheckpointError as err:
            skipped.append(f"{candidate.name} is damaged ({err})")
            continue
        return candidate, skipped
    raise CheckpointError(f"no intact checkpoint under {str(path)!r}: {'; '.join(skipped)}")


def verify_checkpoint(ckpt: Path) -> None:
    """Read every file of the checkpoint at `ckpt` and check every CRC-32 (the small files'
    and every fragment's): a missing, truncated or damaged file raises one `CheckpointError`
    naming it."""
    fragments, states = _checked_files(ckpt, read_json(ckpt / MANIFEST)["world_size"])
    for path in [*states, *ckpt.glob("rank*.pt"), ckpt / "engine.pt"]:
        read_torch(path)
    read_json(ckpt / "trainer.json")
    with ShardReader(fragments, states) as reader:
        for kind, name in reader.keys():
            reader.full(kind, name)
        reader.verify()


def _checked_files(ckpt: Path, world: int) -> tuple[list[Path], list[Path]]:
    """Every rank's fragment and scalar files (`shard_files`), present, and the small files
    (engine, trainer, each rank's scalars and RNG state) matching the CRC-32s their ranks
    recorded (``checksums_rank<r>.json``; checkpoints written before those existed have
    none to check)."""
    fragments, states = shard_files(ckpt, world)
    recorded = {}
    for rank in range(world):
        sums = ckpt / f"checksums_rank{rank}.json"
        if sums.is_file():
            recorded.update(read_json(sums))
    missing = [f for f in [*fragments, *states, *map(ckpt.joinpath, recorded)] if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint file {str(missing[0])!r} is missing")
    for name, crc in recorded.items():
        if _crc32(ckpt / name) != crc:
            raise CheckpointError(
                f"checkpoint file {str(ckpt / name)!r} is damaged (its checksum does not match)"
            )
    return fragments, states


def _crc32(path: Path) -> int:
    return zlib.crc32(path.read_bytes())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} is unreadable: {exc}") from None


def check_resumable(
    path: Path, world_size: int, layout: dict, global_batch: int | None = None
) -> dict:
    """The manifest of the checkpoint at `path`, after checking that a run of `world_size`
    ranks with `layout` (and `global_batch` samples per step, when given) can load it (before
    any process starts, and again on load)."""
    ckpt = find_checkpoint(path)
    manifest = read_json(ckpt / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} has format {manifest.get('format', 1)}, this shardwise "
            f"reads format {FORMAT} (layout-free fragments); it was written by an older version"
        )
    if global_batch is not None:  # the trainer's state; a script's may hold no data state
        trained = read_json(ckpt / "trainer.json").get("data", {}).get("global_batch")
        if trained not in (None, global_batch):
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r} was trained with {trained} samples per step, this "
                f"run takes {global_batch}; set train.global_batch={trained} (and a "
                "train.micro_batch that divides it over the data-parallel ranks) to continue "
                "its data order"
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


def check_model_fits(path: Path, model: nn.Module) -> None:
    """Before launch: the checkpoint at `path` holds every parameter and buffer of `model`
    (a meta-device build is enough) in its full shape, and nothing else."""
    ckpt = find_checkpoint(path)
    fragments, _ = shard_files(ckpt, read_json(ckpt / MANIFEST)["world_size"])
    problems = fit_problems(saved_shapes(fragments), model)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} does not fit this model: it holds {problems[0]}{more}; "
            "resume with the model settings it was saved with"
        )


def load_checkpoint(path: Path, engine: Engine, layout: dict) -> dict:
    """Load `engine`'s state from the checkpoint at `path`, whatever layout saved it; restore
    this rank's RNG state where the saving run had this rank. Returns the trainer state."""
    ckpt = find_checkpoint(path)
    rank, world = _rank_and_world()
    manifest = check_resumable(ckpt, world, layout)
    fragments, states = _checked_files(ckpt, manifest["world_size"])
    own = read_torch(states[rank])["rank_state"] if manifest["rank_state"] else None
    shared = read_torch(ckpt / "engine.pt")
    if shared["scheduler"] is not None:
        shared["scheduler"] = _per_group(shared["scheduler"], len(engine.optimizer.param_groups))
    engine.store.sync_update(engine.optimizer)  # nothing may write over what is loaded
    engine.load_state_dict(shared)
    with ShardReader(fragments, states) as reader:
        load_rank_shards(engine, reader, own)
    rng_file = ckpt / f"rank{rank}.pt"
    if rng_file.is_file():
        rng = read_torch(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return read_json(ckpt / "trainer.json")
