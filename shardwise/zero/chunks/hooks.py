"""Parameters in chunks, driven by module hooks: access before compute, release after.

PatrickStar / Colossal-AI Gemini: a module's parameter chunks are brought to the device just
before it computes and may leave once it is done; the optimizer then visits the chunks one at
a time. `ChunkHooks` turns module hooks into the manager's `access` / `release` calls,
`GradChunks` keeps the gradients in chunks of their own, and `ChunkedAdamW` updates chunk by
chunk; `ChunkStore` (store.py) puts them together for the engine.

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

Activation checkpointing recomputes a block's forward inside backward, and torch stops the
recomputation as soon as the tensors backward needs exist (non-reentrant checkpoint's early
stop): the last module of the block then had its pre-hook but never its forward hook. Such an
unclosed forward access is released with the module's backward accesses (its backward follows
the recomputation), or at `finish_backward` at the latest.

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

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._foreach_utils import _has_foreach_support

from shardwise.precision import DynamicLossScaler
from shardwise.zero.chunks.chunk import Chunk, ChunkState, GradChunk, Tier
from shardwise.zero.chunks.manager import ChunkManager
from shardwise.zero.chunks.packing import chunks_of_modules
from shardwise.zero.offload.adam import OffloadedAdamW
from shardwise.zero.params import output_tensors


def grad_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's 2-norm exactly as `torch.nn.utils.get_total_norm` computes it (one
    `_foreach_norm` for tensors on one device)."""
    if grads and _has_foreach_support(grads, grads[0].device):
        return list(torch._foreach_norm(grads, 2.0))
    return [torch.linalg.vector_norm(grad, 2.0) for grad in grads]


class GradChunks:
    """The gradient chunk group, one `GradChunk` per chunk of `param_chunks` (same order),
    in the parameter chunks' manager; see [Note: gradient chunks]."""

    def __init__(
        self,
        param_chunks: Sequence[Chunk],
        chunks: Sequence[GradChunk],
        manager: ChunkManager,
    ) -> None:
        self.chunks = list(chunks)
        self.manager = manager
        self._grads_of = {p.index: g for p, g in zip(param_chunks, self.chunks, strict=True)}
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
        (self.norms[id(param)],) = grad_norms([view])
        self.manager.release(chunk, "backward")

    def total_norm(self, params: Sequence[nn.Parameter]) -> torch.Tensor:
        """The global 2-norm of the gradients of `params` (in this order, as the plain run's
        clip_grad_norm_ sees them); parameters without a gradient are skipped."""
        norms = [self.norms[id(p)] for p in params if id(p) in self.norms]
        if not norms:
            return torch.tensor(0.0)
        return torch.linalg.vector_norm(torch.stack(norms), 2.0)

    def squares(self, weights: dict[int, float]) -> torch.Tensor:
        """This rank's sum of squared gradient norms, each parameter's weighted by
        ``weights[id(param)]`` (default 1): a tensor-parallel shard held by k ranks counts 1/k."""
        if not self.norms:
            return torch.zeros((), dtype=torch.float32, device=self.manager.device)
        norms = torch.stack(list(self.norms.values())).float()
        scale = torch.tensor([weights.get(key, 1.0) for key in self.norms], device=norms.device)
        return (norms.square() * scale).sum()

    @torch.no_grad()
    def unscale_and_check_(self, scaler: DynamicLossScaler) -> bool:
        """fp16: divide every gradient by the loss scale, chunk by chunk; whether any is
        inf/NaN. The norms are taken again, of the unscaled gradients."""
        found_inf = False
        # each chunk, written or not: [Note: the same moves on every rank] (sharding.py)
        for chunk in self.chunks:
            slots = self._written_slots(chunk)
            self.manager.access(chunk)
            views = [chunk.grad_view(s) for s in slots]
            found_inf |= scaler.unscale_and_check_(views)
            for s, norm in zip(slots, grad_norms(views), strict=True):
                self.norms[id(s.param)] = norm
            self.manager.release(chunk, "backward")
        return found_inf

    def of(self, chunk: Chunk) -> GradChunk:
        """The gradient chunk of parameter chunk `chunk`."""
        return self._grads_of[chunk.index]

    def attach(self, chunk: Chunk) -> list[nn.Parameter]:
        """Bring `chunk`'s gradient chunk to the device and set ``param.grad`` of its written
        parameters to views of it; returns those parameters. See [Note: the same moves on
        every rank] (sharding.py) for why a chunk without any is brought too."""
        grads = self.of(chunk)
        slots = self._written_slots(grads)
        self.manager.access(grads)
        for s in slots:
            s.param.grad = grads.grad_view(s)
        return [s.param for s in slots]

    def detach(self, chunk: Chunk) -> None:
        """After `chunk`'s update: gradients off the parameters, the gradient chunk freed."""
        grads = self.of(chunk)
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
    """Drives a `ChunkManager` from module hooks; see [Note: the hook protocol]. `chunks` are
    the chunks the model's parameters view (the first in the manager's list, so index =
    position). With `grads`, gradients go into their gradient chunks ([Note: gradient
    chunks]); without, they stay in ``param.grad``."""

    def __init__(
        self,
        model: nn.Module,
        manager: ChunkManager,
        chunks: Sequence[Chunk],
        grads: GradChunks | None = None,
        prefetch: bool = True,
    ) -> None:
        self.manager = manager
        self.grads = grads
        self.prefetch = prefetch
        self.chunks = list(chunks)
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
        self._forwards: dict[str, int] = {}
        """Module -> forward accesses whose forward hook has not run (yet, or ever: a
        recomputation stopped early)."""
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
            self.manager.access(chunk, read_only=True)
        self._forwards[name] = self._forwards.get(name, 0) + 1
        self._prefetch(max(self.used[name]) + 1)  # chunks are in execution order

    def after_forward(self, name: str, output: object) -> None:
        self._release_forward(name, 1)
        for tensor in output_tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(lambda _grad, n=name: self.before_backward(n))

    # -- backward ----------------------------------------------------------------------------

    def before_backward(self, name: str) -> None:
        for chunk in self._chunks(name):
            self.manager.access(chunk, read_only=True)
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

    def _release_forward(self, name: str, times: int) -> None:
        self._forwards[name] -= times
        for _ in range(times):
            for chunk in self._chunks(name):
                self.manager.release(chunk, "forward")

    def _release_backward(self, name: str) -> None:
        self._release_forward(name, self._forwards.get(name, 0))  # a stopped recomputation
        for _ in range(self._accesses.pop(name)):
            for chunk in self._chunks(name):
                self.manager.release(chunk, "backward")

    def finish_backward(self) -> None:
        """After a backward: release the chunks of modules still waiting for a gradient, and
        of forwards left open by a stopped recomputation."""
        for name in list(self._accesses):
            self._pending.pop(name, None)
            self._release_backward(name)
        for name, times in self._forwards.items():
            if times:
                self._release_forward(name, times)


class ChunkedAdamW(OffloadedAdamW):
    """`OffloadedAdamW` whose step opens each parameter chunk (`open_chunk`: on the device,
    gradients attached) for the state chunks that update it, and closes it after.

    Its param groups are per parameter chunk (`ChunkStore.param_groups`), in chunk order,
    so the state chunks (which never span two groups) stream in chunk order too: the disk
    tier's read-ahead of the next state chunk overlaps the update of the current one, and
    each parameter chunk is accessed once per step. The update itself is OffloadedAdamW's,
    bit-identical to torch's fused AdamW. It extends `OffloadedAdamW._stepped`, the loop
    the update visits state chunks in; state_dict and load_state_dict walk `_streamed` and
    touch no parameter values, so they leave the parameter chunks where they are."""

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

    def _stepped(self) -> Iterator[Any]:
        current: Chunk | None = None
        try:
            for state_chunk in super()._stepped():
                chunk = self._group_chunks[state_chunk.group]
                if chunk is not current:
                    if current is not None:
                        self._close(current)
                    self._open(chunk)
                    current = chunk
                yield state_chunk
        finally:
            if current is not None:
                self._close(current)


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
