"""ZeRO-3: parameters sharded too, gathered just before a unit runs and released after.

ZeRO paper section 5.3 (stage 3, P_os+g+p): each rank keeps 1/N of the parameters; a unit
(a block of the `ModelSpec`, or the root: embeddings, final norm, head) is all-gathered before
its forward and again before its backward, and released after each, so per-step communication is
two all-gathers and one reduce-scatter of Ψ — 1.5x the all-reduce of data parallelism.

A unit is a released `FlatGroup` (zero/flat_group.py): its parameters are permanent views of
the group's flat buffer, whose storage comes only while it is gathered. The gathered buffer is
a `GatheredChunk` (zero/chunks/chunk.py) and this rank's shard its home chunk, in a
`ChunkManager` without a budget: the same chunks and residency that move the parameters of
``offload.policy``, whose homes are placed in tiers where these stay on the device. Each unit
is a site of `ModuleHooks` (zero/module_hooks.py, [Note: the hook protocol]). The forward
pre-hook gathers the unit and starts gathering the next one (prefetch: the manager starts the
all-gather, the access waits for it); its last release after forward frees it with
``reshard_after_forward``, unless autograd is running (activation checkpointing re-runs
forwards inside backward, where the unit must stay for its backward); the hook on its output
gradient gathers it again and starts gathering the previous one; once all its gradients exist
it is released, and so freed. Whatever is still gathered when backward ends is freed by the
store.
"""

from __future__ import annotations

from torch import nn

from shardwise.models.spec import ModelSpec
from shardwise.zero.chunks.chunk import Chunk, ChunkState, GatheredChunk, Slot, Tier
from shardwise.zero.flat_group import FlatGroup
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


def unit_sites(units: list[FlatGroup]) -> list[Site]:
    """Each unit (in forward order) as a site of the module hooks: its modules, itself, and
    its parameters."""
    return [
        Site(unit.name, tuple(unit.modules), (index,), tuple(unit.bucket.params))
        for index, unit in enumerate(units)
    ]


def unit_chunks(
    units: list[FlatGroup], group: object, reshard_after_forward: bool
) -> tuple[list[GatheredChunk], list[Chunk]]:
    """Each unit's gathered buffer (in the order of `units`, indices 0..n-1) as a chunk of
    the manager, and its home (indices n..2n-1): its `flat_params` all-gathered from every
    rank's `shard` over `group`, freed by the last release after backward, and after forward
    too with `reshard_after_forward`. A home is the unit's `shard`, already on the device; its
    slots are empty (what it holds are the optimizer's pieces, zero/optimizer.py)."""
    frees_after = frozenset({"forward", "backward"} if reshard_after_forward else {"backward"})
    homes = [
        Chunk(
            len(units) + index,
            f"{unit.name}.shard",
            unit.shard.numel(),
            unit.shard.dtype,
            [],
            state=ChunkState.HOLD,
            tier=Tier.DEVICE,
            payload=unit.shard,
        )
        for index, unit in enumerate(units)
    ]
    gathered = [
        GatheredChunk(
            index,
            unit.name,
            unit.bucket.numel,
            unit.flat_params.dtype,
            _slots(unit),
            payload=unit.flat_params,
            home=home,
            group=group,
            frees_after=frees_after,
        )
        for index, (unit, home) in enumerate(zip(units, homes, strict=True))
    ]
    return gathered, homes


def _slots(unit: FlatGroup) -> list[Slot]:
    """Where each parameter of `unit` sits in its flat buffer (named by unit and position)."""
    layout = zip(unit.bucket.params, unit.bucket.offsets, strict=True)
    return [Slot(f"{unit.name}[{i}]", p, offset, p.numel()) for i, (p, offset) in enumerate(layout)]
