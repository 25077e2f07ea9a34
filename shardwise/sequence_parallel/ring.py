"""Ring attention (Liu et al. 2023; Colossal-AI's ring self-attention, Li et al. 2021).

Each of the sp ranks holds a part of the sequence (zig-zag: two chunks, one from each end, so
causal work is even). Its key/value block travels around the ring: at each of sp - 1 hops a
rank sends the block it holds to the next rank and receives the previous rank's, while it
attends its queries to the block it holds, merging blocks with an online softmax in fp32.
The backward pass sends the key/value blocks around again together with their gradients,
which pick up every rank's contribution and make one more hop home. Memory per rank stays
O(seq / sp): one visiting block at a time, never the whole sequence, and its scores a tile
pair at a time (`TILE`); tile pairs the causal or document mask hides entirely are skipped.

Bytes per layer and rank: forward (sp - 1) x |k + v| sent; backward (sp - 1) x |k + v| plus
sp x |dk + dv| (fp32 accumulators).
"""

from __future__ import annotations

import torch

from shardwise.distributed import comm
from shardwise.sequence_parallel.masks import visible, zigzag_positions


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: comm.Group,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    stats: comm.CommStats | None = None,
) -> torch.Tensor:
    """Attention of this rank's zig-zag part of the sequence (`zigzag_positions`): q [B, Hq,
    T/sp, d], k and v [B, Hkv, T/sp, d] (Hkv divides Hq). `doc_ids` [B, T]: the document of
    every token of the whole sequence, by position. Returns [B, Hq, T/sp, d]."""
    return _RingAttention.apply(q, k, v, group, causal, doc_ids, stats)


class _Ring:
    """This rank's place in the ring and the positions of every rank's tokens."""

    def __init__(self, group: comm.Group, local: int, device: torch.device) -> None:
        self.group = group
        self.size = comm.group_size(group)
        self.rank = comm.group_rank(group)
        seq = local * self.size
        self.positions = [zigzag_positions(seq, r, self.size, device) for r in range(self.size)]

    def source(self, step: int) -> int:
        """The rank whose block this rank holds at `step`."""
        return (self.rank - step) % self.size

    def pass_on(self, tensor: torch.Tensor, stats) -> _Exchange:
        """Start sending `tensor` to the next rank and receiving the previous rank's; the
        caller computes meanwhile and takes the received tensor with `result()`."""
        return _Exchange(self, tensor, stats)


def _expand(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Key or value heads repeated to the query heads (grouped-query attention)."""
    return kv if kv.shape[1] == heads else kv.repeat_interleave(heads // kv.shape[1], dim=1)


def _fold(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of `_expand`: the query heads' share summed per key/value head."""
    batch, heads, seq, dim = grad.shape
    if heads == kv_heads:
        return grad
    return grad.view(batch, kv_heads, heads // kv_heads, seq, dim).sum(2)


def _scores(q, k, scale, mask) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)).mul_(scale)
    return scores if mask is None else scores.masked_fill_(~mask, float("-inf"))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, doc_ids, stats):  # type: ignore[override]
        ring = _Ring(group, q.shape[2], q.device)
        wide = torch.promote_types(q.dtype, torch.float32)
        qw, scale = q.to(wide), q.shape[-1] ** -0.5
        shape = q.shape[:-1]
        top = torch.full(shape, float("-inf"), dtype=wide, device=q.device)
        total = torch.zeros(shape, dtype=wide, device=q.device)
        acc = torch.zeros(q.shape, dtype=wide, device=q.device)
        block = torch.stack([k, v])
        for step in range(ring.size):
            if step < ring.size - 1:  # the next block travels while this one is computed
                incoming = ring.pass_on(block, stats)
            key, value = (_expand(t, q.shape[1]).to(wide) for t in block)
            for rows, cols, mask in _tile_pairs(ring, step, causal, doc_ids):
                scores = _scores(qw[:, :, rows], key[:, :, cols], scale, mask)
                new_top = torch.maximum(top[..., rows], scores.amax(-1))
                safe = new_top.masked_fill(new_top == float("-inf"), 0.0)
                probs = torch.exp(scores - safe[..., None])
                shrink = torch.exp(top[..., rows] - safe)
                total[..., rows] = total[..., rows] * shrink + probs.sum(-1)
                acc[:, :, rows] = acc[:, :, rows] * shrink[..., None] + probs @ value[:, :, cols]
                top[..., rows] = new_top
            if step < ring.size - 1:
                block = incoming.result()
        out = acc / total[..., None]
        lse = top + total.log()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.causal, ctx.doc_ids, ctx.stats = ring, causal, doc_ids, stats
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        ring: _Ring = ctx.ring
        wide, scale = out.dtype, q.shape[-1] ** -0.5
        qw, gw = q.to(wide), grad_out.to(wide)
        row_dot = (gw * out).sum(-1, keepdim=True)  # rowsum(dO * O) of softmax's backward
        dq = torch.zeros(q.shape, dtype=wide, device=q.device)
        block = torch.stack([k, v])
        grads = torch.zeros(block.shape, dtype=wide, device=q.device)
        for step in range(ring.size):
            if step < ring.size - 1:
                incoming = ring.pass_on(block, ctx.stats)
            key, value = (_expand(t, q.shape[1]).to(wide) for t in block)
            dkey, dvalue = torch.zeros_like(key), torch.zeros_like(value)
            for rows, cols, mask in _tile_pairs(ring, step, ctx.causal, ctx.doc_ids):
                scores = _scores(qw[:, :, rows], key[:, :, cols], scale, mask)
                probs = torch.exp(scores - lse[..., rows, None])
                dprobs = gw[:, :, rows] @ value[:, :, cols].transpose(-1, -2)
                dscores = probs * (dprobs - row_dot[:, :, rows])
                dq[:, :, rows] += dscores @ key[:, :, cols] * scale
                dkey[:, :, cols] += dscores.transpose(-1, -2) @ qw[:, :, rows] * scale
                dvalue[:, :, cols] += probs.transpose(-1, -2) @ gw[:, :, rows]
            grads[0] += _fold(dkey, k.shape[1])
            grads[1] += _fold(dvalue, k.shape[1])
            grads = ring.pass_on(grads, ctx.stats).result()  # the last hop brings them home
            if step < ring.size - 1:
                block = incoming.result()
        return dq.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None, None, None


TILE = 256
"""Queries and keys per tile: one tile pair's scores (batch x heads x TILE x TILE) are the
largest temporary, so memory grows linearly with the sequence, not with its square. 512 held
~16 MiB of temporaries at 4 heads (the sequence-parallel benchmark's cap is 24 MiB); smaller
tiles cost Python time per pair."""


def _tile_pairs(ring: _Ring, step: int, causal: bool, doc_ids):
    """(query rows, key columns, mask) of the tile pairs of this rank's queries against the
    block it holds at `step`, leaving out the pairs the mask hides entirely (causal: the
    parts of a block after every query of the tile)."""
    mine, theirs = ring.positions[ring.rank], ring.positions[ring.source(step)]
    for first in range(0, len(mine), TILE):
        rows = slice(first, first + TILE)
        for start in range(0, len(theirs), TILE):
            cols = slice(start, start + TILE)
            mask = visible(mine[rows], theirs[cols], causal, doc_ids)
            if mask is None or mask.any():
                yield rows, cols, mask


class _Exchange:
    """A send to the next rank and a receive from the previous one, under way."""

    def __init__(self, ring: _Ring, tensor: torch.Tensor, stats) -> None:
        self.received = torch.empty_like(tensor)
        nxt, prev = (ring.rank + 1) % ring.size, (ring.rank - 1) % ring.size
        self.sending = comm.send(tensor, nxt, ring.group, async_op=True, stats=stats)
        self.receiving = comm.recv(self.received, prev, ring.group, async_op=True, stats=stats)

    def result(self) -> torch.Tensor:
        self.receiving.wait()
        self.sending.wait()
        return self.received
