"""ZeRO-3: parameters sharded too, gathered just before a unit runs and released after.

ZeRO paper section 5.3 (stage 3, P_os+g+p): each rank keeps 1/N of the parameters; a unit
(a block of the `ModelSpec`, or the root: embeddings, final norm, head) is all-gathered before
its forward and again before its backward, and released after each, so per-step communication is
two all-gathers and one reduce-scatter of Ψ — 1.5x the all-reduce of data parallelism.

A unit is a released `FlatGroup` (zero/flat_group.py): its parameters are permanent views
of the group's flat buffer, whose storage comes only while it is gathered, along the group's
table of moves.

[Note: unit hooks] Forward pre-hook: gather this unit, start gathering the next one
(prefetch). Forward post-hook: release it (``reshard_after_forward``), unless autograd is
running — activation checkpointing re-runs forwards inside backward, where the unit must
stay. A hook on the unit's output gradient (it arrives just before the unit's backward): gather it
again, start gathering the previous one. When all of a
unit's gradients exist (the reducer's `on_bucket_complete`), release it; whatever is still
gathered when backward ends (unused parameters) is released by `release_all`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from shardwise.distributed.reducer import Bucket
from shardwise.models.spec import ModelSpec
from shardwise.zero.flat_group import FlatGroup, GroupState


def output_tensors(output: object) -> list[torch.Tensor]:
    """The tensors of a module's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in output_tensors(item)]
    return []


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


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


class ShardedParams:
    """Gathers and releases the parameters of each unit around its forward and backward."""

    def __init__(
        self,
        units: list[FlatGroup],
        group: object,
        reshard_after_forward: bool,
        prefetch: bool,
    ) -> None:
        """`units`: released groups, each with its name and modules, in forward order."""
        self.group = group
        self.reshard_after_forward = reshard_after_forward
        self.prefetch = prefetch
        self.units = units
        self._unit_of_bucket = {id(u.bucket): u for u in self.units}
        for index, unit in enumerate(self.units):
            for module in unit.modules:
                module.register_forward_pre_hook(lambda *_, i=index: self._before_forward(i))
                module.register_forward_hook(
                    lambda _module, _inputs, out, i=index: self._after_forward(i, out)
                )

    def _prefetch(self, index: int) -> None:
        if self.prefetch and 0 <= index < len(self.units):
            unit = self.units[index]
            if unit.state is GroupState.SHARDED:
                unit.start_gather(self.group, async_op=True)

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
        """After backward: every unit back to its shard."""
        for unit in self.units:
            if unit.state is not GroupState.SHARDED:
                unit.release(self.group)

    # -- hooks (see [Note: unit hooks]) -----------------------------------------------------

    def _before_forward(self, index: int) -> None:
        self.units[index].ensure_gathered(self.group)
        if not _in_backward():
            self._prefetch(index + 1)

    def _after_forward(self, index: int, output: object) -> None:
        # The gradient of the unit's output arrives just before the unit's own backward.
        for tensor in output_tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(lambda grad, i=index: self._before_backward(i))
        if self.reshard_after_forward and not _in_backward():
            self.units[index].release(self.group)

    def _before_backward(self, index: int) -> None:
        self.units[index].ensure_gathered(self.group)
        self._prefetch(index - 1)

    def on_bucket_complete(self, bucket: Bucket) -> None:
        """The reducer's callback: a unit's gradients all exist, so its parameters can go.

        The root (index 0) spans the whole forward: its head's gradient arrives first in
        backward but its embedding's last, so it completes last and goes here too."""
        unit = self._unit_of_bucket[id(bucket)]
        if unit.state is not GroupState.SHARDED:
            unit.release(self.group)
