"""Memory tracer (zero/chunks/tracer.py) and auto placement, on a tiny GPT run through the manager.

`ModuleHooks` (zero/module_hooks.py) over `chunk_sites` is how the engine drives the manager:
access a module's chunks before its forward and before its backward, release them after its
forward and once all of its parameters' gradients are accumulated, prefetch the neighbouring
chunk, end the step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.config import ModelConfig
from shardwise.errors import ConfigError
from shardwise.models.gpt import build_gpt
from shardwise.zero.chunks.chunk import Chunk, Tier, TierIO
from shardwise.zero.chunks.manager import ChunkManager
from shardwise.zero.chunks.packing import (
    build_chunks,
    chunk_sites,
    params_in_execution_order,
    search_chunk_size,
)
from shardwise.zero.chunks.placement import apply_placement, auto_placement, placement_summary
from shardwise.zero.chunks.tracer import MemoryTracer
from shardwise.zero.module_hooks import ModuleHooks
from tests.zero.chunks.test_manager import open_disk

SEQ_LEN, SEED = 16, 0
CPU = torch.device("cpu")


def tiny_model(device: str) -> nn.Module:
    return build_gpt(
        ModelConfig(n_layers=2, d_model=32, n_heads=4), SEQ_LEN, device=device, seed=SEED
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, SEQ_LEN + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def train_step(model: nn.Module) -> torch.Tensor:
    idx, targets = batch()
    loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    loss.backward()
    return loss.detach()


def chunked(model: nn.Module) -> list[Chunk]:
    idx = torch.zeros(1, SEQ_LEN, dtype=torch.long, device=next(model.parameters()).device)
    order = params_in_execution_order(model, lambda: model(idx))
    sizes = [p.numel() * p.element_size() for _, p in order]
    return build_chunks(order, search_chunk_size(sizes, search_range=32 * 1024, step=1024))


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = tiny_model("cpu")
    loss = train_step(model)
    return loss, grads(model)


# -- tracer ------------------------------------------------------------------------------------


def test_trace_covers_every_chunk_and_peaks_at_the_end_of_forward():
    model = tiny_model("cpu")
    chunks = chunked(model)
    io = TierIO.for_device(CPU)
    for chunk in chunks:
        chunk.materialize(Tier.DEVICE, io)
    with MemoryTracer(model, chunks, CPU) as tracer:
        train_step(model)
    trace = tracer.trace()
    forward = [m for m in trace.moments if m.phase == "forward"]
    backward = [m for m in trace.moments if m.phase == "backward"]
    every = set(range(len(chunks)))
    assert {i for m in forward for i in m.chunks} == every
    assert {i for m in backward for i in m.chunks} == every
    assert [m.module for m in forward][:3] == ["embed", "blocks.0.norm1", "blocks.0.attn.qkv"]
    assert forward[-1].module == "head" and backward[0].module == "head"
    assert backward[-1].module == "embed"
    assert trace.moments == tuple(forward + backward)
    non_model = [m.non_model_bytes for m in trace.moments]
    assert all(n > 0 for n in non_model[:-1])
    assert non_model[: len(forward)] == sorted(non_model[: len(forward)])
    assert non_model[len(forward) :] == sorted(non_model[len(forward) :], reverse=True)
    assert trace.peak_non_model_bytes == forward[-1].non_model_bytes > backward[-1].non_model_bytes
    assert all(m.model_bytes == sum(c.nbytes for c in chunks) for m in trace.moments)
    assert trace.uses() == [m.chunks for m in trace.moments]


def test_saved_parameters_are_model_data_not_non_model():
    layer = nn.Linear(64, 64, bias=False)
    (chunk,) = build_chunks([("weight", layer.weight)], 64 * 64 * 4)
    chunk.materialize(Tier.DEVICE, TierIO.for_device(CPU))
    x = torch.randn(1, 64, requires_grad=True)
    with MemoryTracer(layer, [chunk], CPU) as tracer:
        layer(x).sum().backward()
    (fwd, _bwd) = tracer.trace().moments
    assert fwd.non_model_bytes == x.numel() * 4, "only the input is saved besides the weight"


# -- the manager under a budget, driven by hooks ---------------------------------------------------


@pytest.mark.parametrize("disk_kind", ["fake", "real"])
def test_step_under_a_budget_matches_the_unmanaged_model_bit_for_bit(
    reference, disk_kind, tmp_path
):
    with open_disk(disk_kind, tmp_path) as disk:
        run_under_budget(reference, disk)


def run_under_budget(reference, disk) -> None:
    want_loss, want_grads = reference
    model = tiny_model("meta")
    chunks = chunked(model)
    one, total = chunks[0].nbytes, sum(c.nbytes for c in chunks)
    budget = 2 * one
    assert budget < total
    manager = ChunkManager(
        chunks,
        CPU,
        device_budget=budget,
        host_budget=one,
        disk=disk,
        param_init=lambda name, t: model.init_parameter(name, t, SEED),
    )
    ModuleHooks(chunk_sites(model, chunks), chunks, manager)
    for _ in range(2):
        loss = train_step(model)
        manager.end_step()
        assert torch.equal(loss, want_loss)
        got = grads(model)
        for name, grad in want_grads.items():
            assert torch.equal(got[name], grad), name
        model.zero_grad(set_to_none=True)
    assert manager.device_peak_bytes <= budget
    assert manager.memory_report()["disk"] > 0


def test_auto_placement_from_a_warm_up_trace(reference):
    """Warm-up step under the budget (LRU: no schedule yet) traced; auto placement turns the
    trace into per-moment chunk budgets; the next step runs Belady within them."""
    want_loss, want_grads = reference
    model = tiny_model("meta")
    chunks = chunked(model)
    one = chunks[0].nbytes
    init = lambda name, t: model.init_parameter(name, t, SEED)  # noqa: E731
    # Generous for the warm-up, whose non-model bytes are not known yet.
    manager = ChunkManager(chunks, CPU, device_budget=1 << 30, host_budget=None, param_init=init)
    hooks = ModuleHooks(chunk_sites(model, chunks), chunks, manager)
    with MemoryTracer(model, chunks, CPU) as tracer:
        train_step(model)
    manager.end_step()
    model.zero_grad(set_to_none=True)
    trace = tracer.trace()
    heaviest = max(len(m.chunks) for m in trace.moments)

    with pytest.raises(ConfigError, match=r"at head forward .* minimum device_budget is \d+"):
        auto_placement(chunks, trace, trace.peak_non_model_bytes + one // 2)

    budget = trace.peak_non_model_bytes + (heaviest + 1) * one
    placement = auto_placement(chunks, trace, budget)
    assert placement.chunk_budgets == tuple(budget - m.non_model_bytes for m in trace.moments)
    manager.device_budget = budget
    apply_placement(manager, placement)  # chunks exist already: only the schedule is set
    manager.device_peak_bytes, hooks.prefetched = 0, 0
    with MemoryTracer(model, chunks, CPU) as tracer:
        loss = train_step(model)
    manager.end_step()
    assert torch.equal(loss, want_loss)
    assert all(torch.equal(grads(model)[n], g) for n, g in want_grads.items())
    again = tracer.trace().moments
    assert [m.chunks for m in again] == trace.uses()
    for moment, chunk_budget in zip(again, placement.chunk_budgets, strict=True):
        assert moment.model_bytes <= chunk_budget
        assert moment.model_bytes + moment.non_model_bytes <= budget
    assert manager.device_peak_bytes <= budget
    assert hooks.prefetched > 0
    summary = placement_summary(chunks, placement)
    assert "placement auto" in summary and "peak non-model" in summary
    assert "at head forward" in summary


def test_tracer_reports_backward_moments_with_a_manager_running():
    model = tiny_model("meta")
    chunks = chunked(model)
    manager = ChunkManager(
        chunks,
        CPU,
        device_budget=2 * chunks[0].nbytes,
        host_budget=None,
        param_init=lambda name, t: model.init_parameter(name, t, SEED),
    )
    ModuleHooks(chunk_sites(model, chunks), chunks, manager)
    with MemoryTracer(model, chunks, CPU) as tracer:
        train_step(model)
    manager.end_step()
    moments = tracer.trace().moments
    assert max(m.model_bytes for m in moments) <= 2 * chunks[0].nbytes
    assert {i for m in moments if m.phase == "backward" for i in m.chunks} == set(
        range(len(chunks))
    )
