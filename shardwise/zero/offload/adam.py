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

[Note: delayed parameter update] ZeRO-Offload's DPU (``offload.delayed_update`` = k): from
step k on, the host's update of step t runs in a background thread while the device computes
step t+1, so step t+1 computes with the parameters from before step t's update (one step
stale). The steps before k update in place: early updates are the largest, and stale ones
there made the default run unstable (ZeRO-Offload warms up the same way). A delayed `step`
copies the gradients to the host (the next backward overwrites them) and the groups'
hyper-parameters (the LR schedule changes them), then starts Adam on the host masters and
states in the background; `finish_step`, called before the next step, waits for it and
writes the masters into the parameters. Delayed, every parameter has a host master, on the
CPU too, and its gradient a host copy: 8 bytes per updated element more.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
        delayed_from: int = 0,
        grad_of: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ) -> None:
        """`delayed_from` k > 0: updates from step k on run in the background (`step`, [Note:
        delayed parameter update]), so the host keeps its own copies of parameters and
        gradients. `grad_of(p)`: the gradient the update reads for `p`, where it is not
        ``p.grad`` (a chunk store's fp32 gradient chunks of bf16 parameters); default
        ``p.grad``."""
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
        self.delayed_from = delayed_from
        self.delayed = delayed_from > 0
        """Whether updates may run in the background (the host keeps its own copies)."""
        self._copies: dict[torch.Tensor, torch.Tensor] = {}
        """Delayed: parameter -> the host buffer its gradient is copied into at each step."""
        self._background = ThreadPoolExecutor(1, "shardwise-update") if self.delayed else None
        self._grad_of = grad_of
        self._pending: Future | None = None

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

    def _stepped(self) -> Iterator[_StateChunk]:
        """The state chunks as the update visits them (`_streamed`; a subclass may do more
        around each, as `ChunkedAdamW` opens the parameter chunk it updates)."""
        return self._streamed()

    # -- the update --------------------------------------------------------------------------

    def _needs_master(self, p: torch.Tensor) -> bool:
        """Whether the update writes a host fp32 copy of `p` rather than `p` itself."""
        return self.delayed or p.device != HOST or p.dtype != torch.float32

    def _host_master(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the update writes: `p` itself, or its host fp32 copy."""
        if not self._needs_master(p):
            return p
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().to(HOST, torch.float32, copy=True)
        return state["master"]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """The update; delayed, it is started in the background on copies of this step's
        gradients and hyper-parameters, and `finish_step` waits for it and writes it back
        ([Note: delayed parameter update])."""
        if closure is not None:
            raise ValueError("OffloadedAdamW does not take a closure")
        if not self._delays_this_step():
            self._update(self._hyper_parameters(), staged=None)
            return
        if self._pending is not None:
            raise RuntimeError("a delayed update is still running: finish_step first")
        settings, staged = self._hyper_parameters(), self._stage_grads()
        self._pending = self._background.submit(self._update, settings, staged)

    @property
    def running(self) -> bool:
        """Whether an update is running in the background (until `finish_step`)."""
        return self._pending is not None

    def _delays_this_step(self) -> bool:
        """From step `delayed_from` on (counted by the saved step counters, so a resumed run
        knows where it is)."""
        if not self.delayed:
            return False
        done = max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)
        return done + 1 >= self.delayed_from

    def finish_step(self) -> bool:
        """Wait for the update a delayed `step` began and write its masters into the parameters;
        returns whether there was one (False: nothing was running)."""
        if self._pending is None:
            return False
        pending, self._pending = self._pending, None
        with torch.no_grad():
            for p in pending.result():  # raises what the update raised
                p.copy_(self.state[p]["master"])
        return True

    def _hyper_parameters(self) -> list[dict[str, Any]]:
        """Each group's settings as they are now (the LR schedule changes them after)."""
        return [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]

    def _stage_grads(self) -> dict[torch.Tensor, torch.Tensor]:
        """Delayed: each parameter's gradient copied into its host buffer (the next backward
        overwrites the gradient while the update runs), its state and master made here (the
        update thread only reads and writes existing tensors)."""
        staged = {}
        for group in self.param_groups:
            for p in group["params"]:
                grad = self._grad(p)
                if grad is None:
                    continue
                if p not in self._copies:
                    copy = torch.empty(p.shape, dtype=torch.float32, device=HOST)
                    self._copies[p] = copy.pin_memory() if self._pinned else copy
                staged[p] = self._copies[p].copy_(grad)
                self._new_state(p)
        return staged

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """The gradient the update reads for `p`."""
        return p.grad if self._grad_of is None else self._grad_of(p)

    def _new_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=HOST)
        self._host_master(p)
        return state

    @torch.no_grad()
    def _update(
        self, settings: list[dict[str, Any]], staged: dict[torch.Tensor, torch.Tensor] | None
    ) -> list[torch.Tensor]:
        """Adam chunk by chunk on the gradients `staged` (delayed), or on each parameter's
        ``.grad`` as its chunk comes in, each parameter written from its master then; returns
        the parameters updated through a master (delayed: for `finish_step` to write)."""
        written = []
        for chunk in self._stepped():
            params, grads, exp_avgs, exp_avg_sqs, steps, updated = [], [], [], [], [], []
            for p, offset in zip(chunk.params, chunk.offsets, strict=True):
                grad = self._grad(p) if staged is None else staged.get(p)
                if grad is None:
                    continue
                state = self._new_state(p)
                updated.append(p)
                params.append(self._host_master(p))
                grads.append(grad.to(HOST, torch.float32).view_as(params[-1]))
                m, v = chunk.buffer[:, offset : offset + p.numel()]
                exp_avgs.append(m.view_as(params[-1]))
                exp_avg_sqs.append(v.view_as(params[-1]))
                steps.append(state["step"])
            if not params:
                continue
            group = settings[chunk.group]
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
            through_master = [p for p, m in zip(updated, params, strict=True) if m is not p]
            if staged is None:
                for p in through_master:
                    p.copy_(self.state[p]["master"])
            written += through_master
        return written

    # -- bookkeeping ---------------------------------------------------------------------------

    def tier_bytes(self) -> dict[str, int]:
        """Bytes of Adam states now in host memory and on disk (a chunk is in one of them);
        the host's include a delayed update's gradient copies."""
        resident = sum(c.buffer.nbytes for c in self.chunks if c.buffer is not None)
        resident += sum(copy.nbytes for copy in self._copies.values())
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
                    # torch's load cast it to the parameter's dtype; one this run would not
                    # update (saved delayed, loaded not) would go stale, and be saved again
                    if "master" in saved and self._needs_master(p):
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
        settings = offloaded_adamw_settings(optim, offload, disk)
        return OffloadedAdamW(groups, **settings, delayed_from=offload.delayed_update)

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
