"""Peak tensor bytes of a process, measured on any device type, CPU included.

[Note: measuring peak memory] CUDA's allocator counts what tensors hold
(``torch.cuda.max_memory_allocated``); the CPU has no such counter, and the resident set
(``VmHWM``) also counts the interpreter, torch's libraries and malloc's free lists, hundreds
of MiB that no planner predicts. `PeakTensorBytes` counts what the allocator would: every
tensor storage on one device type, each once. On entry it finds the storages alive (a scan of
Python objects: parameters, buffers, optimizer states, the store's flat buffers), then sees
every storage an operator creates (a `TorchDispatchMode`, which also sees the ops autograd
runs in backward and the collectives' outputs), and forgets a storage when it dies (a
finalizer on its preserved Python object). Storages change size outside operators
(ZeRO-3's `free_storage` / `alloc_storage`), so after every operator the live sum is read from
the storages themselves rather than kept as a running count. Tensors held only by C++ from
before entry and buffers a backend allocates for itself (gloo's) are not seen; allocator
rounding is not modelled. Costs a Python call and a pass over the live storages per operator:
a measuring tool for tests and benchmarks, not for training runs.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorBytes(TorchDispatchMode):
    """``with PeakTensorBytes("cpu") as tracker:`` around a step; then ``tracker.peak`` (the
    most bytes alive at once since entry), ``tracker.live`` (alive now) and ``tracker.ops``."""

    def __init__(
        self, device_type: str, ignore: frozenset[int] = frozenset(), existing: bool = True
    ) -> None:
        super().__init__()
        self.device_type = device_type
        self.ignore = ignore
        """Storages not to count (`live_storages` taken before what is measured was built)."""
        self.existing = existing
        """Count the storages alive on entry (a scan of every Python object); without, only
        what operators create inside."""
        self._storages: dict[int, weakref.ref] = {}
        self.live = 0
        self.peak = 0
        self.ops = 0
        """Operators run since entry."""

    def __enter__(self) -> PeakTensorBytes:
        for tensor in _tensors() if self.existing else ():
            self._track(tensor)
        self._measure()
        return super().__enter__()

    def reset_peak(self) -> None:
        """Start a new peak from the bytes alive now."""
        self._measure()
        self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        self._measure()
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device_type:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage: a fake or sparse tensor
            return
        key = storage._cdata
        if key not in self._storages and key not in self.ignore:
            self._storages[key] = weakref.ref(storage, lambda _, key=key: self._forget(key))

    def _forget(self, key: int) -> None:
        self._storages.pop(key, None)

    def _measure(self) -> None:
        live = 0
        for ref in list(self._storages.values()):
            storage = ref()
            if storage is not None:
                live += storage.nbytes()
        self.live = live
        self.peak = max(self.peak, live)


def live_storages(device_type: str) -> frozenset[int]:
    """The storages on `device_type` that Python objects refer to now (`PeakTensorBytes`'s
    `ignore`)."""
    keys = set()
    for tensor in _tensors():
        if tensor.device.type == device_type:
            try:
                keys.add(tensor.untyped_storage()._cdata)
            except (RuntimeError, NotImplementedError):
                continue
    return frozenset(keys)


def _tensors() -> list[torch.Tensor]:
    gc.collect()
    # type(), not isinstance(): some module objects warn when asked for their __class__.
    return [obj for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor)]
