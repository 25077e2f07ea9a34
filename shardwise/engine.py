"""The training engine: forward, backward, optimizer step, on a data-parallel mesh.

`initialize(model, optimizer_factory, config)` returns an `Engine`. `train_step(batch)` runs
a whole optimizer step (all micro-batches of gradient accumulation); DeepSpeed-style loops
call `forward`, `backward(loss)` and `step()` per micro-batch instead, and `step()` acts at
the accumulation boundary only.

The engine composes: a tensor-parallel plan (the model split over the mesh's tp axes, its loss
reading vocabulary-split logits), activation checkpointing, the precision policy (parameters
in the compute dtype, fp32 master weights for the optimizer, loss scaling for fp16), the
bucketed `GradReducer` (the only place data-parallel gradients are communicated) and
global-norm clipping.

[Note: parameters in chunks] With ``offload.policy`` static or auto the trainable parameters
live in chunks that move between device, host and disk (zero/chunked.py) instead of the
reducer's flat buckets: there is no reducer and no `OptimizerShards`. Gradients move into
gradient chunks as they arrive ([Note: gradient chunks] in zero/chunk_hooks.py), and the
optimizer visits one chunk and its gradient chunk at a time, clipping there. In one process
the global norm is computed as torch.nn.utils.clip_grad_norm_ does (bit for bit, from
per-parameter norms taken in the gradient hook); over several data-parallel ranks every chunk
is sharded over them (zero/chunk_shards.py: gathered for compute, gradients reduce-scattered,
each rank updating its shard).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shardwise.accelerator import get_accelerator
from shardwise.activation_checkpointing import apply_activation_checkpointing
from shardwise.config import Config, resolve_batch
from shardwise.distributed import comm
from shardwise.distributed.dims import ParallelDims, dp_mesh, tp_mesh
from shardwise.distributed.reducer import GradReducer
from shardwise.errors import CheckpointError, ConfigError, TrainingError
from shardwise.optim import OptimizerFactory, default_optimizer_factory, lr_multiplier, param_groups
from shardwise.precision import make_loss_scaler, policy_from_config
from shardwise.tensor_parallel import Plan, apply_tensor_parallel
from shardwise.zero.chunked import ChunkedParams
from shardwise.zero.offload.adam import OffloadedAdamW, offloaded_optimizer_factory
from shardwise.zero.optimizer import OptimizerShards, ParamInit
from shardwise.zero.params import ShardedParams, zero3_units

log = logging.getLogger("shardwise")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy, computed in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def check_supported(dims: ParallelDims) -> None:
    """Reject degrees this version cannot run yet, before any process waits on them."""
    for name in ("pp", "sp"):
        degree = getattr(dims, name)
        if degree > 1:
            raise ConfigError(
                f"parallel.{name}={degree} is not supported yet; this version trains with "
                f"data and tensor parallelism only (parallel.{name}=1)"
            )


def check_offload_policy(config: Config) -> None:
    """Reject ``offload.policy`` where it cannot run, before any process waits."""
    policy, parallel = config.offload.policy, config.parallel
    if policy == "none":
        return
    if parallel.tp > 1:
        raise ConfigError(
            f"offload.policy={policy!r} shards chunks over the data-parallel ranks only: it "
            f"needs parallel.tp=1 (got {parallel.tp}); use offload.optimizer for Adam states "
            "on host or disk with tensor parallelism"
        )
    if config.zero.stage not in (0, 3):
        raise ConfigError(
            f"offload.policy={policy!r} shards parameters, gradients and Adam states of every "
            f"chunk over the data-parallel ranks (ZeRO-3 for chunks); zero.stage="
            f"{config.zero.stage} asks for less: set zero.stage=3 (or leave it at 0)"
        )


class Engine:
    """Trains `model` with data parallelism over the mesh's ``dp`` axes, state sharded by
    ``zero.stage`` (0: replicated, 1–3: ZeRO), split by `tp_plan` over its tp axes."""

    def __init__(
        self,
        model: nn.Module,
        optimizer_factory: OptimizerFactory,
        config: Config,
        mesh: object | None,
        loss_fn: LossFn = cross_entropy_loss,
        param_init: ParamInit | None = None,
        tp_plan: Plan | None = None,
    ) -> None:
        self.config = config
        self.accelerator = get_accelerator()
        self.policy = policy_from_config(config.precision, self.accelerator)
        self.loss_fn = loss_fn
        self.tp_mesh = tp_mesh(mesh) if mesh is not None else None
        self.tp = None
        if self.tp_mesh is not None and comm.group_size(self.tp_mesh) > 1:
            self._apply_tensor_parallel(model, mesh, tp_plan, loss_fn)
        # [Note: hierarchical data parallelism] Gradients are averaged over every dp rank, but
        # ZeRO shards only within `dp_shard`; the `dp_replicate` groups (typically one per
        # node) hold identical shards, kept equal by an all-reduce of the reduced slices.
        self.dp_mesh = dp_mesh(mesh) if mesh is not None else None
        self.dp_size = self.dp_mesh.size() if mesh is not None else 1
        self.shard_mesh = mesh["dp_shard"] if mesh is not None else None
        replicate = mesh["dp_replicate"] if mesh is not None else None
        self.replicate_mesh = replicate if comm.group_size(replicate) > 1 else None
        self.grad_accum = resolve_batch(config.train, self.dp_size)

        apply_activation_checkpointing(
            model, config.train.activation_checkpointing, config.train.checkpoint_every_n
        )
        local_rank = int(dist.get_rank()) if dist.is_initialized() else 0
        self.device = self.accelerator.device(local_rank)
        on_meta = any(p.is_meta for p in model.parameters())
        chunked = config.offload.policy != "none"
        # meta: filled in place later; chunks: their payloads carry the parameters there
        placement = {} if on_meta or chunked else {"device": self.device}
        self.model = model.to(dtype=self.policy.param_dtype, **placement)
        self._broadcast_from_first_rank()

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.reducer = self.shards = self.sharded_params = self.chunked = None
        groups = param_groups(self.model, config.optim.weight_decay)
        if chunked:
            self._setup_chunks(config, param_init)
            self.optimizer = self.chunked.build_optimizer(groups, optimizer_factory, config.optim)
        else:
            self._setup_zero(config, param_init)
            self.optimizer = optimizer_factory(self.shards.param_groups(groups))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(config.optim, config.train.steps)
        )
        self.scaler = make_loss_scaler(self.policy, config.precision)
        self.global_step = 0
        self.last_grad_norm = 0.0
        self._micro_step = 0

    # -- setup ---------------------------------------------------------------------------

    def _apply_tensor_parallel(
        self, model: nn.Module, mesh: object, plan: Plan | None, loss_fn: LossFn
    ) -> None:
        """Split the model over the tp axes; the plan's loss reads its split output."""
        tp = comm.group_size(self.tp_mesh)
        if plan is None:
            raise ConfigError(
                f"parallel.tp={tp} needs a tensor-parallel plan: pass tp_plan= to initialize() "
                "(shardwise.registry.TP_PLANS has the built-in models' plans)"
            )
        if loss_fn is not cross_entropy_loss:
            raise ConfigError(
                f"a custom loss_fn cannot read the model's output at parallel.tp={tp}: the "
                "tensor-parallel plan splits it and brings its own loss"
            )
        self.tp = apply_tensor_parallel(model, mesh, plan)
        self.loss_fn = self.tp.loss_fn

    def _setup_zero(self, config: Config, param_init: ParamInit | None) -> None:
        """The gradient reducer, this rank's optimizer shards and, at stage 3, the unit
        gather/release hooks (docs/zero.md)."""
        zero = config.zero
        shard_size = comm.group_size(self.shard_mesh)
        _check_shardable(self.params, zero.stage, shard_size)
        units = zero3_units(self.model) if zero.stage == 3 and shard_size > 1 else None
        scatter = zero.stage >= 2
        self.reducer = GradReducer(
            self.params,
            group=self.shard_mesh if scatter else self.dp_mesh,
            bucket_bytes=int(config.distributed.bucket_mb * 2**20),
            reduce_dtype=self.policy.reduce_dtype,
            scatter=scatter,
            bucket_groups=[params for *_, params in reversed(units)] if units else None,
            replicate_group=self.replicate_mesh if scatter else None,
            device=self.device,
        )
        _check_materialisable(self.model, param_init)
        self.shards = OptimizerShards(
            self.model, self.reducer, self.policy, self.shard_mesh, zero.stage, param_init
        )
        self._materialise_frozen(param_init)
        self.sharded_params = None
        if units:
            self.sharded_params = ShardedParams(
                [(name, module) for name, module, _ in units],
                self.shards,
                self.shard_mesh,
                zero.reshard_after_forward,
                zero.prefetch,
            )
            self.reducer.on_bucket_complete = self.sharded_params.on_bucket_complete

    def _setup_chunks(self, config: Config, param_init: ParamInit | None) -> None:
        """Trainable parameters into chunks (see [Note: parameters in chunks]); the rest of
        the model (buffers, frozen parameters) onto the device."""
        if self.policy.needs_master_weights and config.offload.optimizer == "device":
            raise ConfigError(
                f"offload.policy={config.offload.policy!r} with {self.policy.param_dtype} "
                "parameters keeps the fp32 master weights in the host optimizer: set "
                "offload.optimizer='host' or 'disk', or precision.dtype='fp32'"
            )
        _check_materialisable(self.model, param_init)
        first = next(iter(self.params), None)
        example = torch.zeros(
            (1, config.data.seq_len),
            dtype=torch.long,
            device=first.device if first is not None else self.device,
        )
        # The engine's models take token ids [batch, seq] (as its loss and trainer assume).
        self.chunked = ChunkedParams(
            self.model,
            self.params,
            self.device,
            config.offload,
            lambda: self.model(example),
            param_init,
            self.shard_mesh,
            self.replicate_mesh,
        )
        chunked = {id(p) for p in self.chunked.names().values()}
        with torch.no_grad():
            for module in self.model.modules():
                for key, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[key] = buffer.to(self.device)
            for param in self.model.parameters():
                if id(param) not in chunked and not param.is_meta:
                    param.data = param.data.to(self.device)
        self._materialise_frozen(param_init)

    def _broadcast_from_first_rank(self) -> None:
        """Start every replica from rank 0's weights, as DDP does, whatever the init (a meta
        model is filled later by `param_init`, the same on every rank)."""
        if self.dp_size == 1:
            return
        with torch.no_grad():
            for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
                if not tensor.is_meta:
                    comm.broadcast_(tensor, 0, self.dp_mesh)

    def _materialise_frozen(self, param_init: ParamInit | None) -> None:
        """Frozen parameters are not in buckets: fill those still on the meta device alone."""
        for name, param in self.model.named_parameters():
            if param.is_meta:
                tensor = torch.empty(param.shape, dtype=param.dtype, device=self.device)
                param_init(name, tensor)
                torch.utils.swap_tensors(param, nn.Parameter(tensor, requires_grad=False))

    # -- the three-call loop -----------------------------------------------------------

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.chunked is not None:
            self.chunked.start_micro_step()
        return self.model(inputs.to(self.device, non_blocking=True))

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; the last micro-batch of a step reduces gradients."""
        sync = self._micro_step == self.grad_accum - 1
        if self.reducer is not None:
            self.reducer.prepare(sync=sync)
        scaled = loss / self.grad_accum
        if self.scaler is not None:
            scaled = self.scaler.scale_loss(scaled)
        scaled.backward()
        if self.chunked is not None:
            self.chunked.finish_backward()
        elif sync:
            self.reducer.finish()
        if self.sharded_params is not None:
            self.sharded_params.release_all()
        self._micro_step += 1

    def step(self) -> bool:
        """Optimizer step at the accumulation boundary; returns whether weights changed."""
        if self._micro_step < self.grad_accum:
            return False
        if self.chunked is not None:
            return self._step_chunks()
        grads = self.shards.owned_grads()
        groups = [
            g
            for g in (self.shards.norm_group, self.tp_mesh)
            if g is not None and comm.group_size(g) > 1
        ]
        should_step = True
        if self.scaler is not None:
            found_inf = self.scaler.unscale_and_check_(grads, groups)
            should_step = self.scaler.update(found_inf)
        if should_step:
            squares = self._grad_squares(grads)
            self.last_grad_norm = _clip_global_norm_(
                grads, squares, self.config.optim.grad_clip, groups
            )
            self.shards.attach_grads()
            self.optimizer.step()
            self.scheduler.step()
            self.shards.sync_params()
            self.shards.release_grads()
        self.reducer.release_grads()
        self._micro_step = 0
        self.global_step += 1
        return should_step

    def _step_chunks(self) -> bool:
        """`step` with parameters in chunks (see [Note: parameters in chunks])."""
        grads = self.chunked.grads
        should_step = True
        if self.scaler is not None:
            should_step = self.scaler.update(grads.unscale_and_check_(self.scaler))
        self.chunked.finish_warm_up()
        if should_step:
            # Per-parameter norms: the global norm exactly as a plain torch run computes it.
            norm = grads.total_norm(self.params)
            self.last_grad_norm = norm.item()
            self.chunked.optimizer_step(self.optimizer, self.config.optim.grad_clip, norm)
            self.scheduler.step()
        self.chunked.end_step()
        self._micro_step = 0
        self.global_step += 1
        return should_step

    # -- one call per step -------------------------------------------------------------

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        """One optimizer step on this rank's rows of the global batch; returns the mean loss
        over the whole global batch (all micro-batches, all data-parallel ranks)."""
        inputs, targets = batch
        if inputs.shape[0] % self.grad_accum:
            raise ConfigError(
                f"batch of {inputs.shape[0]} rows does not split into "
                f"{self.grad_accum} micro-batches of train.micro_batch"
            )
        loss_sum = torch.zeros((), device=self.device)
        targets = targets.to(self.device, non_blocking=True)
        for micro_in, micro_tgt in zip(
            inputs.chunk(self.grad_accum), targets.chunk(self.grad_accum), strict=True
        ):
            loss = self.loss_fn(self.forward(micro_in), micro_tgt)
            self.backward(loss)
            loss_sum += loss.detach().float()
        mean_loss = self._mean_over_dp(loss_sum / self.grad_accum)
        if not torch.isfinite(mean_loss) and self.scaler is None:
            raise TrainingError(
                f"loss is {mean_loss.item()} at step {self.global_step + 1}: training diverged; "
                "lower optim.lr or set optim.grad_clip"
            )
        self.step()
        return mean_loss.item()

    def _grad_squares(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Sum of squared gradient elements this rank owns, counting each element of the
        model once: a tensor-parallel shard held by k tp ranks contributes 1/k per holder."""
        if self.tp is None:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            return torch.stack(norms).square().sum()
        pieces, weights = [], []
        for owned, grad in zip(self.shards.slices, grads, strict=True):
            for owner, (lo, hi) in zip(owned.owners, owned.grad_ranges, strict=True):
                pieces.append(grad[lo - owned.start : hi - owned.start])
                weights.append(1.0 / self.tp.replicas[id(owner)])
        norms = torch.stack(torch._foreach_norm(pieces, 2, dtype=torch.float32))
        return (norms.square() * torch.tensor(weights, device=norms.device)).sum()

    def _mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        if self.dp_size > 1:
            comm.all_reduce_(value, self.dp_mesh)
            value = value / self.dp_size
        return value

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds per category of model state, read from the tensors themselves
        (each storage counted once, padding included); ``offloaded_host`` / ``offloaded_disk``:
        Adam states moved off the device by ``offload.optimizer`` (host memory, disk).

        With parameters in chunks, ``params`` counts the chunks now on the device, ``grads``
        the ``param.grad`` tensors (none between steps), ``master_params`` the host optimizer's
        fp32 copies, and ``chunks_device`` / ``chunks_host`` / ``chunks_disk`` (parameter
        chunks), ``grad_chunks_device`` / ``_host`` / ``_disk`` (gradient chunks; none between
        steps) and ``chunks_device_peak`` (both, the peak since the start) are the chunk
        manager's own counts."""
        if self.chunked is None:
            grads = [b.grads for b in self.reducer.buckets if b.grads is not None]
            grads += [b.reduced for b in self.reducer.buckets]
            need_masters = self.policy.needs_master_weights
            masters = [s.master for s in self.shards.slices] if need_masters else []
            shards = [s.shard for s in self.shards.slices]
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            masters = [s["master"] for s in self.optimizer.state.values() if "master" in s]
            shards = []
        states = [
            t
            for state in self.optimizer.state.values()
            for key, t in state.items()
            if isinstance(t, torch.Tensor) and not (self.chunked is not None and key == "master")
        ]
        offloaded = (
            self.optimizer.tier_bytes()
            if isinstance(self.optimizer, OffloadedAdamW)
            else {"host": 0, "disk": 0}
        )
        report = {
            "params": _storage_bytes([*self.model.parameters(), *shards]),
            "grads": _storage_bytes(grads),
            "master_params": _storage_bytes(masters),
            "optimizer_states": _storage_bytes(states),
            "buffers": _storage_bytes(self.model.buffers()),
            "offloaded_host": offloaded["host"],
            "offloaded_disk": offloaded["disk"],
        }
        if self.chunked is not None:
            report.update(self.chunked.memory_report())
        return report

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- state ----------------------------------------------------------------------------

    @property
    def state_is_replicated(self) -> bool:
        """Whether every rank holds the same state (else each saves its own)."""
        if self.chunked is not None:
            return not self.chunked.sharded
        return not self.shards.sharded and self.tp is None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on every rank (copies; at ZeRO-3 gathered for it).

        Tensor-parallel shards are not gathered: with parallel.tp > 1 each rank gets its own.
        Chunked parameters are read chunk by chunk through the chunk manager.
        """
        if self.chunked is not None:
            params = self.chunked.read_params()
            return {
                k: params[k] if k in params else v.detach().clone()
                for k, v in self.model.state_dict().items()
            }
        gathered = self.sharded_params.all_gathered() if self.sharded_params else nullcontext()
        with gathered:
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _model_state(self) -> dict:
        """The model's state dict, less the parameters only shards hold (ZeRO-3); chunked
        parameters as copies read through the chunk manager."""
        state = self.model.state_dict()
        if self.chunked is not None:
            state.update(self.chunked.read_params())
        elif self.shards.params_sharded:
            held = {id(p) for p in self.params}
            names = [
                n for n, p in self.model.named_parameters(remove_duplicate=False) if id(p) in held
            ]
            for name in names:
                state.pop(name, None)
        return state

    def state_dict(self) -> dict:
        """Everything an exact resume needs: this rank's shards and the model's other state."""
        return {
            "model": self._model_state(),
            "shards": self.shards.state_dict() if self.shards is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "global_step": self.global_step,
        }

    def load_state_dict(self, state: dict) -> None:
        model_state = state["model"]
        if self.chunked is not None:
            self.chunked.write_params(model_state)  # through the manager, chunk by chunk
            expected_missing = set(self.chunked.names())
            model_state = {k: v for k, v in model_state.items() if k not in expected_missing}
        else:
            expected_missing = set(self.model.state_dict()) - set(self._model_state())
        result = self.model.load_state_dict(model_state, strict=False)
        if set(result.missing_keys) != expected_missing or result.unexpected_keys:
            raise CheckpointError(
                f"checkpoint model state does not fit this model: missing "
                f"{sorted(set(result.missing_keys) - expected_missing)[:3]}, unexpected "
                f"{result.unexpected_keys[:3]}"
            )
        if self.shards is not None:
            self.shards.load_state_dict(state["shards"])
        self.optimizer.load_state_dict(state["optimizer"])
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
    loss_fn: LossFn = cross_entropy_loss,
    param_init: ParamInit | None = None,
    tp_plan: Plan | None = None,
) -> Engine:
    """Wrap `model` for training. Without `mesh`, one is built from ``config.parallel`` and
    the initialised process group (or none in a single process). A model built on the meta
    device needs `param_init(name, tensor)`; with zero.stage=3 it is then built directly as
    shards. With parallel.tp > 1 the (materialised) model is split by `tp_plan`."""
    config = config or Config()
    check_offload_policy(config)
    if mesh is None and dist.is_initialized() and dist.get_world_size() > 1:
        dims = ParallelDims.from_config(config.parallel, dist.get_world_size())
        check_supported(dims)
        mesh = dims.build_mesh(get_accelerator().device_type)
    factory = _optimizer_factory(config, optimizer_factory)
    return Engine(model, factory, config, mesh, loss_fn, param_init, tp_plan)


def _optimizer_factory(config: Config, given: OptimizerFactory | None) -> OptimizerFactory | None:
    """The caller's factory, or AdamW (fused) with its states where ``offload.optimizer`` says."""
    if config.offload.optimizer == "device":
        return given or default_optimizer_factory(config.optim)
    if given is not None:
        raise ConfigError(
            f"offload.optimizer={config.offload.optimizer!r} brings its own AdamW; pass "
            "optimizer_factory=None or keep offload.optimizer='device'"
        )
    if config.offload.policy != "none":
        return None  # the chunked engine builds it: states follow the chunks (ChunkedAdamW)
    return offloaded_optimizer_factory(config.optim, config.offload)


def _check_materialisable(model: nn.Module, param_init: ParamInit | None) -> None:
    meta_buffers = [name for name, b in model.named_buffers() if b.is_meta]
    if meta_buffers:
        raise ConfigError(
            f"model buffer {meta_buffers[0]!r} is on the meta device; materialise buffers "
            "before initialize() (only parameters are filled by param_init)"
        )
    if param_init is None and any(p.is_meta for p in model.parameters()):
        raise ConfigError(
            "the model's parameters are on the meta device: pass param_init=(name, tensor) -> "
            "None to initialize() so they can be filled shard by shard"
        )


def _check_shardable(params: list[nn.Parameter], stage: int, shard_size: int) -> None:
    """Every rank raises the same error (same model, same degrees): nobody is left waiting."""
    numel = sum(p.numel() for p in params)
    if stage >= 1 and shard_size > numel:
        raise ConfigError(
            f"zero.stage={stage} shards over {shard_size} data-parallel ranks, but the model has "
            f"only {numel} trainable elements; use at most {numel} ranks or zero.stage=0"
        )


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _clip_global_norm_(
    flats: list[torch.Tensor], squares: torch.Tensor, max_norm: float, groups: list
) -> float:
    """Scale gradient buffers to the global L2 norm `max_norm`; `squares` is this rank's
    share of the squared norm (padding is zero), summed over each of `groups` (ranks holding
    disjoint slices: ZeRO shards, tensor-parallel shards).

    Same rule as torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6),
    applied only when below one. Returns the norm before clipping.
    """
    total_sq = squares.clone()
    for group in groups:
        comm.all_reduce_(total_sq, group)
    total = total_sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(flats, coef)
    return total.item()
