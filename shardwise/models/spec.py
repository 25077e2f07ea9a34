"""What shardwise needs to know about a model, in the model's own module names.

A `ModelSpec` is declared beside a model (`shardwise.models.SPECS`) or discovered from its
structure (`discover_spec`). Everything that depends on a model's shape reads it instead of
reaching into the model: ZeRO-3 units and activation checkpointing take `blocks`, the
parameter-chunk tracer calls `sample_input`, tensor parallelism asks `tp_plan`, and sequence
parallelism (next) swaps the modules named by `attention`.

[Note: discovery] A model without a declared spec is read as a decoder: its blocks are the
`nn.ModuleList` of identical modules holding the most parameters (``blocks``,
``transformer.h``, ``model.layers``), its embedding the first `nn.Embedding` (or
``get_input_embeddings()``), its head ``get_output_embeddings()`` or the last `nn.Linear`.
Without such a list the spec has no blocks; ZeRO-3 units and activation checkpointing then
fail with one line naming what to declare.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from shardwise.errors import ConfigError

TpPlanBuilder = Callable[..., object]
"""``(dims: ParallelDims, micro_batch: int, sequence_parallel: bool) -> Plan``: the model's
tensor-parallel plan for a layout, after checking that its shapes split (one-line
`ConfigError` naming the tp degrees that fit otherwise)."""


@dataclass(frozen=True)
class PipelineCalls:
    """How a model's forward splits around its blocks, so that pipeline stages can run its
    parts (pipeline/stage.py): the first stage embeds, every stage runs its blocks (each maps
    hidden states ``[B, T, hidden]`` to the same shape), the last finishes."""

    embed: Callable[..., torch.Tensor]
    """``(model, token ids [B, T]) -> hidden states [B, T, hidden]``; it and the blocks also
    take the model's `ModelSpec.positions` keyword under sequence parallelism."""
    finish: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    """``(model, hidden states) -> output`` (the logits)."""
    first: tuple[str, ...]
    """Modules only `embed` uses: kept by the first stage alone."""
    last: tuple[str, ...]
    """Modules only `finish` uses: kept by the last stage alone."""
    hidden_size: int
    """Width of the hidden states passed between stages."""
    run_block: Callable[..., torch.Tensor] = lambda model, block, x, **keywords: block(
        x, **keywords
    )
    """``(model, block, hidden states, **keywords) -> hidden states``: how a stage runs one
    block (what the model's forward passes it besides the hidden states, e.g. LLaMA's rotary
    tables)."""


@dataclass(frozen=True)
class ModelSpec:
    """A model's structure as the parallel machinery needs it."""

    blocks: str | None = None
    """Dotted name of the `nn.ModuleList` of repeated blocks (``"blocks"``,
    ``"transformer.h"``): ZeRO-3 units, activation checkpointing, pipeline stages. None: the
    model has none, and whatever needs blocks says so."""
    embedding: str | None = None
    """Dotted name of the token embedding."""
    head: str | None = None
    """Dotted name of the output projection (may share its weight with `embedding`)."""
    attention: str | None = None
    """Pattern (fnmatch, model-relative) of the modules computing attention, for sequence
    parallelism and sparse attention to replace: a parameter-free core mapping (q, k, v) and
    optionally each token's document (see `documents`) to the output where the model has one
    (the GPT's ``attn.core``), else the attention module."""
    heads: int | None = None
    """Attention (query) heads, for the checks of sequence parallelism; None: unknown."""
    positions: str | None = None
    """Keyword of the model's forward that takes each token's position in the whole sequence
    ([T]): sequence parallelism gives each rank a part of the sequence. None: it has none."""
    positions_rows: bool = False
    """The `positions` keyword takes them as one row, [1, T] (Hugging Face's
    ``position_ids``), not [T]."""
    documents: str | None = None
    """Keyword of the model's forward that takes each token's document ([B, T] by position,
    packed sequences: ``data.pack_documents``), its attention cores passing them on as their
    fourth argument. None: it has none."""
    max_seq_len: int | None = None
    """Longest input in tokens (a learned position table's size), None if unbounded."""
    tp_plan: TpPlanBuilder | None = None
    """The model's tensor-parallel plans; None if it has none."""
    pipeline: PipelineCalls | None = None
    """How its forward splits into pipeline stages; None: it cannot be pipelined."""

    def named_blocks(self, model: nn.Module, purpose: str) -> list[tuple[str, nn.Module]]:
        """(name, block) of every block, names relative to `model`; `purpose` names what
        needs them in the error raised when the model has none."""
        if self.blocks is None:
            raise ConfigError(
                f"{purpose} needs the repeated blocks of {type(model).__name__}, and none were "
                "found (no nn.ModuleList of identical modules): pass spec=ModelSpec(blocks="
                "'<name of its block list>') to initialize()"
            )
        blocks = model.get_submodule(self.blocks)
        # None: a block another pipeline stage holds (pipeline/stage.py)
        return [(f"{self.blocks}.{i}", b) for i, b in enumerate(blocks) if b is not None]

    def attention_cores(self, model: nn.Module, purpose: str) -> list[str]:
        """Names of the model's parameter-free attention cores (`attention`); `purpose` names
        what replaces them in the error raised when there are none."""
        names = [
            name
            for name, _ in model.named_modules()
            if self.attention and fnmatch.fnmatchcase(name, self.attention)
        ]
        if not names or any(any(True for _ in model.get_submodule(n).parameters()) for n in names):
            raise ConfigError(
                f"{purpose} replaces {type(model).__name__}'s attention cores, the "
                "parameter-free modules mapping (q, k, v) to the output, and its "
                f"ModelSpec.attention ({self.attention!r}) names none: declare the pattern of "
                "such modules"
            )
        return names

    def replace_attention_cores(
        self, model: nn.Module, purpose: str, core: Callable[[], nn.Module]
    ) -> int:
        """Put a new `core()` in place of every attention core of `model`; returns how many."""
        names = self.attention_cores(model, purpose)
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, core())
        return len(names)

    def tied(self, model: nn.Module) -> bool:
        """Whether the head's weight is the embedding's Parameter."""
        if self.embedding is None or self.head is None:
            return False
        head = getattr(model.get_submodule(self.head), "weight", None)
        return head is not None and head is model.get_submodule(self.embedding).weight

    def sample_input(self, seq_len: int, device: torch.device | str) -> torch.Tensor:
        """Token ids [1, T] for tracing a forward, T = seq_len capped at `max_seq_len`."""
        length = min(seq_len, self.max_seq_len) if self.max_seq_len else seq_len
        return torch.zeros((1, length), dtype=torch.long, device=device)


SpecBuilder = Callable[[nn.Module], ModelSpec]
"""``fn(model) -> ModelSpec``: a model class's declared spec (`shardwise.models.SPECS`)."""


def qualified_name(kind: type) -> str:
    """``module.QualName`` of a class: how `SPECS` names it without importing it."""
    return f"{kind.__module__}.{kind.__qualname__}"


def resolve_spec(
    model: nn.Module, declared: Mapping[str, SpecBuilder], given: ModelSpec | None = None
) -> ModelSpec:
    """`given`, else the spec `declared` for the model's class (or a base class, by qualified
    name), else one discovered from its structure ([Note: discovery]); checked against the
    model either way."""
    spec = given
    if spec is None:
        names = (qualified_name(kind) for kind in type(model).__mro__)
        builder = next((declared[n] for n in names if n in declared), discover_spec)
        spec = builder(model)
    _check(spec, model)
    return spec


def discover_spec(model: nn.Module) -> ModelSpec:
    """The spec of a decoder read from its modules ([Note: discovery])."""
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and _uniform(module)
    ]
    blocks = None
    if lists:
        blocks = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))[0]
    names = {id(m): n for n, m in model.named_modules()}
    embedding = _find(model, "get_input_embeddings", names, nn.Embedding, first=True)
    head = _find(model, "get_output_embeddings", names, nn.Linear, first=False)
    config = getattr(model, "config", None)
    max_seq_len = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    return ModelSpec(blocks=blocks, embedding=embedding, head=head, max_seq_len=max_seq_len)


def _uniform(modules: nn.ModuleList) -> bool:
    return len({type(m) for m in modules}) == 1


def _find(model, getter: str, names: dict, kind: type, first: bool) -> str | None:
    declared = getattr(model, getter, None)
    if callable(declared):
        try:
            module = declared()
        except NotImplementedError:
            module = None
        if module is not None and id(module) in names:
            return names[id(module)]
    found = [n for n, m in model.named_modules() if isinstance(m, kind)]
    if not found:
        return None
    return found[0] if first else found[-1]


def _check(spec: ModelSpec, model: nn.Module) -> None:
    """Every name of the spec is a module of the model (one line otherwise)."""
    for field in ("blocks", "embedding", "head"):
        name = getattr(spec, field)
        if name is None:
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(
                f"the model spec's {field}={name!r} is not a module of {type(model).__name__}"
            ) from None
        if field == "blocks" and not isinstance(module, nn.ModuleList):
            raise ConfigError(
                f"the model spec's blocks={name!r} is a {type(module).__name__}, not an "
                "nn.ModuleList of blocks"
            )
