"""1D tensor parallelism (Megatron-LM) and Megatron sequence parallelism.

Shoeybi et al. 2019, "Megatron-LM", sec. 3: a column-parallel linear (weight split by output
features) followed by a row-parallel one (split by input features) needs one all-reduce per
pair forward (g) and one backward (f). Per layer pair and rank, the all-reduce of an
activation of S bytes sends 2(P-1)/P * S (the Colossal-AI paper's 1D row: comm 2(P-1)/P,
parameters 1/P, activations 1 — activations are replicated between the pairs).

Korthikanti et al. 2022, "Reducing activation recomputation", sec. 4.2.2 (Megatron-SP): the
regions between the pairs (layer norms, dropout, residual adds) are split along the sequence
instead of replicated; the all-reduce becomes a reduce-scatter (g-bar) and the f becomes an
all-gather (f-bar) — the same bytes on the wire, 1/P of the activations of those regions.

Vocab-parallel embedding and cross-entropy (Megatron sec. 3): the embedding table and the
tied output head are split by vocabulary rows; the loss is computed from the local logits
with two all-reduces of per-token scalars, never the full [tokens, vocab] logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shardwise.distributed import comm, cost
from shardwise.errors import ConfigError
from shardwise.tensor_parallel.plan import (
    LossFn,
    TensorParallelContext,
    require_module,
    split,
    split_fused,
)

SEQ_DIM = 1
"""Sequence dimension of [batch, seq, hidden] activations."""


class ColumnParallelLinear(nn.Module):
    """y[..., local out] = x W_iᵀ (+ b_i): weight rows (output features) split over tp."""

    def __init__(self, weight, bias, group, sequence_parallel: bool, gather_output: bool):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.group, self.sequence_parallel, self.gather_output = (
            group,
            sequence_parallel,
            gather_output,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # f-bar: gather the sequence, reduce-scatter its gradient
            x = comm.gather_along_dim_reduce_scatter_grad(x, SEQ_DIM, self.group)
        else:  # f: identity forward, all-reduce backward
            x = comm.copy_to_group(x, self.group)
        y = self.local_linear(x)
        return comm.gather_along_dim(y, -1, self.group) if self.gather_output else y

    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's output columns, from a weight in nn.Linear's [out, in] layout."""
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = Σ_i x_i W_iᵀ (+ b): weight columns (input features) split over tp; the bias is
    added once, after the reduction."""

    def __init__(self, weight, bias, group, sequence_parallel: bool):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local_linear(x)
        if self.sequence_parallel:  # g-bar: reduce-scatter along the sequence
            y = comm.reduce_scatter_along_dim(y, SEQ_DIM, self.group)
        else:  # g: all-reduce forward, identity backward
            y = comm.reduce_from_group(y, self.group)
        if self.bias is None:
            return y
        # Under sequence parallelism each rank sees its own tokens: partial bias gradients.
        bias = comm.copy_to_group(self.bias, self.group) if self.sequence_parallel else self.bias
        return y + bias

    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum, without the bias, from a weight in nn.Linear's [out, in]
        layout."""
        return F.linear(x, self.weight)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose table rows (vocabulary) are split over tp: each rank looks up the ids
    it holds, zeros the rest, and the partial rows are summed over tp (reduce-scattered
    along the sequence under sequence parallelism)."""

    is_embedding = True
    """Undecayed like nn.Embedding (`shardwise.optim.param_groups`)."""

    def __init__(self, weight, group, vocab_start: int, sequence_parallel: bool):
        super().__init__()
        self.weight = weight
        self.group, self.vocab_start, self.sequence_parallel = (
            group,
            vocab_start,
            sequence_parallel,
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_along_dim(rows, SEQ_DIM, self.group)
        return comm.reduce_from_group(rows, self.group)


class SequenceParallelLayerNorm(nn.Module):
    """LayerNorm over a sequence shard; its (replicated) weight and bias see only this rank's
    tokens, so their gradients are all-reduced over tp (`copy_to_group`)."""

    def __init__(self, norm: nn.LayerNorm, group) -> None:
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else comm.copy_to_group(self.weight, self.group)
        bias = None if self.bias is None else comm.copy_to_group(self.bias, self.group)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


@dataclass(frozen=True)
class ColwiseParallel:
    """Split a Linear's output features; `fused` > 1 for concatenated outputs (qkv = 3)."""

    fused: int = 1
    sequence_parallel: bool = False
    gather_output: bool = False

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        require_module(module, nn.Linear, "ColwiseParallel")
        n, r = ctx.size("tp"), ctx.rank("tp")
        layout = f"rows/{self.fused}"

        def rows(t: torch.Tensor) -> torch.Tensor:
            return split_fused(t, 0, self.fused, n, r)

        weight = ctx.shard(module.weight, layout, rows)
        bias = None if module.bias is None else ctx.shard(module.bias, layout, rows)
        group = ctx.group("tp")
        return ColumnParallelLinear(weight, bias, group, self.sequence_parallel, self.gather_output)


@dataclass(frozen=True)
class RowwiseParallel:
    """Split a Linear's input features; its input is already split (a column-parallel
    output), its output is summed over tp (or reduce-scattered along the sequence)."""

    sequence_parallel: bool = False

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        require_module(module, nn.Linear, "RowwiseParallel")
        n, r = ctx.size("tp"), ctx.rank("tp")
        weight = ctx.shard(module.weight, "cols", lambda t: split(t, 1, n, r))
        bias = module.bias  # replicated, added after the reduction
        return RowParallelLinear(weight, bias, ctx.group("tp"), self.sequence_parallel)


@dataclass(frozen=True)
class VocabParallel:
    """Split an Embedding's table by vocabulary rows (the layout of a tied column-parallel
    head, so both use one shard)."""

    sequence_parallel: bool = False

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        require_module(module, nn.Embedding, "VocabParallel")
        n, r = ctx.size("tp"), ctx.rank("tp")
        weight = ctx.shard(module.weight, "rows/1", lambda t: split(t, 0, n, r))
        start = r * weight.shape[0]
        return VocabParallelEmbedding(weight, ctx.group("tp"), start, self.sequence_parallel)


@dataclass(frozen=True)
class SequenceParallelNorm:
    """A LayerNorm applied to sequence-sharded activations (Megatron-SP)."""

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        require_module(module, nn.LayerNorm, "SequenceParallelNorm")
        return SequenceParallelLayerNorm(module, ctx.group("tp"))


@dataclass(frozen=True)
class SequenceSlice:
    """Keep this rank's block of a module's output along `dim` (a learned position table
    under sequence parallelism); the gradient is all-gathered back, whole on every rank."""

    dim: int = 0

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        group = ctx.group("tp")
        module.register_forward_hook(
            lambda _m, _args, out: comm.scatter_along_dim(out, self.dim, group)
        )
        return module


@dataclass(frozen=True)
class LocalSizes:
    """Divide a module's integer attributes by the tp degree, in place: the sizes its forward
    reads for dims the plan splits elsewhere (heads, the width of each piece of a fused q|k|v
    output), so an unmodified forward computes on this rank's shard of them."""

    names: tuple[str, ...]

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        n = ctx.size("tp")
        for name in self.names:
            size = getattr(module, name, None)
            if not isinstance(size, int):
                raise ConfigError(
                    f"LocalSizes: {type(module).__name__} has no integer attribute {name!r}; "
                    "fix the plan"
                )
            if size % n:
                raise ConfigError(
                    f"LocalSizes: {type(module).__name__}.{name}={size} does not split over tp={n}"
                )
            setattr(module, name, size // n)
        return module


# ---------------------------------------------------------------------------------------------
# Vocab-parallel cross-entropy
# ---------------------------------------------------------------------------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row loss from logits split by vocabulary over `group` (fp32).

    log Σ_v exp(z_v) - z_target with the max and the sums taken over all ranks: one MAX
    all-reduce of [N] maxima, one SUM all-reduce of [2, N] (Σexp and the target logit, which
    lives on one rank). The gradient softmax - onehot needs no communication.
    """

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start):
        local_vocab = logits.shape[-1]
        row_max = logits.max(dim=-1).values
        comm.all_reduce_(row_max, group, op=torch.distributed.ReduceOp.MAX)
        shifted = logits - row_max.unsqueeze(-1)
        exp = shifted.exp()
        local = targets - vocab_start
        inside = (local >= 0) & (local < local_vocab)
        local = local.masked_fill(~inside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1) * inside
        sums = torch.stack((exp.sum(dim=-1), target_logit))
        comm.all_reduce_(sums, group)
        sum_exp, target_logit = sums
        exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(exp, local, inside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, inside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local.unsqueeze(-1), -inside.to(grad.dtype).unsqueeze(-1))
        return grad * grad_loss.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_group: comm.Group,
    total_rows: int,
    row_groups: tuple[comm.Group, ...] = (),
) -> torch.Tensor:
    """Mean cross-entropy over `total_rows` tokens from vocab-split logits.

    ``logits [..., V/n]`` holds this rank's contiguous vocabulary block (block index = rank
    in `vocab_group`); ``targets [...]`` are global ids of the same tokens. When the tokens
    themselves are split over other groups (2D/2.5D/3D split the batch), `row_groups` are
    those groups: the local sum is all-reduced over them (g: the gradient of a replicated
    scalar is 1 on every rank), so every rank returns the same mean.
    """
    logits = logits.float().flatten(0, -2)
    vocab_start = comm.group_rank(vocab_group) * logits.shape[-1]
    per_row = _VocabParallelCrossEntropy.apply(logits, targets.flatten(), vocab_group, vocab_start)
    loss = per_row.sum() / total_rows
    for group in row_groups:
        loss = comm.reduce_from_group(loss, group)
    return loss


def vocab_parallel_loss(ctx: TensorParallelContext) -> LossFn:
    """The 1D loss: every tp rank holds all tokens and a vocabulary block of the logits."""
    group = ctx.group("tp")

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, group, targets.numel())

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Communication cost, per rank (docs/tensor_parallel.md derives each line)
# ---------------------------------------------------------------------------------------------


def linear_wire_bytes(
    tokens: int,
    features: int,
    tp: int,
    elem_bytes: int,
    *,
    row: bool,
    sequence_parallel: bool = False,
    bias: bool = False,
) -> cost.WireBytes:
    """Wire bytes per rank of one column- or row-parallel linear, forward and backward.

    `features` is the width of the replicated (or sequence-sharded) side: the input of a
    column-parallel linear, the output of a row-parallel one; its S = tokens x features x
    elem_bytes. Without SP the column linear all-reduces dX backward (f) and the row linear
    all-reduces Y forward (g): 2(tp-1)/tp * S each. With SP these become an all-gather of the
    S/tp shard ((tp-1) * S/tp) and a reduce-scatter of S ((tp-1)/tp * S): the same bytes on
    the wire, halved per collective, two collectives per linear. A row-parallel `bias` under
    SP sees only this rank's tokens: its gradient is all-reduced too.
    """
    size = tokens * features * elem_bytes
    if not sequence_parallel:
        return cost.wire_table(("forward" if row else "backward", "tp", "all_reduce", tp, size))
    gather, scatter = ("tp", "all_gather", tp, size / tp), ("tp", "reduce_scatter", tp, size)
    if not row:
        return cost.wire_table(("forward", *gather), ("backward", *scatter))
    bias_grad = [("backward", "tp", "all_reduce", tp, features * elem_bytes)] if bias else []
    return cost.wire_table(("forward", *scatter), ("backward", *gather), *bias_grad)


def embedding_wire_bytes(
    tokens: int, hidden: int, tp: int, elem_bytes: int, *, sequence_parallel: bool = False
) -> cost.WireBytes:
    """Wire bytes per rank of the vocab-parallel embedding: its output is summed over tp
    like a row-parallel linear's (all-reduce, or reduce-scatter + all-gather under SP)."""
    return linear_wire_bytes(
        tokens, hidden, tp, elem_bytes, row=True, sequence_parallel=sequence_parallel
    )


def cross_entropy_wire_bytes(tokens: int, tp: int, axis: str = "tp") -> cost.WireBytes:
    """Wire bytes per rank of the vocab-parallel loss over `tokens` local tokens, the
    vocabulary split over `axis`: all-reduces of [N] fp32 maxima and of [2, N] fp32 sums
    forward, nothing backward — independent of the vocabulary size. (Rows split over other
    groups add an all-reduce of the fp32 loss over each.)"""
    return cost.wire_table(
        ("forward", axis, "all_reduce", tp, tokens * 4),
        ("forward", axis, "all_reduce", tp, 2 * tokens * 4),
    )
