"""Building blocks shared by the 2D, 2.5D and 3D layouts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shardwise.distributed import comm, cost

STAT_BYTES = 4
"""Layer-norm statistics are reduced in fp32 whatever the activation dtype."""


class _HiddenSplitNormalize(torch.autograd.Function):
    """x̂ = (x - mean) / sqrt(var + eps) over a hidden dim split over `group`.

    Forward sums per-token statistics over the group twice (the mean, then the square sum of
    the centred values: two passes, for accuracy), in fp32. Saves only x̂ (which the affine
    multiply after it keeps anyway) and 1/σ, like a fused layer norm; backward needs one
    all-reduce of the two per-token sums of dx = (g - mean(g) - x̂ mean(g x̂)) / σ.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: comm.Group, width: int, eps: float):
        x32 = x.float()
        mean = x32.sum(-1, keepdim=True)
        comm.all_reduce_(mean, group)
        centred = x32 - mean / width
        square_sum = centred.square().sum(-1, keepdim=True)
        comm.all_reduce_(square_sum, group)
        rstd = torch.rsqrt(square_sum / width + eps)
        normed = (centred * rstd).to(x.dtype)
        ctx.save_for_backward(normed, rstd)
        ctx.group, ctx.width, ctx.recorders = group, width, comm.open_recorders()
        return normed

    @staticmethod
    @comm.backward_recording
    def backward(ctx: Any, grad: torch.Tensor):
        normed, rstd = ctx.saved_tensors
        g, xhat = grad.float(), normed.float()
        sums = torch.cat((g.sum(-1, keepdim=True), (g * xhat).sum(-1, keepdim=True)), -1)
        comm.all_reduce_(sums, ctx.group)
        means = sums / ctx.width
        grad_x = rstd * (g - means[..., :1] - xhat * means[..., 1:])
        return grad_x.to(grad.dtype), None, None, None


class HiddenSplitLayerNorm(nn.Module):
    """nn.LayerNorm (last dim, biased variance, eps inside the root) of activations whose
    hidden dim is split over `hidden_group` (`_HiddenSplitNormalize`).

    `weight` and `bias` hold this rank's hidden block; the ranks of `replica_groups` hold the
    same block but see other rows, so the parameters pass through `comm.copy_to_group` there
    (their gradients are summed over those rows).
    """

    def __init__(
        self,
        norm: nn.LayerNorm,
        weight: nn.Parameter | None,
        bias: nn.Parameter | None,
        hidden_group: comm.Group,
        replica_groups: Sequence[comm.Group],
    ) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.width, self.eps = norm.normalized_shape[0], norm.eps
        self.hidden_group, self.replica_groups = hidden_group, tuple(replica_groups)

    def _replicated(self, param: torch.Tensor) -> torch.Tensor:
        for group in self.replica_groups:
            param = comm.copy_to_group(param, group)
        return param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _HiddenSplitNormalize.apply(x, self.hidden_group, self.width, self.eps)
        if self.weight is not None:
            y = y * self._replicated(self.weight)
        if self.bias is not None:
            y = y + self._replicated(self.bias)
        return y


def layer_norm_wire_bytes(
    tokens: float,
    hidden: tuple[str, int],
    width: int,
    replicas: Sequence[tuple[str, int]],
    elem_bytes: int,
    affine_params: int = 2,
) -> cost.WireBytes:
    """Wire bytes per rank of one `HiddenSplitLayerNorm` on `tokens` local tokens, the hidden
    dim split over the (axis, size) `hidden`, this rank's block `width` wide, its weight and
    bias (`affine_params` of them) replicated over the (axis, size) `replicas`: forward two
    all-reduces of one fp32 statistic per token, backward one of two; each affine gradient
    all-reduced over every replica axis."""
    axis, n = hidden
    stats = tokens * STAT_BYTES
    entries = [
        ("forward", axis, "all_reduce", n, stats),
        ("forward", axis, "all_reduce", n, stats),
        ("backward", axis, "all_reduce", n, 2 * stats),
    ]
    for _ in range(affine_params):
        entries += [("backward", a, "all_reduce", m, width * elem_bytes) for a, m in replicas]
    return cost.wire_table(*entries)
