"""3D tensor parallelism on a q x q x q cube of ranks.

Agarwal et al. 1995, "A three-dimensional approach to parallel matrix multiplication": for
C = A B on q^3 processors (i, j, l), A_il is replicated along j, B_lj along i, and the
partial products A_il B_lj are summed over l. Bian et al. 2021, "Maximizing Parallelism in
Distributed Training for Huge Neural Networks" (arXiv:2105.14450) applies it to a transformer
linear Y = X W: all-gather the input block over one axis, the weight block over another,
multiply, and reduce-scatter the partial output over the third. Backward all-gathers dY and
reduce-scatters dX = dY W^T and dW = X^T dY the same way.

Cost. The Colossal-AI paper (Bian et al. 2021, arXiv:2110.14883, Table 1, 3D row) gives
parameters 1/q^3, activations 1/q^3 and bandwidth O(6(q-1)/q^3) per linear (latency 6(q-1)),
i.e. one all-gather or reduce-scatter of each of X, W and Y forward and again backward:
2(q-1)(|X| + |W| + |Y|)/q^3 bytes per rank, |.| the full tensor's bytes. Our linear saves
only this rank's blocks of X and W for backward (activation memory 1/q^3 between forward
and backward, as the table promises) and re-gathers them there, so it sends
(q-1)(3|X| + 3|W| + 2|Y|)/q^3 per rank, two collectives more than the paper's six
(`linear_wire_bytes`). The paper's six assume the gathered X_il and W_lj (q times larger)
stay alive until backward.

Layouts [Note: 3D layouts]. Cube ranks (a, b, c) on the mesh axes (tp_dep, tp_row, tp_col).
Token rows are split by whole sequences (batch rows, never the sequence: attention needs
whole sequences) into q^2 batch blocks of B/q^2 rows, block k = rows [k B/q^2, (k+1) B/q^2).

* P (primary, the residual stream): batch block a*q + b, hidden block c.
* S (swapped): batch block a*q + c, feature block b.

A linear whose input is in P (qkv, mlp.up/gate, head): all-gather X over tp_row along the
batch -> rows a*q .. a*q+q-1 (batch super-block a), input-feature block c; all-gather W
(rows: output block b, split again over tp_dep) over tp_dep -> W[out block b, in block c];
the partial product, summed over c, is reduce-scattered over tp_col -> batch block a*q + c,
output block b: layout S. A linear whose input is in S (attn.proj, mlp.down) is the same with
tp_row and tp_col exchanged and returns layout P (batch block a*q + b, output block c). So
P -> S -> P returns the original rows in the original order, and in S every rank holds whole
sequences of one batch block and one block of heads (q|k|v split with `split_fused`): the
attention runs unchanged on local heads.

Weights are split over all q^3 ranks (replicas 1): a linear's weight [out, in] keeps the
output block of its out axis, split again (dim 0) over tp_dep, and the input block of its in
axis. The tied embedding uses the head's layout ``"3d:P/1"`` (vocabulary block b, sub-block a,
hidden block c): it gathers the table over tp_dep and tp_row (the full vocabulary for hidden
block c, V h/q elements per rank, transient) and looks up the ids of batch block a*q + b,
which is layout P directly. Layer norms on P sum their statistics over tp_col; their weight
and bias (hidden block c) are replicated over tp_dep x tp_row (replicas q^2).

Learned position tables are not split (the GPT plan refuses them); rope works on local heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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

BATCH_DIM = 0
"""Batch dimension of [batch, seq, features] activations: the one 3D splits into blocks."""

FEATURE_AXIS = {"P": "tp_col", "S": "tp_row"}
"""The axis whose rank selects the feature block of each layout (see [Note: 3D layouts])."""

_OTHER = {"P": "S", "S": "P"}


def _check_layout(layout: str, style: str) -> None:
    if layout not in FEATURE_AXIS:
        raise ConfigError(f"{style}(input_layout={layout!r}) is not a 3D layout; use 'P' or 'S'")


def batch_block(layout: str, ctx: TensorParallelContext) -> int:
    """Index (of q^2) of the batch block this rank holds in `layout`: a*q + b in P, a*q + c
    in S."""
    q = ctx.size("tp_dep")
    return ctx.rank("tp_dep") * q + ctx.rank(FEATURE_AXIS[_OTHER[layout]])


def take_batch_block(t: torch.Tensor, blocks: int, index: int) -> torch.Tensor:
    """Rows [index*B/blocks, (index+1)*B/blocks) of `t` [B, ...]; refuses a batch that does
    not split into `blocks` blocks of whole sequences."""
    rows = t.shape[BATCH_DIM]
    if rows % blocks:
        raise ConfigError(
            f"3D tensor parallelism splits each micro-batch into q^2={blocks} blocks of whole "
            f"sequences, but the batch has {rows} rows; use a train.micro_batch divisible "
            f"by {blocks}"
        )
    return split(t, BATCH_DIM, blocks, index)


def weight_block(
    t: torch.Tensor, fused: int, q: int, out_index: int, dep_index: int, in_index: int
) -> torch.Tensor:
    """A 3D linear's shard of `t` [out, in]: output block `out_index` (of every fused piece),
    its sub-block `dep_index` along the output dim, input block `in_index`."""
    rows = split(split_fused(t, 0, fused, q, out_index), 0, q, dep_index)
    return split(rows, 1, q, in_index)


# ---------------------------------------------------------------------------------------------
# The 3D matmul
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _CubeAxes:
    """The three roles of the cube's axes for one linear."""

    gather_x: comm.Group
    """The output-feature axis: X is replicated along it, gathered along the batch."""
    gather_w: comm.Group
    """tp_dep: the weight block is split again along it."""
    reduce_y: comm.Group
    """The input-feature axis: the partial products are summed over it."""


def _gather_rows(x: torch.Tensor, group: comm.Group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((comm.group_size(group) * x.shape[0], *x.shape[1:]))
    comm.all_gather_(out, x, group)
    return out


def _reduce_scatter_rows(x: torch.Tensor, group: comm.Group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // comm.group_size(group), *x.shape[1:]))
    comm.reduce_scatter_(out, x, group)
    return out


class _CubeMatmul(torch.autograd.Function):
    """Y_ij = Σ_l X_il W_lj (Agarwal et al. 1995) with rows along dim 0; saves the local
    blocks of X and W only and re-gathers them backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, axes: _CubeAxes):
        ctx.save_for_backward(x, weight)
        ctx.axes, ctx.recorders = axes, comm.open_recorders()
        x_full = _gather_rows(x, axes.gather_x)
        w_full = _gather_rows(weight, axes.gather_w)
        return _reduce_scatter_rows(F.linear(x_full, w_full), axes.reduce_y)

    @staticmethod
    @comm.backward_recording
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        axes = ctx.axes
        grad_full = _gather_rows(grad_y, axes.reduce_y)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:  # dW_lj = Σ_i X_il^T dY_ij: partial over tp_dep's rows
            x_full = _gather_rows(x, axes.gather_x)
            dw = grad_full.flatten(0, -2).transpose(0, 1) @ x_full.flatten(0, -2)
            grad_w = _reduce_scatter_rows(dw, axes.gather_w)
        if ctx.needs_input_grad[0]:  # dX_il = Σ_j dY_ij W_lj^T: partial over the out axis
            w_full = _gather_rows(weight, axes.gather_w)
            grad_x = _reduce_scatter_rows(grad_full @ w_full, axes.gather_x)
        return grad_x, grad_w, None


class CubeLinear(nn.Module):
    """A linear on the cube: input in layout `input_layout`, output in the other one."""

    def __init__(self, weight, bias, axes: _CubeAxes, input_layout: str) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.axes, self.input_layout = axes, input_layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _CubeMatmul.apply(x, self.weight, self.axes)
        if self.bias is None:
            return y
        # The bias block is replicated over the two axes that split the output's rows.
        bias = comm.copy_to_group(self.bias, self.axes.gather_w)
        return y + comm.copy_to_group(bias, self.axes.reduce_y)


class CubeEmbedding(nn.Module):
    """Token embedding whose output is layout P; its table shard is the tied head's."""

    is_embedding = True
    """Stands in for an nn.Embedding (its weight is not weight-decayed, `param_groups`)."""

    def __init__(self, weight, ctx: TensorParallelContext, padding_idx: int | None) -> None:
        super().__init__()
        self.weight, self.padding_idx = weight, padding_idx
        self.dep, self.row = ctx.group("tp_dep"), ctx.group("tp_row")
        self.batch_blocks, self.batch_block = ctx.size("tp_dep") ** 2, batch_block("P", ctx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = take_batch_block(ids, self.batch_blocks, self.batch_block)
        # Gather vocab sub-blocks (tp_dep), then blocks (tp_row); backward reduce-scatters
        # the table gradient, summing it over the batch blocks of the other ranks.
        table = comm.gather_along_dim_reduce_scatter_grad(self.weight, 0, self.dep)
        table = comm.gather_along_dim_reduce_scatter_grad(table, 0, self.row)
        return F.embedding(ids, table, self.padding_idx)


# ---------------------------------------------------------------------------------------------
# Styles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear3D:
    """A Linear on the cube taking `input_layout` ("P" or "S") to the other layout; `fused`
    > 1 for concatenated outputs (q|k|v = 3), so each rank's block is [q_i | k_i | v_i]."""

    input_layout: str = "P"
    fused: int = 1

    def __post_init__(self) -> None:
        _check_layout(self.input_layout, "Linear3D")

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        require_module(module, nn.Linear, "Linear3D")
        in_axis = FEATURE_AXIS[self.input_layout]
        out_axis = FEATURE_AXIS[_OTHER[self.input_layout]]
        q, out_index = ctx.size("tp_dep"), ctx.rank(out_axis)
        dep_index, in_index = ctx.rank("tp_dep"), ctx.rank(in_axis)
        layout = f"3d:{self.input_layout}/{self.fused}"

        def block(t: torch.Tensor) -> torch.Tensor:
            return weight_block(t, self.fused, q, out_index, dep_index, in_index)

        weight = ctx.shard(module.weight, layout, block)
        bias = None
        if module.bias is not None:
            bias = ctx.shard(
                module.bias,
                f"{layout}:bias",
                lambda t: split_fused(t, 0, self.fused, q, out_index),
                replicas=q * q,
            )
        axes = _CubeAxes(ctx.group(out_axis), ctx.group("tp_dep"), ctx.group(in_axis))
        return CubeLinear(weight, bias, axes, self.input_layout)


@dataclass(frozen=True)
class Embedding3D:
    """A token Embedding taking full ids [B, T] to layout P; its table is split like the
    tied head (``Linear3D("P")``), so both use one shard."""

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        require_module(module, nn.Embedding, "Embedding3D")
        if module.max_norm is not None or module.sparse:
            raise ConfigError(
                "Embedding3D supports neither max_norm nor sparse gradients; build the "
                "embedding without them"
            )
        q = ctx.size("tp_dep")
        out_index, in_index = ctx.rank(FEATURE_AXIS["S"]), ctx.rank(FEATURE_AXIS["P"])
        dep_index = ctx.rank("tp_dep")
        weight = ctx.shard(
            module.weight,
            "3d:P/1",
            lambda t: weight_block(t, 1, q, out_index, dep_index, in_index),
        )
        return CubeEmbedding(weight, ctx, module.padding_idx)


@dataclass(frozen=True)
class LayerNorm3D:
    """A LayerNorm on layout P (hidden split over tp_col)."""

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        require_module(module, nn.LayerNorm, "LayerNorm3D")
        if len(module.normalized_shape) != 1:
            raise ConfigError(
                f"LayerNorm3D normalises the last dimension only, not "
                f"normalized_shape={tuple(module.normalized_shape)}"
            )
        q, index = ctx.size("tp_dep"), ctx.rank(FEATURE_AXIS["P"])

        def shard(param: nn.Parameter | None) -> nn.Parameter | None:
            if param is None:
                return None
            return ctx.shard(param, "3d:hidden", lambda t: split(t, 0, q, index), q * q)

        weight, bias = shard(module.weight), shard(module.bias)
        replicas = (ctx.group("tp_dep"), ctx.group(FEATURE_AXIS["S"]))
        return HiddenSplitLayerNorm(module, weight, bias, ctx.group(FEATURE_AXIS["P"]), replicas)


def loss_3d(ctx: TensorParallelContext) -> LossFn:
    """Cross-entropy of head logits in layout S (batch block a*q + c, vocabulary block b on
    tp_row) against the full targets [B, T]: each rank keeps its rows' targets."""
    q = ctx.size("tp_dep")
    block = batch_block("S", ctx)
    vocab_group = ctx.group(FEATURE_AXIS["S"])
    row_groups = (ctx.group("tp_dep"), ctx.group(FEATURE_AXIS["P"]))

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        local = take_batch_block(targets, q * q, block)
        return vocab_parallel_cross_entropy(
            logits, local, vocab_group, targets.numel(), row_groups=row_groups
        )

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Communication cost, per rank, as CommStats records it ([Note: byte accounting])
# ---------------------------------------------------------------------------------------------


def linear_wire_bytes(
    batch_tokens: int,
    d_in: int,
    d_out: int,
    q: int,
    elem_bytes: int,
    *,
    input_layout: str = "P",
    bias: bool = False,
) -> cost.WireBytes:
    """One 3D linear over `batch_tokens` tokens (the whole micro-batch, B T).

    With x, w, y this rank's blocks of X, W, Y (|full| / q^3 bytes each), forward sends
    (q-1)(x + w + y): gathers of x (out axis) and w (tp_dep), the reduce-scatter of the q y
    partial products (in axis). Backward sends (q-1)(y + 2x + 2w): gather dY (in axis),
    re-gather x and w, reduce-scatter dX (out axis) and dW (tp_dep). A bias adds all-reduces
    of its d_out/q block over tp_dep and the in axis, backward.
    """
    in_axis = FEATURE_AXIS[input_layout]
    out_axis = FEATURE_AXIS[_OTHER[input_layout]]
    x = batch_tokens * d_in * elem_bytes / q**3
    w = d_in * d_out * elem_bytes / q**3
    y = batch_tokens * d_out * elem_bytes / q**3
    entries = [
        ("forward", out_axis, "all_gather", q, x),
        ("forward", "tp_dep", "all_gather", q, w),
        ("forward", in_axis, "reduce_scatter", q, q * y),
        ("backward", in_axis, "all_gather", q, y),
        ("backward", out_axis, "all_gather", q, x),
        ("backward", "tp_dep", "all_gather", q, w),
        ("backward", out_axis, "reduce_scatter", q, q * x),
        ("backward", "tp_dep", "reduce_scatter", q, q * w),
    ]
    if bias:
        for axis in ("tp_dep", in_axis):
            entries.append(("backward", axis, "all_reduce", q, d_out / q * elem_bytes))
    return cost.wire_table(*entries)


def embedding_wire_bytes(vocab_size: int, d_model: int, q: int, elem_bytes: int) -> cost.WireBytes:
    """The 3D embedding: independent of the tokens. Forward gathers the V h/q^3 shard over
    tp_dep ((q-1) V h/q^3) and the V h/q^2 block over tp_row ((q-1) V h/q^2); backward
    reduce-scatters the V h/q table gradient over tp_row ((q-1) V h/q^2) and the V h/q^2
    block over tp_dep ((q-1) V h/q^3)."""
    table = vocab_size * d_model * elem_bytes
    return cost.wire_table(
        ("forward", "tp_dep", "all_gather", q, table / q**3),
        ("forward", "tp_row", "all_gather", q, table / q**2),
        ("backward", "tp_row", "reduce_scatter", q, table / q),
        ("backward", "tp_dep", "reduce_scatter", q, table / q**2),
    )


def layer_norm_wire_bytes(
    batch_tokens: int, d_model: int, q: int, elem_bytes: int
) -> cost.WireBytes:
    """The 3D layer norm (weight and bias) over `batch_tokens` tokens (B T / q^2 on each
    rank): statistics over tp_col, weight and bias replicated over tp_dep and tp_row."""
    return layers.layer_norm_wire_bytes(
        batch_tokens / q**2, ("tp_col", q), d_model // q, [("tp_dep", q), ("tp_row", q)], elem_bytes
    )
