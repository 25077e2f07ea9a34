"""ZeRO-3's units: parameters sharded too, gathered just before a unit runs and released after.

ZeRO paper section 5.3 (stage 3, P_os+g+p): each rank keeps 1/N of the parameters; a unit
(a block of the `ModelSpec`, or the root: embeddings, final norm, head) is all-gathered before
its forward and again before its backward, and released after each, so per-step communication is
two all-gathers and one reduce-scatter of Ψ — 1.5x the all-reduce of data parallelism.

Without ``offload.policy`` each unit is one chunk of the chunk store (zero/chunks/store.py):
the chunk is gathered from every rank's shard (its home, which stays on the device), with no
device budget. Each unit is a site of `ModuleHooks` (zero/module_hooks.py, [Note: the hook
protocol]). The forward pre-hook gathers the unit and starts gathering the next one (prefetch:
the manager starts the all-gather, the access waits for it); its last release after forward
frees it with ``reshard_after_forward``, unless autograd is running (activation checkpointing
re-runs forwards inside backward, where the unit must stay for its backward); the hook on its
output gradient gathers it again and starts gathering the previous one; once all its
gradients exist it is released, and so freed, and its gradient chunk is reduce-scattered
while backward goes on. Whatever is still gathered when backward ends is freed by the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from shardwise.models.spec import ModelSpec
from shardwise.zero.chunks.chunk import Chunk
from shardwise.zero.chunks.packing import laid_out
from shardwise.zero.module_hooks import Site


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


@dataclass(frozen=True)
class Units:
    """ZeRO-3's units as the chunk store takes them (`unit_chunks`)."""

    chunks: list[Chunk]
    """A FREE chunk per unit, in forward order."""
    sites: list[Site]
    """Per unit: its modules, its chunk and its parameters, for the module hooks."""
    frees_after: frozenset[str]
    """Phases after which a gathered unit's last release frees it at once: backward, and
    forward too with ``zero.reshard_after_forward``."""


def unit_chunks(
    model: nn.Module, spec: ModelSpec, per_module: bool, align: int, reshard_after_forward: bool
) -> Units:
    """Each unit of `zero3_units` (in forward order) as a chunk of its own size, padded to a
    multiple of `align` elements (so that it splits evenly over the ranks), and as a site."""
    names = {id(p): name for name, p in model.named_parameters()}
    chunks, sites = [], []
    for index, (name, modules, params) in enumerate(zero3_units(model, spec, per_module)):
        slots = laid_out([(names[id(p)], p) for p in params])
        numel = -(-sum(p.numel() for p in params) // align) * align
        chunks.append(Chunk(index, name, numel, params[0].dtype, slots))
        sites.append(Site(name, tuple(modules), (index,), tuple(params)))
    frees_after = {"forward", "backward"} if reshard_after_forward else {"backward"}
    return Units(chunks, sites, frozenset(frees_after))
