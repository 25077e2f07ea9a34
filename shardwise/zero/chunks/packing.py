"""Packing parameters into chunks (chunk.py): in execution order, at the size that wastes least.

[Note: chunk size] Every chunk of a group has the same capacity, `chunk_bytes`, and a parameter
never straddles two chunks. A parameter larger than `chunk_bytes` is a `ConfigError` naming the
minimum, rather than a chunk of its own: fixed-size chunks are what lets the manager reason
"one chunk out, one chunk in", and `search_chunk_size` always starts its search at the largest
parameter anyway. The unused tail of each chunk is padding; `search_chunk_size` picks the size
that wastes least.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from shardwise.errors import ConfigError
from shardwise.zero.chunks.chunk import Chunk, Slot
from shardwise.zero.module_hooks import Site


def pack(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Next-fit packing in order: indices of `sizes` per chunk of `capacity`; an item never
    straddles two chunks, and the order is kept (no bin-packing reorder: the order is the
    execution order prefetching relies on)."""
    groups: list[list[int]] = []
    used = 0
    for index, size in enumerate(sizes):
        if size > capacity:
            raise ConfigError(
                f"a parameter of {size} bytes does not fit in chunk_bytes={capacity}; "
                f"use chunk_bytes >= {size} (see search_chunk_size)"
            )
        if not groups or used + size > capacity:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += size
    return groups


def chunk_waste(sizes: Sequence[int], chunk_bytes: int) -> int:
    """Padding bytes: the unused tail of every chunk when `sizes` are packed in order."""
    groups = pack(sizes, chunk_bytes)
    return len(groups) * chunk_bytes - sum(sizes)


def search_chunk_size(
    param_bytes: Sequence[int],
    *,
    search_range: int,
    step: int,
    min_chunk_bytes: int = 0,
) -> int:
    """The chunk size in bytes that wastes the least padding (Colossal-AI's chunk search).

    Candidates are ``start, start + step, ..., start + search_range`` with ``start =
    max(min_chunk_bytes, largest parameter)``: no smaller size can hold every parameter, and
    `search_range` bounds how much larger chunks (coarser moves, a bigger minimum device
    budget) may grow to save padding. Ties go to the smallest size. `param_bytes` are in
    execution order, packed as `build_chunks` packs them."""
    if step <= 0 or search_range < 0:
        raise ConfigError(
            f"chunk search needs step > 0 and search_range >= 0, got {step=}, {search_range=}"
        )
    start = max(min_chunk_bytes, max(param_bytes, default=1))
    candidates = range(start, start + search_range + 1, step)
    return min(candidates, key=lambda size: (chunk_waste(param_bytes, size), size))


def params_in_execution_order(
    model: nn.Module, run_forward: Callable[[], object]
) -> list[tuple[str, nn.Parameter]]:
    """Unique parameters in the order a forward first uses them (the module that owns them
    directly is about to run); parameters no forward used follow in registration order.

    `run_forward` runs once under ``torch.no_grad``; on a model still on the meta device it
    costs nothing (pass a meta input). Registration order is the fallback because most models
    (GPT included) register modules in the order they call them, but not all do (a shared
    head registered before the blocks, an encoder-decoder), so the recorded order is used."""
    names = {id(p): name for name, p in model.named_parameters()}
    order: dict[int, nn.Parameter] = {}

    def record(module: nn.Module, _inputs: object) -> None:
        for param in module.parameters(recurse=False):
            order.setdefault(id(param), param)

    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
    for param in model.parameters():
        order.setdefault(id(param), param)
    return [(names[key], param) for key, param in order.items()]


def build_chunks(
    params: Sequence[tuple[str, nn.Parameter]], chunk_bytes: int, group: str = "params"
) -> list[Chunk]:
    """FREE chunks of `chunk_bytes` each holding whole `params` in the given order; a change
    of dtype starts a new chunk. Nothing is allocated until `Chunk.materialize`."""
    chunks: list[Chunk] = []
    start = 0
    while start < len(params):
        dtype = params[start][1].dtype
        end = start
        while end < len(params) and params[end][1].dtype == dtype:
            end += 1
        run = params[start:end]
        numel = chunk_bytes // dtype.itemsize
        sizes = [p.numel() * dtype.itemsize for _, p in run]
        for group_indices in pack(sizes, numel * dtype.itemsize):
            slots = laid_out([run[i] for i in group_indices])
            index = len(chunks)
            chunks.append(Chunk(index, f"{group}.{index}", numel, dtype, slots))
        start = end
    return chunks


def laid_out(params: Sequence[tuple[str, nn.Parameter]]) -> list[Slot]:
    """Named parameters one after another in a flat buffer, from offset 0."""
    slots, offset = [], 0
    for name, param in params:
        slots.append(Slot(name, param, offset, param.numel()))
        offset += param.numel()
    return slots


def chunks_of_modules(model: nn.Module, chunks: Sequence[Chunk]) -> dict[str, tuple[int, ...]]:
    """Module name -> indices of the chunks holding its own (non-recursive) parameters, for
    every module that owns parameters: what a module's hooks must access."""
    chunk_of = {id(slot.param): chunk.index for chunk in chunks for slot in chunk.slots}
    result = {}
    for name, module in model.named_modules():
        used = {chunk_of[id(p)] for p in module.parameters(recurse=False) if id(p) in chunk_of}
        if used:
            result[name] = tuple(sorted(used))
    return result


def chunk_sites(model: nn.Module, chunks: Sequence[Chunk]) -> list[Site]:
    """Every module that owns chunked parameters (non-recursively) as a site of the module
    hooks: the chunks holding them, and those parameters."""
    used = chunks_of_modules(model, chunks)
    chunked = {id(slot.param) for chunk in chunks for slot in chunk.slots}
    return [
        Site(
            name,
            (module,),
            used[name],
            tuple(p for p in module.parameters(recurse=False) if id(p) in chunked),
        )
        for name, module in model.named_modules()
        if name in used
    ]


def held_chunks(model: nn.Module, chunks: Sequence[Chunk]) -> frozenset[int]:
    """Chunks holding a parameter that several modules own (a tied weight): its gradient is
    accumulated after its last use, so the chunk stays in use from the first of those modules'
    backward to the last (see [Note: the hook protocol] in zero/module_hooks.py)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return frozenset(
        chunk.index
        for chunk in chunks
        if any(owners.get(id(slot.param), 0) > 1 for slot in chunk.slots)
    )
