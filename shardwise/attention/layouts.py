"""Block layouts as data: which key blocks each query block attends to.

A layout is a bool tensor ``[heads, blocks, blocks]`` (``heads`` = 1 when every head shares
it), built from a named pattern in `LAYOUTS`. With ``causal`` no block above the diagonal is
kept (the op masks the diagonal blocks element-wise). Random parts are drawn from a generator
seeded by `LayoutSpec.seed` (and the head when ``per_head``): every rank builds the same layout.

Patterns (blocks, not tokens):

- ``dense``: every block (the lower triangle when causal).
- ``sliding_window``: the ``window`` blocks around the diagonal (when causal: the diagonal and
  the ``window - 1`` before it).
- ``bslongformer``: the sliding window plus ``global_blocks`` global blocks (the first ones):
  every query attends to them and, unless causal, they attend to every key (causal layouts
  keep global columns only, as DeepSpeed's unidirectional ones do).
- ``bigbird``: BSLongformer's window and global blocks plus ``random_blocks`` random key blocks
  per query row.
- ``fixed`` (Sparse Transformer): blocks grouped into windows of ``window`` blocks, each query
  attending within its window; the last ``global_blocks`` of every window are global columns
  (and, unless causal, global rows).
- ``variable``: local windows of the sizes in ``windows`` (the last size repeated to the end),
  ``global_blocks`` global blocks and ``random_blocks`` random blocks per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shardwise.errors import ConfigError
from shardwise.registry import Registry


@dataclass(frozen=True)
class LayoutSpec:
    """What a pattern needs; the `attention` config section holds the same fields."""

    n_blocks: int
    """Blocks per sequence (sequence length / block size)."""
    heads: int = 1
    causal: bool = True
    window: int = 3
    global_blocks: int = 1
    random_blocks: int = 2
    windows: tuple[int, ...] = field(default=(4,))
    per_head: bool = False
    seed: int = 0


Pattern = Callable[[LayoutSpec, torch.Generator], torch.Tensor]
"""(spec, generator) -> one head's [blocks, blocks] bool layout, before the causal cut."""


def _band(blocks: int, window: int, causal: bool) -> torch.Tensor:
    offset = torch.arange(blocks)[:, None] - torch.arange(blocks)[None, :]
    if causal:
        return (offset >= 0) & (offset < window)
    return offset.abs() <= window // 2


def _global(spec: LayoutSpec, indices: torch.Tensor) -> torch.Tensor:
    """Global blocks: every row attends to them; unless causal they attend to every key."""
    layout = torch.zeros(spec.n_blocks, spec.n_blocks, dtype=torch.bool)
    layout[:, indices] = True
    if not spec.causal:
        layout[indices, :] = True
    return layout


def _random(spec: LayoutSpec, gen: torch.Generator) -> torch.Tensor:
    """`random_blocks` keys per row, drawn among the keys a row may see."""
    layout = torch.zeros(spec.n_blocks, spec.n_blocks, dtype=torch.bool)
    for row in range(spec.n_blocks):
        allowed = row + 1 if spec.causal else spec.n_blocks
        picks = torch.randperm(allowed, generator=gen)[: spec.random_blocks]
        layout[row, picks] = True
    return layout


def _windows(blocks: int, sizes: tuple[int, ...], causal: bool) -> torch.Tensor:
    """Consecutive windows of the given sizes (the last repeated), each attending within."""
    layout = torch.zeros(blocks, blocks, dtype=torch.bool)
    start, index = 0, 0
    while start < blocks:
        end = min(blocks, start + sizes[min(index, len(sizes) - 1)])
        layout[start:end, start:end] = True
        start, index = end, index + 1
    return layout


def dense(spec: LayoutSpec, gen: torch.Generator) -> torch.Tensor:
    return torch.ones(spec.n_blocks, spec.n_blocks, dtype=torch.bool)


def sliding_window(spec: LayoutSpec, gen: torch.Generator) -> torch.Tensor:
    return _band(spec.n_blocks, spec.window, spec.causal)


def bslongformer(spec: LayoutSpec, gen: torch.Generator) -> torch.Tensor:
    return sliding_window(spec, gen) | _global(spec, torch.arange(spec.global_blocks))


def bigbird(spec: LayoutSpec, gen: torch.Generator) -> torch.Tensor:
    return bslongformer(spec, gen) | _random(spec, gen)


def fixed(spec: LayoutSpec, gen: torch.Generator) -> torch.Tensor:
    starts = torch.arange(0, spec.n_blocks, spec.window)
    last = torch.minimum(starts + spec.window, torch.tensor(spec.n_blocks))
    offsets = torch.arange(1, spec.global_blocks + 1)
    indices = (last[:, None] - offsets[None, :]).flatten()
    local = _windows(spec.n_blocks, (spec.window,), spec.causal)
    return local | _global(spec, indices[indices >= 0].unique())


def variable(spec: LayoutSpec, gen: torch.Generator) -> torch.Tensor:
    local = _windows(spec.n_blocks, spec.windows, spec.causal)
    return local | _global(spec, torch.arange(spec.global_blocks)) | _random(spec, gen)


LAYOUTS: Registry[Pattern] = Registry(
    "attention layout",
    {
        "dense": dense,
        "sliding_window": sliding_window,
        "bslongformer": bslongformer,
        "bigbird": bigbird,
        "fixed": fixed,
        "variable": variable,
    },
)


def build_layout(name: str, spec: LayoutSpec) -> torch.Tensor:
    """The named pattern's layout [heads or 1, blocks, blocks] (see the module docstring)."""
    pattern = LAYOUTS.get(name)
    if spec.global_blocks > spec.n_blocks:
        raise ConfigError(
            f"attention.global_blocks={spec.global_blocks} exceeds the {spec.n_blocks} blocks "
            "of a sequence"
        )
    heads = spec.heads if spec.per_head else 1
    layouts = []
    for head in range(heads):
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + head)
        layout = pattern(spec, gen)
        layouts.append(layout.tril() if spec.causal else layout)
    return torch.stack(layouts)


def element_mask(layout: torch.Tensor, block: int, causal: bool) -> torch.Tensor:
    """The token-level mask [heads, seq, seq] a layout stands for (True: attend)."""
    mask = layout.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return mask.tril() if causal else mask
