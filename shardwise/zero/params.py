"""ZeRO-3: parameters sharded too, gathered just before a unit runs and released after.

ZeRO paper section 5.3 (stage 3, P_os+g+p): each rank keeps 1/N of the parameters; a unit
(a block of the `ModelSpec`, or the root: embeddings, final norm, head) is all-gathered before
its forward and again before its backward, and released after each, so per-step communication is
two all-gathers and one reduce-scatter of Ψ — 1.5x the all-reduce of data parallelism.

A unit is a released `FlatGroup` (zero/flat_group.py): its parameters are permanent views
of the group's flat buffer, whose storage comes only while it is gathered, along the group's
table of moves. Each unit is a site of `ModuleHooks` (zero/module_hooks.py, [Note: the hook
protocol]), with `GatherOnUse` as the residency: the forward pre-hook gathers the unit and
starts gathering the next one (prefetch); the forward hook releases it with
``reshard_after_forward``, unless autograd is running (activation checkpointing re-runs
forwards inside backward, where the unit must stay for its backward); the hook on its output
gradient gathers it again and starts gathering the previous one; once all its gradients exist
it is released. Whatever is still gathered when backward ends is released by `release_all`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

from torch import nn

from shardwise.models.spec import ModelSpec
from shardwise.zero.flat_group import FlatGroup, GroupState
from shardwise.zero.module_hooks import Site, in_backward


def zero3_units(
    model: nn.Module, spec: ModelSpec, per_module: bool = False
) -> list[tuple[str, list[nn.Module], list[nn.Parameter]]]:
    """Units in forward order with their trainable parameters and the modules whose calls
    gather them: the root (everything outside the spec's blocks, around the model's call),
    then each block. With `per_module` (a pipeline stage, which never calls the whole model)
    the root is one unit per module owning its parameters, gathered around the call of any
    module holding one of them: a tied weight is the embedding's unit, gathered for the head
    too. Frozen parameters stay replicated."""
    blocks = spec.named_blocks(model, "zero.stage=3 (one unit per block)")
    in_blocks = {id(p) for _, block in blocks for p in block.parameters()}
    root = [p for p in model.parameters() if p.requires_grad and id(p) not in in_blocks]
    units = _module_units(model, root) if per_module else [("root", [model], root)]
    units += [(name, [b], [p for p in b.parameters() if p.requires_grad]) for name, b in blocks]
    return [unit for unit in units if unit[2]]


def _module_units(
    model: nn.Module, params: list[nn.Parameter]
) -> list[tuple[str, list[nn.Module], list[nn.Parameter]]]:
    """`params` in one unit per module that holds them first (in module order), each with
    every module holding one of its parameters."""
    wanted = {id(p) for p in params}
    owner: dict[int, str] = {}
    holders: dict[int, list[nn.Module]] = {}
    units: dict[str, list[nn.Parameter]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) in wanted:
                holders.setdefault(id(param), []).append(module)
                if owner.setdefault(id(param), name) == name:
                    units.setdefault(name, []).append(param)
    result = []
    for name, owned in units.items():
        modules = {id(m): m for p in owned for m in holders[id(p)]}
        result.append((name, list(modules.values()), owned))
    return result


def unit_sites(units: list[FlatGroup]) -> list[Site]:
    """Each unit (in forward order) as a site of the module hooks: its modules, itself, and
    its parameters."""
    return [
        Site(unit.name, tuple(unit.modules), (index,), tuple(unit.bucket.params))
        for index, unit in enumerate(units)
    ]


class GatherOnUse:
    """ZeRO-3's `Residency`: a unit is gathered while a site uses it and released when none
    does (module docstring)."""

    def __init__(self, units: list[FlatGroup], group: object, reshard_after_forward: bool) -> None:
        self.units = units
        self.group = group
        self.reshard_after_forward = reshard_after_forward
        self._users: dict[int, int] = {}
        """Id of a unit -> the sites using it now."""

    def access(self, unit: FlatGroup, read_only: bool = False) -> None:
        unit.ensure_gathered(self.group)
        self._users[id(unit)] = self._users.get(id(unit), 0) + 1

    def release(self, unit: FlatGroup, after: Literal["forward", "backward"]) -> None:
        users = self._users[id(unit)] - 1
        self._users[id(unit)] = users
        if users == 0 and (
            after == "backward" or (self.reshard_after_forward and not in_backward())
        ):
            unit.release(self.group)

    def prefetch(self, unit: FlatGroup) -> bool:
        if unit.state is not GroupState.SHARDED:
            return False
        unit.start_gather(self.group, async_op=True)
        return True

    @contextlib.contextmanager
    def all_gathered(self) -> Iterator[None]:
        """Every unit gathered for the duration of the block (export, evaluation)."""
        for unit in self.units:
            unit.ensure_gathered(self.group)
        try:
            yield
        finally:
            self.release_all()

    def release_all(self) -> None:
        """After backward: every unit no site uses back to its shard."""
        for unit in self.units:
            if unit.state is not GroupState.SHARDED and not self._users.get(id(unit)):
                unit.release(self.group)
