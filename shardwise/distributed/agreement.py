"""Debug mode: the ranks of a group agree on every collective before they issue it.

[Note: collective agreement] With ``distributed.check_collectives = true`` every collective
that `comm` issues is preceded by one small all-gather over the same group in which each
rank shows what it is about to do: the op, the tensor's shape and dtype, and where in the
code it was called (the innermost frame outside comm.py). If the ranks disagree (one rank
reduces a bucket of another size, gathers where the others reduce, or runs one collective
more), every rank raises the same one-line `CollectiveMismatchError` naming both call sites,
instead of hanging until the timeout or silently mixing unrelated data. It costs one
``all_gather_object`` per collective: a tool for finding a bug, not for training runs.
Ranks that issue collectives on different *groups* still meet no common check and hang
until ``distributed.timeout_s`` (whose message names each rank's last collective).

Process state, like the emulated link (link.py): set by the engine from its config.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shardwise.errors import ShardwiseError

_COMM_FILE = str(Path(__file__).with_name("comm.py"))
_enabled = False
_checks: Counter[str] = Counter()
"""Checks done per group label, for the message."""


class CollectiveMismatchError(ShardwiseError):
    """The ranks of a group were about to issue different collectives."""


def check_collectives(enabled: bool) -> None:
    """Turn the agreement check on or off for this process."""
    global _enabled
    _enabled = enabled
    _checks.clear()


def agree(op: str, pg: Any, label: str, tensor: torch.Tensor) -> None:
    """When checking is on, compare (op, shape, dtype) over the ranks of `pg` before the
    collective; raise `CollectiveMismatchError` on every rank if they differ."""
    if not _enabled:
        return
    _checks[label] += 1
    mine = (op, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), _call_site())
    everyone: list[Any] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(everyone, mine, group=pg)
    kinds = [entry[:3] for entry in everyone]
    if all(kind == kinds[0] for kind in kinds):
        return
    odd = next(r for r, kind in enumerate(kinds) if kind != kinds[0])
    raise CollectiveMismatchError(
        f"collectives differ on axis '{label}' (check #{_checks[label]}): "
        f"{_describe(0, everyone[0])}; {_describe(odd, everyone[odd])}"
    )


def _describe(rank: int, entry: tuple) -> str:
    op, shape, dtype, site = entry
    return f"group rank {rank}: {op} of {list(shape)} {dtype} at {site}"


def _call_site() -> str:
    """``file:line in function`` of the innermost caller outside comm.py."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename != _COMM_FILE:
            return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return "?"
