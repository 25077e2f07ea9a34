"""Which keys a query sees, from token positions in the whole sequence: causal order and
document boundaries (packed sequences). Shared by ring and Ulysses attention, whose ranks hold
the sequence in different orders."""

from __future__ import annotations

import torch

from shardwise.errors import ConfigError


def zigzag_positions(seq_len: int, rank: int, ranks: int, device=None) -> torch.Tensor:
    """Positions of the tokens rank `rank` of `ranks` holds under zig-zag (head-tail) load
    balancing: of 2 x ranks equal chunks, chunk `rank` and chunk ``2 ranks - 1 - rank``, so
    every rank has as much causal work as any other."""
    if seq_len % (2 * ranks):
        raise ConfigError(
            f"a sequence of {seq_len} tokens does not split into 2 x sp = {2 * ranks} equal "
            "chunks (zig-zag ring attention)"
        )
    chunk = seq_len // (2 * ranks)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last = torch.arange((2 * ranks - 1 - rank) * chunk, (2 * ranks - rank) * chunk, device=device)
    return torch.cat([first, last])


def contiguous_positions(seq_len: int, rank: int, ranks: int, device=None) -> torch.Tensor:
    """Positions of rank `rank`'s contiguous slice of the sequence."""
    if seq_len % ranks:
        raise ConfigError(f"a sequence of {seq_len} tokens does not split over sp={ranks}")
    local = seq_len // ranks
    return torch.arange(rank * local, (rank + 1) * local, device=device)


def visible(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    doc_ids: torch.Tensor | None,
) -> torch.Tensor | None:
    """[B or 1, 1, len(q_pos), len(k_pos)] True where the query may see the key; None when
    every query sees every key. `doc_ids` [B, seq]: each token's document, by position."""
    mask = None
    if causal:
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if doc_ids is not None:
        same = doc_ids[:, q_pos][:, :, None] == doc_ids[:, k_pos][:, None, :]
        mask = same[:, None] if mask is None else mask & same[:, None]
    return mask
