"""Ulysses sequence parallelism (Jacobs et al. 2023, DeepSpeed-Ulysses, sec. 3.1).

Each of the sp ranks holds a contiguous slice of the sequence for every head. An all-to-all
turns that into the whole sequence for heads/sp heads; attention runs there as on one
process; a second all-to-all turns the output back. Per layer, forward: four all-to-alls
(q, k, v, output), each moving (sp - 1)/sp of the local tensor; the backward mirrors them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardwise.distributed import comm
from shardwise.errors import ConfigError
from shardwise.sequence_parallel.masks import visible


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: comm.Group,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    stats: comm.CommStats | None = None,
) -> torch.Tensor:
    """Attention of this rank's sequence slice: q [B, Hq, T/sp, d], k and v [B, Hkv, T/sp, d]
    (Hkv divides Hq: grouped-query attention), slices in rank order. `doc_ids` [B, T]: the
    document of every token of the whole sequence (packed sequences attend within their
    document). Returns [B, Hq, T/sp, d]."""

    def attend(q, k, v):
        positions = torch.arange(q.shape[2], device=q.device)
        mask = visible(positions, positions, causal, doc_ids) if doc_ids is not None else None
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa
        )

    return across_heads(q, k, v, group, attend, stats)


def across_heads(q, k, v, group: comm.Group, attend, stats=None) -> torch.Tensor:
    """`attend(q, k, v)` on the whole of this group's sequence for heads/sp of the heads:
    all-to-all from sequence-sharded to head-sharded, then back for the output."""
    ranks = comm.group_size(group)
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % ranks:
        raise ConfigError(
            f"{heads} attention heads do not split over Ulysses' sp={ranks}: use an sp that "
            "divides the heads, or attention.sequence_parallel='hybrid' (ring x Ulysses)"
        )
    if kv_heads % ranks:  # fewer kv heads than ranks: each rank takes the kv heads it needs
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    q, k, v = (comm.all_to_all_along_dims(t, 1, 2, group, stats=stats) for t in (q, k, v))
    return comm.all_to_all_along_dims(attend(q, k, v), 2, 1, group, stats=stats)
