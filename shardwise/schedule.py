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
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from shardwise.errors import ConfigError

if TYPE_CHECKING:
    from shardwise.models import ModelSpec
    from shardwise.run_plan import RunPlan
    from shardwise.sequence_parallel.model import SequenceCut

Batch = tuple[torch.Tensor, torch.Tensor] | Mapping[str, torch.Tensor]
"""(inputs, targets), or keyword inputs of the model (``input_ids``, ``labels``, ...)."""


class StepOps(Protocol):
    """What a schedule asks of the engine."""

    def forward_backward(self, micro: Batch) -> torch.Tensor:
        """Forward, loss and backward of one whole micro-batch; returns its loss."""

    def loss_of(self, output: object, targets: torch.Tensor) -> torch.Tensor:
        """The loss of the model's `output` (the last pipeline stage's)."""

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` as its backward starts: averaged over micro-batches, loss-scaled."""

    def run_backward(self, backward: Callable[[], None], sync: bool) -> None:
        """Run `backward` (autograd calls) as one micro-batch's backward of the store; `sync`:
        the rank's last backward of the step, which reduces gradients."""

    def sum_reduced_grad(self, param: torch.nn.Parameter, group: object) -> None:
        """Sum `param`'s gradient, as the update will read it after the step's reduction,
        over `group` (ranks holding copies of one weight: a pipeline's tied embedding)."""


class Schedule(Protocol):
    def __len__(self) -> int: ...

    def run(self, batch: Batch, ops: StepOps) -> torch.Tensor:
        """One step's micro-batches; the step's mean loss (detached, fp32) on every rank."""

    uncounted: torch.nn.Parameter | None
    """A parameter of this rank the store's norm must not count: a pipeline stage's second
    copy of a weight tied across stages (the first stage's copy counts)."""

    def trace_forward(self, model: nn.Module, sample: torch.Tensor) -> None:
        """One forward of this rank's part of `model` on `sample` token ids (the store calls
        it under no_grad to record the order parameters are used in)."""

    def stage_of(self) -> dict[int, int]:
        """Id of a parameter -> the stage of this rank whose backwards give it gradients,
        where the rank runs several stages, each backward through one (empty otherwise):
        the reducer keeps them in separate buckets ([Note: launch order])."""


def build_schedule(
    plan: RunPlan,
    model: nn.Module,
    spec: ModelSpec,
    mesh: object,
    device: torch.device,
    cut: SequenceCut | None = None,
) -> Schedule:
    """The plan's schedule; a pipeline's cuts `model` to this rank's stages (in place), and
    its stages take `cut` of their inputs (sequence parallelism: the whole model's forward
    does that itself)."""
    if plan.pipeline is None:
        return GradientAccumulation(plan.micro_batches)
    from shardwise.pipeline.runtime import PipelineSchedule  # it imports this module

    return PipelineSchedule.build(
        plan.pipeline,
        model,
        spec,
        mesh,
        plan.pipeline_split,
        device,
        plan.precision.param_dtype,
        cut,
        plan.dims.hidden_split(plan.config.parallel.tp_sequence_parallel),
    )


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

    def run(self, batch: Batch, ops: StepOps) -> torch.Tensor:
        """Run every micro-batch; returns the mean of their (detached, fp32) losses."""
        total = None
        for micro in self.split(batch):
            loss = ops.forward_backward(micro).detach().float()
            total = loss if total is None else total + loss
        return total / self.micro_batches

    uncounted = None

    def trace_forward(self, model: nn.Module, sample: torch.Tensor) -> None:
        model(sample)

    def stage_of(self) -> dict[int, int]:
        return {}  # every backward runs through the whole model
