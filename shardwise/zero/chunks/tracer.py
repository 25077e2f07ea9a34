"""Memory tracer: one warm-up step recorded module by module (Gemini's MemStatsCollector).

For every module that owns parameters, in execution order, once before its forward and once
before its backward, the tracer records a *moment*: the chunks the module computes with, the
*model data* (bytes of chunks on the device) and the *non-model data* (activations and
temporaries). The moments are the reference string the manager's Belady eviction looks ahead
in, and the non-model bytes tell placement how much of the device budget is left for chunks at
each moment (Colossal-AI Gemini; PatrickStar, Fang et al. 2021, section 5).

[Note: non-model bytes] On an accelerator they are the allocator's ``memory_allocated()``
minus the model data. On CPU there is no allocator to ask, so the tracer counts what autograd
saves for backward: ``saved_tensors_hooks`` sees every tensor saved (pack) and the holder the
tracer returns is dropped when autograd frees it (after the node's backward, or with the
graph); bytes are counted once per storage, and storages of parameters (model data) are not
counted. That is most of the activation memory of a training step and rises through forward,
peaks at its end and falls through backward, the shape the policy needs, so the same policy
runs on CPU in tests. Parameter gradients are neither (the engine's grad chunks are model data).

A module's forward moment takes the larger of the counts before and after it runs (what it
allocated is alive at the end); its backward moment is taken when the gradient of its output
arrives, just before its backward runs (zero/module_hooks.py uses the same hook).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from shardwise.zero.chunks.chunk import Chunk, Tier
from shardwise.zero.chunks.packing import chunks_of_modules
from shardwise.zero.module_hooks import output_tensors


@dataclass(frozen=True)
class Moment:
    """One module about to compute."""

    module: str
    phase: str
    """``"forward"`` or ``"backward"``."""
    chunks: tuple[int, ...]
    """Indices of the chunks holding the module's own parameters."""
    model_bytes: int
    """Bytes of chunks on the device."""
    non_model_bytes: int
    """Activations and temporaries, see [Note: non-model bytes]."""


@dataclass(frozen=True)
class MemoryTrace:
    """A recorded step: the access sequence and its non-model memory."""

    moments: tuple[Moment, ...]

    @property
    def peak_non_model_bytes(self) -> int:
        return max((m.non_model_bytes for m in self.moments), default=0)

    def uses(self) -> list[tuple[int, ...]]:
        """The chunks of each moment: `ChunkManager.set_schedule`'s `uses`."""
        return [m.chunks for m in self.moments]

    def names(self) -> list[str]:
        return [f"{m.module} {m.phase}" for m in self.moments]


@dataclass
class _SavedBytes:
    """Bytes of tensors autograd holds for backward, counted once per storage."""

    model_storages: Callable[[], set[int]]
    """Current storage addresses of model data (chunk payloads), which are not counted."""
    excluded: set[int] = field(default_factory=set)
    refs: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    alive: int = 0

    def pack(self, tensor: torch.Tensor) -> object:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        holder = _Holder(tensor)
        if key not in self.excluded:  # chunks move: refresh before deciding it is an activation
            self.excluded = self.model_storages()
        if key == 0 or key in self.excluded:
            return holder
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, storage.nbytes()
            self.alive += self.sizes[key]
        self.refs[key] += 1
        weakref.finalize(holder, self._drop, key)
        return holder

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.alive -= self.sizes.pop(key)


class _Holder:
    """What autograd keeps for a saved tensor; its death is the tensor's release."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _unpack(holder: _Holder) -> torch.Tensor:
    return holder.tensor


class MemoryTracer:
    """Records one step's moments: ``with MemoryTracer(model, chunks, device) as tracer:``
    around one forward and backward, then ``tracer.trace()``. Enter it after the engine's
    hooks are registered, so that each moment sees the module's chunks already fetched."""

    def __init__(
        self, model: nn.Module, chunks: Sequence[Chunk], device: torch.device | str
    ) -> None:
        self.model = model
        self.chunks = list(chunks)
        self.device = torch.device(device)
        self._modules = chunks_of_modules(model, self.chunks)
        self._moments: list[Moment] = []
        self._saved = _SavedBytes(self._payload_storages)
        self._handles: list[object] = []
        self._open: list[int] = []
        """Moments of modules whose forward is running, innermost last."""
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._saved.pack, _unpack)

    def __enter__(self) -> MemoryTracer:
        self._moments.clear()
        self._open.clear()
        for name, module in self.model.named_modules():
            if name in self._modules:
                self._handles.append(
                    module.register_forward_pre_hook(lambda *_, n=name: self._before(n))
                )
                self._handles.append(
                    module.register_forward_hook(
                        lambda _m, _i, out, n=name: self._after_forward(n, out)
                    )
                )
        self._saved_hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._saved_hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def trace(self) -> MemoryTrace:
        return MemoryTrace(tuple(self._moments))

    # -- measuring ---------------------------------------------------------------------------

    def _model_bytes(self) -> int:
        return sum(c.nbytes for c in self.chunks if c.tier is Tier.DEVICE)

    def _non_model_bytes(self, model_bytes: int) -> int:
        if self.device.type == "cpu":
            return self._saved.alive
        allocated = torch.get_device_module(self.device).memory_allocated(self.device)
        return max(0, allocated - model_bytes)

    def _record(self, name: str, phase: str) -> None:
        model_bytes = self._model_bytes()
        moment = Moment(
            name, phase, self._modules[name], model_bytes, self._non_model_bytes(model_bytes)
        )
        self._moments.append(moment)

    def _payload_storages(self) -> set[int]:
        return {
            c.payload.untyped_storage().data_ptr() for c in self.chunks if c.tier is Tier.DEVICE
        }

    def _before(self, name: str) -> None:
        self._open.append(len(self._moments))
        self._record(name, "forward")

    def _after_forward(self, name: str, output: object) -> None:
        # Modules nest: the innermost open moment of this module just finished. Searched by
        # name, as a recomputation that activation checkpointing stopped early leaves a
        # module opened and never finished (see zero/module_hooks.py).
        position = max(i for i, t in enumerate(self._open) if self._moments[t].module == name)
        index = self._open.pop(position)
        before = self._moments[index]
        now = self._non_model_bytes(self._model_bytes())
        if now > before.non_model_bytes:
            self._moments[index] = dataclasses.replace(before, non_model_bytes=now)
        for tensor in output_tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(lambda grad, n=name: self._record(n, "backward"))
