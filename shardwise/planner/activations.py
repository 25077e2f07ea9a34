"""Activation memory of one micro-batch, traced before any compute is spent.

[Note: tracing with fake tensors] The model is built on the meta device and its parameters
swapped for fake CPU tensors (`FakeTensorMode`): every operator runs for its shapes only, no
memory and no arithmetic, yet dispatches as on the CPU (SDPA picks the CPU kernels, so what
autograd saves is what a real step saves; on the meta device the math path would be traced
instead). One forward, the loss and backward run under `PeakTensorBytes` and a
`saved_tensors` recorder; parameter gradients are dropped as soon as they accumulate (the
parameter store keeps gradients in its own buffers, counted as model states). The result, a
`Trace`, holds what forward saved for backward by region and kind, the bytes alive at the end
of forward, the peak of the whole pass and its floating-point operations; measured against
real steps (tests/planner) the peak agrees to the byte on the CPU.

A tensor-parallel rank keeps a fraction of each saved tensor (`activation_fraction`, the
layouts of Colossal-AI's Table 1, checked by ``shardwise bench tp``); the dense model is
traced once and scaled.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from shardwise.activation_checkpointing import apply_activation_checkpointing
from shardwise.distributed.dims import ParallelDims
from shardwise.loss import cross_entropy_loss, logits_of
from shardwise.models.spec import ModelSpec
from shardwise.pipeline.stage import StagePart
from shardwise.planner.tracker import PeakTensorBytes

SPLIT_1D = ("attn", "attn.proj", "mlp", "mlp.down", "loss")
"""Regions whose saved activations 1D splits over tp: between a column- and a row-parallel
linear (heads, MLP hidden), and the loss over vocabulary-split logits."""
GATHERED_1D_SP = ("attn.qkv", "mlp.up", "mlp.gate", "head")
"""Column-parallel linears, whose input Megatron-SP gathers along the sequence (and saves
whole); every other region of 1D with SP keeps 1/tp of the sequence."""


def region_of(module_name: str) -> str:
    """``"blocks.3.attn.qkv"`` -> ``"attn.qkv"``; the root module is ``"model"``. The
    attention core (``attn.core``, what sequence parallelism swaps) is part of ``"attn"``."""
    name = re.sub(r"^blocks\.\d+\.?", "", module_name).removesuffix(".core")
    return name or ("block" if module_name else "model")


def saved_kind(tensor: torch.Tensor, batch: int, tokens: int) -> str:
    """How a dense saved tensor scales: ``"fixed"`` (no batch dimension, e.g. rope tables),
    ``"per_token"`` (one value per token) or ``"activation"`` (tokens x features). The batch
    dimension is the first, [B, ...] or flattened [B T, ...]; keep seq_len != micro_batch so
    that a [T, ...] table is not taken for one."""
    if tensor.ndim == 0 or tensor.shape[0] not in (batch, tokens):
        return "fixed"
    return "per_token" if tensor.numel() == tokens else "activation"


@contextmanager
def saved_tensors(model: nn.Module, batch: int, tokens: int) -> Iterator[dict[str, int]]:
    """Bytes autograd saves while the context is open, each storage once, as
    ``"region/kind"`` -> bytes: the region of the innermost module running (``"loss"``
    outside the model), the kind of `saved_kind`. Parameters are not activations."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    names = {module: name for name, module in model.named_modules()}
    stack: list[str] = []
    seen: set[int] = set()
    saved: dict[str, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if storage.nbytes() and key not in params and key not in seen:
            seen.add(key)
            region = region_of(stack[-1]) if stack else "loss"
            kind = f"{region}/{saved_kind(tensor, batch, tokens)}"
            saved[kind] = saved.get(kind, 0) + storage.nbytes()
        return tensor

    def enter(module: nn.Module, _inputs: Any) -> None:
        stack.append(names[module])

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        stack.pop()  # returning None keeps the module's output

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield saved
    finally:
        for handle in handles:
            handle.remove()


def by_region(by_key: dict[str, float]) -> dict[str, float]:
    """``"region/kind"`` -> bytes summed to region -> bytes."""
    regions: dict[str, float] = {}
    for key, nbytes in by_key.items():
        region = key.rsplit("/", 1)[0]
        regions[region] = regions.get(region, 0) + nbytes
    return regions


def grid(dims: ParallelDims) -> tuple[int, int]:
    """(q, d): the grid side and depth of a 2D/2.5D/3D layout; (tp, 1) for 1D."""
    return dims.tp_shape[-1], dims.tp_depth


def token_split(dims: ParallelDims) -> int:
    """How many ways a tensor-parallel layout splits a micro-batch's tokens: its batch blocks
    (`ParallelDims.hidden_split`; Megatron-SP's sequence split is per region, below)."""
    return dims.hidden_split()[0]


def activation_fraction(
    dims: ParallelDims, region: str, kind: str, sequence_parallel: bool = False
) -> float:
    """The share of a dense saved tensor of `kind` (`saved_kind`) saved in `region` that one
    tensor-parallel rank keeps; `sequence_parallel`: 1D with Megatron-SP, whose regions
    between the linears (norms, residuals) split the sequence over tp. Regions are the
    reference GPT's module names (`region_of`)."""
    if kind == "fixed" or dims.tp == 1:
        return 1.0
    if dims.tp_mode == "1d" and sequence_parallel:
        return 1.0 if region in GATHERED_1D_SP else 1 / dims.tp
    tokens = token_split(dims)
    if kind == "per_token":
        return 1 / tokens
    if dims.tp_mode == "1d":
        return 1 / dims.tp if region in SPLIT_1D else 1.0
    return 1 / (tokens * grid(dims)[0])  # tokens split, and features (hidden, heads, vocab)


@dataclass(frozen=True)
class Trace:
    """One micro-batch's forward, loss and backward, in bytes beyond the model's parameters."""

    saved: dict[str, int]
    """What forward and the loss saved for backward, ``"region/kind"`` -> bytes."""
    forward_end: int
    """Alive when backward starts: the saved tensors and the loss's outputs."""
    peak: int
    """The most alive at once during the pass (backward's gradients of activations on top
    of what forward saved)."""
    flops: int = 0
    """Floating-point operations of the pass (torch's `FlopCounterMode`: matmuls and
    attention, recomputation under activation checkpointing included)."""
    ops: int = 0
    """Operators the pass dispatches (each costs the framework's per-operator time)."""

    def scaled(
        self, dims: ParallelDims, sequence_parallel: bool = False, ends_in_loss: bool = True
    ) -> Trace:
        """What one tensor-parallel rank of `dims` holds: each saved tensor by
        `activation_fraction`, the rest (gradients of activations, the loss's temporaries)
        like the logits; for a pipeline stage before the last (not `ends_in_loss`) like the
        hidden states it sends and the gradients it receives for them, which the layout
        splits as `ParallelDims.hidden_split` says (whole in 1D)."""
        if dims.tp == 1:
            return self
        saved = {
            key: int(nbytes * activation_fraction(dims, *key.rsplit("/", 1), sequence_parallel))
            for key, nbytes in self.saved.items()
        }
        if ends_in_loss:
            rest = activation_fraction(dims, "loss", "activation")
        else:
            rest = 1 / math.prod(dims.hidden_split(sequence_parallel))
        dense_saved, local_saved = sum(self.saved.values()), sum(saved.values())
        return Trace(
            saved=saved,
            forward_end=local_saved + int((self.forward_end - dense_saved) * rest),
            peak=local_saved + int((self.peak - dense_saved) * rest),
            flops=self.flops // dims.tp,
            ops=self.ops,
        )


def trace_micro_batch(
    model: nn.Module,
    spec: ModelSpec,
    batch: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    checkpointing: str = "none",
    every_n: int = 2,
    vocab_size: int = 256,
    stage: StagePart | None = None,
) -> Trace:
    """Trace `model` (on the meta device; consumed: its parameters become fake) on a
    [batch, seq_len] micro-batch in `dtype` with the given activation checkpointing. With
    `stage` (a pipeline stage of `model`), only that stage: it starts from the previous
    stage's hidden states unless it is the first, and backward starts from the gradient of
    its output unless it is the last."""
    mode = FakeTensorMode()
    _fake_parameters(model, mode, dtype)
    apply_activation_checkpointing(model, spec, checkpointing, every_n)
    with mode:
        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(_drop_grad)
        inputs = torch.randint(0, vocab_size, (batch, seq_len))
        targets = torch.randint(0, vocab_size, (batch, seq_len))
        if stage is not None and not stage.first:
            shape = (batch, seq_len, stage.calls.hidden_size)
            inputs = torch.empty(shape, dtype=dtype, requires_grad=True)

        def step(targets: torch.Tensor = targets) -> torch.Tensor:
            output = (stage or model)(inputs)
            if stage is None or stage.last:
                output = cross_entropy_loss(logits_of(output), targets)
            return output

        held = [*model.parameters(), *model.buffers(), inputs, targets]
        ignore = frozenset(t.untyped_storage()._cdata for t in held)
        with PeakTensorBytes("cpu", ignore, existing=False) as tracker:
            start = tracker.live
            with saved_tensors(model, batch, batch * seq_len) as saved:
                output = step()
            tracker.reset_peak()
            forward_end = tracker.live - start
            _backward(output)
            del output
        # A second pass counts the FLOPs: the counter's module hooks hold tensors longer.
        with FlopCounterMode(display=False) as flops:
            _backward(step())
    return Trace(saved, forward_end, tracker.peak - start, flops.get_total_flops(), tracker.ops)


def _backward(output: torch.Tensor) -> None:
    output.backward(None if output.ndim == 0 else torch.ones_like(output))


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


def _fake_parameters(model: nn.Module, mode: FakeTensorMode, dtype: torch.dtype) -> None:
    """Swap every parameter and buffer of a meta-device `model` for a fake CPU tensor (ties
    kept: one fake per parameter object); floating parameters in `dtype`."""
    fakes: dict[int, nn.Parameter] = {}
    with mode:
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is None:
                    continue
                if id(param) not in fakes:
                    kind = dtype if param.is_floating_point() else param.dtype
                    fake = torch.empty(param.shape, dtype=kind, device="cpu")
                    fakes[id(param)] = nn.Parameter(fake, requires_grad=param.requires_grad)
                module._parameters[name] = fakes[id(param)]
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = torch.empty(
                        buffer.shape, dtype=buffer.dtype, device="cpu"
                    )
