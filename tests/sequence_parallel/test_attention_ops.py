"""Ring, Ulysses and hybrid (ring x Ulysses) attention at sp=2 and 4 against dense attention
on one process: each rank attends its part of the sequence; its outputs and its parts of the
q, k, v gradients equal the dense ones at the same positions (fp32, 1e-5), causal, full and
document-masked (packed sequences), with grouped-query attention (fewer kv heads); bytes
sent equal the closed forms."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from shardwise.distributed.comm import CommStats
from shardwise.errors import ConfigError
from shardwise.sequence_parallel import (
    contiguous_positions,
    hybrid_attention,
    hybrid_positions,
    ring,
    ring_attention,
    ulysses_attention,
    visible,
    zigzag_positions,
)

OPS = {
    "ring": (ring_attention, zigzag_positions),
    "ulysses": (ulysses_attention, contiguous_positions),
}
MASKS = {"causal": (True, False), "full": (False, False), "documents": (True, True)}
BATCH, HEADS, DIM = 2, 4, 8


def whole(seq: int, kv_heads: int, documents: bool, heads: int = HEADS):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(BATCH, heads, seq, DIM, generator=gen)
    k, v = (torch.randn(BATCH, kv_heads, seq, DIM, generator=gen) for _ in range(2))
    grad = torch.randn(BATCH, heads, seq, DIM, generator=gen)
    doc_ids = None
    if documents:  # a few documents of random lengths per row
        starts = torch.rand(BATCH, seq, generator=gen) < 0.2
        doc_ids = starts.cumsum(-1)
    return q, k, v, grad, doc_ids


def dense(q, k, v, grad, causal, doc_ids):
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    positions = torch.arange(q.shape[2])
    mask = visible(positions, positions, causal, doc_ids)
    out = F.scaled_dot_product_attention(
        *inputs, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
    )
    out.backward(grad)
    return [out.detach(), *(t.grad for t in inputs)]


def small_tiles(fn):
    """Run `fn` with ring attention's tiles of 3 positions (its parts here hold 8 or 16), so
    tiles split blocks unevenly and the causal mask hides whole tile pairs (skipped)."""

    @functools.wraps(fn)
    def run(*args):
        default, ring.TILE = ring.TILE, 3
        try:
            return fn(*args)
        finally:
            ring.TILE = default

    return run


@small_tiles
def parts_match(kind: str, mask: str, kv_heads: int) -> None:
    """On every rank: this rank's part against the dense result at its positions."""
    op, positions_of = OPS[kind]
    causal, documents = MASKS[mask]
    rank, ranks = dist.get_rank(), dist.get_world_size()
    seq = 8 * ranks
    q, k, v, grad, doc_ids = whole(seq, kv_heads, documents)
    want = dense(q, k, v, grad, causal, doc_ids)
    mine = positions_of(seq, rank, ranks)
    local = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
    with CommStats() as stats:
        out = op(*local, None, causal=causal, doc_ids=doc_ids)
        out.backward(grad[:, :, mine])
    got = [out.detach(), *(t.grad for t in local)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b[:, :, mine], rtol=1e-5, atol=1e-6, msg=name)
    ops = stats.as_dict()["world"]
    block = 2 * local[1].nbytes  # k and v of this rank's part (fp32: their gradients' size too)
    if kind == "ring":  # k, v forward and backward over sp - 1 hops; dk, dv over sp hops
        assert ops["send"]["wire_bytes"] == 2 * (ranks - 1) * block + ranks * block
    else:  # q, k, v and the output: all-to-all forward and backward, (sp - 1)/sp of each
        kv = block if kv_heads % ranks == 0 else 2 * local[0].nbytes
        moved = 2 * (2 * local[0].nbytes + kv) * (ranks - 1) / ranks
        assert ops["all_to_all"]["calls"] == 8
        assert ops["all_to_all"]["wire_bytes"] == pytest.approx(moved)


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("kind", list(OPS))
def test_two_ranks(pool2, kind, mask, kv_heads):
    pool2.run(parts_match, kind, mask, kv_heads)


@pytest.mark.parametrize("kv_heads", [HEADS, 1], ids=["mha", "gqa-one-kv-head"])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("kind", list(OPS))
def test_four_ranks(pool4, kind, mask, kv_heads):
    pool4.run(parts_match, kind, mask, kv_heads)


@small_tiles
def hybrid_parts_match(mask: str, heads: int, kv_heads: int) -> None:
    """On every rank of a 2 (ring) x 2 (Ulysses) mesh: this rank's part against dense."""
    from torch.distributed.device_mesh import init_device_mesh

    causal, documents = MASKS[mask]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    seq = 32
    q, k, v, grad, doc_ids = whole(seq, kv_heads, documents, heads)
    want = dense(q, k, v, grad, causal, doc_ids)
    ring, ulysses = mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses")
    mine = hybrid_positions(seq, ring, 2, ulysses, 2)
    local = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
    out = hybrid_attention(*local, mesh["ring"], mesh["ulysses"], causal=causal, doc_ids=doc_ids)
    out.backward(grad[:, :, mine])
    got = [out.detach(), *(t.grad for t in local)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b[:, :, mine], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("mask", "heads", "kv_heads"),
    [("causal", 2, 2), ("full", 4, 2), ("documents", 2, 1)],
    ids=["causal-sp-above-heads", "full-gqa", "documents-one-kv-head"],
)
def test_hybrid_two_by_two(pool4, mask, heads, kv_heads):
    """sp = 4 as ring 2 x Ulysses 2: with 2 heads, an sp Ulysses alone cannot reach."""
    pool4.run(hybrid_parts_match, mask, heads, kv_heads)


def heads_not_dividing(ranks: int) -> str:
    q = torch.randn(1, 3, 4, DIM)
    try:
        ulysses_attention(q, q, q, None)
    except ConfigError as err:
        return str(err)
    return "no error"


def test_bad_shapes_are_one_line_errors(pool2):
    message = pool2.run(heads_not_dividing, 2)[0]
    assert "3 attention heads do not split over Ulysses' sp=2" in message
    assert "hybrid" in message and "\n" not in message
    with pytest.raises(ConfigError, match="does not split into 2 x sp = 8 equal chunks"):
        zigzag_positions(12, 0, 4)
