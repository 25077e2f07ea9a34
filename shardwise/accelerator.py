"""Device, backend and dtype capabilities: the one place that knows what hardware we run on.

Every other module asks this one for the device, the process-group backend, the default
precision and whether pinned memory exists. Nothing else names ``cuda`` or ``gloo``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class Accelerator:
    """What the current process computes on."""

    device_type: str
    """``"cuda"`` or ``"cpu"``."""
    backend: str
    """torch.distributed backend for this device: ``"nccl"`` or ``"gloo"``."""

    def device(self, local_rank: int = 0) -> torch.device:
        """The device this process should use (one GPU per local rank on CUDA)."""
        if self.device_type == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def useful_ranks(self) -> tuple[int, str]:
        """Most ranks one machine runs usefully, and why: one per GPU; on CPU four per core
        (gloo ranks beyond that mostly wait for a core, and start-up alone takes minutes)."""
        if self.device_type == "cuda":
            return torch.cuda.device_count(), "one per GPU"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return 4 * (cores or 1), f"4 per CPU core, {cores or 1} core(s)"

    def set_device(self, local_rank: int) -> None:
        """Bind this process to its device (no-op on CPU)."""
        if self.device_type == "cuda":
            torch.cuda.set_device(self.device(local_rank))

    @property
    def receives_independent_of_sends(self) -> bool:
        """Whether a receive posted ahead leaves later sends free to run. gloo serves sends
        and receives apart; NCCL runs a device's point-to-point ops in issue order on one
        stream, where a receive posted before a send blocks that send until it is matched
        (a deadlock when the peer waits for it: NVIDIA/nccl#479, #783)."""
        return self.backend == "gloo"

    @property
    def caches_allocations(self) -> bool:
        """Whether the device allocator keeps freed memory for reuse (CUDA's caching
        allocator). The CPU's does not: glibc gives blocks above its largest mmap threshold
        (32 MiB) back to the system, and their next allocation faults every page in again."""
        return self.device_type == "cuda"

    @property
    def supports_pinned_memory(self) -> bool:
        """Pinned host memory only helps (and only works) with a CUDA device."""
        return self.device_type == "cuda"

    def default_dtype(self) -> torch.dtype:
        """The compute dtype training should use when the config says ``auto``.

        bf16 only where it is fast: CUDA with native bf16, or a CPU with AMX tiles. On CPUs
        with AVX512-BF16 but no AMX, bf16 matmul measured 0.7x fp32 (83 vs 119 GFLOPS, one
        core); on AVX2-only CPUs it is ~50x slower. fp32 is the safe default there.
        """
        if self.device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if _cpu_has_amx() else torch.float32

    def peak_memory_bytes(self) -> int:
        """Peak memory of this process on its device (device allocator, or host max RSS)."""
        if self.device_type == "cuda":
            return int(torch.cuda.max_memory_allocated())
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def synchronize(self) -> None:
        """Wait for queued device work (timing needs it on CUDA)."""
        if self.device_type == "cuda":
            torch.cuda.synchronize()


def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


@cache
def get_accelerator() -> Accelerator:
    """The accelerator of this process: CUDA where torch sees a GPU (hide them with
    ``CUDA_VISIBLE_DEVICES=`` to train on the CPU), else the CPU."""
    if torch.cuda.is_available():
        return Accelerator(device_type="cuda", backend="nccl")
    return Accelerator(device_type="cpu", backend="gloo")
