"""Tensor parallelism: plans (data) applied to unmodified models, in four layouts."""

from shardwise.tensor_parallel.plan import (
    ParallelStyle,
    Plan,
    TensorParallel,
    TensorParallelContext,
    apply_tensor_parallel,
)

__all__ = [
    "ParallelStyle",
    "Plan",
    "TensorParallel",
    "TensorParallelContext",
    "apply_tensor_parallel",
]
