"""Block-sparse attention: only the blocks a layout keeps are computed, forward and backward.

A layout is a boolean block mask ``[heads, q_blocks, k_blocks]`` (heads = 1: shared by every
head). Its rows are grouped by their block count K, so that each group is one batched matmul
of a query block ``[block, head_dim]`` against its K gathered key blocks ``[K * block,
head_dim]``: the softmax of a row spans exactly its kept keys in one pass (every key block
of a row is in the same chunk, so no online rescaling across chunks is needed), with no
padding and no ``seq x seq`` matrix. Groups are cut into chunks whose score tile stays small
(`CHUNK_SCORES`), so memory grows with the kept blocks of one chunk, not with the square of
the sequence.

The backward pass recomputes each chunk's probabilities from q and k (as FlashAttention does)
instead of keeping them: it saves q, k, v and the output only. With ``causal`` the layout
keeps no block above the diagonal and the diagonal blocks are masked element-wise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardwise.attention.flex import flex_available, flex_block_sparse_attention
from shardwise.errors import ConfigError

CHUNK_SCORES = 1 << 19
"""Score elements per chunk (2 MiB of fp32). Chosen on the benchmark (8 heads of 64, blocks of
64, 4096 tokens): smaller chunks cost Python and dispatch time (2^17: +40%), larger ones
memory (2^20: a peak above dense SDPA's) for no speed (docs/benchmarks.md)."""


@dataclass(frozen=True)
class RowGroup:
    """Layout rows that keep the same number of key blocks."""

    rows: torch.Tensor
    """[R] flat row indices (head * q_blocks + q_block)."""
    cols: torch.Tensor
    """[R, K] flat key-block indices (head * k_blocks + k_block) of each row, ascending."""
    diagonal: bool
    """Every row's last block is its own diagonal block (masked element-wise when causal)."""


class BlockSparsePlan:
    """The row groups of a checked layout, built once per (layout, device)."""

    def __init__(self, layout: torch.Tensor, block: int, causal: bool) -> None:
        check_layout(layout, causal)
        self.layout = layout
        self.block = block
        self.causal = causal
        heads, q_blocks, _ = layout.shape
        counts = layout.sum(-1)
        diagonal = layout.diagonal(dim1=1, dim2=2) & causal
        self.groups: list[RowGroup] = []
        for count in counts.unique().tolist():
            for on_diagonal in (False, True):
                head, row = ((counts == count) & (diagonal == on_diagonal)).nonzero(as_tuple=True)
                if head.numel() == 0:
                    continue
                cols = layout[head, row].nonzero(as_tuple=True)[1].view(-1, count)
                self.groups.append(
                    RowGroup(head * q_blocks + row, head[:, None] * q_blocks + cols, on_diagonal)
                )
        self._moved: dict[torch.device, BlockSparsePlan] = {}
        self.density = float(counts.sum()) / layout.numel()
        """Kept blocks / all blocks of the square layout."""

    @property
    def heads(self) -> int:
        return self.layout.shape[0]

    @property
    def seq_len(self) -> int:
        return self.layout.shape[1] * self.block

    def on(self, device: torch.device) -> BlockSparsePlan:
        """This plan with its indices on `device` (moved once per device, then cached)."""
        if self.layout.device == device:
            return self
        if device not in self._moved:
            moved = object.__new__(BlockSparsePlan)
            moved.__dict__.update(self.__dict__, _moved={})
            moved.layout = self.layout.to(device)
            moved.groups = [
                RowGroup(g.rows.to(device), g.cols.to(device), g.diagonal) for g in self.groups
            ]
            self._moved[device] = moved
        return self._moved[device]


def check_layout(layout: torch.Tensor, causal: bool) -> None:
    """One-line errors for a layout the op cannot run."""
    if layout.dtype != torch.bool or layout.dim() != 3 or layout.shape[1] != layout.shape[2]:
        raise ConfigError(
            f"a block layout is a bool tensor [heads, blocks, blocks]; got {layout.dtype} "
            f"{list(layout.shape)}"
        )
    if causal and layout.triu(1).any():
        raise ConfigError("a causal block layout keeps a block above the diagonal")
    empty = (~layout.any(-1)).nonzero()
    if len(empty):
        head, row = empty[0].tolist()
        raise ConfigError(
            f"block layout row {row} of head {head} keeps no block: its queries would attend "
            f"to nothing ({len(empty)} such rows)"
        )


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockSparsePlan
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(head_dim) + mask) v over the plan's kept blocks; q, k, v
    [batch, heads, seq, head_dim] with seq = the plan's blocks x block. On CUDA through
    FlexAttention with the same layout (shardwise/attention/flex.py), elsewhere our op."""
    batch, heads, seq, _ = q.shape
    if seq != plan.seq_len:
        raise ConfigError(
            f"sequence length {seq} does not match the block layout "
            f"({plan.layout.shape[1]} blocks of {plan.block} = {plan.seq_len})"
        )
    if plan.heads not in (1, heads):
        raise ConfigError(f"a block layout of {plan.heads} heads for attention of {heads} heads")
    if flex_available(q.device):
        return flex_block_sparse_attention(q, k, v, plan, compiled=True)
    return _BlockSparseAttention.apply(q, k, v, plan)


def _blocks(x: torch.Tensor, plan: BlockSparsePlan) -> torch.Tensor:
    """[B, H, T, d] -> [lead x layout heads x blocks, block, d]: one row per block, where
    lead counts the (batch, head) pairs that share a layout head (a view, no copy)."""
    return x.reshape(-1, plan.block, x.shape[-1])


def _chunks(group: RowGroup, lead: int, blocks: int, block: int):
    """(rows, cols): flat block indices (into `_blocks`) of pieces of `group` whose scores
    hold at most `CHUNK_SCORES` elements: rows ``[lead x R]`` (several layout rows of every
    lead, or, for rows too long for that, one row of a few leads) and their key blocks
    ``[lead x R x K]``; `blocks` is the number of blocks per lead."""
    per_row = block * block * group.cols.shape[1]
    rows = max(1, CHUNK_SCORES // (lead * per_row))
    leads = lead if CHUNK_SCORES >= lead * per_row else max(1, CHUNK_SCORES // per_row)
    offsets = torch.arange(lead, device=group.rows.device) * blocks
    for start in range(0, group.rows.numel(), rows):
        part_rows = group.rows[start : start + rows]
        part_cols = group.cols[start : start + rows].reshape(-1)
        for first in range(0, lead, leads):
            offset = offsets[first : first + leads, None]
            yield (offset + part_rows).reshape(-1), (offset + part_cols).reshape(-1)


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """Softmax and gradient sums: fp32 for bf16/fp16 inputs, the input's own dtype above."""
    return torch.promote_types(dtype, torch.float32)


def _scores(qc, kc, scale: float, above: torch.Tensor | None) -> torch.Tensor:
    """Probabilities of one chunk [n, block, K * block]; `above` (the causal mask of a block,
    True above its diagonal) for rows whose last block is their diagonal."""
    scores = torch.baddbmm(qc.new_empty(()), qc, kc.mT, beta=0, alpha=scale)
    if above is not None:
        scores[..., -above.shape[0] :].masked_fill_(above, float("-inf"))
    return torch.softmax(scores.to(_accumulation(qc.dtype)), dim=-1)


def _diagonal_mask(plan: BlockSparsePlan, group: RowGroup, like: torch.Tensor):
    """The causal mask of a diagonal block for `group`'s rows (True above the diagonal), or
    None when their last block is not their diagonal."""
    if not group.diagonal:
        return None
    return torch.ones(plan.block, plan.block, dtype=torch.bool, device=like.device).triu_(1)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: BlockSparsePlan):  # type: ignore[override]
        qb, kb, vb = (_blocks(x, plan) for x in (q, k, v))
        out = torch.empty_like(qb)
        lead, blocks = _leads(q, plan)
        for group in plan.groups:
            above = _diagonal_mask(plan, group, q)
            for rows, cols in _chunks(group, lead, blocks, plan.block):
                _forward_chunk(qb, kb, vb, out, rows, cols, above)
        out = out.view_as(q)
        ctx.save_for_backward(q, k, v, out)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out = ctx.saved_tensors
        plan: BlockSparsePlan = ctx.plan
        qb, kb, vb, ob = (_blocks(x, plan) for x in (q, k, v, out))
        gb = _blocks(grad_out.contiguous(), plan)
        wide = _accumulation(q.dtype)
        dq = torch.empty_like(qb)
        dk = torch.zeros(kb.shape, dtype=wide, device=kb.device)
        dv = torch.zeros(vb.shape, dtype=wide, device=vb.device)
        lead, blocks = _leads(q, plan)
        for group in plan.groups:
            above = _diagonal_mask(plan, group, q)
            for rows, cols in _chunks(group, lead, blocks, plan.block):
                _backward_chunk(qb, kb, vb, ob, gb, dq, dk, dv, rows, cols, above)
        return dq.view_as(q), dk.to(k.dtype).view_as(k), dv.to(v.dtype).view_as(v), None


def _leads(q: torch.Tensor, plan: BlockSparsePlan) -> tuple[int, int]:
    """(batch, head) pairs per layout head, and blocks per such pair's layout."""
    batch, heads, seq, _ = q.shape
    return batch * heads // plan.heads, plan.heads * (seq // plan.block)


# One chunk per call: its temporaries are freed before the next chunk's are made, and each is
# released as soon as it is used (`del`), so a chunk's peak is about four score tiles.
# Blocks move by index_select / index_copy_ / index_add_ on the [blocks, block, d] views with
# flat indices: several times faster than the same selection along an inner dimension.


def _forward_chunk(qb, kb, vb, out, rows, cols, above) -> None:
    """out[rows] = attention of the query blocks `rows` over their key blocks `cols`."""
    block, dim = qb.shape[-2:]
    qc = qb.index_select(0, rows)
    n = qc.shape[0]
    kc = kb.index_select(0, cols).view(n, -1, dim)
    probs = _scores(qc, kc, dim**-0.5, above)
    del qc, kc
    vc = vb.index_select(0, cols).view(n, -1, dim)
    out.index_copy_(0, rows, torch.bmm(probs.to(vc.dtype), vc))


def _backward_chunk(qb, kb, vb, ob, gb, dq, dk, dv, rows, cols, above) -> None:
    """Adds the chunk's share of dk and dv; writes dq of its rows (each row is in one chunk).
    With P the probabilities and dO the output gradient: dV = Pᵀ dO; dP = dO Vᵀ;
    dS = P * (dP - rowsum(dO * O)) (softmax's backward, the row sums from the output);
    dQ = dS K / sqrt(d); dK = dSᵀ Q / sqrt(d)."""
    block, dim = qb.shape[-2:]
    scale, wide = dim**-0.5, dk.dtype
    qc = qb.index_select(0, rows)
    n = qc.shape[0]
    kc = kb.index_select(0, cols).view(n, -1, dim)
    gc = gb.index_select(0, rows)
    probs = _scores(qc, kc, scale, above)
    values = torch.bmm(probs.mT.to(gc.dtype), gc).to(wide)
    dv.index_add_(0, cols, values.view(-1, block, dim))
    del values
    oc = ob.index_select(0, rows).view(n * block, 1, dim).to(wide)
    row_dot = torch.bmm(oc, gc.view(n * block, dim, 1).to(wide)).view(n, block, 1)
    vc = vb.index_select(0, cols).view(n, -1, dim)
    dprobs = torch.bmm(gc, vc.mT).to(wide).sub_(row_dot)
    del vc
    dscores = probs.mul_(dprobs).to(qc.dtype)
    del dprobs, probs
    dq.index_copy_(0, rows, torch.bmm(dscores, kc).mul_(scale))
    del kc
    keys = torch.baddbmm(qc.new_empty(()), dscores.mT, qc, beta=0, alpha=scale).to(wide)
    dk.index_add_(0, cols, keys.view(-1, block, dim))
