"""Per-rank peak memory of a resolved plan, predicted before launch.

[Note: the memory model] A rank's peak during a step is

    model states on the device + buffers + the step's activations + gathered parameters

* **Model states** are `RunPlan.model_state_bytes` (ZeRO's 2/2/4/8 bytes per element, each
  category divided by dp_shard where the plan shards it, Ψ divided by tp and pp), placed on
  a tier by the offload policy: Adam states and master weights on the host or disk with
  ``offload.optimizer``; parameter chunks with ``offload.policy`` (`_placed_states`).
* **Activations** come from a trace of one micro-batch (`trace_micro_batch`, fake tensors):
  the peak of forward, loss and backward beyond the parameters, scaled to the rank's tensor-
  parallel share (`Trace.scaled`) and traced at the rank's sequence slice under sequence
  parallelism. A pipeline stage traces its own blocks, and holds the forward activations of
  as many micro-batches as its schedule has in flight (`Schedule.in_flight_peak`).
* **Gathered tensors of 2D/2.5D/3D tensor parallelism**: the backward of a grid linear
  gathers blocks of its input, weight and output gradient; the largest linear's count
  (`_gathered_backward_bytes`). They move the step's peak into backward, where at stages 2
  and 3 a full-size gradient bucket is filling too (`_filling_bucket_bytes`); elsewhere the
  peak is where backward starts, before any parameter gradient exists.
* **Gathered parameters**: ZeRO-3 gathers a unit (a block, or the root: embedding, head,
  final norm) for its compute and releases it after. The step's peak is where backward
  starts, with one unit gathered; under activation checkpointing it moves into a block's
  recomputation, where the block's unit, the next one (prefetched), the block's full
  gradient and the previous block's, still being reduce-scattered while this backward runs,
  are alive: four units. The largest unit counts.

On the CPU the device and the host are one memory: there the comparison with a measured
peak (`PeakTensorBytes`) is against device + host (see docs/planner.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from shardwise.models import ModelSpec, spec_of
from shardwise.pipeline.stage import StagePart, has_module
from shardwise.planner.activations import Trace, grid, trace_micro_batch
from shardwise.run_plan import RunPlan, meta_model
from shardwise.zero.params import zero3_units

TIERS = ("device", "host", "disk")


@dataclass(frozen=True)
class MemoryPrediction:
    """Bytes per rank: model states by category and tier, and the step's transients."""

    states: dict[str, dict[str, float]]
    """Category (params, grads, master_params, optimizer_states) -> tier -> bytes."""
    buffers: float
    """The model's buffers (e.g. rope tables), on the device."""
    activations: float
    """The step's activations and their gradients at their peak (`Trace.peak`; pipeline:
    plus the forward activations of the other micro-batches in flight)."""
    gathered: float
    """ZeRO-3: full parameters of the largest unit, gathered for its compute (times four
    under activation checkpointing, see [Note: the memory model])."""
    in_flight: int = 1
    """Micro-batches whose forward activations a pipeline rank holds at once."""
    trace: Trace | None = field(default=None, compare=False)

    def tier(self, name: str) -> float:
        """Model-state bytes on one tier."""
        return sum(tiers.get(name, 0.0) for tiers in self.states.values())

    @property
    def device_peak(self) -> float:
        """The rank's peak on its device."""
        return self.tier("device") + self.buffers + self.activations + self.gathered

    @property
    def memory_peak(self) -> float:
        """Device peak plus host-resident states: the peak where device and host are one
        memory (the CPU)."""
        return self.device_peak + self.tier("host")


def predict_memory(plan: RunPlan, traces: dict | None = None) -> MemoryPrediction:
    """The per-rank memory of `plan` for its registered model (built on the meta device);
    under pipeline parallelism, that of the rank with the highest peak. `traces` keeps the
    dense traces for the next call (plans of one model differing in layout)."""
    key = plan.config.model.model_dump_json()
    model = meta_model(plan.config)
    spec = spec_of(model)
    traces = {} if traces is None else traces

    def trace(blocks: range | None) -> Trace:
        config = plan.config
        sequence = config.data.seq_len // plan.dims.sp
        dtype = plan.precision.param_dtype
        checkpointing = (config.train.activation_checkpointing, config.train.checkpoint_every_n)
        shape = (key, config.train.micro_batch, sequence, dtype, checkpointing, blocks)
        if shape not in traces:
            traces[shape] = _trace(plan, model, spec, blocks)
        last = blocks is None or blocks.stop == len(
            spec.named_blocks(model, "pipeline parallelism")
        )
        return traces[shape].scaled(plan.dims, config.parallel.tp_sequence_parallel, last)

    if plan.pipeline is None:
        return _prediction(plan, model, spec, 1.0, [trace(None)], 1)
    schedule = plan.pipeline
    split = plan.pipeline_split
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ranks = []
    for rank, in_flight in enumerate(schedule.in_flight_peak()):
        stages = schedule.stages_of(rank)
        share = _stage_params(model, spec, split, stages, schedule.stages) * schedule.ranks / total
        ranks.append(
            _prediction(plan, model, spec, share, [trace(split[s]) for s in stages], in_flight)
        )
    return max(ranks, key=lambda prediction: prediction.device_peak)


def _prediction(
    plan: RunPlan,
    model: nn.Module,
    spec: ModelSpec,
    share: float,
    traces: list[Trace],
    in_flight: int,
) -> MemoryPrediction:
    """One rank's prediction: model states times `share` (its part of Ψ / pp), the traces
    of its pipeline stages (or of the whole model)."""
    config = plan.config
    peak = max(trace.peak for trace in traces)
    activations = peak + (in_flight - 1) * max(trace.forward_end for trace in traces)
    per_module = plan.pipeline is not None  # as the store cuts them (zero/store.py)
    units = zero3_units(model, spec, per_module) if plan.sharding.params else []
    unit = max((sum(p.numel() for p in params) for *_, params in units), default=0)
    if plan.dims.tp > 1 and plan.dims.tp_mode != "1d":
        activations += _gathered_backward_bytes(plan, model) + _filling_bucket_bytes(plan)
    held = 4 if config.train.activation_checkpointing != "none" else 1
    param_bytes = torch.finfo(plan.precision.param_dtype).bits // 8
    return MemoryPrediction(
        states=_placed_states(plan, share, activations),
        buffers=float(sum(b.numel() * b.element_size() for b in model.buffers())),
        activations=float(activations),
        gathered=float(held * unit * param_bytes / plan.dims.tp),
        in_flight=in_flight,
        trace=traces[0],
    )


def _trace(plan: RunPlan, model: nn.Module, spec: ModelSpec, blocks: range | None) -> Trace:
    """`trace_micro_batch` on a copy of `model`: one micro-batch at the rank's sequence slice
    (the blocks of one pipeline stage: `blocks`), before the tensor-parallel split."""
    config = plan.config
    traced = copy.deepcopy(model)
    stage = None
    if blocks is not None:
        last = blocks.stop == len(spec.named_blocks(model, "pipeline parallelism"))
        stage = StagePart(
            0,
            blocks,
            blocks.start == 0,
            last,
            traced,
            traced.get_submodule(spec.blocks),
            spec.pipeline,
        )
    return trace_micro_batch(
        traced,
        spec,
        config.train.micro_batch,
        config.data.seq_len // plan.dims.sp,
        dtype=plan.precision.param_dtype,
        checkpointing=config.train.activation_checkpointing,
        every_n=config.train.checkpoint_every_n,
        vocab_size=config.model.vocab_size,
        stage=stage,
    )


def _filling_bucket_bytes(plan: RunPlan) -> float:
    """Stages 2-3: the full-size gradient bucket being filled before its reduce-scatter
    (the reducer's first bucket of backward; in the parameter dtype, plus its copy in the
    reduce dtype when that differs)."""
    if not plan.sharding.grads:
        return 0.0  # the whole gradient buffers are model states
    precision = plan.precision
    param_bytes = torch.finfo(precision.param_dtype).bits // 8
    reduce_bytes = torch.finfo(precision.reduce_dtype).bits // 8
    psi = plan.trainable_params * plan.dims.tp_depth / plan.dims.tp / plan.dims.pp
    elements = min(psi, plan.config.distributed.bucket_mb * 2**20 / param_bytes)
    copy = reduce_bytes if precision.reduce_dtype != precision.param_dtype else 0
    return elements * (param_bytes + copy)


def _gathered_backward_bytes(plan: RunPlan, model: nn.Module) -> float:
    """2D/2.5D/3D: the largest linear's backward gathers blocks of its input, weight and
    output gradient and holds full-width partial gradients before reduce-scattering them
    (summa.py `_SummaMatmul.backward`, three_d.py `_CubeMatmul.backward`); elements alive
    at once, per (d_in, d_out) linear."""
    dims, config = plan.dims, plan.config
    q, depth = grid(dims)
    tokens = config.train.micro_batch * config.data.seq_len
    elem = torch.finfo(plan.precision.param_dtype).bits // 8
    sizes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]

    def summa(d_in: int, d_out: int) -> float:  # gathered rows [r, in], weight [in, out/q]
        rows = tokens / (depth * q)
        return rows * d_in + d_in * d_out / q + rows * d_in / q

    def cube(d_in: int, d_out: int) -> float:  # dY and X rows gathered over q, dW, then dX
        rows, weight = tokens / q, d_out * d_in / q**2  # gathered rows; a gathered weight
        grad_y, x_rows = rows * d_out / q, rows * d_in / q
        return grad_y + max(x_rows + weight, weight + x_rows + x_rows / q)

    per_linear = cube if dims.tp_mode == "3d" else summa
    return max(per_linear(d_in, d_out) for d_in, d_out in sizes) * elem


def _stage_params(
    model: nn.Module, spec: ModelSpec, split: list[range], stages: list[int], n_stages: int
) -> int:
    """Trainable elements a pipeline rank holding `stages` keeps: their blocks, the
    embedding's modules on the first stage, the head's on the last (a tied weight on both)."""
    blocks = [block for _, block in spec.named_blocks(model, "pipeline parallelism")]
    modules = [blocks[i] for s in stages for i in split[s]]
    calls = spec.pipeline
    names = (calls.first if 0 in stages else ()) + (calls.last if n_stages - 1 in stages else ())
    modules += [model.get_submodule(name) for name in names if has_module(model, name)]
    if n_stages - 1 in stages and spec.tied(model):
        modules.append(model.get_submodule(spec.embedding))
    params = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}
    return sum(p.numel() for p in params.values())


def _placed_states(plan: RunPlan, share: float, activations: float) -> dict[str, dict[str, float]]:
    """`RunPlan.model_state_bytes` times `share`, on tiers. Parameter chunks: ``static``
    keeps `param_device_fraction` of them on the device (within ``device_budget_mb`` if
    set), ``auto`` what its budget leaves beside the step's `activations`; the others fill
    ``host_budget_mb`` and go to disk beyond it."""
    offload = plan.offload
    placed = {}
    for name, nbytes in plan.model_state_bytes().items():
        nbytes *= share
        tier = "device"
        if name in ("master_params", "optimizer_states") and offload.optimizer != "device":
            tier = offload.optimizer
        placed[name] = {tier: nbytes}
    if plan.tiered:
        params = placed["params"]["device"]
        budget = offload.device_budget_mb * 2**20 if offload.device_budget_mb else float("inf")
        if plan.static_placement:
            kept = min(params * offload.param_device_fraction, budget)
        else:
            kept = min(params, max(budget - activations, 0.0))
        host_budget = offload.host_budget_mb * 2**20 if offload.host_budget_mb else float("inf")
        host = min(params - kept, host_budget)
        placed["params"] = {"device": kept, "host": host, "disk": params - kept - host}
    return placed
