"""Attention cores that replace the model's dense one: block-sparse attention (layouts as
data, an op computing only the kept blocks); document masks of packed sequences. See
docs/attention.md."""

from shardwise.attention.block_sparse import BlockSparsePlan, block_sparse_attention
from shardwise.attention.core import (
    SparseAttention,
    SparseAttentionCore,
    apply_attention,
    apply_document_masks,
    apply_sparse_attention,
    sparse_attention,
)
from shardwise.attention.layouts import LAYOUTS, LayoutSpec, build_layout, element_mask

__all__ = [
    "LAYOUTS",
    "BlockSparsePlan",
    "LayoutSpec",
    "SparseAttention",
    "SparseAttentionCore",
    "apply_attention",
    "apply_document_masks",
    "apply_sparse_attention",
    "block_sparse_attention",
    "build_layout",
    "element_mask",
    "sparse_attention",
]
