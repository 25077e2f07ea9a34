"""1D tensor parallelism (Megatron-LM) of transposed linears: GPT-2's ``Conv1D``.

GPT-2 (and OpenAI GPT) compute every projection as ``y = x W + b`` with ``W`` stored
[in_features, out_features], the transpose of nn.Linear's layout. The Megatron split is the
same as for nn.Linear (`shardwise.tensor_parallel.one_d`): a column-parallel layer keeps a
block of output features, now weight *columns* (dim 1); a row-parallel one keeps a block of
input features, now weight *rows* (dim 0). Only the local matmul differs, so the layers here
are the 1D layers with that matmul replaced; the communication (f and g) is theirs.

The module is recognised by its shape, not its class: this package imports no model library.
A transposed linear has a 2-D ``weight`` [in, out] and an ``nf`` attribute equal to ``out``
(``transformers.pytorch_utils.Conv1D``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shardwise.errors import ConfigError
from shardwise.tensor_parallel.one_d import ColumnParallelLinear, RowParallelLinear
from shardwise.tensor_parallel.plan import TensorParallelContext, split, split_fused


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether `module` is a Conv1D-style linear: weight [in, out], ``nf`` = out."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def _require_transposed_linear(module: nn.Module, style: str) -> None:
    if not is_transposed_linear(module):
        raise ConfigError(
            f"{style} applies to a Conv1D (weight [in, out], attribute nf), not "
            f"{type(module).__name__}; fix the plan"
        )


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W (+ b) with W [in, out], flattened to one matmul like Conv1D itself."""
    flat = x.reshape(-1, x.shape[-1])
    y = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
    return y.view(*x.shape[:-1], weight.shape[1])


class ColumnParallelConv1D(ColumnParallelLinear):
    """y[..., local out] = x W_i (+ b_i): weight columns (output features) split over tp."""

    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(x, self.weight, self.bias)


class RowParallelConv1D(RowParallelLinear):
    """y = Σ_i x_i W_i (+ b): weight rows (input features) split over tp; the bias is added
    once, after the reduction."""

    def local_linear(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(x, self.weight, None)


@dataclass(frozen=True)
class ColwiseParallelConv1D:
    """Split a Conv1D's output features (weight columns); `fused` > 1 for concatenated
    outputs (GPT-2's ``c_attn`` is q|k|v: each rank keeps [q_i | k_i | v_i])."""

    fused: int = 1
    gather_output: bool = False

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        _require_transposed_linear(module, "ColwiseParallelConv1D")
        n, r = ctx.size("tp"), ctx.rank("tp")
        weight = ctx.shard(
            module.weight, f"cols/{self.fused}", lambda t: split_fused(t, 1, self.fused, n, r)
        )
        bias = None
        if module.bias is not None:
            bias = ctx.shard(
                module.bias, f"rows/{self.fused}", lambda t: split_fused(t, 0, self.fused, n, r)
            )
        group = ctx.group("tp")
        return ColumnParallelConv1D(weight, bias, group, False, self.gather_output)


@dataclass(frozen=True)
class RowwiseParallelConv1D:
    """Split a Conv1D's input features (weight rows); its input is a column-parallel output,
    its output is summed over tp."""

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module:
        _require_transposed_linear(module, "RowwiseParallelConv1D")
        n, r = ctx.size("tp"), ctx.rank("tp")
        weight = ctx.shard(module.weight, "rows/1", lambda t: split(t, 0, n, r))
        return RowParallelConv1D(weight, module.bias, ctx.group("tp"), False)
