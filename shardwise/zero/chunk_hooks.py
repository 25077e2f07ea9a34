"""Parameters in chunks, driven by the engine: module hooks around compute, the optimizer pass.

PatrickStar / Colossal-AI Gemini: a module's parameter chunks are brought to the device just
before it computes and may leave once it is done; the optimizer then visits the chunks one at
a time. `ChunkHooks` turns module hooks into the manager's `access` / `release` calls;
`ChunkedParams` is what the engine holds when ``offload.policy`` is not "none": it builds the
chunks, the manager and its placement, runs the warm-up trace of ``policy="auto"`` and the
chunk-wise optimizer pass, and reads and writes the parameters for checkpoints.

[Note: the hook protocol] For every module that owns chunked parameters (non-recursively):

    forward pre-hook       access its chunks; prefetch the chunk after its last one
    forward hook           release them ("forward"); hook every output that requires grad
    output-gradient hook   (the gradient arrives just before the module's backward)
                           access its chunks again; prefetch the chunk before its first
    post-accumulate-grad   move the gradient into its gradient chunk ([Note: gradient
      hook of a parameter  chunks]); once every chunked parameter of the module has its
                           gradient for this backward, release the chunks ("backward") as
                           many times as the backward accessed them (a module called twice)
    finish_backward()      release what is still in use: modules some of whose parameters
                           got no gradient

A tied parameter belongs to every module that owns it, and its gradient is accumulated once,
after its last use in backward, so its chunk stays in use from the first of those modules'
backward to the last. Parameter hooks go on at the first backward: materialising a meta
parameter swaps it (`torch.utils.swap_tensors`), which drops hooks registered before.

[Note: gradient chunks] Gradients live in a second chunk group (`GradChunk`, the same slots
and offsets as the parameter chunks) in the same `ChunkManager`, under the same device and
host budgets. A parameter's post-accumulate-grad hook accesses its gradient chunk, copies the
gradient in (adds it, from the second micro-batch of an accumulation on: the same IEEE sums as
torch's ``param.grad +=``), records the parameter's gradient norm, releases the chunk and sets
``param.grad`` to None, so the full-size gradient lives only from autograd's accumulation to
the hook. A released gradient chunk is ranked for eviction by its parameter chunk's next use
(`ChunkManager.follow`): kept while later modules of the same chunk still add gradients, the
first to go (to host, or disk) once its chunk is done for the step. The optimizer pass
accesses each parameter chunk with its gradient chunk, attaches the gradients as views of it,
clips and updates, then discards the gradient chunk (FREE: no bytes anywhere until the next
backward).

The global norm is `torch.nn.utils.get_total_norm`'s, bit for bit: its per-tensor norms
(``_foreach_norm`` where torch has it, else ``vector_norm``) taken in the hook on the final
value of each gradient (every write overwrites the last), stacked in parameter order, and the
norm of that. With fp16 the loss-scale unscaling needs a pass over the gradient chunks, which
recomputes the norms of the unscaled gradients.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._foreach_utils import _has_foreach_support

from shardwise.config import OffloadConfig, OptimConfig
from shardwise.errors import CheckpointError, ConfigError
from shardwise.optim import OptimizerFactory
from shardwise.precision import DynamicLossScaler
from shardwise.zero.chunks import (
    Chunk,
    ChunkState,
    GradChunk,
    Tier,
    build_chunks,
    build_grad_chunks,
    chunks_of_modules,
    params_in_execution_order,
    search_chunk_size,
)
from shardwise.zero.manager import ChunkManager
from shardwise.zero.offload.adam import OffloadedAdamW
from shardwise.zero.offload.disk import DiskTier
from shardwise.zero.optimizer import ParamInit
from shardwise.zero.params import output_tensors
from shardwise.zero.placement import (
    Placement,
    apply_placement,
    auto_placement,
    placement_summary,
    static_placement,
)
from shardwise.zero.tracer import MemoryTrace, MemoryTracer

log = logging.getLogger("shardwise")

MIB = 2**20


def _grad_norm(grad: torch.Tensor) -> torch.Tensor:
    """One tensor's 2-norm exactly as `torch.nn.utils.get_total_norm` computes it."""
    if _has_foreach_support([grad], grad.device):
        return torch._foreach_norm([grad], 2.0)[0]
    return torch.linalg.vector_norm(grad, 2.0)


class GradChunks:
    """The gradient chunk group, one `GradChunk` per parameter chunk (same index order), in
    the parameter chunks' manager; see [Note: gradient chunks]."""

    def __init__(self, chunks: Sequence[GradChunk], manager: ChunkManager) -> None:
        self.chunks = list(chunks)
        self.manager = manager
        self._where = {id(s.param): (chunk, s) for chunk in self.chunks for s in chunk.slots}
        self.written: set[int] = set()
        """Ids of the parameters with a gradient in their chunk this step."""
        self.norms: dict[int, torch.Tensor] = {}
        """Parameter id -> the 2-norm of its gradient as last written."""

    @torch.no_grad()
    def accumulate(self, param: nn.Parameter) -> None:
        """Move ``param.grad`` into its gradient chunk (copy, or add to this step's earlier
        micro-batches) and drop it."""
        chunk, slot = self._where[id(param)]
        grad, param.grad = param.grad, None
        self.manager.access(chunk)
        view = chunk.grad_view(slot)
        if id(param) in self.written:
            view.add_(grad)
        else:
            view.copy_(grad)
            self.written.add(id(param))
        self.norms[id(param)] = _grad_norm(view)
        self.manager.release(chunk, "backward")

    def total_norm(self, params: Sequence[nn.Parameter]) -> torch.Tensor:
        """The global 2-norm of the gradients of `params` (in this order, as the plain run's
        clip_grad_norm_ sees them); parameters without a gradient are skipped."""
        norms = [self.norms[id(p)] for p in params if id(p) in self.norms]
        if not norms:
            return torch.tensor(0.0)
        return torch.linalg.vector_norm(torch.stack(norms), 2.0)

    @torch.no_grad()
    def unscale_and_check_(self, scaler: DynamicLossScaler) -> bool:
        """fp16: divide every gradient by the loss scale, chunk by chunk; whether any is
        inf/NaN. The norms are taken again, of the unscaled gradients."""
        found_inf = False
        for chunk in self.chunks:
            slots = self._written_slots(chunk)
            if not slots:
                continue
            self.manager.access(chunk)
            views = [chunk.grad_view(s) for s in slots]
            found_inf |= scaler.unscale_and_check_(views)
            for s, view in zip(slots, views, strict=True):
                self.norms[id(s.param)] = _grad_norm(view)
            self.manager.release(chunk, "backward")
        return found_inf

    def attach(self, chunk: Chunk) -> list[nn.Parameter]:
        """Bring `chunk`'s gradient chunk to the device and set ``param.grad`` of its written
        parameters to views of it; returns those parameters."""
        grads = self.chunks[chunk.index]
        slots = self._written_slots(grads)
        if slots:
            self.manager.access(grads)
            for s in slots:
                s.param.grad = grads.grad_view(s)
        return [s.param for s in slots]

    def detach(self, chunk: Chunk) -> None:
        """After `chunk`'s update: gradients off the parameters, the gradient chunk freed."""
        grads = self.chunks[chunk.index]
        if grads.state is not ChunkState.COMPUTE:
            return
        for s in grads.slots:
            s.param.grad = None
        self.manager.release(grads, "backward")
        self.manager.discard(grads)

    def end_step(self) -> None:
        """Free what no update consumed (a skipped step) and forget this step's gradients."""
        for chunk in self.chunks:
            if chunk.state is not ChunkState.FREE:
                self.manager.discard(chunk)
        self.written.clear()
        self.norms.clear()

    def bytes_per_tier(self) -> dict[Tier, int]:
        return {tier: sum(c.nbytes for c in self.chunks if c.tier is tier) for tier in Tier}

    def _written_slots(self, chunk: GradChunk) -> list:
        return [s for s in chunk.slots if id(s.param) in self.written]


class ChunkHooks:
    """Drives a `ChunkManager` from module hooks; see [Note: the hook protocol]. With `grads`,
    gradients go into their gradient chunks ([Note: gradient chunks]); without, they stay in
    ``param.grad``."""

    def __init__(
        self,
        model: nn.Module,
        manager: ChunkManager,
        grads: GradChunks | None = None,
        prefetch: bool = True,
    ) -> None:
        self.manager = manager
        self.grads = grads
        self.prefetch = prefetch
        self.chunks = [c for c in manager.chunks if not isinstance(c, GradChunk)]
        """The parameter chunks (first in the manager's list, so index = position)."""
        self.used = chunks_of_modules(model, self.chunks)
        """Module name -> indices of the chunks holding its own parameters."""
        self.modules = dict(model.named_modules())
        chunked = {id(slot.param) for chunk in self.chunks for slot in chunk.slots}
        self.owned: dict[str, frozenset[int]] = {}
        """Module name -> ids of its own chunked parameters."""
        self.owners: dict[int, list[str]] = {}
        """Parameter id -> the modules owning it (several for a tied weight)."""
        self.prefetched = 0
        """Prefetches started (moves that `access` then found under way or done)."""
        self._handles: list[Any] = []
        self._grad_hooked: set[int] = set()
        self._accesses: dict[str, int] = {}
        """Module -> backward accesses not yet released."""
        self._pending: dict[str, set[int]] = {}
        """Module -> its parameters whose gradient this backward has not accumulated yet."""
        for name, module in model.named_modules():
            if name not in self.used:
                continue
            self._handles.append(
                module.register_forward_pre_hook(lambda *_, n=name: self.before_forward(n))
            )
            self._handles.append(
                module.register_forward_hook(lambda _m, _i, out, n=name: self.after_forward(n, out))
            )
            self.owned[name] = frozenset(
                id(p) for p in module.parameters(recurse=False) if id(p) in chunked
            )
            for key in self.owned[name]:
                self.owners.setdefault(key, []).append(name)

    def remove(self) -> None:
        """Take every hook off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._grad_hooked.clear()

    def _chunks(self, name: str) -> list[Chunk]:
        return [self.manager.chunks[i] for i in self.used[name]]

    def _prefetch(self, index: int) -> None:
        if self.prefetch and 0 <= index < len(self.chunks):
            self.prefetched += self.manager.prefetch(self.chunks[index])

    # -- forward -----------------------------------------------------------------------------

    def before_forward(self, name: str) -> None:
        for chunk in self._chunks(name):
            self.manager.access(chunk)
        self._prefetch(max(self.used[name]) + 1)  # chunks are in execution order

    def after_forward(self, name: str, output: object) -> None:
        for chunk in self._chunks(name):
            self.manager.release(chunk, "forward")
        for tensor in output_tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(lambda _grad, n=name: self.before_backward(n))

    # -- backward ----------------------------------------------------------------------------

    def before_backward(self, name: str) -> None:
        for chunk in self._chunks(name):
            self.manager.access(chunk)
        for param in self.modules[name].parameters(recurse=False):
            if id(param) in self.owners and id(param) not in self._grad_hooked:
                self._grad_hooked.add(id(param))
                self._handles.append(param.register_post_accumulate_grad_hook(self._grad_ready))
        self._accesses[name] = self._accesses.get(name, 0) + 1
        self._pending.setdefault(name, set(self.owned[name]))
        self._prefetch(min(self.used[name]) - 1)

    def _grad_ready(self, param: nn.Parameter) -> None:
        if self.grads is not None and param.grad is not None:
            self.grads.accumulate(param)
        for name in self.owners[id(param)]:
            pending = self._pending.get(name)
            if pending is None:
                continue
            pending.discard(id(param))
            if not pending:
                del self._pending[name]
                self._release_backward(name)

    def _release_backward(self, name: str) -> None:
        for _ in range(self._accesses.pop(name)):
            for chunk in self._chunks(name):
                self.manager.release(chunk, "backward")

    def finish_backward(self) -> None:
        """After a backward: release the chunks of modules still waiting for a gradient."""
        for name in list(self._accesses):
            self._pending.pop(name, None)
            self._release_backward(name)


class ChunkedAdamW(OffloadedAdamW):
    """`OffloadedAdamW` whose step opens each parameter chunk (`open_chunk`: on the device,
    gradients attached) for the state chunks that update it, and closes it after.

    Its param groups are per parameter chunk (`ChunkedParams.param_groups`), in chunk order,
    so the state chunks (which never span two groups) stream in chunk order too: the disk
    tier's read-ahead of the next state chunk overlaps the update of the current one, and
    each parameter chunk is accessed once per step. The update itself is OffloadedAdamW's,
    bit-identical to torch's fused AdamW. It hooks `OffloadedAdamW._streamed`, the one loop
    that visits state chunks; state_dict and load_state_dict walk it too but touch no
    parameter values, so they leave the parameter chunks where they are."""

    def __init__(
        self,
        groups: list[dict],
        *,
        group_chunks: Sequence[Chunk],
        open_chunk: Callable[[Chunk], None],
        close_chunk: Callable[[Chunk], None],
        **kw,
    ) -> None:
        super().__init__(groups, **kw)
        self._group_chunks = list(group_chunks)
        self._open, self._close = open_chunk, close_chunk
        self._stepping = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self._stepping = True
        try:
            super().step(closure)
        finally:
            self._stepping = False

    def _streamed(self) -> Iterator[Any]:
        current: Chunk | None = None
        try:
            for state_chunk in super()._streamed():
                chunk = self._group_chunks[state_chunk.group]
                if self._stepping and chunk is not current:
                    if current is not None:
                        self._close(current)
                    self._open(chunk)
                    current = chunk
                yield state_chunk
        finally:
            if current is not None:
                self._close(current)


class ChunkedParams:
    """The engine's trainable parameters as chunks in one process (``offload.policy``).

    Built from the model (on the meta device, filled by `param_init`, or materialised
    anywhere): parameters in execution order (`run_forward` runs once under no_grad to record
    it), the chunk size searched for the least padding, a `ChunkManager` within the budgets,
    the placement of the policy, and `ChunkHooks` on the model."""

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter],
        device: torch.device,
        offload: OffloadConfig,
        run_forward: Callable[[], object],
        param_init: ParamInit | None = None,
    ) -> None:
        self.model = model
        self.offload = offload
        trainable = {id(p) for p in params}
        order = [
            (name, p)
            for name, p in params_in_execution_order(model, run_forward)
            if id(p) in trainable
        ]
        self.chunks, self.placement = self._chunks_and_placement(order)
        self.disk = (
            DiskTier(
                offload.disk_path, max_bytes=offload.disk_max_bytes, workers=offload.disk_workers
            )
            if offload.disk_path is not None
            else None
        )
        host_budget = _bytes(offload.host_budget_mb)
        self._check_capacity(self.placement.device_budget, host_budget)
        grad_chunks = build_grad_chunks(self.chunks)
        self.manager = ChunkManager(
            [*self.chunks, *grad_chunks],
            device,
            self.placement.device_budget,
            host_budget,
            self.disk,
            param_init,
        )
        for grads, chunk in zip(grad_chunks, self.chunks, strict=True):
            self.manager.follow(grads, chunk)
        apply_placement(self.manager, self.placement)
        self.grads = GradChunks(grad_chunks, self.manager)
        self.hooks = ChunkHooks(model, self.manager, self.grads)
        self._clip: tuple[float, torch.Tensor] | None = None
        """(max_norm, global norm) while the optimizer pass clips gradients."""
        self.group_chunks: list[Chunk] = []
        """Param group index -> the chunk it updates (see `param_groups`)."""
        self._tracer: MemoryTracer | None = None
        self.warming_up = offload.policy == "auto"
        """Until the first optimizer step: the auto policy's warm-up, traced."""
        if not self.warming_up:
            log.info(placement_summary(self.chunks, self.placement))

    # -- placement ---------------------------------------------------------------------------

    def _chunks_and_placement(
        self, order: list[tuple[str, nn.Parameter]]
    ) -> tuple[list[Chunk], Placement]:
        """Chunks of the size that wastes the least padding, or, if those leave the device
        budget below the minimum a step needs (`_minimum_budget`), the smallest chunks the
        parameters allow; then the policy's initial placement."""
        offload, budget = self.offload, _bytes(self.offload.device_budget_mb)
        if offload.policy == "auto" and budget is None:
            raise ConfigError(
                "offload.policy='auto' places chunks within offload.device_budget_mb; set it "
                "(MiB of device memory for parameter and gradient chunks and activations)"
            )
        sizes = [p.numel() * p.element_size() for _, p in order]
        for search_range in dict.fromkeys([int(offload.chunk_search_range_mb * MIB), 0]):
            chunk_bytes = search_chunk_size(
                sizes,
                search_range=search_range,
                step=max(1, int(offload.chunk_search_step_mb * MIB)),
                min_chunk_bytes=int(offload.chunk_min_mb * MIB),
            )
            self.chunks = build_chunks(order, chunk_bytes)
            pinned = self._pinned()
            minimum, why = self._minimum_budget(pinned)
            if budget is None or budget >= minimum:
                return self.chunks, self._placement(pinned, budget or minimum)
        raise ConfigError(
            f"offload.device_budget_mb={offload.device_budget_mb:g} is below the minimum "
            f"{_mib_up(minimum)} MiB ({minimum} bytes) even with the smallest chunks "
            f"({chunk_bytes} bytes): {why}; raise offload.device_budget_mb"
            + (" or lower offload.chunk_min_mb" if offload.chunk_min_mb else "")
        )

    def _pinned(self) -> frozenset[int]:
        if self.offload.policy != "static":
            return frozenset()
        return static_placement(self.chunks, self.offload.param_device_fraction, 0.0).pinned

    def _placement(self, pinned: frozenset[int], budget: int) -> Placement:
        """static: the policy's placement (pinning `pinned`). auto, for the warm-up: the first
        chunks on the device while they fit in the budget, no schedule."""
        if self.offload.policy == "static":
            optim = 1.0 if self.offload.optimizer == "device" else 0.0
            placement = static_placement(self.chunks, self.offload.param_device_fraction, optim)
            return dataclasses.replace(placement, device_budget=budget)
        on_device, room = 0, budget
        while on_device < len(self.chunks) and self.chunks[on_device].nbytes <= room:
            room -= self.chunks[on_device].nbytes
            on_device += 1
        tiers = tuple(Tier.DEVICE if c.index < on_device else Tier.HOST for c in self.chunks)
        return Placement("auto", tiers, frozenset(), None, budget)

    def _minimum_budget(self, pinned: frozenset[int]) -> tuple[int, str]:
        """The smallest device budget for chunks a step runs in, and why: in backward the
        pinned chunks, the chunks held through backward (`held_chunks`), the other chunks of
        the module that computes with the most bytes of them and one gradient chunk; in the
        optimizer pass the pinned chunks, one parameter chunk and its gradient chunk."""
        held = held_chunks(self.model, self.chunks) - pinned
        base = sum(self.chunks[i].nbytes for i in pinned | held)
        modules = chunks_of_modules(self.model, self.chunks)
        working = {
            name: sum(self.chunks[i].nbytes for i in used if i not in pinned | held)
            for name, used in modules.items()
        }
        module = max(working, key=working.get)
        grad = max(c.nbytes for c in self.chunks)  # gradient chunks are the same size
        why = [f"{module!r} computes with chunks {list(modules[module])}"]
        if pinned:
            why.append(f"chunks {sorted(pinned)} are pinned")
        if held:
            why.append(f"chunks {sorted(held)} are held through backward (tied parameters)")
        why.append(f"one gradient chunk ({grad} bytes) receives gradients beside them")
        update = sum(self.chunks[i].nbytes for i in pinned) + 2 * grad
        return max(base + working[module] + grad, update), "; ".join(why)

    def _check_trace(self, trace: MemoryTrace, budget: int) -> None:
        """The minimum device budget the warm-up measured: at each moment its non-model bytes
        plus its chunks, and in backward the chunks held through it (`held_chunks`) and one
        gradient chunk, which `auto_placement` does not know about; the optimizer pass (one
        chunk and its gradient chunk, beside the first or last moment's non-model bytes, whose
        budget is in force then). One error naming the minimum."""
        held = held_chunks(self.model, self.chunks)
        grad = max(c.nbytes for c in self.chunks)
        need, worst = 0, None
        for moment in trace.moments:
            backward = moment.phase == "backward"
            used = set(moment.chunks) | (held if backward else set())
            moment_need = moment.non_model_bytes + sum(self.chunks[i].nbytes for i in used)
            moment_need += grad if backward else 0
            if moment_need > need:
                need, worst = moment_need, (moment, sorted(used))
        for moment in trace.moments[:1] + trace.moments[-1:]:
            if moment.non_model_bytes + 2 * grad > need:
                need, worst = moment.non_model_bytes + 2 * grad, (moment, "the optimizer pass")
        if worst is not None and need > budget:
            moment, used = worst
            raise ConfigError(
                f"offload.device_budget_mb={self.offload.device_budget_mb:g} is below the "
                f"minimum {_mib_up(need)} MiB ({need} bytes) the warm-up step measured: at "
                f"{moment.module} {moment.phase} activations take {moment.non_model_bytes} "
                f"bytes beside chunks {used} (and a gradient chunk in backward); raise "
                "offload.device_budget_mb or lower the batch size or sequence length"
            )

    def _check_capacity(self, device_budget: int | None, host_budget: int | None) -> None:
        total = 2 * sum(c.nbytes for c in self.chunks)  # between backward and update
        if self.disk is None and host_budget is not None and device_budget is not None:
            if total > device_budget + host_budget:
                raise ConfigError(
                    f"parameter and gradient chunks take {total / MIB:.4g} MiB, more than "
                    f"offload.device_budget_mb + offload.host_budget_mb = "
                    f"{(device_budget + host_budget) / MIB:.4g} MiB; set offload.disk_path or "
                    "raise offload.host_budget_mb"
                )

    # -- the step ----------------------------------------------------------------------------

    def start_micro_step(self) -> None:
        """Before a forward: the auto policy traces its whole warm-up step (every micro-batch)."""
        if self.warming_up and self._tracer is None:
            self._tracer = MemoryTracer(self.model, self.chunks, self.manager.device)
            self._tracer.__enter__()

    def finish_backward(self) -> None:
        self.hooks.finish_backward()

    def finish_warm_up(self) -> None:
        """At the first step boundary (auto): place from the trace, before the optimizer pass,
        so that a budget too small fails before any weight changed."""
        if not self.warming_up:
            return
        self.warming_up = False
        tracer, self._tracer = self._tracer, None
        if tracer is None:
            return
        tracer.__exit__(None, None, None)
        self._check_trace(tracer.trace(), self.manager.device_budget)
        self.placement = auto_placement(self.chunks, tracer.trace(), self.manager.device_budget)
        apply_placement(self.manager, self.placement)
        log.info(placement_summary(self.chunks, self.placement))

    def param_groups(self, groups: list[dict]) -> list[dict]:
        """`groups` (e.g. weight decay) split by chunk, in chunk order: the optimizer walks
        the chunks in that order. Sets `group_chunks`."""
        members = [{id(p) for p in group["params"]} for group in groups]
        split: list[dict] = []
        self.group_chunks = []
        for chunk in self.chunks:
            for group, ids in zip(groups, members, strict=True):
                params = [slot.param for slot in chunk.slots if id(slot.param) in ids]
                if params:
                    split.append({**group, "params": params})
                    self.group_chunks.append(chunk)
        return split

    def build_optimizer(
        self, groups: list[dict], factory: OptimizerFactory | None, optim: OptimConfig
    ) -> torch.optim.Optimizer:
        """`factory`'s optimizer over the chunk groups (Adam states on the device), or, for
        ``offload.optimizer`` host / disk, a `ChunkedAdamW` sharing the disk tier."""
        chunk_groups = self.param_groups(groups)
        if self.offload.optimizer == "device":
            return factory(chunk_groups)
        return ChunkedAdamW(
            chunk_groups,
            group_chunks=self.group_chunks,
            open_chunk=self._open_for_update,
            close_chunk=self._close_after_update,
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            tier=self.offload.optimizer,
            disk=self.disk,
            chunk_bytes=self.offload.chunk_mb << 20,
        )

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, max_norm: float, norm: torch.Tensor
    ) -> None:
        """Update every chunk's parameters, one chunk and its gradient chunk on the device at
        a time, gradients clipped to `max_norm` (0: not clipped) by the global `norm` as
        `torch.nn.utils.clip_grads_with_norm_` does: `ChunkedAdamW` walks the chunks itself;
        any other optimizer (which skips parameters without a gradient, as torch's do) steps
        once per chunk with only that chunk's gradients attached."""
        self._clip = (max_norm, norm) if max_norm > 0 else None
        try:
            if isinstance(optimizer, ChunkedAdamW):
                optimizer.step()
                return
            for chunk in self.chunks:
                self._open_for_update(chunk)
                optimizer.step()
                self._close_after_update(chunk)
        finally:
            self._clip = None

    def _open_for_update(self, chunk: Chunk) -> None:
        self.manager.access(chunk)
        params = self.grads.attach(chunk)
        if params and self._clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, *self._clip)

    def _close_after_update(self, chunk: Chunk) -> None:
        self.grads.detach(chunk)
        self.manager.release(chunk, "backward")

    def end_step(self) -> None:
        """After the optimizer step: gradient chunks freed, every chunk back to HOLD."""
        self.grads.end_step()
        self.manager.end_step()

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
            self.manager.access(chunk)
            for slot in chunk.slots:
                copies[id(slot.param)] = slot.param.detach().clone()
            self.manager.release(chunk, "forward")
        self.manager.end_step()
        return {name: copies[id(p)] for name, p in self.names().items()}

    def write_params(self, state: dict[str, torch.Tensor]) -> None:
        """Copy the chunked parameters' values in from `state` (a model state dict), chunk by
        chunk through the manager."""
        names: dict[int, str] = {}
        for name, p in self.names().items():
            names.setdefault(id(p), name)
        missing = [name for name in names.values() if name not in state]
        if missing:
            raise CheckpointError(
                f"checkpoint model state lacks parameters {missing[:3]} of this model"
            )
        with torch.no_grad():
            for chunk in self.chunks:
                self.manager.access(chunk)
                for slot in chunk.slots:
                    slot.param.copy_(state[names[id(slot.param)]])
                self.manager.release(chunk, "forward")
        self.manager.end_step()

    def memory_report(self) -> dict[str, int]:
        """Bytes of parameter chunks and of gradient chunks per tier now, and the device
        high-water mark of both together (the manager's)."""
        grads = self.grads.bytes_per_tier()
        params = {tier: self.manager.memory_report()[tier.value] - grads[tier] for tier in Tier}
        report = {f"chunks_{tier.value}": params[tier] for tier in Tier}
        report.update({f"grad_chunks_{tier.value}": grads[tier] for tier in Tier})
        report["chunks_device_peak"] = self.manager.device_peak_bytes
        return report


def held_chunks(model: nn.Module, chunks: Sequence[Chunk]) -> frozenset[int]:
    """Chunks holding a parameter that several modules own (a tied weight): its gradient is
    accumulated after its last use, so the chunk stays in use from the first of those modules'
    backward to the last (see [Note: the hook protocol])."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return frozenset(
        chunk.index
        for chunk in chunks
        if any(owners.get(id(slot.param), 0) > 1 for slot in chunk.slots)
    )


def _mib_up(nbytes: int) -> str:
    """`nbytes` in MiB, rounded up to 4 decimals: a budget set to the printed value suffices."""
    return f"{math.ceil(nbytes / MIB * 10_000) / 10_000:g}"


def _bytes(mib: float | None) -> int | None:
    return None if mib is None else int(mib * MIB)
