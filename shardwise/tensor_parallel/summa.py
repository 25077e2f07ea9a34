"""2D (SUMMA) and 2.5D (Tesseract) tensor parallelism: one implementation, depth d = 1 is 2D.

Xu et al. 2021, "An Efficient 2D Method for Training Super-Large Deep Learning Models"
(Optimus, arXiv:2104.05343) runs every linear layer as SUMMA (van de Geijn & Watts 1997) on a
q x q grid: activations and weights are both split in q x q blocks, so each rank holds 1/q^2
of both. Wang et al. 2021, "2.5-dimensional distributed model training" (Tesseract,
arXiv:2105.14500) stacks d such grids: the batch is split d*q ways instead of q, the weights
stay split q x q and are replicated over the depth, and each grid runs SUMMA on its own rows.

[Note: summa layout] Rank (k, i, j) is rank k on ``tp_dep`` (absent in 2D: d = 1, k = 0), i on
``tp_row``, j on ``tp_col``.

* Activations [B, T, h]: batch block k*q + i of d*q, hidden block j of q. The model receives
  the full ids and the loss the full targets; each rank slices its batch block. The batch,
  not the sequence, is split because attention needs whole sequences.
* Linear weights (torch layout [out, in]): out block j, in block i, replicated over k. The
  output of a linear has the layout of its input (hidden block j), so residual adds and the
  next linear line up. A fused q|k|v output is split piece-wise (`split_fused`): block j is
  [q_j | k_j | v_j], heads block j, and attention runs unchanged on n_heads/q local heads.
* Embedding table [V, h]: vocab block j, hidden block i, the layout of the tied head's weight,
  so both use one shard. LayerNorm weight and bias: hidden block j.

The linear (`_SummaMatmul`): all-gather X over tp_col (X_ki, [b, T, in]) and W over tp_row
(W_j, [out/q, in]); Y_kij = X_ki W_jᵀ. Backward re-gathers both, then dX is reduce-scattered
over tp_col and dW over tp_row; the depth replicas' partial dW are all-reduced over tp_dep.

[Note: summa costs] Per rank and linear layer with |X| = tokens * d_in elements of the full
input and |W| = d_in * d_out (closed forms: `linear_wire_bytes`; ring volumes of
comm's [Note: byte accounting]):

==========  ============================================  ===================================
pass        this module                                   collectives
==========  ============================================  ===================================
forward     (q-1)(|X|/d + |W|) / q^2                      all-gather X (tp_col), W (tp_row)
backward    2 (q-1)(|X|/d + |W|) / q^2                    both all-gathers again, then
            + 2 (d-1)/d |W| / q^2                         reduce-scatter dX (tp_col), dW
                                                          (tp_row); all-reduce dW (tp_dep)
==========  ============================================  ===================================

Bian et al. 2021, "Colossal-AI" (arXiv:2110.14883), Table 1, per layer: 2D — computation
1/q^2, parameters 1/q^2, activations 1/q^2, bandwidth 6(q-1)/q, latency 6(q-1); 2.5D —
computation 1/(dq^2), parameters 1/q^2, activations 1/(dq^2), bandwidth 3(q-1)(d+1)/(dq),
latency 6(q-1). Their bandwidth is in panels (one block row of the grid, S/q elements when
|X| = |W| = S); in those units ours is 3(q-1)(1/d + 1)/q: 6(q-1)/q in 2D, 3(q-1)(d+1)/(dq) in
2.5D, the same six panel moves — two forward, and backward two re-broadcasts and two
reductions, as SUMMA's backward products dX = dY W and dW = dYᵀ X need W's and X's panels
again. Keeping X_ki and W_j from the forward pass would save the two backward all-gathers (a
third of the traffic) but store q times the activation (X_ki instead of X_kij), losing the
1/(dq^2) activation memory; `_SummaMatmul` saves only the local blocks. The table leaves out
our 2(d-1)/d |W|/q^2: the depth replicas of a weight are kept in sync like data-parallel
replicas. Latency: six ring collectives of q - 1 steps. `_SummaMatmul` issues comm's in-place
ops; its backward records into the recorders open at forward time (`comm.backward_recording`) as
well as those open where backward runs.

Layer norms sum their statistics over tp_col (`layer_norm_wire_bytes`): two all-reduces of
per-token fp32 scalars forward (mean, then the variance of the centred values, as
nn.LayerNorm computes it) and one of two per-token sums backward; their weight and bias
gradients are all-reduced over tp_row and tp_dep. The embedding costs `embedding_wire_bytes`.
The loss is `vocab_parallel_cross_entropy` over tp_col, its token sum all-reduced over tp_row
and tp_dep.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from shardwise.distributed import comm, cost
from shardwise.errors import ConfigError
from shardwise.tensor_parallel import layers
from shardwise.tensor_parallel.layers import HiddenSplitLayerNorm
from shardwise.tensor_parallel.one_d import vocab_parallel_cross_entropy
from shardwise.tensor_parallel.plan import (
    LossFn,
    TensorParallelContext,
    require_module,
    split,
    split_fused,
)

SUMMA_MODES = ("2d", "2.5d")
"""Tensor-parallel layouts this module implements."""


@dataclass(frozen=True)
class SummaGrid:
    """This rank's place (k, i, j) in the d x q x q grid and the groups along its axes."""

    row: DeviceMesh
    """tp_row: the q ranks (k, *, j), which hold the other batch blocks of a depth layer."""
    col: DeviceMesh
    """tp_col: the q ranks (k, i, *), which hold the other hidden blocks of the same rows."""
    depth: DeviceMesh | None
    """tp_dep: the d ranks (*, i, j), weight replicas; None in 2D."""
    q: int
    """Grid side, in ranks."""
    d: int
    """Depth, in ranks (1 in 2D)."""
    k: int
    """This rank's depth layer (0 in 2D)."""
    i: int
    """This rank's grid row: batch block k*q + i, weight in block i."""
    j: int
    """This rank's grid column: hidden (or weight out) block j."""

    @classmethod
    def of(cls, ctx: TensorParallelContext) -> SummaGrid:
        if ctx.mode not in SUMMA_MODES:
            raise ConfigError(
                f"2D/2.5D tensor-parallel styles need tp_mode '2d' or '2.5d', not {ctx.mode!r}"
            )
        depth = ctx.group("tp_dep") if ctx.mode == "2.5d" else None
        k, d = (ctx.rank("tp_dep"), ctx.size("tp_dep")) if depth is not None else (0, 1)
        return cls(
            row=ctx.group("tp_row"),
            col=ctx.group("tp_col"),
            depth=depth,
            q=ctx.size("tp_col"),
            d=d,
            k=k,
            i=ctx.rank("tp_row"),
            j=ctx.rank("tp_col"),
        )

    @property
    def batch_groups(self) -> tuple[DeviceMesh, ...]:
        """Groups whose ranks hold the other batch blocks: tp_row, and tp_dep in 2.5D."""
        return (self.row,) if self.depth is None else (self.row, self.depth)

    def batch_block(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's block k*q + i of d*q along dim 0 (the batch) of a full tensor."""
        blocks, batch = self.d * self.q, tensor.shape[0]
        if batch % blocks:
            raise ConfigError(
                f"2D/2.5D tensor parallelism splits the batch into depth x q = {self.d} x "
                f"{self.q} = {blocks} blocks, but the batch has {batch} rows; use a "
                f"micro_batch divisible by {blocks}"
            )
        rows = batch // blocks
        return tensor.narrow(0, (self.k * self.q + self.i) * rows, rows)

    def shared_by_depth(self, param: torch.Tensor) -> torch.Tensor:
        """Megatron's f over tp_dep: the d replicas see different batch blocks, so their
        gradients are partial sums, all-reduced in backward."""
        return param if self.depth is None else comm.copy_to_group(param, self.depth)

    def shared_by_batch_blocks(self, param: torch.Tensor) -> torch.Tensor:
        """f over tp_row and tp_dep, for a parameter every batch block uses (norms, biases)."""
        return self.shared_by_depth(comm.copy_to_group(param, self.row))


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def _gather_last_dim(x: torch.Tensor, group: DeviceMesh) -> torch.Tensor:
    """[..., n/q] blocks of the group, concatenated in rank order along the last dim."""
    front = x.movedim(-1, 0).contiguous()
    out = front.new_empty((comm.group_size(group) * front.shape[0], *front.shape[1:]))
    comm.all_gather_(out, front, group)
    return out.movedim(0, -1)


def _gather_columns_transposed(weight: torch.Tensor, group: DeviceMesh) -> torch.Tensor:
    """W_j [out/q, in/q] blocks gathered along `in`, returned transposed: [in, out/q]."""
    front = weight.t().contiguous()
    out = front.new_empty((comm.group_size(group) * front.shape[0], front.shape[1]))
    comm.all_gather_(out, front, group)
    return out


def _reduce_scatter_first_dim(x: torch.Tensor, group: DeviceMesh) -> torch.Tensor:
    """Sum of `x` over the group, this rank's block of dim 0 kept."""
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // comm.group_size(group), *x.shape[1:]))
    comm.reduce_scatter_(out, x, group)
    return out


class _SummaMatmul(torch.autograd.Function):
    """Y_kij = X_ki W_jᵀ from the local blocks X_kij [..., in/q] and W_ij [out/q, in/q].

    Saves only the local blocks; backward re-gathers X_ki and W_j (see [Note: summa costs]).
    """

    @staticmethod
    def forward(ctx, x, weight, row, col):
        ctx.save_for_backward(x, weight)
        ctx.row, ctx.col, ctx.recorders = row, col, comm.open_recorders()
        return _gather_last_dim(x, col) @ _gather_columns_transposed(weight, row)

    @staticmethod
    @comm.backward_recording
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:  # dX_kij: Σ_j' dY_kij' W_j' over tp_col, block j kept
            partial = grad_y @ _gather_columns_transposed(weight, ctx.row).t()
            grad_x = _reduce_scatter_first_dim(partial.movedim(-1, 0), ctx.col).movedim(0, -1)
        if ctx.needs_input_grad[1]:  # dW_ij: Σ_i' X_i'ᵀ dY_i'j over tp_row, in block i kept
            rows = _gather_last_dim(x, ctx.col).flatten(0, -2)
            partial = rows.t() @ grad_y.flatten(0, -2)  # [in, out/q]
            grad_weight = _reduce_scatter_first_dim(partial, ctx.row).t()
        return grad_x, grad_weight, None, None


class SummaLinear(nn.Module):
    """y_kij = x_ki W_jᵀ (+ b_j): a Linear whose weight is split q x q ([Note: summa layout])."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, grid: SummaGrid):
        super().__init__()
        self.weight, self.bias, self.grid = weight, bias, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.grid.shared_by_depth(self.weight)
        y = _SummaMatmul.apply(x, weight, self.grid.row, self.grid.col)
        if self.bias is None:
            return y
        return y + self.grid.shared_by_batch_blocks(self.bias)


class SummaEmbedding(nn.Module):
    """Embedding with the table split vocab (tp_col) x hidden (tp_row): the table's hidden
    blocks are gathered over tp_row, each rank looks up the ids of its batch block that fall
    in its vocab block (zeros elsewhere), and the partial rows are summed over tp_col while
    scattering hidden block j to rank j."""

    is_embedding = True
    """Stands in for an nn.Embedding (its weight is not weight-decayed, `param_groups`)."""

    def __init__(self, weight: nn.Parameter, grid: SummaGrid) -> None:
        super().__init__()
        self.weight, self.grid = weight, grid

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self.grid.batch_block(ids)  # checked before any collective
        table = comm.gather_along_dim_reduce_scatter_grad(
            self.grid.shared_by_depth(self.weight), 1, self.grid.row
        )
        local = ids - self.grid.j * table.shape[0]
        outside = (local < 0) | (local >= table.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), table)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        return comm.reduce_scatter_along_dim(rows, -1, self.grid.col)


# ---------------------------------------------------------------------------------------------
# Styles
# ---------------------------------------------------------------------------------------------


def _weight_layout(fused: int) -> str:
    """Layout name of a [out, in] weight: out block j (piece-wise when fused), in block i."""
    return f"summa/{fused}"


def _vector_layout(fused: int) -> str:
    """Layout name of a bias or norm parameter: block j (piece-wise when fused)."""
    return f"summa-col/{fused}"


@dataclass(frozen=True)
class Linear2p5D:
    """Split a Linear's weight q x q (out block j, in block i), replicated over the depth;
    `fused` > 1 for concatenated outputs (qkv = 3)."""

    fused: int = 1

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        require_module(module, nn.Linear, "Linear2p5D")
        grid = SummaGrid.of(ctx)
        q, i, j = grid.q, grid.i, grid.j

        def block(t: torch.Tensor) -> torch.Tensor:
            return split(split_fused(t, 0, self.fused, q, j), 1, q, i)

        weight = ctx.shard(module.weight, _weight_layout(self.fused), block, replicas=grid.d)
        bias = None
        if module.bias is not None:
            bias = ctx.shard(
                module.bias,
                _vector_layout(self.fused),
                lambda t: split_fused(t, 0, self.fused, q, j),
                replicas=grid.d * q,
            )
        return SummaLinear(weight, bias, grid)


@dataclass(frozen=True)
class Embedding2p5D:
    """Split an Embedding's table vocab block j x hidden block i: the layout of the tied
    head's weight under `Linear2p5D`, so both use one shard."""

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        require_module(module, nn.Embedding, "Embedding2p5D")
        grid = SummaGrid.of(ctx)
        q, i, j = grid.q, grid.i, grid.j
        weight = ctx.shard(
            module.weight,
            _weight_layout(1),
            lambda t: split(split(t, 0, q, j), 1, q, i),
            replicas=grid.d,
        )
        return SummaEmbedding(weight, grid)


@dataclass(frozen=True)
class LayerNorm2p5D:
    """A LayerNorm over hidden-split activations: weight and bias hidden block j, replicated
    over tp_row and tp_dep."""

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        require_module(module, nn.LayerNorm, "LayerNorm2p5D")
        if len(module.normalized_shape) != 1:
            raise ConfigError(
                f"LayerNorm2p5D normalises the last dim only, not {module.normalized_shape}"
            )
        grid = SummaGrid.of(ctx)
        block = partial(split, dim=0, parts=grid.q, index=grid.j)

        def shard(param: nn.Parameter | None) -> nn.Parameter | None:
            if param is None:
                return None
            return ctx.shard(param, _vector_layout(1), block, replicas=grid.d * grid.q)

        weight, bias = shard(module.weight), shard(module.bias)
        return HiddenSplitLayerNorm(module, weight, bias, grid.col, grid.batch_groups)


def loss_summa(ctx: TensorParallelContext) -> LossFn:
    """Mean cross-entropy from logits [b, T, V/q] of batch block (k, i), vocab block j, and
    the full targets: vocab-parallel over tp_col, token sums all-reduced over tp_row/tp_dep."""
    grid = SummaGrid.of(ctx)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = grid.batch_block(targets)
        return vocab_parallel_cross_entropy(
            logits, rows, grid.col, targets.numel(), row_groups=grid.batch_groups
        )

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Closed-form communication ([Note: summa costs]; comm's [Note: byte accounting])
# ---------------------------------------------------------------------------------------------


def linear_wire_bytes(
    tokens: int, d_in: int, d_out: int, q: int, d: int, elem_bytes: int, *, bias: bool = False
) -> cost.WireBytes:
    """Wire bytes per rank of one `SummaLinear` for a batch of `tokens` (batch x seq of the
    full batch the model receives), as CommStats records them."""
    rows = tokens / (d * q)  # tokens of this rank's batch block
    x_block, w_block = rows * d_in / q * elem_bytes, d_out * d_in / q**2 * elem_bytes
    entries = [
        ("forward", "tp_col", "all_gather", q, x_block),
        ("forward", "tp_row", "all_gather", q, w_block),
        ("backward", "tp_col", "all_gather", q, x_block),
        ("backward", "tp_row", "all_gather", q, w_block),
        ("backward", "tp_col", "reduce_scatter", q, q * x_block),
        ("backward", "tp_row", "reduce_scatter", q, q * w_block),
        ("backward", "tp_dep", "all_reduce", d, w_block),
    ]
    if bias:
        b_block = d_out / q * elem_bytes
        entries += [
            ("backward", "tp_row", "all_reduce", q, b_block),
            ("backward", "tp_dep", "all_reduce", d, b_block),
        ]
    return cost.wire_table(*entries)


def embedding_wire_bytes(
    tokens: int, vocab: int, d_model: int, q: int, d: int, elem_bytes: int
) -> cost.WireBytes:
    """Wire bytes per rank of one `SummaEmbedding` for `tokens` ids of the full batch."""
    rows = tokens / (d * q)
    table_block = vocab * d_model / q**2 * elem_bytes
    x_block = rows * d_model / q * elem_bytes
    return cost.wire_table(
        ("forward", "tp_row", "all_gather", q, table_block),
        ("forward", "tp_col", "reduce_scatter", q, q * x_block),
        ("backward", "tp_col", "all_gather", q, x_block),
        ("backward", "tp_row", "reduce_scatter", q, q * table_block),
        ("backward", "tp_dep", "all_reduce", d, table_block),
    )


def layer_norm_wire_bytes(
    tokens: int, d_model: int, q: int, d: int, elem_bytes: int, *, affine_params: int = 2
) -> cost.WireBytes:
    """Wire bytes per rank of one `HiddenSplitLayerNorm` for `tokens` of the full batch:
    statistics over tp_col, weight and bias replicated over tp_row and tp_dep."""
    return layers.layer_norm_wire_bytes(
        tokens / (d * q),
        ("tp_col", q),
        d_model // q,
        [("tp_row", q), ("tp_dep", d)],
        elem_bytes,
        affine_params,
    )
