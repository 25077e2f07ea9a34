"""AdamW with its states on the host or on disk, streamed through in chunks (ZeRO-Offload's
CPU optimizer, ZeRO-Infinity's NVMe optimizer states).

Ren et al. 2021, "ZeRO-Offload" (ATC'21): the fp32 master weights and Adam states (12Ψ bytes
of the 16Ψ) live in host memory and the update runs on the CPU; only gradients go down and
updated parameters come back. Rajbhandari et al. 2021, "ZeRO-Infinity" (SC'21): the states
may live on NVMe and stream through host memory a piece at a time.

`OffloadedAdamW` keeps, per **state chunk** (consecutive parameters of one param group, about
`chunk_bytes` of states), one flat fp32 buffer ``[2, n]`` holding exp_avg and exp_avg_sq.
``step()`` walks the chunks in order: the chunk's buffer is brought in (on the ``disk`` tier:
read while the previous chunk computes — read-ahead — and written back while the next one
computes — write-behind), then one ``torch._fused_adamw_`` call updates the chunk's
parameters, exactly the kernel and arguments ``torch.optim.AdamW(fused=True)`` uses, so the
result is bit-identical to it (the update is element-wise; chunking only splits the call).

Parameters on another device than the CPU (CUDA) get a host fp32 master copy: gradients are
copied down, the update runs on the host, the parameter is overwritten with the result.
Only the per-parameter ``step`` counters (and those master copies) stay in `state`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from shardwise.accelerator import get_accelerator
from shardwise.config import OffloadConfig, OptimConfig
from shardwise.errors import ConfigError
from shardwise.optim import OptimizerFactory, default_optimizer_factory
from shardwise.zero.offload.disk import DiskTier
from shardwise.zero.offload.run_dirs import check_root

TIERS = ("host", "disk")
"""Where `OffloadedAdamW` keeps its states."""

HOST = torch.device("cpu")

MAX_PENDING_WRITES = 1
"""Write-behind depth of the disk tier: with the chunk computing and the one being read
ahead, about three chunks of states are in host memory at once."""


class StateFiles(Protocol):
    """What the disk tier offers (`shardwise.zero.offload.disk.DiskTier`)."""

    def write(self, key: str, tensor: torch.Tensor) -> Future: ...

    def read(self, key: str, out: torch.Tensor) -> Future: ...

    def flush(self) -> None: ...


@dataclass
class _StateChunk:
    """Consecutive parameters of one param group whose states share a buffer."""

    key: str
    group: int
    """Index in param_groups (load_state_dict replaces the group dicts)."""
    params: list[torch.Tensor]
    offsets: list[int]
    numel: int
    buffer: torch.Tensor | None = None
    """[2, numel] fp32: exp_avg, exp_avg_sq; None while on disk."""


def _state_chunks(param_groups: list[dict], chunk_bytes: int) -> list[_StateChunk]:
    """Params in order, cut into chunks of at most `chunk_bytes` of states (a parameter
    larger than that gets a chunk of its own); never across param groups."""
    chunks: list[_StateChunk] = []
    for g, group in enumerate(param_groups):
        current: list[torch.Tensor] = []
        numel = 0
        for p in group["params"]:
            if current and (numel + p.numel()) * 8 > chunk_bytes:
                chunks.append(_new_chunk(f"g{g}c{len(chunks)}", g, current))
                current, numel = [], 0
            current.append(p)
            numel += p.numel()
        if current:
            chunks.append(_new_chunk(f"g{g}c{len(chunks)}", g, current))
    return chunks


def _new_chunk(key: str, group: int, params: list[torch.Tensor]) -> _StateChunk:
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.numel()
    return _StateChunk(key=key, group=group, params=params, offsets=offsets, numel=total)


class OffloadedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (fused) whose exp_avg / exp_avg_sq live on the host or on disk."""

    def __init__(
        self,
        params: Iterable,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float = 0.0,
        tier: str = "host",
        disk: StateFiles | None = None,
        chunk_bytes: int = 64 << 20,
    ) -> None:
        if tier not in TIERS:
            raise ConfigError(f"optimizer state tier {tier!r} is not one of {', '.join(TIERS)}")
        if tier == "disk" and disk is None:
            raise ConfigError("optimizer states on disk need offload.disk_path")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.tier, self.disk = tier, disk
        self.chunks = _state_chunks(self.param_groups, chunk_bytes)
        self._pinned = get_accelerator().supports_pinned_memory
        self._on_disk: set[str] = set()
        self._writes: deque[Future] = deque()

    # -- chunk buffers -----------------------------------------------------------------------

    def _empty(self, chunk: _StateChunk) -> torch.Tensor:
        buffer = torch.empty((2, chunk.numel), dtype=torch.float32, device=HOST)
        return buffer.pin_memory() if self._pinned else buffer

    def _fetch(self, chunk: _StateChunk) -> Future | None:
        """Start bringing `chunk`'s states in; zeros the first time."""
        if chunk.buffer is not None:
            return None
        chunk.buffer = self._empty(chunk)
        if chunk.key not in self._on_disk:
            chunk.buffer.zero_()
            return None
        return self.disk.read(chunk.key, chunk.buffer)

    def _evict(self, chunk: _StateChunk) -> None:
        """On the disk tier, write the chunk back (write-behind) and drop it from memory; at
        most `MAX_PENDING_WRITES` writes stay in flight (each holds its chunk's buffer)."""
        if self.tier == "disk":
            self._writes.append(self.disk.write(chunk.key, chunk.buffer))
            self._on_disk.add(chunk.key)
            chunk.buffer = None
            while len(self._writes) > MAX_PENDING_WRITES:
                self._writes.popleft().result()

    def _streamed(self) -> Iterator[_StateChunk]:
        """Every chunk resident in turn; the next one is read while this one computes."""
        pending = self._fetch(self.chunks[0]) if self.chunks else None
        for index, chunk in enumerate(self.chunks):
            if pending is not None:
                pending.result()
            following = self.chunks[index + 1] if index + 1 < len(self.chunks) else None
            pending = self._fetch(following) if following is not None else None
            yield chunk
            self._evict(chunk)
        if self.tier == "disk":
            self._writes.clear()
            self.disk.flush()

    # -- the update --------------------------------------------------------------------------

    def _host_master(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the update writes: `p` itself on the host, else its host fp32 copy."""
        if p.device == HOST and p.dtype == torch.float32:
            return p
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().to(HOST, torch.float32)
        return state["master"]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("OffloadedAdamW does not take a closure")
        for chunk in self._streamed():
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p, offset in zip(chunk.params, chunk.offsets, strict=True):
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=HOST)
                params.append(self._host_master(p))
                grads.append(p.grad.to(HOST, torch.float32).view_as(params[-1]))
                m, v = chunk.buffer[:, offset : offset + p.numel()]
                exp_avgs.append(m.view_as(params[-1]))
                exp_avg_sqs.append(v.view_as(params[-1]))
                steps.append(state["step"])
            if not params:
                continue
            group = self.param_groups[chunk.group]
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )
            with_grads = [p for p in chunk.params if p.grad is not None]
            for p, master in zip(with_grads, params, strict=True):
                if master is not p:
                    p.copy_(master)

    # -- bookkeeping ---------------------------------------------------------------------------

    def tier_bytes(self) -> dict[str, int]:
        """Bytes of Adam states now in host memory and on disk (a chunk is in one of them)."""
        resident = sum(c.buffer.nbytes for c in self.chunks if c.buffer is not None)
        on_disk = sum(
            8 * c.numel for c in self.chunks if c.buffer is None and c.key in self._on_disk
        )
        return {"host": resident, "disk": on_disk}

    def saved_states(self) -> tuple[dict[str, Any], Iterator[tuple[int, dict[str, Any]]]]:
        """torch's AdamW state dict with its ``state`` left empty, and each parameter's state
        in parameter order: its index and ``step``, ``exp_avg``, ``exp_avg_sq`` (views of the
        resident chunk, valid until the next state is drawn), and the fp32 ``master`` of a
        parameter that has one (bf16/fp16 parameters: rebuilt from the parameter, a resume
        would lose the bits the parameter's dtype rounds away). Streamed chunk by chunk from
        their tier, so a checkpoint holds one chunk of states at a time."""
        saved = super().state_dict()
        steps = saved.pop("state")
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

        def states() -> Iterator[tuple[int, dict[str, Any]]]:
            for chunk in self._streamed():
                for p, offset in zip(chunk.params, chunk.offsets, strict=True):
                    if "step" not in self.state[p]:
                        continue
                    m, v = chunk.buffer[:, offset : offset + p.numel()]
                    i = index[id(p)]
                    entry = {"step": steps[i]["step"], "exp_avg": m.view_as(p)}
                    entry["exp_avg_sq"] = v.view_as(p)
                    if "master" in self.state[p]:
                        entry["master"] = self.state[p]["master"]
                    yield i, entry

        return {**saved, "state": {}}, states()

    def state_dict(self) -> dict[str, Any]:
        """torch's AdamW layout (``exp_avg``, ``exp_avg_sq`` per parameter; see
        `saved_states`), copied: the checkpoint does not depend on the tier."""
        saved, states = self.saved_states()
        saved["state"] = {i: {k: v.clone() for k, v in entry.items()} for i, entry in states}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch's AdamW layout; the states go to their chunks (and tier)."""
        states = state_dict["state"]
        scalars = {i: {"step": s["step"]} for i, s in states.items()}
        self.load_states({**state_dict, "state": scalars}, states.get)

    def load_states(
        self, state_dict: dict[str, Any], elements: Callable[[int], dict | None]
    ) -> None:
        """As `load_state_dict` from torch's layout with only the ``step`` of each state;
        ``elements(i)`` gives parameter i's ``exp_avg``, ``exp_avg_sq`` (and ``master``),
        asked for while its chunk is in, so a resume holds one chunk of states at a time."""
        steps = {i: {"step": s["step"].clone()} for i, s in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": steps})
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for chunk in self._streamed():
            for p, offset in zip(chunk.params, chunk.offsets, strict=True):
                saved = elements(index[id(p)]) if index[id(p)] in steps else None
                if saved is not None:
                    chunk.buffer[0, offset : offset + p.numel()] = saved["exp_avg"].flatten()
                    chunk.buffer[1, offset : offset + p.numel()] = saved["exp_avg_sq"].flatten()
                    if "master" in saved:  # torch's load cast it to the parameter's dtype
                        self.state[p]["master"] = saved["master"].to(HOST, torch.float32)


def check_offload(offload: OffloadConfig) -> None:
    """Refuse settings the optimizer offload cannot run with, before any process starts."""
    if offload.optimizer == "disk":
        if offload.disk_path is None:
            raise ConfigError("offload.optimizer='disk' needs offload.disk_path (a directory)")
        check_root(offload.disk_path, offload.disk_max_bytes, offload.disk_workers)


def offloaded_optimizer_factory(optim: OptimConfig, offload: OffloadConfig) -> OptimizerFactory:
    """`OffloadedAdamW` with ``optim``'s hyper-parameters, its states where ``offload.optimizer``
    says; the disk tier is opened here."""
    check_offload(offload)
    disk = None
    if offload.optimizer == "disk":
        disk = DiskTier(
            offload.disk_path,
            max_bytes=offload.disk_max_bytes,
            workers=offload.disk_workers,
            direct=offload.direct_io,
        )

    def build(groups: list[dict]) -> torch.optim.Optimizer:
        return OffloadedAdamW(groups, **offloaded_adamw_settings(optim, offload, disk))

    return build


def optimizer_factory(optim: OptimConfig, offload: OffloadConfig) -> OptimizerFactory:
    """AdamW from the config: torch's fused one with the parameters, or `OffloadedAdamW` with
    its states where ``offload.optimizer`` says."""
    if offload.optimizer == "device":
        return default_optimizer_factory(optim)
    return offloaded_optimizer_factory(optim, offload)


def offloaded_adamw_settings(
    optim: OptimConfig, offload: OffloadConfig, disk: DiskTier | None
) -> dict[str, Any]:
    """`OffloadedAdamW`'s keyword arguments from the config (weight decay is per group)."""
    return {
        "lr": optim.lr,
        "betas": optim.betas,
        "eps": optim.eps,
        "tier": offload.optimizer,
        "disk": disk,
        "chunk_bytes": offload.chunk_mb << 20,
    }
