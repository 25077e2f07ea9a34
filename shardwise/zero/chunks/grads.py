"""Gradients in chunks, and the chunk-wise optimizer pass.

PatrickStar / Colossal-AI Gemini: the module hooks (zero/module_hooks.py, with the
`ChunkManager` as the residency) bring a module's parameter chunks to the device just before
it computes and let them leave once it is done; `GradChunks` keeps the gradients in chunks of
their own, filled from the hooks (`ModuleHooks.on_grad`), and `ChunkedAdamW` updates chunk by
chunk. `ChunkStore` (store.py) puts them together for the engine.

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
from shardwise.zero.offload.adam import OffloadedAdamW


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

    def attach(self, chunk: Chunk) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Bring `chunk`'s gradient chunk to the device; each of its written parameters with
        the view of its gradient (in the chunk's dtype, the reduce dtype). See [Note: the
        same moves on every rank] (sharding.py) for why a chunk without any is brought too."""
        grads = self.of(chunk)
        slots = self._written_slots(grads)
        self.manager.access(grads)
        return [(s.param, grads.grad_view(s)) for s in slots]

    def detach(self, chunk: Chunk) -> None:
        """After `chunk`'s update: the gradient chunk freed."""
        grads = self.of(chunk)
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
        """`open_chunk` brings a parameter chunk in with its gradients, which `grad_of` (in
        `kw`, `OffloadedAdamW`'s) gives (in the reduce dtype, which may not be the
        parameter's)."""
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
