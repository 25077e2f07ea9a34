"""Chunks (zero/chunks/chunk.py): size search, execution order, packing, state table, tier moves."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from shardwise.config import ModelConfig
from shardwise.models.gpt import build_gpt
from shardwise.zero.chunks.chunk import (
    _TRANSITIONS,
    Chunk,
    ChunkEvent,
    ChunkState,
    ChunkStateError,
    Tier,
    TierIO,
    build_grad_chunks,
)
from shardwise.zero.chunks.packing import (
    build_chunks,
)
from tests.zero.chunks.test_manager import FakeDisk, bits, make_chunks, same_bits

SEQ_LEN = 16


def tiny_gpt(device: str = "cpu") -> nn.Module:
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4)
    return build_gpt(cfg, SEQ_LEN, device=device)


def test_materialise_from_meta_fills_with_param_init_on_host():
    with torch.device("meta"):
        param = nn.Parameter(torch.empty(3, 2))
    (chunk,) = build_chunks([("w", param)], 64)
    chunk.materialize(Tier.HOST, TierIO.for_device(torch.device("cpu")), lambda n, t: t.fill_(7))
    assert not param.is_meta and param.untyped_storage().nbytes() == 0
    assert chunk.tier is Tier.HOST and torch.equal(chunk.host[:6], torch.full((6,), 7.0))
    assert torch.equal(chunk.host[6:], torch.zeros(10)), "padding is zero"


# -- state table -------------------------------------------------------------------------------


def chunk_in(state: ChunkState) -> Chunk:
    chunk = make_chunks([4], 4)[0]
    chunk.state = state
    chunk.users = 1 if state is ChunkState.COMPUTE else 0
    return chunk


@pytest.mark.parametrize(("state", "event"), list(_TRANSITIONS))
def test_every_legal_transition(state, event):
    chunk = chunk_in(state)
    chunk.apply(event)
    assert chunk.state is _TRANSITIONS[state, event]


ILLEGAL = [k for k in itertools.product(ChunkState, ChunkEvent) if k not in _TRANSITIONS]


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_illegal_transition_raises_naming_state_and_event(state, event):
    with pytest.raises(ChunkStateError, match=f"{event.name} is not legal in state {state.name}"):
        chunk_in(state).apply(event)


def test_a_step_walks_the_lifecycle():
    chunk = chunk_in(ChunkState.FREE)
    path = [ChunkState.FREE]
    for event in [
        ChunkEvent.MATERIALIZE,
        ChunkEvent.ACCESS,
        ChunkEvent.RELEASE_FWD,
        ChunkEvent.ACCESS,
        ChunkEvent.RELEASE_BWD,
        ChunkEvent.END_STEP,
    ]:
        chunk.apply(event)
        path.append(chunk.state)
    S = ChunkState
    assert path == [S.FREE, S.HOLD, S.COMPUTE, S.HOLD_AFTER_FWD, S.COMPUTE, S.HOLD_AFTER_BWD,
                    S.HOLD]  # fmt: skip


# -- tier moves --------------------------------------------------------------------------------


def test_moves_are_refused_while_compute_or_free_or_to_the_same_tier():
    io = TierIO.for_device(torch.device("cpu"), FakeDisk())
    chunk = make_chunks([4], 4)[0]
    with pytest.raises(ChunkStateError, match="cannot move nowhere -> HOST in state FREE"):
        chunk.move(Tier.HOST, io)
    chunk.materialize(Tier.DEVICE, io)
    chunk.apply(ChunkEvent.ACCESS)
    with pytest.raises(ChunkStateError, match="cannot move DEVICE -> HOST in state COMPUTE"):
        chunk.move(Tier.HOST, io)
    chunk.apply(ChunkEvent.RELEASE_FWD)
    with pytest.raises(ChunkStateError, match="DEVICE -> DEVICE is not a legal move"):
        chunk.move(Tier.DEVICE, io)


@pytest.mark.parametrize(
    "path",
    [
        [Tier.HOST, Tier.DEVICE],
        [Tier.HOST, Tier.DISK, Tier.HOST, Tier.DEVICE],
        [Tier.DISK, Tier.DEVICE],
        [Tier.DISK, Tier.HOST, Tier.DISK, Tier.DEVICE],
    ],
)
def test_tier_round_trips_are_bit_exact_and_free_what_they_leave(path):
    disk = FakeDisk()
    io = TierIO.for_device(torch.device("cpu"), disk)
    chunk = make_chunks([5, 7], 16, seed=3)[0]
    chunk.materialize(Tier.DEVICE, io)
    want = bits(chunk)
    for step, tier in enumerate(path):
        chunk.move(tier, io)
        assert chunk.tier is tier
        on_device = chunk.payload.untyped_storage().nbytes()
        assert on_device == (chunk.nbytes if tier is Tier.DEVICE else 0)
        assert (chunk.host is not None) == (tier is Tier.HOST)
        assert (chunk.key in disk.store) == chunk.on_disk == (Tier.DISK in path[: step + 1])
    assert same_bits(bits(chunk), want)
    written = int(Tier.DISK in path)
    assert disk.writes == written, "an unchanged chunk is written once: its disk copy stays"
    chunk.modified(io)
    assert chunk.key not in disk.store and not chunk.on_disk


def test_a_changed_chunk_is_written_again_and_read_back_changed():
    disk = FakeDisk()
    io = TierIO.for_device(torch.device("cpu"), disk)
    chunk = make_chunks([5, 7], 16, seed=3)[0]
    chunk.materialize(Tier.DISK, io)
    chunk.move(Tier.DEVICE, io)
    chunk.move(Tier.DISK, io)  # clean: nothing written
    assert disk.writes == 1
    chunk.move(Tier.DEVICE, io)
    chunk.modified(io)
    chunk.payload.data.add_(1.0)
    want = bits(chunk)
    chunk.move(Tier.DISK, io)
    chunk.move(Tier.DEVICE, io)
    assert disk.writes == 2 and same_bits(bits(chunk), want)


def test_refilling_does_not_look_like_an_inplace_change_to_autograd():
    io = TierIO.for_device(torch.device("cpu"))
    chunk = make_chunks([4], 4)[0]
    chunk.materialize(Tier.DEVICE, io)
    (weight,) = (s.param for s in chunk.slots)
    x = torch.ones(4, requires_grad=True)
    loss = (x * weight).sum()  # saves weight for x's gradient
    chunk.move(Tier.HOST, io)
    chunk.move(Tier.DEVICE, io)
    loss.backward()
    assert torch.equal(x.grad, weight.detach())


@pytest.mark.parametrize("via", [[Tier.HOST], [Tier.DISK], [Tier.HOST, Tier.DISK]])
def test_gradient_chunks_share_the_layout_leave_the_parameters_alone_and_discard(via):
    disk = FakeDisk()
    io = TierIO.for_device(torch.device("cpu"), disk)
    chunks = make_chunks([5, 7, 9], 16, seed=1)
    for chunk in chunks:
        chunk.materialize(Tier.DEVICE, io)
    want = [bits(c) for c in chunks]
    grads = build_grad_chunks(chunks)
    assert [(g.index, g.key, g.numel) for g in grads] == [(2, "grads.0", 16), (3, "grads.1", 16)]
    grad = grads[0]
    assert grad.slots is chunks[0].slots
    grad.materialize(Tier.DEVICE, io)
    for slot in grad.slots:
        grad.grad_view(slot).fill_(slot.offset + 1.0)
    for tier in [*via, Tier.DEVICE]:
        grad.move(tier, io)
    for slot in grad.slots:
        assert torch.equal(grad.grad_view(slot), torch.full(slot.param.shape, slot.offset + 1.0))
    assert all(same_bits(bits(c), b) for c, b in zip(chunks, want, strict=True)), (
        "parameters are not views of the gradient chunk"
    )
    grad.move(via[-1], io)
    grad.discard(io)
    assert grad.state is ChunkState.FREE and grad.tier is None and grad.host is None
    assert grad.key not in disk.store and grad.payload is None
    grad.materialize(Tier.DEVICE, io)  # the next step's backward
    assert grad.payload.untyped_storage().nbytes() == grad.nbytes


def test_gradient_chunks_reuse_freed_buffers_where_the_allocator_does_not():
    """On the CPU a gradient chunk leaving the device keeps its buffer for the next one of
    its size, so a step does not fault in fresh pages for every gradient chunk; where the
    allocator caches (CUDA) nothing is kept."""
    io = TierIO.for_device(torch.device("cpu"))
    assert io.recycles
    grads = build_grad_chunks(make_chunks([5, 7, 9], 16, seed=1))
    grads[0].materialize(Tier.DEVICE, io)
    first = grads[0].payload.data_ptr()
    grads[0].discard(io)
    grads[1].materialize(Tier.DEVICE, io)
    assert grads[1].payload.data_ptr() == first
    grads[1].discard(io)
    assert len(io.recycled[(16, torch.float32)]) == 1, "no more than were in use at once"
    caching = TierIO(torch.device("cpu"), recycles=False)
    caching.recycle(torch.empty(16))
    assert not caching.recycled
