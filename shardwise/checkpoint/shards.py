"""An engine's state as fragments of named full tensors: saved by any layout, loaded by any.

[Note: layout-free checkpoints] Every tensor of the training state is saved as *fragments*:
a kind (``model`` for buffers and frozen parameters, ``master`` for what the optimizer
updates, ``optim.<key>`` for an optimizer state such as ``optim.exp_avg``), the parameter's
name in the unsplit model, its full shape, and the positions its values take in the full
tensor flattened, as runs ``(start, length)``. A rank writes what it owns and is the first
holder of: its optimizer's pieces (ZeRO slices or chunk shards) at the first data-parallel
replica, the rest of the model's state at data-parallel rank 0; tensor-parallel shards find
their positions through the plan that cut them (`TensorParallel.global_index`), pipeline
stages hold disjoint names. Loading reverses it for the loading layout: each rank assembles,
one full tensor at a time, the tensors its own pieces are slices of (`ShardReader`), so no
rank ever holds more than the largest tensor beyond its own state. The model's parameters
are written from the master pieces, as after a step (in fp32 they are the same tensor, in
bf16/fp16 their rounding), so a resume in any layout continues from the same numbers.

What is per-rank and not a slice of any tensor (1-bit Adam's error buffers) is saved as the
rank's own state and loaded only into the layout that saved it (`check_resumable`). Scalar
optimizer state (Adam's step) and the param group settings are saved per parameter name,
since the loading layout may group pieces differently (chunks split groups per chunk).
"""

from __future__ import annotations

import copy
import ctypes
import functools
import io
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shardwise.distributed import comm
from shardwise.errors import CheckpointError
from shardwise.tensor_parallel import TensorParallel
from shardwise.zero.offload.adam import OffloadedAdamW

if TYPE_CHECKING:
    from shardwise.engine import Engine
    from shardwise.zero.store import OwnedPiece

MASTER = "master"
MODEL = "model"
OPTIM = "optim."


def index_runs(index: torch.Tensor) -> torch.Tensor:
    """Runs of consecutive positions in the 1-D int64 `index`: rows ``(start, length)``."""
    if index.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.int64)
    cuts = torch.nonzero(index[1:] != index[:-1] + 1).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), cuts])
    ends = torch.cat([cuts, torch.tensor([index.numel()])])
    return torch.stack([index[starts], ends - starts], dim=1)


def runs_index(runs: torch.Tensor) -> torch.Tensor:
    """The positions `runs` stand for, in order (inverse of `index_runs`)."""
    lengths = runs[:, 1]
    before = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(runs[:, 0] - before, lengths) + torch.arange(int(lengths.sum()))


class Positions:
    """Where this rank's tensors sit in the full ones (tensor-parallel shards through the
    plan; anything else is its own full tensor). Keeps the last shard's index."""

    def __init__(self, tp: TensorParallel | None) -> None:
        self.tp = tp
        self._last: tuple[int, torch.Size, torch.Tensor | None] | None = None

    def of(self, tensor: torch.Tensor, lo: int, hi: int) -> tuple[torch.Size, torch.Tensor]:
        """The full shape, and the runs of elements ``lo:hi`` of `tensor` flattened."""
        if self._last is None or self._last[0] != id(tensor):
            shape, index = self.tp.global_index(tensor) if self.tp else (tensor.shape, None)
            self._last = (id(tensor), shape, index)
        _, shape, index = self._last
        if index is None:
            return shape, torch.tensor([[lo, hi - lo]], dtype=torch.int64)
        return shape, index_runs(index[lo:hi])


MAGIC = b"SWSHARD1"
"""Last bytes of a fragment file; before them the index's length (8 bytes, little-endian)."""
FEW_RUNS = 64
"""Runs kept in the index (more: stored in the file), and copied as slices when assembling
(more: through one index tensor)."""
READ_BLOCK = 16 * 2**20
"""Bytes per read; each block's checksum runs while the next one is read."""


class FragmentWriter:
    """Writes one rank's fragments to `path` as they come: each one's values (and runs, if
    many) as raw bytes, then a JSON index of them (kind, name, full shape, dtype, runs or
    their offset, values' offset, CRC-32), so neither writing nor reading needs more than one
    fragment in memory."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 - closed by `close`
        self.index: list[dict] = []

    def add(self, kind: str, name: str, shape: torch.Size, runs, values: torch.Tensor) -> None:
        values = values.detach().reshape(-1).to("cpu").contiguous()
        entry = {"kind": kind, "name": name, "shape": list(shape), "dtype": str(values.dtype)}
        crc = _checksums().submit(zlib.crc32, raw_bytes(values))  # beside the writes
        if len(runs) <= FEW_RUNS:
            entry["runs"] = runs.tolist()
        else:
            entry["runs_at"] = [self.file.tell(), runs.numel()]
            self.file.write(raw_bytes(runs.contiguous()))
        entry["values"] = [self.file.tell(), values.numel()]
        self.file.write(raw_bytes(values))
        entry["crc32"] = crc.result()
        self.index.append(entry)

    def close(self) -> None:
        """Write the index and make the file durable."""
        index = json.dumps({"fragments": self.index}).encode()
        self.file.write(index + struct.pack("<Q", len(index)) + MAGIC)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _other_state(engine: Engine) -> Iterable[tuple[str, torch.Tensor]]:
    """The model's state the store does not hold: buffers and frozen parameters."""
    held = {id(p) for p in engine.store.params}
    for name, tensor in engine.model.state_dict(keep_vars=True).items():
        if id(tensor) not in held:
            yield name, tensor


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (the view keeps the tensor
    alive). Not through numpy: exporting a tensor to numpy makes its storage non-resizable
    for good, and chunk payloads are resized (see [Note: the payload never meets the disk
    tier])."""
    buffer = (ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(
        tensor.data_ptr()
    )
    buffer.tensor = tensor  # the memoryview holds the buffer, the buffer the tensor
    return memoryview(buffer).cast("B")


def write_rank_shards(engine: Engine, fragments: Path, states: Path) -> bool:
    """Write this rank's fragments to `fragments` as the store yields them (a piece may be
    valid only while its chunk is in: no copies) and its optimizer scalars and per-rank state
    to `states` (see [Note: layout-free checkpoints]). Returns whether this rank has per-rank
    state (1-bit Adam's error buffers)."""
    writer = FragmentWriter(fragments)
    params, rank_state = _walk_rank_state(engine, writer.add)
    writer.close()
    return write_states(states, params, rank_state)


@dataclass
class RankShards:
    """A copy of one rank's part of a checkpoint in host memory (`snapshot_rank_shards`),
    which training may go on changing the originals of."""

    fragments: list[tuple]
    """(kind, name, full shape, runs, values) of every fragment, values copied."""
    params: dict[str, dict]
    rank_state: Any

    def write(self, fragments: Path, states: Path) -> bool:
        """As `write_rank_shards`, from the copy."""
        writer = FragmentWriter(fragments)
        for fragment in self.fragments:
            writer.add(*fragment)
        writer.close()
        return write_states(states, self.params, self.rank_state)


def snapshot_rank_shards(engine: Engine) -> RankShards:
    """This rank's fragments and scalars, copied into host memory (an asynchronous save)."""
    fragments: list[tuple] = []

    def keep(kind: str, name: str, shape: torch.Size, runs, values: torch.Tensor) -> None:
        fragments.append((kind, name, shape, runs, values.detach().to("cpu", copy=True)))

    params, rank_state = _walk_rank_state(engine, keep)
    return RankShards(fragments, *copy.deepcopy((params, rank_state)))


def _walk_rank_state(engine: Engine, add: Callable) -> tuple[dict[str, dict], Any]:
    """Hand every fragment this rank writes to ``add(kind, name, shape, runs, values)``;
    return the per-parameter settings and scalars, and the store's per-rank state."""
    store, positions = engine.store, Positions(engine.tp)
    if engine.dp.dp is None or comm.group_rank(engine.dp.dp) == 0:
        for name, tensor in _other_state(engine):
            add(MODEL, name, *positions.of(tensor, 0, tensor.numel()), tensor)
    params: dict[str, dict] = {}
    if store.writes_owned:
        pieces: dict[int, tuple[OwnedPiece, torch.Size, torch.Tensor]] = {}
        for piece in store.owned():
            shape, runs = positions.of(piece.owner, piece.info.start, piece.info.end)
            pieces[id(piece.tensor)] = (piece, shape, runs)
            add(MASTER, piece.info.name, shape, runs, piece.tensor)
        saved, states = _saved_states(engine.optimizer)
        next_state = next(states, None)
        index = 0
        for group, saved_group in zip(
            engine.optimizer.param_groups, saved["param_groups"], strict=True
        ):
            settings = {k: v for k, v in saved_group.items() if k != "params"}
            for param in group["params"]:
                piece, shape, runs = pieces[id(param)]
                name = piece.info.name
                entry = params.setdefault(name, {"group": settings, "scalars": {}, "elements": []})
                mine = next_state is not None and next_state[0] == index
                for key, value in (next_state[1] if mine else {}).items():
                    if _per_element(key, value, param):
                        add(OPTIM + key, name, shape, runs, value)
                        if key not in entry["elements"]:
                            entry["elements"].append(key)
                    else:
                        entry["scalars"][key] = value
                if mine:  # drawn once this one is written: it may reuse its memory
                    next_state = next(states, None)
                index += 1
    return params, store.rank_state()


def _saved_states(optimizer: torch.optim.Optimizer) -> tuple[dict, Iterator[tuple[int, dict]]]:
    """The optimizer's state dict without its states, and each parameter's state (its index
    first) in parameter order: streamed by an optimizer whose states live off the device (a
    state is valid until the next is drawn), from `state_dict` otherwise."""
    if isinstance(optimizer, OffloadedAdamW):
        return optimizer.saved_states()
    saved = optimizer.state_dict()
    return {**saved, "state": {}}, iter(sorted(saved["state"].items()))


def write_states(path: Path, params: dict, rank_state: Any) -> bool:
    """A rank's optimizer scalars and settings by parameter name, and its per-rank state;
    returns whether it has any."""
    durable(path, lambda f: torch.save({"params": params, "rank_state": rank_state}, f))
    return rank_state is not None


def durable(path: Path, write) -> None:
    """`write(file)` into `path`, then fsync it: on disk before the checkpoint is committed."""
    with open(path, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def _per_element(key: str, value: object, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and key != "step" and value.shape == param.shape


def read_torch(path: Path) -> dict:
    """A small torch file of a checkpoint; a damaged one is a one-line error naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise CheckpointError(f"checkpoint file {str(path)!r} is unreadable: {exc}") from None


class ShardReader:
    """The fragments of every rank's file of a checkpoint: indexes read at once, values when
    a full tensor that needs them is assembled (one at a time)."""

    def __init__(self, fragments: list[Path], states: list[Path]) -> None:
        self._fragments: dict[tuple[str, str], list[dict]] = {}
        for path in fragments:
            for fragment in _read_index(path):
                fragment["file"] = path
                key = (fragment["kind"], fragment["name"])
                self._fragments.setdefault(key, []).append(fragment)
        self.params: dict[str, dict] = {}
        for path in states:
            for name, entry in read_torch(path)["params"].items():
                self.params.setdefault(name, entry)
        self._full: tuple[tuple[str, str], torch.Tensor] | None = None
        self._files: dict[Path, io.FileIO] = {}
        """Open fragment files: one per file, so the kernel's readahead carries on."""
        self._unchecked: tuple[Future | None, dict] | None = None
        """The last fragment read, whose CRC-32 may still be computed."""

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    def _read_into(self, path: Path, offset: int, into: torch.Tensor) -> Iterator[memoryview]:
        """Fill `into` from `path` at `offset`, yielding each block once it is read."""
        file = self._files.get(path)
        if file is None:
            file = self._files[path] = open(path, "rb", buffering=0)  # noqa: SIM115
        view = raw_bytes(into)
        file.seek(offset)
        for start in range(0, len(view), READ_BLOCK):
            block = view[start : start + READ_BLOCK]
            if file.readinto(block) != len(block):
                raise CheckpointError(f"checkpoint file {str(path)!r} is truncated")
            yield block

    def _runs(self, fragment: dict) -> torch.Tensor:
        if "runs" in fragment:
            return torch.tensor(fragment["runs"], dtype=torch.int64).view(-1, 2)
        offset, count = fragment["runs_at"]
        runs = torch.empty(count, dtype=torch.int64)
        for _ in self._read_into(fragment["file"], offset, runs):
            pass
        return runs.view(-1, 2)

    def keys(self) -> list[tuple[str, str]]:
        """``(kind, name)`` of every tensor the checkpoint holds."""
        return list(self._fragments)

    def shape_and_dtype(self, kind: str, name: str) -> tuple[torch.Size, torch.dtype]:
        first = self._fragments[(kind, name)][0]
        return torch.Size(first["shape"]), _dtype(first["dtype"])

    def full(self, kind: str, name: str) -> torch.Tensor:
        """The whole tensor, in its shape."""
        shape = torch.Size(self._fragments[(kind, name)][0]["shape"])
        return self._assemble(kind, name, shape).view(shape)

    def read(self, kind: str, name: str, shape: torch.Size, runs: torch.Tensor) -> torch.Tensor:
        """The values at `runs` of the full tensor `name` of `kind` (1-D; a view of the
        assembled tensor where `runs` is one run)."""
        full = self._assemble(kind, name, shape)
        if len(runs) == 1:
            start, length = runs[0].tolist()
            return full[start : start + length]
        return full[runs_index(runs)]

    def take(self, kind: str, name: str, shape: torch.Size, runs: torch.Tensor) -> torch.Tensor:
        """As `read`, but a tensor of the caller's own: the assembled tensor itself when
        `runs` cover all of it (no copy), else a copy."""
        values = self.read(kind, name, shape, runs)
        if len(runs) > 1:
            return values  # gathered: a copy already
        if values.numel() == shape.numel():
            self._full = None
            return values
        return values.clone()

    def verify(self) -> None:
        """Raise if the last fragment read is damaged (the others were checked already)."""
        if self._unchecked is not None:
            crc, fragment = self._unchecked
            self._unchecked = None
            if (crc.result() if crc else 0) != fragment["crc32"]:
                _damaged(fragment)

    def _read_values(self, fragment: dict, into: torch.Tensor) -> None:
        """Read a fragment's values into the contiguous tensor `into` (of its size). Its
        CRC-32 is computed block by block beside the reads, and checked when the next
        fragment has been read (or by `verify`): IO and checksums overlap, and at most one
        fragment waits for its check."""
        offset, count = fragment["values"]
        if count != into.numel():
            _damaged(fragment)
        crc = None
        for block in self._read_into(fragment["file"], offset, into):
            crc = _checksums().submit(zlib.crc32, block, crc.result() if crc else 0)
        self.verify()
        self._unchecked = (crc, fragment)

    def _assemble(self, kind: str, name: str, shape: torch.Size) -> torch.Tensor:
        key = (kind, name)
        if self._full is not None and self._full[0] == key:
            return self._full[1]
        fragments = self._fragments.get(key)
        if not fragments:
            raise CheckpointError(
                f"checkpoint has no {kind} tensor {name!r}; it is of another model"
            )
        saved = torch.Size(fragments[0]["shape"])
        if saved != shape:
            raise CheckpointError(
                f"checkpoint tensor {name!r} has shape {tuple(saved)}, this model's "
                f"{tuple(shape)}; it is of another model"
            )
        self._full = None  # the previous one is freed before this one is built
        runs = [self._runs(fragment) for fragment in fragments]
        covered = sum(int(r[:, 1].sum()) for r in runs)
        if covered < shape.numel():
            raise CheckpointError(
                f"checkpoint holds only {covered} of {shape.numel()} elements of {kind} tensor "
                f"{name!r}: a rank's file is missing"
            )
        full = torch.empty(shape.numel(), dtype=_dtype(fragments[0]["dtype"]))
        # copies held by several ranks (tensor-parallel replicas, a tied weight on two
        # pipeline stages) overlap: then check that together they cover every element
        filled = torch.zeros(shape.numel(), dtype=torch.bool) if covered > shape.numel() else None
        for fragment, where in zip(fragments, runs, strict=True):
            if len(where) == 1:  # straight into place
                start, length = where[0].tolist()
                self._read_values(fragment, full[start : start + length])
                if filled is not None:
                    filled[start : start + length] = True
                continue
            values = torch.empty(int(where[:, 1].sum()), dtype=full.dtype)
            self._read_values(fragment, values)
            if len(where) <= FEW_RUNS:  # slices: no index tensor as large as the values
                done = 0
                for start, length in where.tolist():
                    full[start : start + length] = values[done : done + length]
                    done += length
            else:
                full[runs_index(where)] = values
            if filled is not None:
                filled[runs_index(where)] = True
        if filled is not None and not bool(filled.all()):
            raise CheckpointError(
                f"checkpoint holds only {int(filled.sum())} of {shape.numel()} elements of "
                f"{kind} tensor {name!r}: a rank's file is missing"
            )
        self._full = (key, full)
        return full


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def model_tensor_names(model: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """Every parameter and persistent buffer of `model` once, with all its names (a tied
    weight has several)."""
    persistent = set(model.state_dict())
    buffers = [(name, b) for name, b in model.named_buffers() if name in persistent]
    by_id: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *buffers]:
        by_id.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(by_id.values())


def fit_problems(saved: dict[str, list[int]], model: nn.Module) -> list[str]:
    """How tensors saved under these names and full shapes fail to fit `model`, each as
    what the saved ones hold ("no 'x'", "'x' of shape [..], ..."); empty when they fit."""
    groups = model_tensor_names(model)
    problems = []
    for names, tensor in groups:
        found = [name for name in names if name in saved]
        if not found:
            problems.append(f"no {names[0]!r}")
        elif list(saved[found[0]]) != list(tensor.shape):
            problems.append(
                f"{found[0]!r} of shape {list(saved[found[0]])}, the model's {list(tensor.shape)}"
            )
    known = {name for names, _ in groups for name in names}
    problems += [f"{name!r}, which the model has not" for name in sorted(set(saved) - known)]
    return problems


def saved_shapes(fragments: list[Path]) -> dict[str, list[int]]:
    """Name -> full shape of every tensor in these fragment files (their indexes only)."""
    return {f["name"]: f["shape"] for path in fragments for f in _read_index(path)}


def _read_index(path: Path) -> list[dict]:
    try:
        with open(path, "rb") as file:
            file.seek(-len(MAGIC) - 8, os.SEEK_END)
            tail = file.read(len(MAGIC) + 8)
            if tail[8:] != MAGIC:
                raise ValueError("no index at its end (truncated?)")
            (length,) = struct.unpack("<Q", tail[:8])
            file.seek(-len(MAGIC) - 8 - length, os.SEEK_END)
            return json.loads(file.read(length))["fragments"]
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} is unreadable: {exc}") from None


@functools.cache
def _checksums() -> ThreadPoolExecutor:
    """One thread for CRC-32s (zlib releases the GIL): checksums overlap the file IO."""
    return ThreadPoolExecutor(1, thread_name_prefix="shardwise-crc")


# a forked child has none of its parent's threads: it starts its own pool
os.register_at_fork(after_in_child=_checksums.cache_clear)


def _damaged(fragment: dict) -> None:
    raise CheckpointError(
        f"checkpoint file {str(fragment['file'])!r}: {fragment['kind']} tensor "
        f"{fragment['name']!r} is damaged (its checksum does not match)"
    )


def load_rank_shards(engine: Engine, reader: ShardReader, rank_state: dict | None) -> None:
    """Fill `engine`'s model, master weights and optimizer states from `reader`."""
    store, positions = engine.store, Positions(engine.tp)
    with torch.no_grad():
        for name, tensor in _other_state(engine):
            shape, runs = positions.of(tensor, 0, tensor.numel())
            tensor.copy_(reader.read(MODEL, name, shape, runs).view_as(tensor))
    pieces: dict[int, tuple[OwnedPiece, torch.Size, torch.Tensor]] = {}

    def fill(piece: OwnedPiece) -> None:
        shape, runs = positions.of(piece.owner, piece.info.start, piece.info.end)
        pieces[id(piece.tensor)] = (piece, shape, runs)
        values = reader.read(MASTER, piece.info.name, shape, runs)
        piece.tensor.copy_(values.view_as(piece.tensor))

    store.load_owned(fill)
    saved, elements = _optimizer_state(engine.optimizer, reader, pieces)
    if isinstance(engine.optimizer, OffloadedAdamW):  # one chunk of states at a time
        engine.optimizer.load_states(saved, elements)
    else:
        for index, state in saved["state"].items():
            state.update(elements(index))
        engine.optimizer.load_state_dict(saved)
    reader.verify()
    store.load_rank_state(rank_state)


def _optimizer_state(
    optimizer: torch.optim.Optimizer,
    reader: ShardReader,
    pieces: dict[int, tuple[OwnedPiece, torch.Size, torch.Tensor]],
) -> tuple[dict, Callable[[int], dict]]:
    """torch's optimizer state dict for this rank's pieces with each state's scalars only
    (Adam's ``step``), and the function that reads parameter i's per-element states (Adam's
    moments) from the checkpoint when called."""
    state: dict[int, dict] = {}
    groups: list[dict] = []
    reads: dict[int, tuple[str, OwnedPiece, torch.Size, torch.Tensor, list[str]]] = {}
    index = 0
    for group in optimizer.param_groups:
        settings: dict | None = None
        first = index
        for param in group["params"]:
            piece, shape, runs = pieces[id(param)]
            name = piece.info.name
            saved = reader.params.get(name)
            if saved is None:
                raise CheckpointError(f"checkpoint has no optimizer state for {name!r}")
            settings = settings or saved["group"]
            if saved["scalars"] or saved["elements"]:
                state[index] = {key: _clone(value) for key, value in saved["scalars"].items()}
                reads[index] = (name, piece, shape, runs, saved["elements"])
            index += 1
        groups.append({**(settings or {}), "params": list(range(first, index))})

    def elements(i: int) -> dict:
        name, piece, shape, runs, keys = reads[i]
        return {k: reader.take(OPTIM + k, name, shape, runs).view_as(piece.tensor) for k in keys}

    return {"state": state, "param_groups": groups}, elements


def _clone(value: object) -> object:
    return value.clone() if isinstance(value, torch.Tensor) else value
