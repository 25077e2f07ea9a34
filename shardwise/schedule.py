"""Schedules: the micro-batch loop of one optimizer step, as an object.

A schedule splits a step's batch into micro-batches and says, for each, what runs and whether
gradients are reduced after it. `GradientAccumulation` is the first: forward and backward of
each micro-batch in turn, gradients kept local until the last backward reduces them. Pipeline
schedules (GPipe, 1F1B, interleaved, zero-bubble) plug in here: their actions interleave
forward and backward passes of micro-batches across stages, and the engine runs whichever
schedule the plan names without a branch of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from shardwise.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor] | Mapping[str, torch.Tensor]
"""(inputs, targets), or keyword inputs of the model (``input_ids``, ``labels``, ...)."""


class GradientAccumulation:
    """`micro_batches` forward/backward passes per step; the last one reduces gradients."""

    def __init__(self, micro_batches: int) -> None:
        self.micro_batches = micro_batches

    def split(self, batch: Batch) -> list[Batch]:
        """The step's rows into `micro_batches` equal micro-batches along dim 0."""
        tensors = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
        rows = tensors[0].shape[0] if tensors else 0
        if rows == 0 or rows % self.micro_batches:
            raise ConfigError(
                f"batch of {rows} rows does not split into {self.micro_batches} micro-batches "
                "of train.micro_batch"
            )
        if isinstance(batch, Mapping):
            parts = {key: value.chunk(self.micro_batches) for key, value in batch.items()}
            return [{key: part[i] for key, part in parts.items()} for i in range(len(self))]
        inputs, targets = batch
        return list(zip(inputs.chunk(len(self)), targets.chunk(len(self)), strict=True))

    def __len__(self) -> int:
        return self.micro_batches

    def run(self, batch: Batch, forward_backward: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
        """Run every micro-batch; returns the mean of their (detached, fp32) losses."""
        total = None
        for micro in self.split(batch):
            loss = forward_backward(micro).detach().float()
            total = loss if total is None else total + loss
        return total / self.micro_batches
