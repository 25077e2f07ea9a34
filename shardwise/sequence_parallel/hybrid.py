"""2D sequence parallelism (USP: Fang and Zhao 2024): sp = ring degree x Ulysses degree.

The sequence is cut into zig-zag parts over the ring ranks, and each part into contiguous
slices over the Ulysses ranks (`hybrid_positions`). Ulysses' all-to-all gathers a ring part
for heads/u of the heads; ring attention runs over the ring ranks on those heads; a second
all-to-all brings the output back. Ulysses alone caps sp at the head count, ring alone pays
sp - 1 hops of latency; the product reaches an sp above the head count with fewer hops."""

from __future__ import annotations

import torch

from shardwise.distributed import comm
from shardwise.sequence_parallel.masks import contiguous_positions, zigzag_positions
from shardwise.sequence_parallel.ring import ring_attention
from shardwise.sequence_parallel.ulysses import across_heads


def hybrid_positions(
    seq_len: int, ring_rank: int, rings: int, ulysses_rank: int, ulysses: int, device=None
) -> torch.Tensor:
    """Positions of the tokens of (ring rank, Ulysses rank): the Ulysses rank's contiguous
    slice of the ring rank's zig-zag part."""
    part = zigzag_positions(seq_len, ring_rank, rings, device)
    return part[contiguous_positions(len(part), ulysses_rank, ulysses, device)]


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring_group: comm.Group,
    ulysses_group: comm.Group,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    stats: comm.CommStats | None = None,
) -> torch.Tensor:
    """Attention of this rank's tokens (`hybrid_positions`): q [B, Hq, T/sp, d], k and v
    [B, Hkv, T/sp, d]; `doc_ids` [B, T] by position. Returns [B, Hq, T/sp, d]."""

    def attend(q, k, v):
        return ring_attention(q, k, v, ring_group, causal=causal, doc_ids=doc_ids, stats=stats)

    return across_heads(q, k, v, ulysses_group, attend, stats)
