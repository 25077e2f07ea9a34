"""The CUDA path of block-sparse attention: torch's FlexAttention with the plan's layout as
its block mask (fused kernels, forward and backward). The layout is the same data as on CPU,
so the results are the same attention; FlexAttention has no backward on CPU, where
`block_sparse_attention` runs its own op."""

from __future__ import annotations

import weakref
from functools import cache
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shardwise.attention.block_sparse import BlockSparsePlan

_MASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""plan -> {(seq_len, device): BlockMask}: built once per plan, length and device."""


def flex_available(device: torch.device) -> bool:
    """FlexAttention trains on this device (CUDA, with a torch that has it)."""
    if device.type != "cuda":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_block_mask(plan: BlockSparsePlan, seq_len: int, device: torch.device):
    """FlexAttention's `BlockMask` for the plan: token (q, k) attends when its block pair is
    kept (per layout head) and, when causal, k <= q."""
    from torch.nn.attention.flex_attention import create_block_mask

    layout, block, causal = plan.layout.to(device), plan.block, plan.causal
    shared = layout.shape[0] == 1

    def keep(batch, head, q_index, k_index):
        kept = layout[0 if shared else head, q_index // block, k_index // block]
        return kept & (k_index <= q_index) if causal else kept

    heads = None if shared else layout.shape[0]
    return create_block_mask(keep, None, heads, seq_len, seq_len, device=device)


@cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockSparsePlan, compiled: bool
) -> torch.Tensor:
    """Attention of q, k, v [B, H, T, d] over the plan's layout through FlexAttention;
    `compiled`: its fused kernels (CUDA), else torch's eager reference (forward only on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    masks = _MASKS.setdefault(plan, {})
    key = (q.shape[2], q.device)
    if key not in masks:
        masks[key] = flex_block_mask(plan, q.shape[2], q.device)
    return (_compiled() if compiled else flex_attention)(q, k, v, block_mask=masks[key])
