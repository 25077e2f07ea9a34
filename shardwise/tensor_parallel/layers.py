"""Building blocks shared by the 2D, 2.5D and 3D layouts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shardwise.distributed import comm


def sum_over_group(x: torch.Tensor, group: comm.Group) -> torch.Tensor:
    """All-reduce forward and backward: every rank's downstream uses the sum, so each rank's
    gradient of it is a partial sum too (Megatron's g then f, Shoeybi et al. 2019, sec. 3)."""
    return comm.reduce_from_group(comm.copy_to_group(x, group), group)


class HiddenSplitLayerNorm(nn.Module):
    """nn.LayerNorm (last dim, biased variance, eps inside the root) of activations whose
    hidden dim is split over `hidden_group`: the mean, then the variance of the centred values
    (two passes, for accuracy), each summed over the group in fp32.

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
        x32 = x.float()
        mean = sum_over_group(x32.sum(-1, keepdim=True), self.hidden_group) / self.width
        centred = x32 - mean
        square_sum = sum_over_group(centred.square().sum(-1, keepdim=True), self.hidden_group)
        y = (centred * torch.rsqrt(square_sum / self.width + self.eps)).to(x.dtype)
        if self.weight is not None:
            y = y * self._replicated(self.weight)
        if self.bias is not None:
            y = y + self._replicated(self.bias)
        return y
