"""Block-sparse attention in a model: the plan from the config, the core that replaces the
model's attention cores (the modules its `ModelSpec.attention` names)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from torch import Tensor, nn

from shardwise.attention.block_sparse import BlockSparsePlan, block_sparse_attention
from shardwise.attention.layouts import LayoutSpec, build_layout
from shardwise.config import AttentionConfig
from shardwise.data.tokenizer import document_ids
from shardwise.errors import ConfigError
from shardwise.models.spec import ModelSpec
from shardwise.sequence_parallel.model import SequenceCut, apply_sequence_parallel, split_of

if TYPE_CHECKING:
    from shardwise.run_plan import RunPlan


@dataclass
class SparseAttention:
    """A resolved ``attention.kind = 'sparse'``: the layout and its plan per head count."""

    layout: str
    """The `LAYOUTS` name."""
    spec: LayoutSpec
    """The layout's settings at the configured sequence length (``data.seq_len``)."""
    block: int
    _plans: dict[tuple[int, int], BlockSparsePlan] = field(default_factory=dict, repr=False)

    def plan(self, heads: int, seq_len: int) -> BlockSparsePlan:
        """The (cached) plan for `heads` heads over `seq_len` tokens (any multiple of the
        block): one layout for every head, or one per head with ``per_head``."""
        heads = heads if self.spec.per_head else 1
        if (heads, seq_len) not in self._plans:
            if seq_len % self.block:
                raise ConfigError(
                    f"a sequence of {seq_len} tokens is not a multiple of attention.block="
                    f"{self.block}"
                )
            spec = replace(self.spec, heads=heads, n_blocks=seq_len // self.block)
            plan = BlockSparsePlan(build_layout(self.layout, spec), self.block, spec.causal)
            self._plans[heads, seq_len] = plan
        return self._plans[heads, seq_len]

    def describe(self) -> str:
        kept = self.plan(1, self.spec.n_blocks * self.block).density
        return f"block-sparse {self.layout}, block {self.block}, {kept:.1%} of blocks kept"


def sparse_attention(cfg: AttentionConfig, seq_len: int) -> SparseAttention:
    """`cfg`'s causal block-sparse attention for sequences of `seq_len` tokens, checked: one-line
    errors for a length that does not split into blocks or a layout the op cannot run."""
    if seq_len % cfg.block:
        raise ConfigError(
            f"data.seq_len={seq_len} is not a multiple of attention.block={cfg.block}"
        )
    spec = LayoutSpec(
        n_blocks=seq_len // cfg.block,
        causal=True,
        window=cfg.window,
        global_blocks=cfg.global_blocks,
        random_blocks=cfg.random_blocks,
        windows=cfg.windows,
        per_head=cfg.per_head,
        seed=cfg.seed,
    )
    attention = SparseAttention(cfg.layout, spec, cfg.block)
    attention.plan(1, seq_len)  # builds and checks the layout
    return attention


class SparseAttentionCore(nn.Module):
    """Causal block-sparse attention of q, k, v [B, H, T, head_dim]: a drop-in for the
    model's parameter-free attention core."""

    def __init__(self, attention: SparseAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, q: Tensor, k: Tensor, v: Tensor, documents: Tensor | None = None) -> Tensor:
        if documents is not None:  # the plan refuses data.pack_documents with sparse attention
            raise ValueError("block-sparse attention has no document masks")
        plan = self.attention.plan(q.shape[1], q.shape[2]).on(q.device)
        return block_sparse_attention(q, k, v, plan)

    def extra_repr(self) -> str:
        return self.attention.describe()


def apply_document_masks(model: nn.Module, spec: ModelSpec) -> None:
    """Packed sequences (``data.pack_documents``): the model's forward gets each token's
    document (`document_ids` of its token ids, by position) as its `spec.documents` keyword,
    which its attention cores keep to. Registered before sequence parallelism cuts the
    inputs, so the documents are those of the whole sequence."""

    def with_documents(module, args, kwargs):
        if not args:
            raise ConfigError(
                "data.pack_documents=true takes (inputs, targets) batches: the documents are "
                "read from the token ids"
            )
        return args, {**kwargs, spec.documents: document_ids(args[0])}

    model.register_forward_pre_hook(with_documents, with_kwargs=True)


def apply_sparse_attention(model: nn.Module, spec: ModelSpec, attention: SparseAttention) -> int:
    """Replace every attention core of `model` with a `SparseAttentionCore`; returns how many."""
    purpose = "attention.kind='sparse'"
    return spec.replace_attention_cores(model, purpose, lambda: SparseAttentionCore(attention))


def apply_attention(
    model: nn.Module, spec: ModelSpec, plan: RunPlan, mesh: object | None, loss_fn: Callable
) -> tuple[Callable, SequenceCut | None]:
    """The plan's attention cores in `model`: block-sparse, or ring / Ulysses attention over
    the sp ranks (which also cuts each rank's part of the inputs and of the targets), and
    document masks for packed sequences. Returns the loss function to train with, and under
    sequence parallelism the cut of the inputs (for pipeline stages)."""
    if plan.attention is not None:
        apply_sparse_attention(model, spec, plan.attention)
    if plan.config.data.pack_documents:  # first: the documents of the whole sequence
        apply_document_masks(model, spec)
    if plan.sequence_parallel is None:
        return loss_fn, None
    ulysses = plan.config.attention.ulysses_degree
    split = split_of(plan.sequence_parallel, mesh, ulysses)
    return apply_sequence_parallel(model, spec, split, loss_fn)
