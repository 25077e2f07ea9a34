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

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shardwise.distributed import comm
from shardwise.errors import CheckpointError
from shardwise.tensor_parallel import TensorParallel

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


def _fragment(kind: str, name: str, shape: torch.Size, runs: torch.Tensor, values) -> dict:
    return {
        "kind": kind,
        "name": name,
        "shape": list(shape),
        "runs": runs,
        "values": values.detach().reshape(-1).to("cpu", copy=True),
    }


def _other_state(engine: Engine) -> Iterable[tuple[str, torch.Tensor]]:
    """The model's state the store does not hold: buffers and frozen parameters."""
    held = {id(p) for p in engine.store.params}
    for name, tensor in engine.model.state_dict(keep_vars=True).items():
        if id(tensor) not in held:
            yield name, tensor


def rank_shards(engine: Engine) -> dict[str, Any]:
    """What this rank writes (see [Note: layout-free checkpoints])."""
    store, positions = engine.store, Positions(engine.tp)
    fragments: list[dict] = []
    if engine.dp.dp is None or comm.group_rank(engine.dp.dp) == 0:
        for name, tensor in _other_state(engine):
            shape, runs = positions.of(tensor, 0, tensor.numel())
            fragments.append(_fragment(MODEL, name, shape, runs, tensor))
    params: dict[str, dict] = {}
    if store.writes_owned:
        pieces: dict[int, tuple[OwnedPiece, torch.Size, torch.Tensor]] = {}
        for piece in store.owned():
            shape, runs = positions.of(piece.owner, piece.info.start, piece.info.end)
            pieces[id(piece.tensor)] = (piece, shape, runs)
            fragments.append(_fragment(MASTER, piece.info.name, shape, runs, piece.tensor))
        saved = engine.optimizer.state_dict()
        index = 0
        for group, saved_group in zip(
            engine.optimizer.param_groups, saved["param_groups"], strict=True
        ):
            settings = {k: v for k, v in saved_group.items() if k != "params"}
            for param in group["params"]:
                piece, shape, runs = pieces[id(param)]
                entry = params.setdefault(
                    piece.info.name, {"group": settings, "scalars": {}, "elements": []}
                )
                for key, value in saved["state"].get(index, {}).items():
                    if _per_element(key, value, param):
                        name = piece.info.name
                        fragments.append(_fragment(OPTIM + key, name, shape, runs, value))
                        if key not in entry["elements"]:
                            entry["elements"].append(key)
                    else:
                        entry["scalars"][key] = value
                index += 1
    return {"fragments": fragments, "params": params, "rank_state": store.rank_state()}


def _per_element(key: str, value: object, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and key != "step" and value.shape == param.shape


class ShardReader:
    """The fragments of every rank's file in a checkpoint, read lazily (memory-mapped); full
    tensors assembled one at a time."""

    def __init__(self, files: list[Path]) -> None:
        self._fragments: dict[tuple[str, str], list[dict]] = {}
        self.params: dict[str, dict] = {}
        for path in files:
            try:
                content = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:
                raise CheckpointError(
                    f"checkpoint file {str(path)!r} is unreadable: {exc}"
                ) from None
            for fragment in content["fragments"]:
                fragment["file"] = path
                key = (fragment["kind"], fragment["name"])
                self._fragments.setdefault(key, []).append(fragment)
            for name, entry in content["params"].items():
                self.params.setdefault(name, entry)
        self._full: tuple[tuple[str, str], torch.Tensor] | None = None

    def keys(self) -> list[tuple[str, str]]:
        """``(kind, name)`` of every tensor the checkpoint holds."""
        return list(self._fragments)

    def full(self, kind: str, name: str) -> torch.Tensor:
        """The whole tensor, in its shape."""
        shape = torch.Size(self._fragments[(kind, name)][0]["shape"])
        return self._assemble(kind, name, shape).view(shape)

    def read(self, kind: str, name: str, shape: torch.Size, runs: torch.Tensor) -> torch.Tensor:
        """The values at `runs` of the full tensor `name` of `kind` (1-D)."""
        full = self._assemble(kind, name, shape)
        if len(runs) == 1:
            start, length = runs[0].tolist()
            return full[start : start + length]
        return full[runs_index(runs)]

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
        full = torch.empty(shape.numel(), dtype=fragments[0]["values"].dtype)
        filled = torch.zeros(shape.numel(), dtype=torch.bool)
        for fragment in fragments:
            where = runs_index(fragment["runs"])
            if where.numel() != fragment["values"].numel():
                raise CheckpointError(
                    f"checkpoint file {str(fragment['file'])!r}: tensor {name!r} is damaged"
                )
            full[where] = fragment["values"]
            filled[where] = True
        if not bool(filled.all()):
            raise CheckpointError(
                f"checkpoint holds only {int(filled.sum())} of {shape.numel()} elements of "
                f"{kind} tensor {name!r}: a rank's file is missing"
            )
        self._full = (key, full)
        return full


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
    engine.optimizer.load_state_dict(_optimizer_state(engine.optimizer, reader, pieces))
    store.load_rank_state(rank_state)


def _optimizer_state(
    optimizer: torch.optim.Optimizer,
    reader: ShardReader,
    pieces: dict[int, tuple[OwnedPiece, torch.Size, torch.Tensor]],
) -> dict:
    """torch's optimizer state dict for this rank's pieces, read from the checkpoint."""
    state: dict[int, dict] = {}
    groups: list[dict] = []
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
            entry = {key: _clone(value) for key, value in saved["scalars"].items()}
            for key in saved["elements"]:
                values = reader.read(OPTIM + key, name, shape, runs)
                entry[key] = values.clone().view_as(param)  # not a view of the full tensor
            if entry:
                state[index] = entry
            index += 1
        groups.append({**(settings or {}), "params": list(range(first, index))})
    return {"state": state, "param_groups": groups}


def _clone(value: object) -> object:
    return value.clone() if isinstance(value, torch.Tensor) else value
