"""This rank's pipeline stages: its runs of the model's blocks, with the embedding or head.

`build_stages` cuts the model in place: the blocks of other ranks' stages become None in
their `nn.ModuleList` (indices and so parameter names stay as in the whole model, so
checkpoints and parity checks compare by name), the embedding's modules stay on the first
stage only and the head's on the last. What is left is an ordinary module the parameter
store wraps as usual; each `StagePart` runs one (virtual) stage of it.

[Note: tied embedding across stages] With the head's weight the embedding's Parameter
(GPT-2 style), the first and the last stage each hold it (the last keeps the embedding module
too, unused, so that the weight is still known as an embedding's: no weight decay): two
copies, started equal (every rank builds the same model). Each stage computes only its
share of the gradient; the store sums the two reduced ones over the pair of ranks
(`sum_reduced_grad`) after the step's last backward, so both apply the same update and stay
equal, as the one tensor of a single process would. The global gradient norm counts it
once (the last stage leaves it out).

[Note: partition by memory] ``pipeline.partition = "memory"`` balances the activations each
stage holds at its peak: a block's bytes saved for the backward per micro-batch (measured,
pipeline/costs.py) times the micro-batches the schedule has in flight on the stage's rank
(`Schedule.in_flight_peak`: 1F1B's first of p stages holds p, its last one). So earlier
stages get fewer blocks. With virtual stages (several per rank) the per-micro-batch bytes are
balanced unweighted. Model states are not counted: blocks of equal width hold equal states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from shardwise.errors import TrainingError
from shardwise.models import ModelSpec
from shardwise.models.spec import PipelineCalls
from shardwise.pipeline.costs import counted_flops, profile_parts
from shardwise.pipeline.partition import balanced_split
from shardwise.pipeline.schedules import Schedule


@dataclass
class StagePart:
    """One (virtual) stage: the blocks at `indices` of the model's block list, after the
    embedding if it is the first stage, before the head if it is the last."""

    stage: int
    indices: range
    first: bool
    last: bool
    model: nn.Module
    block_list: nn.ModuleList
    calls: PipelineCalls

    def __call__(self, x: torch.Tensor, **keywords: torch.Tensor) -> torch.Tensor:
        """`keywords`: the model's forward keywords the embedding and the blocks take too
        (``positions`` under sequence parallelism)."""
        if self.first:
            x = self.calls.embed(self.model, x, **keywords)
        for index in self.indices:
            x = self.calls.run_block(self.model, self.block_list[index], x, **keywords)
        return self.calls.finish(self.model, x) if self.last else x

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the stage computes with."""
        names = (self.calls.first if self.first else ()) + (self.calls.last if self.last else ())
        modules = [self.block_list[index] for index in self.indices]
        modules += [
            self.model.get_submodule(name) for name in names if has_module(self.model, name)
        ]
        return [p for module in modules for p in module.parameters()]


@dataclass
class PipelineStages:
    """This rank's parts of the pipeline and what its runtime needs to talk to the others."""

    parts: dict[int, StagePart]
    """Stage index -> the part this rank runs."""
    group: object
    """The pipeline axis of this rank (point-to-point, losses, norms): group rank i runs
    the schedule's rank i."""
    tied: nn.Parameter | None
    """This rank's copy of a weight tied across the first and last stage, if it holds one."""
    tied_group: object | None
    """The first and last stage's ranks, when a weight is tied across them."""
    counts_tied: bool
    """Whether this rank's copy of the tied weight counts in the global norm (first stage)."""

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states passed between stages."""
        return next(iter(self.parts.values())).calls.hidden_size


def stage_blocks(
    spec: ModelSpec,
    model: nn.Module,
    schedule: Schedule,
    by: str,
    micro_batch: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> list[range]:
    """The blocks of each of the schedule's stages, balanced by block count, parameter count,
    counted FLOPs of a sequence, time measured on a micro-batch of `micro_batch` (sequences,
    tokens) in `dtype`, or the activations held at once ([Note: partition by memory])."""
    blocks = [block for _, block in spec.named_blocks(model, "pipeline parallelism")]
    stages = schedule.stages
    if by in ("layers", "params"):
        costs = [1 if by == "layers" else sum(p.numel() for p in b.parameters()) for b in blocks]
        return balanced_split(costs, stages)
    if by == "flops":
        costs, first, last = counted_flops(spec, model, blocks, micro_batch[1])
        return balanced_split(costs, stages, first, last)
    costs, first, last = profile_parts(spec, model, blocks, micro_batch, dtype).costs(by)
    held = None
    if by == "memory" and stages == schedule.ranks:
        held = schedule.in_flight_peak()  # stage s runs on rank s
    return balanced_split(costs, stages, first, last, held)


def build_stages(
    model: nn.Module,
    spec: ModelSpec,
    schedule: Schedule,
    split: tuple[range, ...],
    mesh: object,
) -> PipelineStages:
    """Cut `model` to this rank's stages of `schedule` (in place; `split`: the blocks of each,
    the plan's) and return them; `mesh` has a ``pp`` axis, `spec` its `PipelineCalls` (the
    plan checked both). Collective over the world (the tied pair's group)."""
    calls = spec.pipeline
    pp = mesh["pp"]
    rank = pp.get_local_rank()
    block_list = model.get_submodule(spec.blocks)
    mine = schedule.stages_of(rank)
    last_stage = schedule.stages - 1
    tied = spec.tied(model)
    tied_weight = model.get_submodule(spec.embedding).weight if tied else None
    keep = {i for s in mine for i in split[s]}
    for index in range(len(block_list)):
        if index not in keep:
            block_list[index] = None
    holds_first, holds_last = 0 in mine, last_stage in mine
    # A tied embedding stays on the last stage: its weight is the head's, and the module says
    # it is an embedding (no weight decay, as in one process).
    shared = {spec.embedding} if tied and holds_last else set()
    for names, held in ((calls.first, holds_first), (calls.last, holds_last)):
        for name in names:
            if not held and name not in shared and has_module(model, name):
                _drop(model, name)
    parts = {
        s: StagePart(s, split[s], s == 0, s == last_stage, model, block_list, calls) for s in mine
    }
    model.register_forward_pre_hook(_refuse_whole_model_call)
    tied_group = _tied_group(mesh, schedule) if tied else None
    return PipelineStages(
        parts=parts,
        group=pp,
        tied=tied_weight if (holds_first or holds_last) else None,
        tied_group=tied_group,
        counts_tied=holds_first,
    )


def _refuse_whole_model_call(module: nn.Module, _args: object) -> None:
    """The cut model holds this rank's stages only; its parts run through `StagePart`."""
    raise TrainingError(
        f"{type(module).__name__} is cut into pipeline stages (parallel.pp > 1), so it cannot "
        "run as a whole: train with engine.train_step(batch), which runs the schedule"
    )


def _tied_group(mesh: object, schedule: Schedule) -> object | None:
    """The group of this pipeline's ranks holding the first and the last stage (None when
    one rank holds both: there is one copy). new_group is collective over the world, so every
    rank creates every pipeline's pair, in the same order."""
    first, last = schedule.rank_of(0), schedule.rank_of(schedule.stages - 1)
    if first == last:
        return None
    axis = mesh.mesh_dim_names.index("pp")
    pipelines = mesh.mesh.movedim(axis, -1).reshape(-1, mesh.mesh.shape[axis]).tolist()
    mine = None
    for pipeline in pipelines:
        group = dist.new_group([pipeline[first], pipeline[last]])
        if dist.get_rank() in (pipeline[first], pipeline[last]):
            mine = group
    return mine


def has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _drop(model: nn.Module, name: str) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, None)
