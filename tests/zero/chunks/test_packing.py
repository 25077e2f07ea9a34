"""Packing parameters into chunks (zero/chunks/packing.py): order, sizes, padding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardwise.errors import ConfigError
from shardwise.zero.chunks.chunk import ChunkState, Tier, TierIO
from shardwise.zero.chunks.packing import (
    build_chunks,
    chunk_waste,
    chunks_of_modules,
    pack,
    params_in_execution_order,
    search_chunk_size,
)
from tests.zero.chunks.test_chunk import SEQ_LEN, tiny_gpt

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
