"""The training engine: a parameter store, an optimizer, a loss scaler and a schedule.

`initialize(model, optimizer_factory, config)` resolves the config into a `RunPlan`
(shardwise/run_plan.py), applies the plan to the model from outside (tensor parallelism,
activation checkpointing, through the model's `ModelSpec`) and returns an `Engine`.
`train_step(batch)` runs one optimizer step: the schedule's micro-batches (gradient
accumulation), then the step. DeepSpeed-style loops call `forward`, `backward(loss)` and
`step()` per micro-batch instead; `step()` acts at the accumulation boundary only.

The store (zero/store.py) decides where parameters, gradients and optimizer states live and
how gradients are reduced; the engine only sequences it: before/after backward, the loss-scale
check, the global norm and its clipping coefficient, the update. There is one clipping rule
(torch.nn.utils.clip_grad_norm_'s: coefficient max_norm / (norm + 1e-6), at most one) and one
unscale path, whatever the store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from shardwise.accelerator import get_accelerator
from shardwise.activation_checkpointing import apply_activation_checkpointing
from shardwise.attention import apply_attention
from shardwise.config import Config
from shardwise.distributed import comm
from shardwise.distributed.launch import join_launched_group
from shardwise.errors import TrainingError
from shardwise.loss import LossFn, choose_loss, own_loss
from shardwise.models import ModelSpec, spec_of
from shardwise.optim import OptimizerFactory, lr_multiplier, param_groups
from shardwise.precision import make_loss_scaler
from shardwise.run_plan import RunPlan, resolve
from shardwise.schedule import Batch, build_schedule
from shardwise.tensor_parallel import Plan, apply_tensor_parallel
from shardwise.zero.chunks.chunk import ParamInit
from shardwise.zero.store import DataParallelGroups, build_store, clip_coefficient


class Engine:
    """Trains `model` as `plan` says: split by its tensor-parallel plan, its state in a
    parameter store, micro-batches run by a schedule."""

    def __init__(
        self,
        model: nn.Module,
        optimizer_factory: OptimizerFactory | None,
        plan: RunPlan,
        mesh: object | None,
        loss_fn: LossFn | None = None,
        param_init: ParamInit | None = None,
        spec: ModelSpec | None = None,
    ) -> None:
        self.plan = plan
        distributed = plan.config.distributed
        comm.configure_process(distributed.emulate_gbps, distributed.check_collectives)
        self.accelerator = get_accelerator()
        self.device = self.accelerator.device(dist.get_rank() if dist.is_initialized() else 0)
        spec = spec_of(model, spec)
        self.tp = apply_tensor_parallel(model, mesh, plan.tp_plan) if plan.tp_plan else None
        loss_fn = choose_loss(loss_fn, self.tp.loss_fn if self.tp else None)
        self.loss_fn, cut = apply_attention(model, spec, plan, mesh, loss_fn)
        self.schedule = build_schedule(plan, model, spec, mesh, self.device, cut)
        train = plan.config.train
        apply_activation_checkpointing(
            model, spec, train.activation_checkpointing, train.checkpoint_every_n
        )
        self.scaler = make_loss_scaler(plan.precision, plan.config.precision)
        self.store = build_store(
            model, plan, mesh, self.device, spec, param_init, self.tp, self.scaler, self.schedule
        )
        self.model = model
        self.dp = DataParallelGroups.of(mesh)
        optim = plan.config.optim
        groups = (
            param_groups(model, optim.weight_decay)
            if plan.optimizer.decay_groups
            else [{"params": self.store.params}]
        )
        self.optimizer = self.store.build_optimizer(optimizer_factory, groups, plan)
        self.scheduler = None
        if plan.optimizer.lr_schedule:
            factor = lr_multiplier(optim, train.steps)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.global_step = 0
        self.last_grad_norm = 0.0
        self._micro_step = 0

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters (as the model holds them: shards under tp)."""
        return self.store.params

    # -- the three-call loop -----------------------------------------------------------

    def forward(self, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> object:
        """The model's output for token ids, or for keyword inputs (a dict batch)."""
        self.store.before_forward()
        if isinstance(inputs, Mapping):
            return self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return self.model(inputs.to(self.device, non_blocking=True))

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; the last micro-batch of a step reduces gradients."""
        sync = self._micro_step == len(self.schedule) - 1
        self.run_backward(lambda: torch.autograd.backward(self.scaled(loss)), sync)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` averaged over the step's micro-batches and loss-scaled (fp16)."""
        scaled = loss / len(self.schedule)
        return self.scaler.scale_loss(scaled) if self.scaler is not None else scaled

    def run_backward(self, backward: Callable[[], None], sync: bool) -> None:
        """Run `backward` (a micro-batch's, a pipeline stage's or its weights' half) inside
        the store's bracket; `sync`: the rank's last backward of the step, which reduces."""
        self.store.before_backward(sync, self.optimizer)
        backward()
        self.store.after_backward(sync)
        self._micro_step += 1

    def step(self) -> bool:
        """Optimizer step at the accumulation boundary; returns whether weights changed."""
        if self._micro_step < len(self.schedule):
            return False
        should_step = True
        if self.scaler is not None:
            should_step = self.scaler.update(self.store.unscale_and_check(self.scaler))
        if should_step:
            norm = self.store.grad_norm(self.schedule.uncounted)
            self.last_grad_norm = norm.item()
            coef = clip_coefficient(norm, self.plan.optimizer.grad_clip)
            self.store.update(self.optimizer, coef)
            if self.scheduler is not None:
                self.scheduler.step()
        self.store.end_step()
        self._micro_step = 0
        self.global_step += 1
        return should_step

    # -- one call per step -------------------------------------------------------------

    def train_step(self, batch: Batch) -> float:
        """One optimizer step on this rank's rows of the global batch: ``(inputs, targets)``
        or a dict of the model's keyword inputs (with ``labels``: the model's own loss).
        Returns the mean loss over the global batch (all micro-batches and dp ranks)."""
        self.store.before_forward()  # a pipeline's stages run without `forward`
        mean_loss = self.schedule.run(batch, self)
        if self.dp.size > 1:
            comm.all_reduce_(mean_loss, self.dp.dp)
            mean_loss = mean_loss / self.dp.size
        if not torch.isfinite(mean_loss) and self.scaler is None:
            why = "training diverged; lower optim.lr or set optim.grad_clip"
            if self.global_step == 0:
                why = "before any update: check the initial weights (model.init_std) and inputs"
            raise TrainingError(f"loss is {mean_loss.item()} at step {self.global_step + 1}, {why}")
        self.step()
        return mean_loss.item()

    def forward_backward(self, micro: Batch) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch (the schedule calls it)."""
        if isinstance(micro, Mapping):
            loss = own_loss(self.forward(micro))
        else:
            inputs, targets = micro
            loss = self.loss_of(self.forward(inputs), targets)
        self.backward(loss)
        return loss

    def loss_of(self, output: object, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, targets.to(self.device, non_blocking=True))

    def sum_reduced_grad(self, param: nn.Parameter, group: object) -> None:
        self.store.sum_reduced_grad(param, group)

    # -- state ----------------------------------------------------------------------------

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds per category of model state, read from the tensors
        themselves (see the store's `memory_report`)."""
        return self.store.memory_report(self.optimizer)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on every rank (copies; gathered where sharded over
        data-parallel ranks; tensor-parallel shards stay each rank's own); collective."""
        self.store.sync_update(self.optimizer)
        return self.store.full_state_dict()

    def state_dict(self) -> dict:
        """The state every rank shares: step, LR schedule, loss scale. Parameters and
        optimizer states are saved from the store, in any layout's terms
        (shardwise/checkpoint/shards.py)."""
        return {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "global_step": self.global_step,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = state["global_step"]


def initialize(
    model: nn.Module,
    optimizer_factory: OptimizerFactory | None = None,
    config: Config | None = None,
    *,
    mesh: object | None = None,
    loss_fn: LossFn | None = None,
    param_init: ParamInit | None = None,
    tp_plan: Plan | None = None,
    spec: ModelSpec | None = None,
    plan: RunPlan | None = None,
) -> Engine:
    """Wrap `model` for training.

    Under a launcher (``shardwise run``, torchrun) the process group is joined here if the
    script has not. Without `mesh`, one is built from the plan. A model built on the meta
    device needs `param_init(name, tensor)`; it is then built directly as shards. `spec`
    overrides the model's declared or discovered `ModelSpec`, `tp_plan` its tensor-parallel
    plan; `plan` skips resolving `config` (the launcher resolved it already)."""
    config = config or (plan.config if plan is not None else Config())
    join_launched_group(config.distributed.timeout_s)
    if plan is None:
        world = mesh.size() if mesh is not None else _world_size()
        plan = resolve(
            config,
            world,
            model=model,
            spec=spec,
            tp_plan=tp_plan,
            optimizer_given=optimizer_factory is not None,
        )
    if mesh is None and plan.world_size > 1:
        mesh = plan.dims.build_mesh(get_accelerator().device_type)
    return Engine(model, optimizer_factory, plan, mesh, loss_fn, param_init, spec)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
