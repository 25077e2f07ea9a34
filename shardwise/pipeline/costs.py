"""What each pipeline part of a model costs: each block, the embedding and the head, by counted
FLOPs (``pipeline.partition = "flops"``) or measured in one profiling pass, time and activation
memory (``"time"``, ``"memory"``).

[Note: partition by FLOPs] ``pipeline.partition = "flops"`` weighs each block by the
floating-point operations of one forward and backward of a sequence (torch's
`FlopCounterMode`), and the first and the last stage also by their embedding's and head's
(a head over a large vocabulary can cost several blocks). They are counted, not timed: on the
meta device, with the parameters swapped for meta tensors of their shapes, so nothing is
computed, every rank gets the same split, and the plan holds it before any process starts.
The counts are matmul and attention FLOPs; elementwise work and communication are not in them.

[Note: partition by measured cost] Each part runs alone on the accelerator, one forward and
backward of a micro-batch of the run's shape (``train.micro_batch`` sequences of
``data.seq_len`` tokens, whole sequences under sequence parallelism too: the parts' costs are
compared with each other, not predicted) in the compute dtype: once to warm up, counting the
bytes its forward saves for the backward (`saved_tensors_hooks`, parameters not counted: the
activations a stage holds per micro-batch in flight), then three times timed (the median). The
part's parameters and buffers are fresh tensors swapped in by `functional_call` (the model may
be on the meta device), so one block at a time is ever materialised. The plan holds the split,
made before any rank starts; where ranks resolve plans themselves (`initialize` under a
launcher), rank 0's profile is broadcast so that all of them cut alike. A timed split can
change from run to run with the machine's load (the plan table prints it); a checkpoint loads
into another split as into any other layout. On CUDA, `shardwise train` profiles in the
launching process, which then keeps a CUDA context on the first GPU while the ranks train (a
few hundred MB; not measured here).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from shardwise.accelerator import get_accelerator
from shardwise.distributed import comm
from shardwise.models import ModelSpec

TIMED_RUNS = 3
"""Timed runs of each part (their median is its time), after one to warm up."""


def counted_flops(
    spec: ModelSpec, model: nn.Module, blocks: list[nn.Module], seq_len: int
) -> tuple[list[int], int, int]:
    """FLOPs of a forward and backward of one sequence: of each block, of the embedding and of
    the head ([Note: partition by FLOPs])."""
    calls = spec.pipeline
    ids = spec.sample_input(seq_len, "meta")
    hidden = torch.empty((*ids.shape, calls.hidden_size), device="meta")
    costs = [
        _flops(_Call(model, lambda m, x, b=block: calls.run_block(m, b, x)), hidden)
        for block in blocks
    ]
    return costs, _flops(_Call(model, calls.embed), ids), _flops(_Call(model, calls.finish), hidden)


class _Call(nn.Module):
    """``call(model, x)`` as a module's forward, so that `torch.func.functional_call` can swap
    the model's parameters."""

    def __init__(self, model: nn.Module, call) -> None:
        super().__init__()
        self.model, self.call = model, call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(self.model, x)


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of ``module(x)`` and its backward, its parameters and buffers swapped for meta
    tensors of their shapes."""
    meta = {
        name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
        for name, t in (*module.named_parameters(), *module.named_buffers())
    }
    x = x.detach().requires_grad_() if x.is_floating_point() else x
    with FlopCounterMode(display=False) as counter:
        out = torch.func.functional_call(module, meta, (x,))
        if out.requires_grad:
            out.backward(torch.empty_like(out))
    return counter.get_total_flops()


@dataclass(frozen=True)
class PartProfile:
    """Seconds of a forward and backward, and bytes saved for the backward, of one part."""

    seconds: float
    saved_bytes: int


@dataclass(frozen=True)
class ModelProfile:
    blocks: list[PartProfile]
    embedding: PartProfile
    head: PartProfile

    def costs(self, by: str) -> tuple[list[int], int, int]:
        """(each block's, the embedding's, the head's) cost in integer units: microseconds
        (``by = "time"``) or bytes (``"memory"``)."""

        def cost(part: PartProfile) -> int:
            return round(part.seconds * 1e6) if by == "time" else part.saved_bytes

        return [cost(b) for b in self.blocks], cost(self.embedding), cost(self.head)


def profile_parts(
    spec: ModelSpec,
    model: nn.Module,
    blocks: list[nn.Module],
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> ModelProfile:
    """Profile each block, the embedding and the head on micro-batches of `shape` (sequences,
    tokens) in `dtype` ([Note: partition by measured cost]); rank 0's profile on every rank."""
    calls = spec.pipeline
    device = get_accelerator().device(dist.get_rank() if dist.is_initialized() else 0)
    hidden = torch.randn(*shape, calls.hidden_size, device=device, dtype=dtype)
    ids = torch.zeros(shape, dtype=torch.long, device=device)
    parts = [(lambda m, x, b=block: calls.run_block(m, b, x), block, hidden) for block in blocks]
    parts.append((calls.embed, _modules(model, calls.first), ids))
    parts.append((calls.finish, _modules(model, calls.last), hidden))
    measured = [_profile(_Call(model, call), used, x, dtype) for call, used, x in parts]
    if dist.is_initialized() and dist.get_world_size() > 1:
        measured = _rank_zero(measured, device)
    return ModelProfile(blocks=measured[:-2], embedding=measured[-2], head=measured[-1])


def _modules(model: nn.Module, names: tuple[str, ...]) -> nn.ModuleList:
    """The modules of `names` the model has (a learned position table is optional)."""
    modules = dict(model.named_modules())
    return nn.ModuleList(modules[name] for name in names if name in modules)


def _profile(module: _Call, used: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> PartProfile:
    """Time and saved bytes of ``module(x)`` and its backward, with fresh tensors for the
    parameters of `used` and for every buffer, meta tensors for the other parameters."""
    accelerator = get_accelerator()
    mine = {id(p) for p in used.parameters()}
    tensors = {}
    for name, t in module.named_parameters():
        tensors[name] = _fresh(t, x.device, dtype) if id(t) in mine else t.to("meta")
    for name, t in module.named_buffers():
        tensors[name] = _fresh(t, x.device, dtype)
    weights = {t.untyped_storage().data_ptr() for t in tensors.values() if not t.is_meta}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def run() -> None:
        inputs = x.detach().requires_grad_() if x.is_floating_point() else x
        out = torch.func.functional_call(module, tensors, (inputs,))
        out.backward(torch.ones_like(out))
        accelerator.synchronize()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    times = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return PartProfile(seconds=statistics.median(times), saved_bytes=sum(saved.values()))


def _fresh(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `t`'s shape on `device`: floats small random values in `dtype`, others 0."""
    if not t.is_floating_point():
        return torch.zeros(t.shape, dtype=t.dtype, device=device)
    fresh = torch.empty(t.shape, dtype=dtype, device=device).normal_(0, 0.02)
    return fresh.requires_grad_(t.requires_grad)


def _rank_zero(measured: list[PartProfile], device: torch.device) -> list[PartProfile]:
    """Every rank's copy of rank 0's profile."""
    values = torch.tensor(
        [[p.seconds, p.saved_bytes] for p in measured], dtype=torch.float64, device=device
    )
    comm.broadcast_(values, 0, None)
    return [PartProfile(seconds=s, saved_bytes=int(b)) for s, b in values.tolist()]
