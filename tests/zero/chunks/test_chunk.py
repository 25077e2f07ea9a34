"""Chunks (zero/chunks/chunk.py): size search, execution order, packing, state table, tier moves."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from shardwise.config import ModelConfig
from shardwise.errors import ConfigError
from shardwise.models.gpt import build_gpt
from shardwise.zero.chunks.chunk import (
    _TRANSITIONS,
    Chunk,
    ChunkEvent,
    ChunkState,
    ChunkStateError,
    Tier,
    TierIO,
    build_chunks,
    build_grad_chunks,
    chunk_waste,
    chunks_of_modules,
    pack,
    params_in_execution_order,
    search_chunk_size,
)
from tests.zero.chunks.test_manager import FakeDisk, bits, make_chunks, same_bits

SEQ_LEN = 16


def tiny_gpt(device: str = "cpu") -> nn.Module:
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4)
    return build_gpt(cfg, SEQ_LEN, device=device)


# -- size search -------------------------------------------------------------------------------


def test_pack_keeps_order_and_never_straddles():
    assert pack([5, 4, 3, 2, 2], 6) == [[0], [1], [2, 3], [4]]
    assert pack([5, 4, 3, 2, 2], 7) == [[0], [1, 2], [3, 4]]
    assert pack([0, 3, 0, 3], 3) == [[0, 1, 2], [3]]
    with pytest.raises(ConfigError, match="parameter of 9 bytes does not fit in chunk_bytes=8"):
        pack([3, 9], 8)


@pytest.mark.parametrize(
    ("sizes", "search_range", "step", "want", "waste"),
    [
        ([3, 3, 3, 3], 3, 1, 3, 0),  # 6 wastes nothing too: ties go to the smaller size
        ([5, 4, 3, 2, 2], 3, 1, 5, 4),  # 5: [5][4][3,2][2]; 6 wastes 8, 7 wastes 5, 8 wastes 8
        ([6, 2, 6, 2], 2, 2, 8, 0),  # 6: [6][2][6][2] wastes 8; 8: [6,2][6,2] wastes 0
        ([6, 2, 6, 2], 1, 2, 6, 8),  # the range stops before 8
    ],
)
def test_search_chunk_size_minimises_padding(sizes, search_range, step, want, waste):
    assert search_chunk_size(sizes, search_range=search_range, step=step) == want
    assert chunk_waste(sizes, want) == waste


def test_search_starts_at_the_largest_parameter_or_the_minimum():
    assert search_chunk_size([7, 1], search_range=0, step=1) == 7
    assert search_chunk_size([7, 1], search_range=0, step=1, min_chunk_bytes=16) == 16
    with pytest.raises(ConfigError, match="step > 0"):
        search_chunk_size([7], search_range=4, step=0)


# -- execution order and building ---------------------------------------------------------------


class Reordered(nn.Module):
    """Registers `late` before `early` but calls `early` first; `unused` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.early = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(self.early(x))


def test_execution_order_is_first_use_then_registration():
    model = Reordered()
    names = [n for n, _ in params_in_execution_order(model, lambda: model(torch.zeros(1, 4)))]
    assert names == [
        "early.weight", "early.bias", "late.weight", "late.bias", "unused.weight", "unused.bias"
    ]  # fmt: skip


def test_gpt_order_on_meta_with_tied_head_once():
    model = tiny_gpt("meta")
    idx = torch.zeros(1, SEQ_LEN, dtype=torch.long, device="meta")
    order = params_in_execution_order(model, lambda: model(idx))
    names = [n for n, _ in order]
    assert names[0] == "embed.weight" and names[-2:] == ["norm_f.weight", "norm_f.bias"]
    assert names.index("blocks.0.mlp.down.weight") < names.index("blocks.1.norm1.weight")
    assert len(names) == len(set(names)) == len(list(model.parameters()))


def test_built_chunks_hold_whole_parameters_and_keep_values():
    model = tiny_gpt()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    order = params_in_execution_order(model, lambda: model(torch.zeros(1, 4, dtype=torch.long)))
    sizes = [p.numel() * 4 for _, p in order]
    chunk_bytes = search_chunk_size(sizes, search_range=16 * 1024, step=1024)
    chunks = build_chunks(order, chunk_bytes)
    assert [s.name for c in chunks for s in c.slots] == [n for n, _ in order]
    io = TierIO.for_device(torch.device("cpu"))
    for chunk in chunks:
        assert chunk.state is ChunkState.FREE and chunk.nbytes == chunk_bytes
        assert all(s.offset + s.numel <= chunk.numel for s in chunk.slots)
        chunk.materialize(Tier.DEVICE, io)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), reference[name])
    payload_of = {id(s.param): c.payload for c in chunks for s in c.slots}
    for param in model.parameters():
        assert param.untyped_storage().data_ptr() == payload_of[id(param)].data_ptr()
    assert model.head.weight is model.embed.weight
    used = chunks_of_modules(model, chunks)
    assert set(used) >= {"embed", "head", "blocks.0.attn.qkv", "norm_f"}
    assert used["head"] == used["embed"]
    assert sum(c.used_numel for c in chunks) * 4 + chunk_waste(sizes, chunk_bytes) == (
        len(chunks) * chunk_bytes
    )


def test_a_dtype_change_starts_a_new_chunk():
    params = [
        ("a", nn.Parameter(torch.zeros(2))),
        ("b", nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))),
        ("c", nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))),
    ]
    chunks = build_chunks(params, 64)
    assert [[s.name for s in c.slots] for c in chunks] == [["a"], ["b", "c"]]
    assert [c.numel for c in chunks] == [16, 32]


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
    assert grad.key not in disk.store and grad.payload.untyped_storage().nbytes() == 0
    grad.materialize(Tier.DEVICE, io)  # the next step's backward
    assert grad.payload.untyped_storage().nbytes() == grad.nbytes
