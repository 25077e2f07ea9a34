"""Running a pipeline schedule: this rank's actions, one step at a time (the schedule seam).

`PipelineSchedule.run` walks this rank's actions of the `Schedule` (schedules.py) in order:

    RECV_ACT / RECV_GRAD   the wait for the activation (gradient) a neighbour sent; on gloo
                           its receive was posted (irecv) when the previous receive from the
                           same peer completed, or at the step's start, so the transfer runs
                           while this rank computes ([Note: receives posted ahead])
    F                      the stage part's forward; the last stage's loss
    SEND_ACT / SEND_GRAD   a non-blocking send (isend), waited for once a message the peer
                           sent after receiving it has arrived ([Note: sends complete
                           early], schedules.py), the rest at the end of the step: a rank
                           never blocks on a send while its peer waits for something it has
                           yet to compute
    B                      the backward of the stage's output with the received gradient (the
                           last stage: of its scaled loss); the input's gradient is what
                           SEND_GRAD sends
    I / W                  zero-bubble's halves of B: the input's gradient first, the weights'
                           later, one backward's work in all ([Note: I and W], backward.py)

`check` (schedules.py) proved the order deadlock-free with exactly these semantics (sends
buffered, receives blocking) and matched every channel's sends and receives in FIFO order,
which is what NCCL needs; gloo matches by order too.

[Note: receives posted ahead] A receive waited for where the schedule puts it blocks no more
than a blocking receive there would, so the proof holds; posting it earlier lets the bytes
move while the rank computes instead of after it asks for them. One receive per peer is
posted at a time, in the schedule's order, so each peer's messages still match in FIFO order
(activations and gradients between two ranks share one channel, as `check` assumes). Only
where the backend serves receives apart from sends
(`Accelerator.receives_independent_of_sends`: gloo): NCCL would hold this rank's later sends
behind the posted receive, so there each receive is posted where it is waited for.

Activations between stages have the shape ``[rows, T, hidden]`` of the micro-batch and the
compute dtype, known to both sides; under tensor parallelism each rank sends its share, as
the tp layout splits the residual stream (`hidden_split`: 2D/2.5D/3D a batch and a hidden
block, Megatron-SP a sequence block) to the rank of the same tp coordinates on the next
stage. Under sequence parallelism every stage takes the same `cut` of the micro-batch's
token ids (T is this rank's part) and passes its keywords (the positions) to its part.

A stage's input is a leaf that requires grad, so the backward of one stage stops at its
input and the gradient crosses to the previous stage explicitly (between ranks, or within one
rank when it holds both stages). The store sees each backward as a micro-batch: the rank's
last backward of the step is the one that reduces gradients over the data-parallel ranks.
The step's loss (the mean over micro-batches) lives on the last stage and is broadcast over
the pipeline. The store sums gradient norms and fp16 overflow flags over the pipeline axis
too (stages hold disjoint parameters), leaving out the last stage's copy of a tied weight
(`uncounted`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import nn

from shardwise.accelerator import get_accelerator
from shardwise.distributed import comm
from shardwise.errors import ConfigError
from shardwise.models import ModelSpec
from shardwise.pipeline.backward import WeightGradients, backward_input
from shardwise.pipeline.schedules import Action, Kind, Schedule, sends_complete_at
from shardwise.pipeline.stage import PipelineStages, build_stages
from shardwise.schedule import GradientAccumulation, StepOps
from shardwise.sequence_parallel.model import SequenceCut

_COMPUTE = (Kind.FORWARD, Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT)
_RECEIVES = (Kind.RECV_ACT, Kind.RECV_GRAD)
_UPDATES_WEIGHTS = (Kind.BACKWARD, Kind.BACKWARD_WEIGHT)
"""Actions whose backward gives the stage's weights their gradients."""


class PipelineSchedule:
    """A pipeline `Schedule` run on this rank's stages."""

    def __init__(
        self,
        schedule: Schedule,
        stages: PipelineStages,
        device: torch.device,
        dtype: torch.dtype,
        cut: SequenceCut | None = None,
        hidden_split: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        """`hidden_split`: into how many parts this rank's share of the hidden states between
        stages divides rows, sequence and width (`ParallelDims.hidden_split`: tensor
        parallelism's layout of the residual stream)."""
        self.schedule = schedule
        self.cut = cut
        self.hidden_split = hidden_split
        self.stages = stages
        self.device = device
        self.dtype = dtype
        rank = comm.group_rank(stages.group)
        self.actions = schedule.actions(rank)
        self.sends_complete = sends_complete_at(schedule, rank)
        """Index of a receive -> the sends it shows complete ([Note: sends complete early])."""
        self._micro_batches = GradientAccumulation(schedule.micro_batches)
        """Splits a step's batch (the rule every schedule uses)."""
        self.first_receives: list[int] = []
        """Index of the first receive from each peer: posted at the step's start."""
        self.next_receive: dict[int, int | None] = {}
        """Index of a receive -> the index of the next receive from the same peer (None for
        the step's last from it): posted when this one completes."""
        last_from: dict[int, int] = {}
        for index, action in enumerate(self.actions):
            if action.kind not in _RECEIVES:
                continue
            if action.peer in last_from:
                self.next_receive[last_from[action.peer]] = index
            else:
                self.first_receives.append(index)
            last_from[action.peer] = index
            self.next_receive[index] = None
        backwards = [i for i, a in enumerate(self.actions) if a.kind in _UPDATES_WEIGHTS]
        self._last_backward = backwards[-1] if backwards else -1
        self._last_rank = schedule.rank_of(schedule.stages - 1)
        self.receives_ahead = get_accelerator().receives_independent_of_sends
        """Whether receives are posted ahead ([Note: receives posted ahead])."""
        self.busy_s = 0.0
        """Seconds the last step spent in compute actions (F, B, I, W) on this rank; its
        schedule's idle time is the rest of `step_s` (host time: on an accelerator it counts
        launches, not kernels)."""
        self.step_s = 0.0
        """Seconds of the last step's actions, its sends included."""

    @classmethod
    def build(
        cls,
        schedule: Schedule,
        model: nn.Module,
        spec: ModelSpec,
        mesh: object,
        split: tuple[range, ...],
        device: torch.device,
        dtype: torch.dtype,
        cut: SequenceCut | None = None,
        hidden_split: tuple[int, int, int] = (1, 1, 1),
    ) -> PipelineSchedule:
        """Cut `model` to this rank's stages (in place) and schedule them."""
        stages = build_stages(model, spec, schedule, split, mesh)
        return cls(schedule, stages, device, dtype, cut, hidden_split)

    def __len__(self) -> int:
        return self.schedule.micro_batches

    def run(self, batch: object, ops: StepOps) -> torch.Tensor:
        """This rank's actions for one step; returns the step's mean loss on every rank."""
        if isinstance(batch, Mapping):
            raise ConfigError(
                "parallel.pp > 1 takes (inputs, targets) batches; a dict batch needs the "
                "model's own loss, which pipeline stages do not run"
            )
        m = self.schedule.micro_batches
        inputs, targets = zip(*self._micro_batches.split(batch), strict=True)
        keywords = [{}] * m
        if self.cut is not None:
            cuts = (self.cut(ids.to(self.device, non_blocking=True)) for ids in inputs)
            inputs, keywords = zip(*cuts, strict=True)
        step = _Step(self, inputs, targets, keywords, ops)
        start = busy = time.perf_counter()
        for index in self.first_receives if self.receives_ahead else ():
            step.post(index)
        for index, action in enumerate(self.actions):
            before = time.perf_counter()
            step.do(index, action, sync=index == self._last_backward)
            if action.kind in _COMPUTE:
                busy += time.perf_counter() - before
        for work, _tensor in step.sends.values():
            work.wait()
        end = time.perf_counter()
        self.busy_s, self.step_s = busy - start, end - start
        # the reduced gradient: where it is another buffer than `.grad` (bf16 parameters
        # reduced in fp32, gradient chunks), a sum of `.grad` after the reduction would be lost
        if self.stages.tied is not None and self.stages.tied_group is not None:
            ops.sum_reduced_grad(self.stages.tied, self.stages.tied_group)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        if step.losses:
            total = torch.stack(step.losses).sum() / m
        comm.broadcast_(total, self._last_rank, self.stages.group)
        return total

    def trace_forward(self, model: nn.Module, sample: torch.Tensor) -> None:
        """This rank's stage parts (of `model`) in stage order on `sample`, cut as each
        micro-batch is; a stage after the first takes zeros of the hidden states' shape, where
        the parameters are (the meta device, for a model not yet materialised)."""
        keywords = {}
        if self.cut is not None:
            sample, keywords = self.cut(sample)
        device = next(model.parameters()).device
        hidden = torch.zeros(self.hidden_shape(sample), dtype=self.dtype, device=device)
        for stage in sorted(self.stages.parts):
            part = self.stages.parts[stage]
            part(sample if part.first else hidden, **keywords)

    def hidden_shape(self, inputs: torch.Tensor) -> tuple[int, int, int]:
        """This rank's share of the hidden states of a micro-batch of token ids `inputs`
        ([rows, T], T this rank's part under sequence parallelism)."""
        rows, seq = inputs.shape[:2]
        split_rows, split_seq, split_width = self.hidden_split
        return (rows // split_rows, seq // split_seq, self.stages.hidden_size // split_width)

    def stage_of(self) -> dict[int, int]:
        if len(self.stages.parts) == 1:
            return {}
        return {id(p): s for s, part in self.stages.parts.items() for p in part.parameters()}

    @property
    def uncounted(self) -> nn.Parameter | None:
        """The last stage's copy of a tied weight: the first stage's copy counts in the norm."""
        return None if self.stages.counts_tied else self.stages.tied


class _Step:
    """The tensors one step's actions pass to each other."""

    def __init__(
        self,
        runner: PipelineSchedule,
        inputs: tuple[torch.Tensor, ...],
        targets: tuple[torch.Tensor, ...],
        keywords: list[dict[str, torch.Tensor]],
        ops: StepOps,
    ) -> None:
        self.runner, self.inputs, self.targets, self.ops = runner, inputs, targets, ops
        self.keywords = keywords
        """Per micro-batch: what every stage part takes besides its input (the positions of
        this rank's part of the sequence, under sequence parallelism)."""
        self.stage_inputs: dict[tuple[int, int], torch.Tensor] = {}
        """(micro, stage) -> the stage's input leaf (from a receive or this rank's stage)."""
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        """(micro, stage) -> the stage's output (the last stage: its scaled loss)."""
        self.grads: dict[tuple[int, int], torch.Tensor] = {}
        """(micro, stage) -> the gradient of the stage's output."""
        self.input_grads: dict[tuple[int, int], torch.Tensor] = {}
        """(micro, stage) -> the gradient of the stage's input, to send."""
        self.weight_grads: dict[tuple[int, int], WeightGradients] = {}
        """(micro, stage) -> what the stage's I left for its W."""
        self.losses: list[torch.Tensor] = []
        self.sends: dict[int, tuple[object, torch.Tensor]] = {}
        """Index of a send action -> (work, tensor) of its isend, until it is known complete:
        the tensor stays alive until then."""
        self.posted: dict[int, tuple[object, torch.Tensor]] = {}
        """Index of a receive action -> (work, buffer) of its irecv, posted ahead."""

    def _receive(self, micro: int) -> torch.Tensor:
        shape = self.runner.hidden_shape(self.inputs[micro])
        return torch.empty(shape, dtype=self.runner.dtype, device=self.runner.device)

    def post(self, index: int) -> None:
        """Post the receive of action `index` ([Note: receives posted ahead])."""
        action = self.runner.actions[index]
        buffer = self._receive(action.micro)
        work = comm.recv(buffer, action.peer, self.runner.stages.group, async_op=True)
        self.posted[index] = (work, buffer)

    def _received(self, index: int) -> torch.Tensor:
        """Wait for receive `index` (posted ahead, or now), post the next one from its peer
        when receives go ahead, return its buffer."""
        if index not in self.posted:
            self.post(index)
        work, buffer = self.posted.pop(index)
        work.wait()
        for send in self.runner.sends_complete.get(index, ()):
            self.sends.pop(send)[0].wait()  # done: its bytes have arrived
        following = self.runner.next_receive[index]
        if following is not None and self.runner.receives_ahead:
            self.post(following)
        return buffer

    def do(self, index: int, action: Action, sync: bool) -> None:
        key = (action.micro, action.stage)
        kind = action.kind
        group = self.runner.stages.group
        if kind is Kind.RECV_ACT:
            self.stage_inputs[key] = self._received(index).requires_grad_()
        elif kind is Kind.RECV_GRAD:
            self.grads[key] = self._received(index)
        elif kind in (Kind.SEND_ACT, Kind.SEND_GRAD):
            tensor = (
                self.outputs[key].detach() if kind is Kind.SEND_ACT else self.input_grads.pop(key)
            )
            self.sends[index] = (comm.send(tensor, action.peer, group, async_op=True), tensor)
        elif kind is Kind.FORWARD:
            self._forward(action)
        elif kind is Kind.BACKWARD_INPUT:
            self._backward_input(action)
        else:
            self._backward(action, sync)

    def _forward(self, action: Action) -> None:
        micro, stage = action.micro, action.stage
        part = self.runner.stages.parts[stage]
        if part.first:
            x = self.inputs[micro].to(self.runner.device, non_blocking=True)
        else:
            x = self.stage_inputs[(micro, stage)]
        out = part(x, **self.keywords[micro])
        if part.last:
            loss = self.ops.loss_of(out, self.targets[micro].to(self.runner.device))
            self.losses.append(loss.detach().float())
            out = self.ops.scaled(loss)
        elif stage + 1 in self.runner.stages.parts:  # the next stage runs here too
            self.stage_inputs[(micro, stage + 1)] = out.detach().requires_grad_()
        self.outputs[(micro, stage)] = out

    def _backward(self, action: Action, sync: bool) -> None:
        """B: the whole backward, then the input's gradient handed on; W (after I): the
        weights' half that I left, or the whole backward where I could not split it."""
        key = (action.micro, action.stage)
        x = self.stage_inputs.pop(key, None)
        if key in self.weight_grads:
            self.ops.run_backward(self.weight_grads.pop(key).run, sync)
            return
        out = self.outputs.pop(key)
        grad = None if self.runner.stages.parts[action.stage].last else self.grads.pop(key)
        self.ops.run_backward(lambda: torch.autograd.backward(out, grad), sync)
        if action.kind is Kind.BACKWARD and x is not None:
            self._hand_on(action.micro, action.stage, x.grad)

    def _backward_input(self, action: Action) -> None:
        """I: only the gradient of the stage's input, handed on; the weights' half waits for
        W ([Note: I and W]). The first stage has no input gradient: its W is the backward."""
        key = (action.micro, action.stage)
        part = self.runner.stages.parts[action.stage]
        if part.first:
            return  # token ids have no gradient
        out = self.outputs[key]
        grad = None if part.last else self.grads[key]
        input_grad, weights = backward_input(out, grad, self.stage_inputs[key])
        if weights is not None:
            self.weight_grads[key] = weights
            del self.outputs[key]
            if not part.last:
                del self.grads[key]
        self._hand_on(action.micro, action.stage, input_grad)

    def _hand_on(self, micro: int, stage: int, input_grad: torch.Tensor) -> None:
        """The gradient of stage `stage`'s input, to the previous stage's backward: on this
        rank directly, else through SEND_GRAD."""
        if stage - 1 in self.runner.stages.parts:  # the previous stage runs here too
            self.grads[(micro, stage - 1)] = input_grad
        else:
            self.input_grads[(micro, stage)] = input_grad
