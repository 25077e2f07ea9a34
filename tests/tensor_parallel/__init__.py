"""Tensor-parallel tests: shared comparison helper."""

from __future__ import annotations

import torch

RTOL = 1e-5
"""fp32 layer parity: relative error of a parallel result against its dense twin."""


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """||got - want|| <= rtol * ||want|| (shapes equal), with `what` in the message."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = torch.linalg.vector_norm(got.detach() - want) / torch.linalg.vector_norm(want)
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"
