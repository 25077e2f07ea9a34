"""Block-sparse attention: only the blocks a layout keeps are computed, forward and backward.

A layout is a boolean block mask ``[heads, q_blocks, k_blocks]`` (heads = 1: shared by every
head). Its rows are grouped by their block count K, so that each group is one batched matmul
of a query block ``[block, head_dim]`` against its K gathered key blocks ``[K * block,
head_dim]``: the softmax of a row spans exactly its kept keys, with no padding, no
``seq x seq`` matrix and no scatter in the forward pass. Groups are cut into chunks of rows
whose score tile stays small (`CHUNK_SCORES`), so temporaries stay in cache and memory grows
with the number of kept blocks, not with the square of the sequence.

The backward pass recomputes each chunk's probabilities from q and k (as FlashAttention does)
instead of keeping them: it saves q, k, v and the output only. With ``causal`` the layout
keeps no block above the diagonal and the diagonal blocks are masked element-wise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardwise.errors import ConfigError

CHUNK_SCORES = 1 << 19
"""Score elements per chunk (2 MiB of fp32): a chunk's scores, probabilities and gathered keys
and values fit in a core's L2 cache, where a whole group's would be memory-bound."""


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
    [batch, heads, seq, head_dim] with seq = the plan's blocks x block."""
    batch, heads, seq, _ = q.shape
    if seq != plan.seq_len:
        raise ConfigError(
            f"sequence length {seq} does not match the block layout "
            f"({plan.layout.shape[1]} blocks of {plan.block} = {plan.seq_len})"
        )
    if plan.heads not in (1, heads):
        raise ConfigError(f"a block layout of {plan.heads} heads for attention of {heads} heads")
    return _BlockSparseAttention.apply(q, k, v, plan)


def _blocks(x: torch.Tensor, plan: BlockSparsePlan) -> torch.Tensor:
    """[B, H, T, d] -> [lead, layout heads * blocks, block, d]: the flat block index of the
    plan in dimension 1, every (batch, head) that shares a layout head in dimension 0."""
    batch, heads, seq, dim = x.shape
    return x.reshape(batch * heads // plan.heads, plan.heads * (seq // plan.block), plan.block, dim)


def _chunks(group: RowGroup, lead: int, block: int):
    """(rows, cols) slices of `group` whose scores hold about `CHUNK_SCORES` elements."""
    keys = group.cols.shape[1]
    step = max(1, CHUNK_SCORES // (lead * block * block * keys))
    for start in range(0, group.rows.numel(), step):
        yield group.rows[start : start + step], group.cols[start : start + step].reshape(-1)


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """Softmax and gradient sums: fp32 for bf16/fp16 inputs, the input's own dtype above."""
    return torch.promote_types(dtype, torch.float32)


def _scores(qc, kc, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Probabilities of one chunk [n, block, K * block]; `mask` (additive, -inf above the
    diagonal of the last block) for rows whose last block is their diagonal."""
    if mask is None:
        scores = torch.baddbmm(qc.new_empty(()), qc, kc.mT, beta=0, alpha=scale)
    else:
        scores = torch.baddbmm(mask.to(qc.dtype), qc, kc.mT, alpha=scale)
    return torch.softmax(scores.to(_accumulation(qc.dtype)), dim=-1)


def _diagonal_mask(plan: BlockSparsePlan, group: RowGroup, like: torch.Tensor):
    """The additive causal mask of `group`'s rows [block, K * block], or None."""
    if not group.diagonal:
        return None
    block, keys = plan.block, group.cols.shape[1]
    mask = torch.zeros(block, keys * block, dtype=torch.float32, device=like.device)
    above = torch.ones(block, block, dtype=torch.bool, device=like.device).triu_(1)
    mask[:, -block:].masked_fill_(above, float("-inf"))
    return mask


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: BlockSparsePlan):  # type: ignore[override]
        qb, kb, vb = (_blocks(x, plan) for x in (q, k, v))
        lead, _, block, dim = qb.shape
        scale = dim**-0.5
        out = torch.empty_like(qb)
        for group in plan.groups:
            mask = _diagonal_mask(plan, group, q)
            for rows, cols in _chunks(group, lead, block):
                n = lead * rows.numel()
                qc = qb.index_select(1, rows).reshape(n, block, dim)
                kc = kb.index_select(1, cols).reshape(n, -1, dim)
                vc = vb.index_select(1, cols).reshape(n, -1, dim)
                probs = _scores(qc, kc, scale, mask).to(vc.dtype)
                out.index_copy_(1, rows, torch.bmm(probs, vc).view(lead, -1, block, dim))
        out = out.view_as(q)
        ctx.save_for_backward(q, k, v, out)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out = ctx.saved_tensors
        plan: BlockSparsePlan = ctx.plan
        qb, kb, vb = (_blocks(x, plan) for x in (q, k, v))
        gb = _blocks(grad_out.contiguous(), plan)
        wide = _accumulation(q.dtype)
        # d(softmax): dS = P * (dP - rowsum(dO * O)), the row sums taken once from the output.
        row_dot = torch.linalg.vecdot(gb.to(wide), _blocks(out, plan).to(wide))
        lead, _, block, dim = qb.shape
        scale = dim**-0.5
        dq = torch.empty_like(qb)
        dk = torch.zeros(kb.shape, dtype=wide, device=kb.device)
        dv = torch.zeros(vb.shape, dtype=wide, device=vb.device)
        for group in plan.groups:
            mask = _diagonal_mask(plan, group, q)
            for rows, cols in _chunks(group, lead, block):
                n = lead * rows.numel()
                qc = qb.index_select(1, rows).reshape(n, block, dim)
                kc = kb.index_select(1, cols).reshape(n, -1, dim)
                vc = vb.index_select(1, cols).reshape(n, -1, dim)
                gc = gb.index_select(1, rows).reshape(n, block, dim)
                probs = _scores(qc, kc, scale, mask)
                values = torch.bmm(probs.mT.to(gc.dtype), gc).to(wide)
                dv.index_add_(1, cols, values.view(lead, -1, block, dim))
                dprobs = (
                    torch.bmm(gc, vc.mT)
                    .to(wide)
                    .sub_(row_dot.index_select(1, rows).reshape(n, block, 1))
                )
                dscores = probs.mul_(dprobs).to(qc.dtype)
                queries = torch.bmm(dscores, kc).mul_(scale)
                dq.index_copy_(1, rows, queries.view(lead, -1, block, dim))
                keys = torch.baddbmm(qc.new_empty(()), dscores.mT, qc, beta=0, alpha=scale).to(wide)
                dk.index_add_(1, cols, keys.view(lead, -1, block, dim))
        return dq.view_as(q), dk.to(k.dtype).view_as(k), dv.to(v.dtype).view_as(v), None
