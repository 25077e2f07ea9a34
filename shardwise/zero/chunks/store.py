"""Trainable parameters in chunks (``offload.policy`` static or auto; ZeRO-3's units).

`ChunkStore` puts the chunks together for the engine: it builds the chunks (size searched
for the least padding, or one per unit: zero/params.py), the `ChunkManager` within the
device and host budgets (and the disk tier), the policy's placement, the hooks on the model,
the auto policy's warm-up trace, the chunk-wise optimizer pass, and reads and writes the
parameters for checkpoints.

With a data-parallel group of N > 1 ranks the chunks are sharded over it (sharding.py;
replica groups of such ranks average their gradient shards): this rank's optimizer updates
1/N of each chunk (its `OwnedSlice`), in the chunk's *home*, which the placement places and
the optimizer pass opens. At ZeRO-3 the home is this rank's shard, a chunk of its own, and
the model's parameters view *gathered* chunks that exist on the device only while in use.
At stages 1 and 2 every rank keeps the full chunks, each its own home: the optimizer's
pieces view the chunk as the parameters do, and the chunk is all-gathered in place after its
slice was updated, as the flat store's buckets are. In one process the homes are the chunks,
updated whole.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from shardwise.distributed import comm
from shardwise.errors import CheckpointError, ConfigError
from shardwise.optim import OptimizerFactory, default_optimizer_factory
from shardwise.precision import DynamicLossScaler, found_on_any_rank
from shardwise.run_plan import RunPlan
from shardwise.tensor_parallel import TensorParallel
from shardwise.zero.chunks.budget import MIB, ChunkBytes, mib_up
from shardwise.zero.chunks.chunk import (
    Chunk,
    ChunkState,
    OwnedSlice,
    ParamInit,
    PieceInfo,
    Tier,
    TierIO,
    build_grad_chunks,
)
from shardwise.zero.chunks.grads import ChunkedAdamW, GradChunks, grad_norms
from shardwise.zero.chunks.manager import ChunkManager
from shardwise.zero.chunks.packing import (
    build_chunks,
    chunk_sites,
    params_in_execution_order,
    search_chunk_size,
)
from shardwise.zero.chunks.placement import (
    Placement,
    apply_placement,
    auto_placement,
    on_the_device,
    placement_summary,
    static_placement,
)
from shardwise.zero.chunks.sharding import ShardedGrads, shard_chunks, slice_grad_chunks
from shardwise.zero.chunks.tracer import MemoryTrace, MemoryTracer
from shardwise.zero.module_hooks import ModuleHooks
from shardwise.zero.offload.adam import OffloadedAdamW, offloaded_adamw_settings
from shardwise.zero.offload.disk import DiskTier
from shardwise.zero.params import Units
from shardwise.zero.store import (
    DataParallelGroups,
    OwnedPiece,
    global_norm,
    model_state_report,
)

log = logging.getLogger("shardwise")


class ChunkStore:
    """The engine's trainable parameters as chunks (``offload.policy``, ZeRO-3), sharded over
    `group` when it has more than one rank.

    Built from the model (on the meta device, filled by `param_init`, or materialised
    anywhere): parameters in execution order (`run_forward` runs once under no_grad to record
    it), the chunk size searched for the least padding, a `ChunkManager` within the budgets,
    the placement of the policy, and the module hooks (`ModuleHooks`, the manager as residency)."""

    def __init__(
        self,
        model: nn.Module,
        plan: RunPlan,
        groups: DataParallelGroups,
        device: torch.device,
        run_forward: Callable[[], object] | None,
        param_init: ParamInit | None = None,
        tp: TensorParallel | None = None,
        units: Units | None = None,
    ) -> None:
        """Chunks sharded over ``groups.shard``; ``groups.replicate``: ranks holding the same
        shards (hierarchical data parallelism), which average their gradient shards.
        `run_forward` runs this rank's part of the model once on a sample (the execution
        order; None with `units`). `tp`: the model is split by a tensor-parallel plan; its
        shards are chunked like any parameter, and norms and overflow flags are summed over
        the tp ranks too. `units`: ZeRO-3 without ``offload.policy``, the model's units
        (zero/params.py) instead of searched chunks: on the device with no budget, each freed
        after use as ``zero.reshard_after_forward`` says, gradients reduced as backward goes."""
        offload, group, replicate = plan.offload, groups.shard, groups.replicate
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        self.device = device
        self.precision = plan.precision
        self.model = model
        self.offload = offload
        self.delayed = offload.delayed_update > 0
        """``offload.delayed_update`` (the plan allows it for units only, whose homes never
        leave the device): the host's update runs in the background while the next step
        computes ([Note: delayed parameter update] in offload/adam.py)."""
        self.ranks = comm.group_size(group) if group is not None else 1
        replicas = comm.group_size(replicate) if replicate is not None else 1
        self.sharded = self.ranks * replicas > 1
        """Gradients are reduced over ranks: chunks in shards (one "shard" of the whole chunk
        when only replicas share them)."""
        self.group = group if self.sharded else None
        self.replicate = replicate
        whole = plan.sharding.optimizer and not plan.sharding.params
        self.gathered = self.sharded and not whole
        """ZeRO-3: full chunks gathered from the shards for each use and dropped after; else
        (stages 1 and 2, or one process) full chunks kept on every rank."""
        self.whole = self.sharded and whole
        self.grad_dtype = plan.precision.reduce_dtype
        """Gradient chunks are in the reduce dtype (fp32 under bf16 by default), as the flat
        store's buckets."""
        if units is not None:
            self.chunks, sites = units.chunks, units.sites
            self.placement = on_the_device(len(self.chunks))
        else:
            trainable = {id(p) for p in params}
            order = [
                (name, p)
                for name, p in params_in_execution_order(model, run_forward)
                if id(p) in trainable
            ]
            self.chunks, self.placement = self._chunks_and_placement(order)
            sites = chunk_sites(model, self.chunks)
        self.disk = (
            DiskTier(
                offload.disk_path,
                max_bytes=offload.disk_max_bytes,
                workers=offload.disk_workers,
                direct=offload.direct_io,
            )
            if offload.disk_path is not None
            else None
        )
        host_budget = _bytes(offload.host_budget_mb)
        if self.disk is None:
            self._bytes_of(self.chunks).check_capacity(self.placement.device_budget, host_budget)
        if self.sharded:
            io = TierIO.for_device(torch.device(device))
            self.chunks, self.slices = shard_chunks(
                self.chunks,
                self.group,
                io,
                param_init,
                gathered=self.gathered,
                frees_after=units.frees_after if units else frozenset(),
            )
            self.homes = [owned.home for owned in self.slices]
            full_grads = build_grad_chunks(self.chunks, zeroed=True, dtype=self.grad_dtype)
            shards = self.homes if self.gathered else []  # homes that are chunks of their own
            first = len(self.chunks) + len(full_grads) + len(shards)
            home_grads = slice_grad_chunks(self.slices, first, self.grad_dtype)
            managed = [*self.chunks, *full_grads, *shards, *home_grads]
        else:
            self.homes = self.chunks
            self.slices = [OwnedSlice.whole(chunk) for chunk in self.chunks]
            full_grads = home_grads = build_grad_chunks(self.chunks, dtype=self.grad_dtype)
            managed = [*self.chunks, *home_grads]
        """`slices[i]`: what this rank's optimizer updates of chunk i, in `homes[i]` (the
        chunk, or at ZeRO-3 this rank's shard of it)."""
        self.manager = ChunkManager(
            managed, device, self.placement.device_budget, host_budget, self.disk, param_init
        )
        for i, chunk in enumerate(self.chunks):
            for follower in {full_grads[i], home_grads[i], self.homes[i]} - {chunk}:
                self.manager.follow(follower, chunk)
        apply_placement(self.manager, self.placement, self.homes)
        if self.sharded:
            self.grads = ShardedGrads(
                self.homes,
                home_grads,
                full_grads,
                self.manager,
                group,
                replicate,
                reduce_every_backward=plan.sharding.grads or self.gathered,
                overlap=self.placement.device_budget is None,
            )
        else:
            self.grads = GradChunks(self.chunks, home_grads, self.manager)
        self.hooks = ModuleHooks(
            sites,
            self.chunks,
            self.manager,
            self.grads.accumulate,
            prefetch=plan.sharding.prefetch,
        )
        self._clip_coef: torch.Tensor | None = None
        """What the optimizer pass multiplies gradients by (clipping), while it runs."""
        self._attached: dict[int, torch.Tensor] = {}
        """For `ChunkedAdamW` (`_attached_grad`): id of a parameter of the home it updates ->
        its gradient (a torch optimizer reads ``.grad`` instead)."""
        self._visited = 0
        """Homes the running optimizer pass has opened (a position: every one before it)."""
        self.group_chunks: list[Chunk] = []
        """Param group index -> the home it updates (see `param_groups`)."""
        self._origin = {
            id(piece.param): id(owner.param)
            for owned in self.slices
            for piece, owner in zip(owned.pieces, owned.owners, strict=True)
        }
        """Id of a piece the optimizer updates -> id of the parameter it is of."""
        tp_group = tp and tp.ctx.group("tp")
        self.norm_groups = [g for g in (self.group, tp_group, groups.stages) if g is not None]
        """Groups whose ranks hold disjoint gradients: norms and overflow flags sum over them."""
        self._norm_weights = (
            {
                key: 1.0 / tp.replicas[self._origin[key]]
                for key in (id(s.param) for owned in self.slices for s in owned.pieces)
            }
            if tp is not None
            else {}
        )
        """Id of a parameter (or piece) -> its weight in the squared norm (1 / tp replicas)."""
        self._position = {home.index: i for i, home in enumerate(self.homes)}
        """Manager index of a home -> its position (the index of its chunk)."""
        self._tracer: MemoryTracer | None = None
        self.warming_up = offload.policy == "auto"
        """Until the first step's last backward: the auto policy's warm-up, traced."""
        if not self.warming_up and units is None:  # units: no placement to tell
            self._log_placement()
        self._place_the_rest()
        self.masters: dict[int, torch.Tensor] = {}
        """Manager index of a home -> its fp32 master copy on the device, when a device
        optimizer steps bf16/fp16 parameters ([Note: master copies on the device])."""
        self._master_pieces: dict[int, nn.Parameter] = {}
        """Id of a piece of an owned slice -> its piece of the master copy (what is stepped)."""
        if plan.precision.needs_master_weights and offload.optimizer == "device":
            self._build_masters(plan.precision.master_dtype)

    # [Note: master copies on the device] With bf16 or fp16 parameters and Adam's states on
    # the device (``offload.optimizer='device'``), each home has an fp32 master copy on the
    # device, as the flat store's optimizer slices have: the optimizer steps pieces of it (the
    # owned slice's pieces, in fp32) whose gradients are views of the gradient chunk (fp32, the
    # reduce dtype; upcast copies with ``precision.reduce_dtype='param'``), and after each
    # home's update the master is rounded into the home. The host and disk optimizers keep
    # their own master copies (`ChunkedAdamW`).

    def _build_masters(self, dtype: torch.dtype) -> None:
        for owned in self.slices:
            self.manager.access(owned.home, read_only=True)
            master = owned.view().detach().to(dtype=dtype, copy=True)
            self.masters[owned.home.index] = master
            for slot in owned.pieces:
                view = master[slot.offset : slot.offset + slot.numel].view(slot.param.shape)
                self._master_pieces[id(slot.param)] = nn.Parameter(view)
            self.manager.release(owned.home, "forward")
        self.manager.end_step()

    def _stepped(self, param: nn.Parameter) -> nn.Parameter:
        """What the optimizer steps for a piece of an owned slice: its master piece, if any."""
        return self._master_pieces.get(id(param), param)

    def _place_the_rest(self) -> None:
        """Buffers and parameters outside the chunks (frozen ones) onto the device."""
        chunked = {id(p) for p in self.names().values()}
        with torch.no_grad():
            for module in self.model.modules():
                for key, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[key] = buffer.to(self.device)
            for param in self.model.parameters():
                if id(param) not in chunked and not param.is_meta:
                    param.data = param.data.to(self.device)

    def _log_placement(self) -> None:
        log.info(placement_summary(self.homes, self.placement))
        if self.gathered:
            log.info(
                f"  chunks sharded over {self.ranks} rank(s): this rank keeps 1/{self.ranks} "
                f"of each (homes above), gathered on the device while in use"
            )
        elif self.whole:
            log.info(
                f"  every rank keeps the full chunks (above) and updates 1/{self.ranks} of "
                "each in place, all-gathered after the update"
            )

    # -- placement ---------------------------------------------------------------------------

    def _bytes_of(self, chunks: list[Chunk]) -> ChunkBytes:
        """What a step over `chunks` needs of the device, as this store shards them."""
        return ChunkBytes(
            self.model, chunks, self.ranks, self.sharded, self.gathered, self.grad_dtype
        )

    def _chunks_and_placement(
        self, order: list[tuple[str, nn.Parameter]]
    ) -> tuple[list[Chunk], Placement]:
        """Chunks of the size that wastes the least padding, or, if those leave the device
        budget below the minimum a step needs (`ChunkBytes.minimum`), the smallest chunks the
        parameters allow; then the policy's initial placement."""
        offload, budget = self.offload, _bytes(self.offload.device_budget_mb)
        sizes = [p.numel() * p.element_size() for _, p in order]
        for search_range in dict.fromkeys([int(offload.chunk_search_range_mb * MIB), 0]):
            chunk_bytes = search_chunk_size(
                sizes,
                search_range=search_range,
                step=max(1, int(offload.chunk_search_step_mb * MIB)),
                min_chunk_bytes=int(offload.chunk_min_mb * MIB),
            )
            if self.sharded:  # shards of whole elements of any dtype
                chunk_bytes = math.ceil(chunk_bytes / (8 * self.ranks)) * 8 * self.ranks
            chunks = build_chunks(order, chunk_bytes)
            pinned = self._pinned(chunks)
            minimum, why = self._bytes_of(chunks).minimum(pinned)
            if budget is None or budget >= minimum:
                return chunks, self._placement(chunks, pinned, budget or minimum)
        raise ConfigError(
            f"offload.device_budget_mb={offload.device_budget_mb:g} is below the minimum "
            f"{mib_up(minimum)} MiB ({minimum} bytes) even with the smallest chunks "
            f"({chunk_bytes} bytes): {why}; raise offload.device_budget_mb"
            + (" or lower offload.chunk_min_mb" if offload.chunk_min_mb else "")
        )

    def _pinned(self, chunks: list[Chunk]) -> frozenset[int]:
        if self.offload.policy != "static":
            return frozenset()
        return static_placement(chunks, self.offload.param_device_fraction, 0.0).pinned

    def _placement(self, chunks: list[Chunk], pinned: frozenset[int], budget: int) -> Placement:
        """static: the policy's placement (pinning `pinned`). auto, for the warm-up: the first
        homes on the device while they fit in the budget, no schedule. Positions index the
        chunks and their homes alike."""
        if self.offload.policy == "static":
            optim = 1.0 if self.offload.optimizer == "device" else 0.0
            placement = static_placement(chunks, self.offload.param_device_fraction, optim)
            return dataclasses.replace(placement, device_budget=budget)
        placed = self._bytes_of(chunks).home
        on_device, room = 0, budget
        while on_device < len(chunks) and placed(on_device) <= room:
            room -= placed(on_device)
            on_device += 1
        tiers = tuple(Tier.DEVICE if c.index < on_device else Tier.HOST for c in chunks)
        return Placement("auto", tiers, frozenset(), None, budget)

    # -- the store protocol (zero/store.py) --------------------------------------------------

    def before_forward(self) -> None:
        """Before a step's forwards: the auto policy traces its whole warm-up step (every
        micro-batch, or every pipeline action)."""
        if self.warming_up and self._tracer is None:
            self._tracer = MemoryTracer(self.model, self.chunks, self.manager.device)
            self._tracer.__enter__()

    def before_backward(self, sync: bool, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_backward(self, sync: bool) -> None:
        """Release what the backward left in use; after the step's last backward, end the
        auto policy's warm-up."""
        self.hooks.finish_backward()
        if self.sharded:
            self.grads.finish_backward(last=sync)
        if sync:
            self._finish_warm_up()

    def unscale_and_check(self, scaler: DynamicLossScaler) -> bool:
        """fp16: unscale this rank's gradient chunks; the overflow flag is every rank's."""
        found = self.grads.unscale_and_check_(scaler)
        flag = torch.tensor([float(found)], device=self.device)
        return found_on_any_rank(flag, self.norm_groups)

    def grad_norm(self, uncounted: nn.Parameter | None = None) -> torch.Tensor:
        """The global norm: in one process exactly as a plain torch run computes it (per
        parameter norms taken in the gradient hook); over ranks the root of every rank's
        squares (tensor-parallel shards counted once over their replicas; `uncounted`, a
        second copy of a tied weight, not at all)."""
        if not self.norm_groups:
            return self.grads.total_norm([p for p in self.params if p is not uncounted])
        weights = self._norm_weights
        if uncounted is not None:  # the parameter, or this rank's piece of it
            pieces = [key for key, origin in self._origin.items() if origin == id(uncounted)]
            weights = {**weights, **dict.fromkeys([id(uncounted), *pieces], 0.0)}
        return global_norm(self.grads.squares(weights), self.norm_groups)

    @torch.no_grad()
    def sum_reduced_grad(self, param: nn.Parameter, group: object) -> None:
        """Sum `param`'s reduced gradient over `group` (the two pipeline stages holding a
        tied weight). Sharded, each rank holds a piece of it wherever its chunk put it, and
        the two stages' chunks differ: the pieces are put together over the shard group
        first (a transient gradient of the weight's size on the device), summed over
        `group`, and each rank keeps its piece, whose norm is taken again. Every rank
        accesses its gradient shard, piece or not: ZeRO-3's ranks must make the same moves
        to gather the same chunks later."""
        position = next(
            i for i, chunk in enumerate(self.chunks) if any(s.param is param for s in chunk.slots)
        )
        owned = self.slices[position]
        grads = self.grads.of(owned.home)
        pairs = zip(owned.pieces, owned.owners, strict=True)
        mine = [(piece, owner) for piece, owner in pairs if owner.param is param]
        self.manager.access(grads)
        if not self.sharded:
            view = grads.grad_view(mine[0][0])
            comm.all_reduce_(view, group)
        else:
            whole = torch.zeros(param.numel(), dtype=grads.dtype, device=self.device)
            parts = [
                (
                    grads.grad_view(piece),
                    whole[owned.first + piece.offset - owner.offset :][: piece.numel],
                )
                for piece, owner in mine
            ]
            for view, part in parts:
                part.copy_(view.reshape(-1))
            comm.all_reduce_(whole, self.group)
            comm.all_reduce_(whole, group)
            for view, part in parts:
                view.copy_(part.view_as(view))
        for piece, _ in mine:
            (self.grads.norms[id(piece.param)],) = grad_norms([grads.grad_view(piece)])
        self.manager.release(grads, "backward")

    def _finish_warm_up(self) -> None:
        """At the first step boundary (auto): place from the trace, before the optimizer pass,
        so that a budget too small fails before any weight changed."""
        if not self.warming_up:
            return
        self.warming_up = False
        tracer, self._tracer = self._tracer, None
        if tracer is None:
            return
        tracer.__exit__(None, None, None)
        trace = self._same_on_every_rank(tracer.trace())
        budget = self.manager.device_budget
        self._bytes_of(self.chunks).check_trace(trace, budget, self.offload.device_budget_mb)
        self.placement = auto_placement(self.chunks, trace, self.manager.device_budget)
        apply_placement(self.manager, self.placement, self.homes)
        self._log_placement()

    def _same_on_every_rank(self, trace: MemoryTrace) -> MemoryTrace:
        """ZeRO-3: each moment's non-model bytes as the largest over the ranks, so that every
        rank evicts, and so gathers, the same chunks at the same moments."""
        if not self.gathered or not trace.moments:
            return trace
        sizes = torch.tensor(
            [m.non_model_bytes for m in trace.moments],
            dtype=torch.float64,
            device=self.manager.device,
        )
        comm.all_reduce_(sizes, self.group, op=torch.distributed.ReduceOp.MAX)
        moments = [
            dataclasses.replace(m, non_model_bytes=int(size))
            for m, size in zip(trace.moments, sizes.tolist(), strict=True)
        ]
        return dataclasses.replace(trace, moments=tuple(moments))

    def param_groups(self, groups: list[dict]) -> list[dict]:
        """`groups` (e.g. weight decay) split by home, in chunk order: the optimizer walks the
        homes in that order, updating the pieces of this rank's slices. Sets `group_chunks`."""
        members = [{id(p) for p in group["params"]} for group in groups]
        split: list[dict] = []
        self.group_chunks = []
        for owned in self.slices:
            for group, ids in zip(groups, members, strict=True):
                params = [
                    self._stepped(s.param) for s in owned.pieces if self._origin[id(s.param)] in ids
                ]
                if params:
                    split.append({**group, "params": params})
                    self.group_chunks.append(owned.home)
        return split

    def build_optimizer(
        self, given: OptimizerFactory | None, groups: list[dict], plan: RunPlan
    ) -> torch.optim.Optimizer:
        """The optimizer over the chunk groups: `given`'s or torch's AdamW (states on the
        device), or, for ``offload.optimizer`` host / disk, a `ChunkedAdamW` sharing the disk
        tier; an `OffloadedAdamW` that may update in the background with
        ``offload.delayed_update``."""
        chunk_groups = self.param_groups(groups)
        if self.offload.optimizer == "device":
            return (given or default_optimizer_factory(plan.config.optim))(chunk_groups)
        settings = offloaded_adamw_settings(plan.config.optim, self.offload, self.disk)
        if self.delayed:  # the homes stay on the device: its update opens none
            return OffloadedAdamW(
                chunk_groups,
                **settings,
                delayed_from=self.offload.delayed_update,
                grad_of=self._attached_grad,
            )
        return ChunkedAdamW(
            chunk_groups,
            group_chunks=self.group_chunks,
            open_chunk=self._open_for_update,
            close_chunk=self._close_after_update,
            grad_of=self._attached_grad,
            **settings,
        )

    def update(self, optimizer: torch.optim.Optimizer, clip_coef: torch.Tensor | None) -> None:
        """Update every chunk's parameters, one chunk and its gradient chunk on the device at
        a time, gradients multiplied by `clip_coef` as they are opened (what
        `torch.nn.utils.clip_grads_with_norm_` multiplies by): `ChunkedAdamW` walks the chunks
        itself; any other optimizer (which skips parameters without a gradient, as torch's do)
        steps once per chunk with only that chunk's gradients attached. With
        ``offload.delayed_update`` every home is opened and the optimizer steps once, after
        the previous step's update was written (`_finish_delayed`)."""
        self._clip_coef, self._visited = clip_coef, 0
        try:
            if isinstance(optimizer, ChunkedAdamW):
                optimizer.step()
            elif self.delayed:
                self._finish_delayed(optimizer)
                for home in self.homes:
                    self._open_for_update(home)
                optimizer.step()  # copies the gradients it reads to the host, if it delays
                for home in self.homes:
                    self._close_after_update(home)
            else:
                for home in self.homes:
                    self._open_for_update(home)
                    optimizer.step()
                    self._close_after_update(home)
            self._visit_skipped(len(self.homes))
        finally:
            self._clip_coef = None

    def sync_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the homes what every rank agrees on (before a save, a load or
        `full_state_dict`): a delayed update still running waited for and written."""
        self._finish_delayed(optimizer)

    def _finish_delayed(self, optimizer: torch.optim.Optimizer) -> None:
        """Write a delayed update still running into the homes (the homes' chunks gathered
        before are dropped as their homes open for the update, or were at the step's end)."""
        if self.delayed:
            optimizer.finish_step()

    def _open_for_update(self, chunk: Chunk) -> None:
        """Bring home `chunk` for its update, after visiting the homes before it that the
        optimizer pass skipped (`_visit_skipped`)."""
        position = self._position[chunk.index]
        self._visit_skipped(position)
        self._visited = position + 1
        self._bring_home(chunk)

    def _visit_skipped(self, position: int) -> None:
        """Open and close the homes before `position` that the optimizer pass has not:
        `ChunkedAdamW` holds no state for a shard of padding only, and every rank must make
        the same moves ([Note: the same moves on every rank], sharding.py)."""
        for home in self.homes[self._visited : position]:
            self._bring_home(home)
            self._close_after_update(home)

    def _bring_home(self, chunk: Chunk) -> None:
        """`chunk` on the device with its gradients, clipped, and the next home and its
        gradients on their way while this one updates; a chunk gathered from `chunk` is stale
        from now on and dropped."""
        position = self._position[chunk.index]
        self.manager.access(chunk)
        if self.gathered:
            self._drop_gathered(self.chunks[position])
        grads = []
        for param, grad in self.grads.attach(chunk):
            stepped = self._stepped(param)  # a master piece, if any
            if self.offload.optimizer == "device":  # a torch optimizer: `.grad`
                stepped.grad = grad if grad.dtype == stepped.dtype else grad.to(stepped.dtype)
                grad = stepped.grad
            else:
                self._attached[id(param)] = grad
            grads.append(grad)
        if position + 1 < len(self.homes):
            following = self.homes[position + 1]
            self.manager.prefetch(following)
            self.manager.prefetch(self.grads.of(following))
        if grads and self._clip_coef is not None:
            torch._foreach_mul_(grads, self._clip_coef)

    def _attached_grad(self, param: nn.Parameter) -> torch.Tensor | None:
        return self._attached.get(id(param))

    def _close_after_update(self, chunk: Chunk) -> None:
        """After `chunk`'s update: its master rounded into it, its gradients freed, and a full
        chunk kept whole all-gathered in place from every rank's updated slice."""
        owned = self.slices[self._position[chunk.index]]
        self._write_slice(owned)
        for slot in owned.pieces:
            self._stepped(slot.param).grad = None
            self._attached.pop(id(slot.param), None)
        self.grads.detach(chunk)
        self.manager.release(chunk, "backward")

    @torch.no_grad()
    def _write_slice(self, owned: OwnedSlice) -> None:
        """The stepped values of `owned` (on the device) into its chunk: its master rounded
        into the slice, if it has one; a full chunk kept whole then all-gathered from every
        rank's slice, in chunk order on every rank (the optimizer pass and checkpoint loads
        visit every home: [Note: the same moves on every rank], sharding.py)."""
        master = self.masters.get(owned.home.index)
        if master is not None:  # into .data: see [Note: refilling keeps the version]
            owned.view().data.copy_(master)
        if self.whole:
            comm.all_gather_(owned.home.payload.data, owned.view(), self.group)

    def end_step(self) -> None:
        """After the optimizer step: gradient chunks and gathered chunks freed, every chunk
        back to HOLD."""
        self.grads.end_step()
        if self.gathered:
            for chunk in self.chunks:
                self._drop_gathered(chunk)
        self.manager.end_step()

    def _drop_gathered(self, chunk: Chunk) -> None:
        if chunk.state is not ChunkState.FREE:
            self.manager.discard(chunk)

    # -- state -------------------------------------------------------------------------------

    def names(self) -> dict[str, nn.Parameter]:
        """Every name of a chunked parameter (a tied one has several) -> the parameter."""
        chunked = {id(slot.param) for chunk in self.chunks for slot in chunk.slots}
        return {
            name: p
            for name, p in self.model.named_parameters(remove_duplicate=False)
            if id(p) in chunked
        }

    def read_params(self) -> dict[str, torch.Tensor]:
        """A copy of every chunked parameter by name, read chunk by chunk through the manager
        (between steps: the manager's step is reset afterwards)."""
        copies: dict[int, torch.Tensor] = {}
        for chunk in self.chunks:
            self.manager.access(chunk, read_only=True)
            for slot in chunk.slots:
                copies[id(slot.param)] = slot.param.detach().clone()
            self.manager.release(chunk, "forward")
        self.manager.end_step()
        return {name: copies[id(p)] for name, p in self.names().items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the whole model's state, chunked parameters read chunk by chunk."""
        params = self.read_params()
        return {
            k: params[k] if k in params else v.detach().clone()
            for k, v in self.model.state_dict().items()
        }

    @property
    def writes_owned(self) -> bool:
        """Whether this rank saves its homes: the first of the ranks holding the same ones."""
        if not self.sharded:
            return True
        return self.replicate is None or comm.group_rank(self.replicate) == 0

    def owned(self) -> Iterator[OwnedPiece]:
        """The homes' pieces, one home brought in through the manager at a time."""
        yield from self._walk_homes(read_only=True)

    def load_owned(self, fill: Callable[[OwnedPiece], None]) -> None:
        """`fill` writes each owned piece; the full chunks follow from the slices: dropped
        where gathered (stale), all-gathered where kept whole (`_write_slice`)."""
        with torch.no_grad():
            for piece in self._walk_homes(read_only=False):
                fill(piece)
            if self.gathered:
                for chunk in self.chunks:
                    self._drop_gathered(chunk)
        self.manager.end_step()

    def _walk_homes(self, read_only: bool) -> Iterator[OwnedPiece]:
        """The pieces of each owned slice as the optimizer steps them (master pieces, if any),
        its home brought in; unless `read_only`, the slice is written into its chunk after its
        pieces were (`_write_slice`)."""
        first_name = {id(p): name for name, p in self.model.named_parameters()}
        for owned in self.slices:
            self.manager.access(owned.home, read_only=read_only)
            for piece, owner in zip(owned.pieces, owned.owners, strict=True):
                info = PieceInfo.of(first_name[id(owner.param)], piece, owner, owned.first)
                yield OwnedPiece(info, owner.param, self._stepped(piece.param))
            if not read_only:
                self._write_slice(owned)
            self.manager.release(owned.home, "forward")
        self.manager.end_step()

    def rank_state(self) -> dict | None:
        return None  # nothing here depends on the layout alone

    def load_rank_state(self, state: dict | None) -> None:
        if state is not None:
            raise CheckpointError("the checkpoint holds per-rank state a chunked run has not")

    def memory_report(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """`model_state_report` with ``params`` the chunks now on the device (parameters and
        homes), ``grads`` the ``param.grad`` tensors (none between steps), ``master_params``
        the fp32 master copies of bf16 / fp16 parameters (the host optimizer's, or on the
        device those of [Note: master copies on the device]; an fp32 run's host copies, kept
        for ``offload.delayed_update``, count with the optimizer's states, as the flat store
        and the plan count them), and the manager's own counts: ``chunks_device`` / ``_host``
        / ``_disk`` (parameter chunks), ``grad_chunks_device`` / ``_host`` / ``_disk``
        (gradient chunks; none between steps) and ``chunks_device_peak`` (both, the peak
        since the start)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        masters, skip = list(self.masters.values()), ()
        if self.precision.needs_master_weights:
            masters += [s["master"] for s in optimizer.state.values() if "master" in s]
            skip = ("master",)
        homes = [h.payload for h in self.homes if self.gathered and h.tier is Tier.DEVICE]
        report = model_state_report(self.model, optimizer, grads, masters, homes, skip)
        per_tier = self.grads.bytes_per_tier()
        managed = self.manager.memory_report()
        report.update({f"chunks_{t.value}": managed[t.value] - per_tier[t] for t in Tier})
        report.update({f"grad_chunks_{t.value}": per_tier[t] for t in Tier})
        report["chunks_device_peak"] = self.manager.device_peak_bytes
        return report


def _bytes(mib: float | None) -> int | None:
    return None if mib is None else int(mib * MIB)
