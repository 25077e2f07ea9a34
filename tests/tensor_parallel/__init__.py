"""Tensor-parallel tests: shared comparison helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardwise.distributed import comm, cost

RTOL = 1e-5
"""fp32 layer parity: relative error of a parallel result against its dense twin."""


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """||got - want|| <= rtol * ||want|| (shapes equal), with `what` in the message."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = torch.linalg.vector_norm(got.detach() - want) / torch.linalg.vector_norm(want)
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"


def run_recorded(
    layer: nn.Module, x: torch.Tensor, probe: torch.Tensor
) -> tuple[torch.Tensor, cost.WireBytes]:
    """Forward, then backward of ``(layer(x) * probe).sum()``, each under its own recorder:
    the output and the wire bytes per phase and (axis, op)."""
    with comm.CommStats() as forward:
        y = layer(x)
    with comm.CommStats() as backward:
        (y * probe).sum().backward()
    return y, {"forward": forward.wire_by_axis_op(), "backward": backward.wire_by_axis_op()}


def assert_wire(got: cost.WireBytes, want: cost.WireBytes, what: str) -> None:
    """Recorded wire bytes equal a closed form's, phase by phase, (axis, op) by (axis, op)."""
    for phase in ("forward", "backward"):
        assert got[phase] == pytest.approx(want[phase]), f"{what}, {phase}: {got[phase]}"
