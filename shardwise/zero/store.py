"""Where parameters, gradients and optimizer states live, and how gradients are reduced.

`ParamStore` is the one protocol the engine trains through: the hooks around forward and
backward, the gradients' loss-scale check and global norm, the optimizer update, state dicts
and the memory report. Two stores implement it, chosen by the plan (`build_store`):

* `FlatStore`: parameters as views of flat per-bucket buffers; gradients reduced bucket by
  bucket while backward runs (all-reduce, or reduce-scatter when gradients are sharded); this
  rank's optimizer owns a slice of every bucket (ZeRO 1-2).
* `ChunkStore` (zero/chunks/store.py): parameters in chunks, sharded over the data-parallel
  ranks: placed on device, host and disk under budgets (Gemini, ``offload.policy``), or,
  for ZeRO-3 without it, one chunk per unit (a block of the `ModelSpec`, or the rest of the
  model; zero/params.py) gathered around its forward and backward.

Both receive the model, the plan and the mesh; the engine composes the store with an
optimizer, a loss scaler and a schedule, and clips with the norm the store reports.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from shardwise.distributed import comm
from shardwise.distributed.compressed import OneBitExchange
from shardwise.distributed.dims import grad_mesh, replica_mesh
from shardwise.distributed.reducer import Exchange, GradReducer, compressed_sizes, make_buckets
from shardwise.errors import CheckpointError, ConfigError
from shardwise.models import ModelSpec
from shardwise.optim import OptimizerFactory
from shardwise.optim.onebit import OneBitAdam
from shardwise.optim.zero_one import ZeroOneAdam
from shardwise.precision import DynamicLossScaler
from shardwise.run_plan import RunPlan
from shardwise.schedule import Schedule
from shardwise.tensor_parallel import TensorParallel
from shardwise.zero.chunks.chunk import ParamInit, PieceInfo
from shardwise.zero.offload.adam import OffloadedAdamW, optimizer_factory
from shardwise.zero.optimizer import OptimizerShards
from shardwise.zero.params import unit_chunks


class ParamStore(Protocol):
    """The engine's view of where the model's trainable state lives."""

    model: nn.Module
    params: list[nn.Parameter]
    """Trainable parameters, in model order."""
    device: torch.device

    def build_optimizer(
        self, given: OptimizerFactory | None, groups: list[dict], plan: RunPlan
    ) -> torch.optim.Optimizer: ...
    def before_forward(self) -> None: ...
    def before_backward(self, sync: bool, optimizer: torch.optim.Optimizer) -> None: ...
    def after_backward(self, sync: bool) -> None: ...
    def unscale_and_check(self, scaler: DynamicLossScaler) -> bool: ...
    def grad_norm(self, uncounted: nn.Parameter | None = None) -> torch.Tensor: ...
    def sum_reduced_grad(self, param: nn.Parameter, group: object) -> None: ...
    def update(self, optimizer: torch.optim.Optimizer, clip_coef: torch.Tensor | None) -> None: ...
    def sync_update(self, optimizer: torch.optim.Optimizer) -> None: ...
    def end_step(self) -> None: ...
    def full_state_dict(self) -> dict[str, torch.Tensor]: ...
    @property
    def writes_owned(self) -> bool: ...
    def owned(self) -> Iterator[OwnedPiece]: ...
    def load_owned(self, fill: Callable[[OwnedPiece], None]) -> None: ...
    def rank_state(self) -> dict | None: ...
    def load_rank_state(self, state: dict | None) -> None: ...
    def memory_report(self, optimizer: torch.optim.Optimizer) -> dict[str, int]: ...


@dataclass(frozen=True)
class OwnedPiece:
    """A tensor this rank's optimizer updates (the master weights of a slice of a parameter),
    as a checkpoint sees it (shardwise/checkpoint/shards.py)."""

    info: PieceInfo
    """The parameter's name and the slice of it (of this rank's tensor-parallel shard,
    flattened) that `tensor` holds."""
    owner: nn.Parameter
    """The model's parameter (for a tensor-parallel shard: where it sits in the full one)."""
    tensor: torch.Tensor
    """The optimizer's parameter; valid during the walk only (it may be evicted after)."""


@dataclass(frozen=True)
class DataParallelGroups:
    """The data-parallel groups a store reduces over ([Note: hierarchical data parallelism]).

    Gradients are averaged over every dp rank, but state is sharded only within `shard`; the
    `replicate` groups (typically one per node) hold identical shards, kept equal by an
    all-reduce of the reduced slices."""

    dp: object | None
    shard: object | None
    replicate: object | None
    """None when there is one replica."""
    stages: object | None = None
    """The pipeline axis, when there are stages: they hold disjoint parameters, so gradient
    norms and overflow flags are summed over it (as over dp shards and tp ranks)."""

    @classmethod
    def of(cls, mesh: object | None) -> DataParallelGroups:
        if mesh is None:
            return cls(None, None, None)
        replicate = replica_mesh(mesh)
        stages = mesh["pp"]
        return cls(
            grad_mesh(mesh),
            mesh["dp_shard"],
            replicate if comm.group_size(replicate) > 1 else None,
            stages if comm.group_size(stages) > 1 else None,
        )

    @property
    def size(self) -> int:
        return comm.group_size(self.dp) if self.dp is not None else 1


def build_store(
    model: nn.Module,
    plan: RunPlan,
    mesh: object | None,
    device: torch.device,
    spec: ModelSpec,
    param_init: ParamInit | None,
    tp: TensorParallel | None,
    scaler: DynamicLossScaler | None,
    schedule: Schedule,
) -> ParamStore:
    """Place `model` (in the plan's parameter dtype, every replica starting from rank 0's
    weights) and wrap its trainable parameters in the store the plan asks for. `scaler`: the
    fp16 loss scaler the gradients arrive scaled by; `schedule` runs this rank's part of the
    model (a pipeline stage's) for the chunks' execution order."""
    from shardwise.zero.chunks.store import ChunkStore  # it imports this module

    check_materialisable(model, param_init)
    groups = DataParallelGroups.of(mesh)
    on_meta = any(p.is_meta for p in model.parameters())
    # meta: filled in place later; chunks: their payloads carry the parameters there
    placement = {} if on_meta or plan.chunks else {"device": device}
    model.to(dtype=plan.precision.param_dtype, **placement)
    broadcast_from_first_rank(model, groups)
    if plan.chunks:  # sharded parameters, or parameters in tiers
        run = units = None
        if plan.tiered:  # chunks packed in execution order, which one forward records
            # on the parameters' device: a meta model traces for free, and a sequence-parallel
            # cut computes its positions where the token ids are
            where = next(p for p in model.parameters() if p.requires_grad).device
            sample = spec.sample_input(plan.config.data.seq_len, where)
            run = functools.partial(schedule.trace_forward, model, sample)
        else:  # ZeRO-3: a chunk per unit, whole elements on every rank
            pipelined = plan.pipeline is not None  # stages never call the whole model
            align = 8 * comm.group_size(groups.shard)
            after = plan.sharding.reshard_after_forward
            units = unit_chunks(model, spec, pipelined, align, after)
        store = ChunkStore(model, plan, groups, device, run, param_init, tp, units)
    else:
        stage_of = schedule.stage_of()
        store = FlatStore(model, plan, groups, device, spec, param_init, tp, scaler, stage_of)
    materialise_frozen(model, param_init, device)
    return store


class FlatStore:
    """Flat bucket buffers, reduced during backward, this rank's slice of each stepped by the
    optimizer (docs/zero.md)."""

    def __init__(
        self,
        model: nn.Module,
        plan: RunPlan,
        groups: DataParallelGroups,
        device: torch.device,
        spec: ModelSpec,
        param_init: ParamInit | None,
        tp: TensorParallel | None,
        scaler: DynamicLossScaler | None = None,
        stage_of: dict[int, int] | None = None,
    ) -> None:
        """`stage_of`: the schedule's stage of each parameter (by id), where this rank runs
        several: no bucket spans two."""
        sharding = plan.sharding
        self.model, self.device, self.tp = model, device, tp
        self.precision = plan.precision
        self.params = [p for p in model.parameters() if p.requires_grad]
        shard_size = comm.group_size(groups.shard)
        _check_shardable(self.params, sharding.stage, shard_size)
        reduce_group = groups.shard if sharding.grads else groups.dp
        replicate_group = groups.replicate if sharding.grads else None
        # 1-bit Adam compresses only where there is someone to send to: over the replicas
        # when there are some ([Note: 1-bit Adam over replicas] in reducer.py)
        exchange_group = replicate_group if replicate_group is not None else reduce_group
        onebit = plan.optimizer.onebit_freeze is not None and comm.group_size(exchange_group) > 1
        chunk = plan.config.optim.compression_chunk
        pieces = comm.group_size(exchange_group) if replicate_group is not None else 1
        buckets = make_buckets(
            self.params,
            reduce_group,
            plan.precision.reduce_dtype,
            bucket_bytes=int(plan.config.distributed.bucket_mb * 2**20),
            scatter=sharding.grads,
            device=device,
            align=math.lcm(8, chunk) * pieces if onebit else 1,
            alone=_stage_embedding(model, plan, spec),
            stage_of=stage_of,
        )
        exchange = None
        if onebit:
            # the exchange's slices are the optimizer's only over the group it shards over
            owns_slices = (
                sharding.optimizer
                and replicate_group is None
                and comm.group_size(reduce_group) == shard_size
            )
            exchange = OneBitExchange(
                compressed_sizes(buckets, replicated=replicate_group is not None),
                exchange_group,
                chunk,
                gather=not owns_slices,
                device=device,
                loss_scale=(lambda: scaler.scale) if scaler is not None else None,
            )
        self.shards = OptimizerShards(
            model,
            buckets,
            plan.precision,
            groups.shard,
            sharding,
            param_init,
        )
        self.reducer = GradReducer(
            buckets,
            group=reduce_group,
            scatter=sharding.grads,
            replicate_group=replicate_group,
            compression=exchange,
        )
        tp_group = tp.ctx.group("tp") if tp is not None else None
        self.norm_groups = [
            g
            for g in (self.shards.norm_group, tp_group, groups.stages)
            if g is not None and comm.group_size(g) > 1
        ]
        """Groups whose ranks hold disjoint gradient slices: norms and overflow flags are
        summed over them."""
        self.groups = groups
        self.compresses_momentum = plan.optimizer.compressed_momentum and exchange is not None
        """1-bit Adam sends each rank's momentum instead of its gradient."""
        self.delayed = plan.offload.delayed_update > 0
        """Whether the optimizer (`OffloadedAdamW`) may step in the background."""

    def build_optimizer(
        self, given: OptimizerFactory | None, groups: list[dict], plan: RunPlan
    ) -> torch.optim.Optimizer:
        groups = self.shards.param_groups(groups)
        freeze = plan.optimizer.onebit_freeze
        if freeze is None:
            return (given or optimizer_factory(plan.config.optim, plan.offload))(groups)
        kind = ZeroOneAdam if plan.config.optim.name == "zero_one_adam" else OneBitAdam
        return kind(groups, plan.config.optim, freeze)

    # -- around forward and backward ---------------------------------------------------------

    def before_forward(self) -> None:
        pass

    def before_backward(self, sync: bool, optimizer: torch.optim.Optimizer) -> None:
        self.reducer.prepare(sync, self._exchange(optimizer))

    def _exchange(self, optimizer: torch.optim.Optimizer) -> Exchange:
        """How the next backward's gradients travel: 1-bit and 0/1 Adam's phases."""
        if isinstance(optimizer, ZeroOneAdam) and optimizer.local:
            return Exchange.LOCAL
        if (
            isinstance(optimizer, OneBitAdam)
            and optimizer.frozen
            and self.reducer.compression is not None
        ):
            # the momenta travel instead, in `update` ([Note: compressed momentum])
            return Exchange.LOCAL if self.compresses_momentum else Exchange.COMPRESSED
        return Exchange.EXACT

    def after_backward(self, sync: bool) -> None:
        self.reducer.finish(last=sync)

    # -- the step ----------------------------------------------------------------------------

    def unscale_and_check(self, scaler: DynamicLossScaler) -> bool:
        groups = self.norm_groups
        if self.reducer.exchange is Exchange.LOCAL and self.reducer.group_size > 1:
            groups = [*groups, self.reducer.group]  # local gradients: every rank skips alike
        found_inf = scaler.unscale_and_check_(self.shards.owned_grads(), groups, self.device)
        if found_inf and self.reducer.exchange is Exchange.COMPRESSED:
            self.reducer.compression.restore_errors()  # the residue of a discarded step
        return found_inf

    def sum_reduced_grad(self, param: nn.Parameter, group: object) -> None:
        """Sum over `group` `param`'s gradient as the update will read it: whole (zero.stage
        0-1), or this rank's slice (stage 2) of a parameter with a bucket of its own (the
        reducer's `alone`: a pipeline stage's embedding weight, so that the slices of its two
        stages line up)."""
        comm.all_reduce_(self.reducer.reduced_grad(param), group)

    def grad_norm(self, uncounted: nn.Parameter | None = None) -> torch.Tensor:
        """The global 2-norm: this rank's squares (each tensor-parallel shard counted once
        over its replicas; `uncounted`, a second copy of a tied weight, not at all) summed
        over the groups holding disjoint slices."""
        squares = self._grad_squares(self.shards.owned_grads(), uncounted)
        return global_norm(squares, self.norm_groups)

    def _grad_squares(
        self, grads: list[torch.Tensor], uncounted: nn.Parameter | None
    ) -> torch.Tensor:
        """Sum of squared gradient elements this rank owns, counting each element of the
        model once: a tensor-parallel shard held by k tp ranks contributes 1/k per holder,
        `uncounted` nothing."""
        if self.tp is None and uncounted is None:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            return torch.stack(norms).square().sum()
        pieces, weights = [], []
        for owned, grad in zip(self.shards.groups, grads, strict=True):
            for piece, owner in zip(owned.pieces, owned.owners, strict=True):
                pieces.append(grad[piece.offset : piece.offset + piece.numel])
                share = 1.0 / self.tp.replicas[id(owner.param)] if self.tp is not None else 1.0
                weights.append(0.0 if owner.param is uncounted else share)
        norms = torch.stack(torch._foreach_norm(pieces, 2, dtype=torch.float32))
        return (norms.square() * torch.tensor(weights, device=norms.device)).sum()

    def update(self, optimizer: torch.optim.Optimizer, clip_coef: torch.Tensor | None) -> None:
        """Clip, step this rank's pieces, write them back (all-gathered where sharded). With
        ``offload.delayed_update`` the step runs in the background and what is written back
        is the previous step's ([Note: delayed parameter update] in offload/adam.py)."""
        if clip_coef is not None:
            torch._foreach_mul_(self.shards.owned_grads(), clip_coef)
        self.shards.attach_grads()
        if self.compresses_momentum and self.reducer.exchange is Exchange.LOCAL:
            self._average_momenta(optimizer)
        self._finish_delayed(optimizer)  # the previous step's, before this one starts
        optimizer.step()
        if isinstance(optimizer, ZeroOneAdam):
            self._after_local_step(optimizer)
        if not (self.delayed and optimizer.running):
            self.shards.sync_params()
        self.shards.release_grads()

    @torch.no_grad()
    def _average_momenta(self, optimizer: OneBitAdam) -> None:
        """1-bit Adam at zero.stage 0: each rank's momentum on its own gradient, averaged
        compressed, becomes every rank's ([Note: compressed momentum] in optim/onebit.py)."""
        for averaged in self._averaged_pieces(optimizer.local_momentum):
            for piece, view in averaged.items():
                optimizer.take_momentum(piece, view)

    def _averaged_pieces(
        self, fill: Callable[[nn.Parameter, torch.Tensor], object]
    ) -> Iterator[dict[nn.Parameter, torch.Tensor]]:
        """A bucket at a time: `fill(piece, out)` writes this rank's value for each optimizer
        piece of the bucket into a flat tensor, the compressed exchange averages it over the
        ranks (where there is one), and each piece's (flat) average is yielded."""
        exchange = self.reducer.compression
        for index, owned in enumerate(self.shards.groups):
            flat = torch.zeros_like(owned.master)  # the padding stays zero
            averaged = {}
            for piece in owned.pieces:
                averaged[piece.param] = flat[piece.offset : piece.offset + piece.numel]
                fill(piece.param, averaged[piece.param])
            if exchange is not None:
                exchange.launch(index, flat, flat, scaled=False).wait()
            yield averaged

    def sync_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the parameters the one state every rank agrees on (every rank calls this,
        before a save, a load or `full_state_dict`): a delayed update still running waited
        for and written, 0/1 Adam's local steps since the last synchronisation averaged."""
        self._finish_delayed(optimizer)
        if isinstance(optimizer, ZeroOneAdam) and optimizer.unsynced:
            self._synchronise(optimizer)
            self.shards.sync_params()

    def _finish_delayed(self, optimizer: torch.optim.Optimizer) -> None:
        """Wait for a delayed update still running and write it into the parameters
        (all-gathered where sharded); nothing when updates are not delayed or none runs."""
        if self.delayed and optimizer.finish_step():
            self.shards.sync_params()

    def _after_local_step(self, optimizer: ZeroOneAdam) -> None:
        exchange = self.reducer.compression
        if exchange is not None and optimizer.steps_since_freeze == 1:
            exchange.zero_errors()  # they held gradients' residue; displacements' from now
        if optimizer.sync_due:
            self._synchronise(optimizer)

    @torch.no_grad()
    def _synchronise(self, optimizer: ZeroOneAdam) -> None:
        """Average the ranks' displacements since the last synchronisation, compressed, a
        bucket at a time, and let the optimizer take them ([Note: 0/1 Adam's
        synchronisation] in optim/zero_one.py). Zero stage 0: each slice is a whole bucket."""
        displacements = self._averaged_pieces(
            lambda piece, out: torch.sub(optimizer.synced[piece], piece, out=out)
        )
        for averaged in displacements:
            optimizer.synchronise(averaged)
        optimizer.synchronised()

    def end_step(self) -> None:
        self.reducer.release_grads()

    # -- state -------------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the whole model's state (tensor-parallel shards stay this rank's)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @property
    def writes_owned(self) -> bool:
        """Whether this rank saves its owned slices: the first of the ranks holding them."""
        holders = self.groups.replicate if self.shards.sharded else self.groups.dp
        return holders is None or comm.group_rank(holders) == 0

    def owned(self) -> Iterator[OwnedPiece]:
        names = {id(p): name for name, p in self.model.named_parameters()}
        for owned in self.shards.groups:
            for piece, owner in zip(owned.pieces, owned.owners, strict=True):
                info = PieceInfo.of(names[id(owner.param)], piece, owner, owned.start)
                yield OwnedPiece(info, owner.param, piece.param)

    def load_owned(self, fill: Callable[[OwnedPiece], None]) -> None:
        """`fill` writes each owned piece; the parameters are then written from them (and
        all-gathered where the optimizer is sharded), as after a step."""
        with torch.no_grad():
            for piece in self.owned():
                fill(piece)
        self.shards.sync_params()

    def rank_state(self) -> dict | None:
        """State only this rank has, in this layout: 1-bit Adam's error buffers."""
        compression = self.reducer.compression
        return compression.state_dict() if compression is not None else None

    def load_rank_state(self, state: dict | None) -> None:
        compression = self.reducer.compression
        if (compression is None) != (state is None):
            raise CheckpointError(
                "the checkpoint was saved with another optimizer (1-bit Adam's error buffers "
                "are missing or extra); resume with the optim.name it was saved with"
            )
        if compression is not None:
            compression.load_state_dict(state)

    def memory_report(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        buckets = self.reducer.buckets
        grads = [b.grads for b in buckets if b.grads is not None] + [b.reduced for b in buckets]
        slices = self.shards.groups
        masters = [s.master for s in slices] if self.precision.needs_master_weights else []
        compression = self.reducer.compression
        extra = compression.errors + compression.previous if compression else []
        if isinstance(optimizer, OneBitAdam):
            extra += optimizer.denominators.values()
        if isinstance(optimizer, ZeroOneAdam):
            extra += optimizer.synced.values()
        return model_state_report(
            self.model, optimizer, grads, masters, [s.shard for s in slices], (), extra
        )


# -- shared by the stores ---------------------------------------------------------------------


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor | None:
    """What `update` multiplies the gradients by: torch's clip_grad_norm_ factor
    clamp(max_norm / (norm + 1e-6), max=1); None where that changes nothing (`max_norm` 0: no
    clipping; a factor of exactly 1, as most steps have late in training, would change no bit
    at the cost of a pass over every gradient)."""
    if max_norm <= 0:
        return None
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return coef if coef.item() < 1.0 else None


def global_norm(squares: torch.Tensor, groups: list) -> torch.Tensor:
    """The global gradient 2-norm from this rank's sum of squared elements (`squares`), summed
    over the `groups` whose ranks hold disjoint gradients (dp shards, tp ranks, stages)."""
    for group in groups:
        comm.all_reduce_(squares, group)
    return squares.sqrt()


def model_state_report(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    grads: list[torch.Tensor],
    masters: list[torch.Tensor],
    shards: list[torch.Tensor],
    states_skip: tuple[str, ...],
    states_extra: list[torch.Tensor] = (),
) -> dict[str, int]:
    """Bytes per category of model state, read from the tensors' storages (each counted once,
    padding included); ``optimizer_states`` adds `states_extra` (1-bit Adam's error
    buffers and frozen denominators); ``offloaded_host`` / ``offloaded_disk``: Adam states
    that ``offload.optimizer`` moved off the device."""
    states = [
        t
        for state in optimizer.state.values()
        for key, t in state.items()
        if isinstance(t, torch.Tensor) and key not in states_skip
    ] + list(states_extra)
    offloaded = (
        optimizer.tier_bytes() if isinstance(optimizer, OffloadedAdamW) else {"host": 0, "disk": 0}
    )
    return {
        "params": storage_bytes([*model.parameters(), *shards]),
        "grads": storage_bytes(grads),
        "master_params": storage_bytes(masters),
        "optimizer_states": storage_bytes(states),
        "buffers": storage_bytes(model.buffers()),
        "offloaded_host": offloaded["host"],
        "offloaded_disk": offloaded["disk"],
    }


def memory_tiers(report: dict[str, int], optimizer_tier: str) -> dict[str, int]:
    """Model-state bytes per tier (device, host, disk) from either store's `memory_report`:
    parameter and gradient chunks where the manager placed them, Adam states that
    ``offload.optimizer`` moved (`optimizer_tier`: what stays in the optimizer's own state
    then, step counters and host master copies, is in host memory), the chunk store's
    master copies with the optimizer's states; everything else on the device."""
    kept_in = "device" if optimizer_tier == "device" else "host"
    tiers = {
        "device": report["buffers"],
        "host": report["offloaded_host"],
        "disk": report["offloaded_disk"],
    }
    tiers[kept_in] += report["optimizer_states"]
    if "chunks_device" in report:  # ChunkStore: parameters and gradients live in chunks
        for tier in tiers:
            tiers[tier] += report[f"chunks_{tier}"] + report[f"grad_chunks_{tier}"]
        tiers[kept_in] += report["master_params"]
        tiers["device"] += report["grads"]
    else:
        tiers["device"] += report["params"] + report["grads"] + report["master_params"]
    return tiers


def storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def broadcast_from_first_rank(model: nn.Module, groups: DataParallelGroups) -> None:
    """Start every replica from rank 0's weights, as DDP does, whatever the init (a meta
    model is filled later by `param_init`, the same on every rank)."""
    if groups.size == 1:
        return
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if not tensor.is_meta:
                comm.broadcast_(tensor, 0, groups.dp)


def materialise_frozen(model: nn.Module, param_init: ParamInit | None, device) -> None:
    """Frozen parameters are in no bucket or chunk: fill those still on the meta device."""
    for name, param in model.named_parameters():
        if param.is_meta:
            tensor = torch.empty(param.shape, dtype=param.dtype, device=device)
            param_init(name, tensor)
            torch.utils.swap_tensors(param, nn.Parameter(tensor, requires_grad=False))


def check_materialisable(model: nn.Module, param_init: ParamInit | None) -> None:
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


def _stage_embedding(model: nn.Module, plan: RunPlan, spec: ModelSpec) -> nn.Parameter | None:
    """A pipeline stage's embedding weight, where this rank holds it: the first and the last
    stage share it when the head is tied, and sum its reduced gradient; a bucket of its own
    makes their slices of it line up at zero.stage 2."""
    if plan.pipeline is None or spec.embedding is None:
        return None
    try:
        return model.get_submodule(spec.embedding).weight
    except AttributeError:  # a middle stage: the embedding was cut away
        return None
