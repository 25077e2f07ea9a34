"""1D (Megatron) layers against their dense twins on two ranks: outputs, input and weight
gradients (fp32, 1e-5 relative), and the bytes each layer puts on the wire (closed forms)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.distributed import comm, cost
from shardwise.distributed.dims import ParallelDims
from shardwise.errors import ConfigError
from shardwise.tensor_parallel import Plan, TensorParallelContext, apply_tensor_parallel
from shardwise.tensor_parallel.one_d import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallelNorm,
    SequenceSlice,
    VocabParallel,
    cross_entropy_wire_bytes,
    embedding_wire_bytes,
    linear_wire_bytes,
    vocab_parallel_loss,
)
from shardwise.tensor_parallel.plan import split, split_fused
from tests.tensor_parallel import assert_rel_close, assert_wire, run_recorded

B, T, H, F_HIDDEN, VOCAB = 2, 4, 8, 6, 16
TP = 2


def _context() -> TensorParallelContext:
    return TensorParallelContext(ParallelDims.tensor_parallel(TP).build_mesh("cpu"), "1d")


def _seq_shard(t: torch.Tensor, sp: bool, rank: int) -> torch.Tensor:
    return split(t, 1, TP, rank) if sp else t


def _mlp_pair(sp: bool) -> dict[str, float]:
    """Column then row linear (both with bias) against nn.Linear, and a fused q|k|v column
    linear; returns the pair's wire bytes measured forward and backward."""
    ctx = _context()
    rank = ctx.rank("tp")
    torch.manual_seed(0)
    dense_up, dense_down = nn.Linear(H, F_HIDDEN), nn.Linear(F_HIDDEN, H)
    col = ColwiseParallel(sequence_parallel=sp).apply(copy.deepcopy(dense_up), ctx)
    row = RowwiseParallel(sequence_parallel=sp).apply(copy.deepcopy(dense_down), ctx)
    x = torch.randn(B, T, H, requires_grad=True)
    probe = torch.randn(B, T, H)

    dense_y = dense_down(F.gelu(dense_up(x)))
    (dense_y * probe).sum().backward()

    x_local = _seq_shard(x.detach(), sp, rank).requires_grad_()
    pair = nn.Sequential(col, nn.GELU(), row)
    y, wire = run_recorded(pair, x_local, _seq_shard(probe, sp, rank))

    assert_rel_close(y, _seq_shard(dense_y.detach(), sp, rank), "output")
    assert_rel_close(x_local.grad, _seq_shard(x.grad, sp, rank), "input grad")
    assert_rel_close(col.weight.grad, split(dense_up.weight.grad, 0, TP, rank), "col W")
    assert_rel_close(col.bias.grad, split(dense_up.bias.grad, 0, TP, rank), "col bias")
    assert_rel_close(row.weight.grad, split(dense_down.weight.grad, 1, TP, rank), "row W")
    assert_rel_close(row.bias.grad, dense_down.bias.grad, "row bias (replicated)")

    # A fused output [q | k | v]: each rank holds [q_r | k_r | v_r].
    dense_qkv = nn.Linear(H, 3 * F_HIDDEN)
    qkv = ColwiseParallel(fused=3, sequence_parallel=sp).apply(copy.deepcopy(dense_qkv), ctx)
    dense_out = dense_qkv(x.detach())
    (dense_out * dense_out).sum().backward()
    out = qkv(x_local.detach())
    (out * out).sum().backward()
    assert_rel_close(out, split_fused(dense_out.detach(), -1, 3, TP, rank), "fused output")
    assert_rel_close(qkv.weight.grad, split_fused(dense_qkv.weight.grad, 0, 3, TP, rank), "W")
    return wire


def _embedding(sp: bool) -> cost.WireBytes:
    ctx = _context()
    rank = ctx.rank("tp")
    torch.manual_seed(1)
    dense = nn.Embedding(VOCAB, H)
    embed = VocabParallel(sequence_parallel=sp).apply(copy.deepcopy(dense), ctx)
    ids = torch.randint(0, VOCAB, (B, T))
    probe = torch.randn(B, T, H)
    (dense(ids) * probe).sum().backward()
    out, wire = run_recorded(embed, ids, _seq_shard(probe, sp, rank))
    assert_rel_close(out, _seq_shard(dense(ids).detach(), sp, rank), "embedding output")
    assert_rel_close(embed.weight.grad, split(dense.weight.grad, 0, TP, rank), "embedding W")
    return wire


def _cross_entropy() -> cost.WireBytes:
    ctx = _context()
    rank = ctx.rank("tp")
    torch.manual_seed(2)
    logits = torch.randn(B, T, VOCAB, requires_grad=True)
    targets = torch.randint(0, VOCAB, (B, T))
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    local = split(logits.detach(), -1, TP, rank).requires_grad_()
    with comm.CommStats() as forward:
        loss = vocab_parallel_loss(ctx)(local, targets)
    with comm.CommStats() as backward:
        loss.backward()
    want = F.cross_entropy(logits.detach().flatten(0, 1), targets.flatten())
    assert_rel_close(loss, want, "loss")
    assert_rel_close(local.grad, split(logits.grad, -1, TP, rank), "logit grad")
    return {"forward": forward.wire_by_axis_op(), "backward": backward.wire_by_axis_op()}


def _sequence_parallel_norm_and_positions() -> None:
    ctx = _context()
    rank = ctx.rank("tp")
    torch.manual_seed(3)
    dense = nn.LayerNorm(H)
    with torch.no_grad():
        dense.weight.uniform_(0.5, 1.5)
        dense.bias.uniform_(-0.5, 0.5)
    norm = SequenceParallelNorm().apply(copy.deepcopy(dense), ctx)
    x = torch.randn(B, T, H)
    probe = torch.randn(B, T, H)
    (dense(x) * probe).sum().backward()
    out = norm(split(x, 1, TP, rank))
    (out * split(probe, 1, TP, rank)).sum().backward()
    assert_rel_close(out, split(dense(x).detach(), 1, TP, rank), "norm output")
    assert_rel_close(norm.weight.grad, dense.weight.grad, "norm weight (all-reduced)")
    assert_rel_close(norm.bias.grad, dense.bias.grad, "norm bias (all-reduced)")

    positions = nn.Embedding(T, H)
    table_grad_probe = torch.randn(T, H)
    local = SequenceSlice(dim=0).apply(positions, ctx)(torch.arange(T))
    (local * split(table_grad_probe, 0, TP, rank)).sum().backward()
    assert local.shape == (T // TP, H)
    assert_rel_close(positions.weight.grad, table_grad_probe, "position table grad (gathered)")


def _bad_plans() -> list[str]:
    ctx = _context()
    errors = []
    for attempt in (
        lambda: ColwiseParallel().apply(nn.Embedding(VOCAB, H), ctx),
        lambda: VocabParallel().apply(nn.Linear(H, H), ctx),
        lambda: apply_tensor_parallel(
            nn.Sequential(nn.Linear(H, H)),
            ctx.mesh,
            Plan(mode="1d", layers={"nothing.*": ColwiseParallel()}, loss=vocab_parallel_loss),
        ),
        lambda: _tied_two_ways(ctx),
        lambda: ColwiseParallel().apply(nn.Linear(H, 3), ctx),
    ):
        with pytest.raises(ConfigError) as info:
            attempt()
        errors.append(str(info.value))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(H, H))
    plan = Plan(mode="1d", layers={"0": ColwiseParallel()}, loss=vocab_parallel_loss)
    with pytest.raises(ConfigError, match="materialised"):
        apply_tensor_parallel(meta, ctx.mesh, plan)
    return errors


def _tied_two_ways(ctx: TensorParallelContext) -> None:
    first, second = nn.Linear(H, H, bias=False), nn.Linear(H, H, bias=False)
    second.weight = first.weight
    ColwiseParallel().apply(first, ctx)
    RowwiseParallel().apply(second, ctx)


@pytest.mark.parametrize("sp", [False, True], ids=["plain", "sequence-parallel"])
def test_column_row_pair_matches_dense_and_closed_form(pool2, sp):
    col = linear_wire_bytes(B * T, H, TP, 4, row=False, sequence_parallel=sp)
    row = linear_wire_bytes(B * T, H, TP, 4, row=True, sequence_parallel=sp, bias=True)
    for got in pool2.run(_mlp_pair, sp):
        assert_wire(got, cost.wire_sum(col, row), "column + row linear")


@pytest.mark.parametrize("sp", [False, True], ids=["plain", "sequence-parallel"])
def test_vocab_parallel_embedding_matches_dense_and_closed_form(pool2, sp):
    want = embedding_wire_bytes(B * T, H, TP, 4, sequence_parallel=sp)
    for got in pool2.run(_embedding, sp):
        assert_wire(got, want, "embedding")


def test_vocab_parallel_cross_entropy_matches_dense_without_full_logits(pool2):
    want = cross_entropy_wire_bytes(B * T, TP)
    for got in pool2.run(_cross_entropy):
        assert_wire(got, want, "cross-entropy")


def test_sequence_parallel_norm_and_position_slice(pool2):
    pool2.run(_sequence_parallel_norm_and_positions)


def test_bad_plans_are_clear_errors(pool2):
    errors = pool2.run(_bad_plans)[0]
    assert "ColwiseParallel applies to Linear, not Embedding" in errors[0]
    assert "VocabParallel applies to Embedding, not Linear" in errors[1]
    assert "'nothing.*' matches no module" in errors[2]
    assert "split two ways" in errors[3]
    assert "does not split into 2 equal blocks" in errors[4]
