"""3D tensor parallelism on the 2 x 2 x 2 cube (pool8): every layer and the whole GPT against
their dense twins (fp32, 1e-5 relative), the bytes each layer puts on the wire against the
closed forms, and the errors of a wrong plan or batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.config import ModelConfig
from shardwise.distributed.dims import ParallelDims
from shardwise.errors import ConfigError
from shardwise.models.gpt import build_gpt, gpt_config_from
from shardwise.models.gpt_plans import gpt_plan_3d, gpt_split_factors_3d
from shardwise.tensor_parallel import TensorParallelContext, apply_tensor_parallel
from shardwise.tensor_parallel.plan import split, split_fused
from shardwise.tensor_parallel.three_d import (
    Embedding3D,
    LayerNorm3D,
    Linear3D,
    embedding_wire_bytes,
    layer_norm_wire_bytes,
    linear_wire_bytes,
    loss_3d,
)
from tests.parity import SEQ, TINY
from tests.tensor_parallel import assert_rel_close, assert_wire, run_recorded

Q = 2
B, T, D_IN, D_OUT, VOCAB = 4, 3, 8, 12, 16
LINEARS = [("P", 1, False), ("P", 3, True), ("S", 1, False), ("S", 3, False)]
"""(input layout, fused, bias) of the linears checked."""


def _context() -> TensorParallelContext:
    return TensorParallelContext(ParallelDims.tensor_parallel(Q**3, "3d").build_mesh("cpu"), "3d")


def _cube(ctx: TensorParallelContext) -> tuple[int, int, int]:
    return ctx.rank("tp_dep"), ctx.rank("tp_row"), ctx.rank("tp_col")


def _local(t: torch.Tensor, layout: str, cube: tuple[int, int, int], fused: int = 1):
    """This rank's block of a dense [B, ..., features] activation (see [Note: 3D layouts])."""
    a, b, c = cube
    rows, features = (a * Q + b, c) if layout == "P" else (a * Q + c, b)
    return split_fused(split(t, 0, Q * Q, rows), -1, fused, Q, features)


def _weight_shard(t: torch.Tensor, layout: str, cube: tuple[int, int, int], fused: int = 1):
    a, b, c = cube
    out_index, in_index = (b, c) if layout == "P" else (c, b)
    return split(split(split_fused(t, 0, fused, Q, out_index), 0, Q, a), 1, Q, in_index)


def _linear(ctx, layout: str, fused: int, bias: bool) -> dict:
    cube = _cube(ctx)
    dense = nn.Linear(D_IN, D_OUT, bias=bias)
    layer = Linear3D(layout, fused=fused).apply(copy.deepcopy(dense), ctx)
    x, probe = torch.randn(B, T, D_IN, requires_grad=True), torch.randn(B, T, D_OUT)
    (dense(x) * probe).sum().backward()
    out = "S" if layout == "P" else "P"
    x_local = _local(x.detach(), layout, cube).requires_grad_()
    y, wire = run_recorded(layer, x_local, _local(probe, out, cube, fused))
    what = f"linear {layout}->{out} fused={fused}"
    assert_rel_close(y, _local(dense(x).detach(), out, cube, fused), f"{what} output")
    assert_rel_close(x_local.grad, _local(x.grad, layout, cube), f"{what} input grad")
    want_w = _weight_shard(dense.weight.grad, layout, cube, fused)
    assert_rel_close(layer.weight.grad, want_w, f"{what} weight grad")
    if bias:
        want_b = split_fused(dense.bias.grad, 0, fused, Q, cube[1 if layout == "P" else 2])
        assert_rel_close(layer.bias.grad, want_b, f"{what} bias grad")
    return wire


def _layer_norm(ctx) -> dict:
    cube = _cube(ctx)
    dense = nn.LayerNorm(D_IN)
    with torch.no_grad():
        dense.weight.uniform_(0.5, 1.5)
        dense.bias.uniform_(-0.5, 0.5)
    norm = LayerNorm3D().apply(copy.deepcopy(dense), ctx)
    x, probe = 3 * torch.randn(B, T, D_IN) + 1, torch.randn(B, T, D_IN)
    x.requires_grad_()
    (dense(x) * probe).sum().backward()
    x_local = _local(x.detach(), "P", cube).requires_grad_()
    y, wire = run_recorded(norm, x_local, _local(probe, "P", cube))
    assert_rel_close(y, _local(dense(x).detach(), "P", cube), "norm output")
    assert_rel_close(x_local.grad, _local(x.grad, "P", cube), "norm input grad")
    assert_rel_close(norm.weight.grad, split(dense.weight.grad, 0, Q, cube[2]), "norm weight")
    assert_rel_close(norm.bias.grad, split(dense.bias.grad, 0, Q, cube[2]), "norm bias")
    return wire


def _embedding(ctx) -> dict:
    cube = _cube(ctx)
    dense = nn.Embedding(VOCAB, D_IN)
    embed = Embedding3D().apply(copy.deepcopy(dense), ctx)
    ids, probe = torch.randint(0, VOCAB, (B, T)), torch.randn(B, T, D_IN)
    (dense(ids) * probe).sum().backward()
    y, wire = run_recorded(embed, ids, _local(probe, "P", cube))
    assert_rel_close(y, _local(dense(ids).detach(), "P", cube), "embedding output")
    assert_rel_close(embed.weight.grad, _weight_shard(dense.weight.grad, "P", cube), "table grad")
    return wire


def _tied_head_and_loss(ctx) -> None:
    """Embedding -> head (tied, one shard) -> loss against dense cross-entropy."""
    cube = _cube(ctx)
    dense_embed, dense_head = nn.Embedding(VOCAB, D_IN), nn.Linear(D_IN, VOCAB, bias=False)
    dense_head.weight = dense_embed.weight
    embed, head = copy.deepcopy(dense_embed), copy.deepcopy(dense_head)
    head.weight = embed.weight
    embed, head = Embedding3D().apply(embed, ctx), Linear3D("P").apply(head, ctx)
    assert head.weight is embed.weight, "the tied head must share the embedding's shard"
    ids, targets = torch.randint(0, VOCAB, (B, T)), torch.randint(0, VOCAB, (B, T))
    want = F.cross_entropy(dense_head(dense_embed(ids)).flatten(0, 1), targets.flatten())
    want.backward()
    loss = loss_3d(ctx)(head(embed(ids)), targets)
    loss.backward()
    assert_rel_close(loss, want.detach(), "loss")
    want_w = _weight_shard(dense_embed.weight.grad, "P", cube)
    assert_rel_close(embed.weight.grad, want_w, "tied table grad (embedding + head)")


def _layers() -> dict:
    ctx = _context()
    torch.manual_seed(0)  # every rank draws the same dense layers and data
    wires = {f"linear {lay}/{f}": _linear(ctx, lay, f, bias) for lay, f, bias in LINEARS}
    wires["layer_norm"] = _layer_norm(ctx)
    wires["embedding"] = _embedding(ctx)
    _tied_head_and_loss(ctx)
    return wires


def _gpt(ctx, mlp: str, tie: bool) -> None:
    model_cfg = ModelConfig(**TINY, mlp=mlp, tie_embeddings=tie)
    plan = gpt_plan_3d(gpt_config_from(model_cfg, SEQ))
    dense = build_gpt(model_cfg, SEQ, seed=3)
    model = build_gpt(model_cfg, SEQ, seed=3)
    tp = apply_tensor_parallel(model, ctx.mesh, plan)
    gen = torch.Generator().manual_seed(5)
    rows = torch.randint(0, model_cfg.vocab_size, (Q * Q, SEQ + 1), generator=gen)
    ids, targets = rows[:, :-1], rows[:, 1:]
    want = F.cross_entropy(dense(ids).flatten(0, 1), targets.flatten())
    want.backward()
    loss = tp.loss_fn(model(ids), targets)
    loss.backward()
    what = f"gpt mlp={mlp} tie={tie}"
    assert_rel_close(loss, want.detach(), f"{what} loss")
    # The expected gradient shards: the plan applied to a model holding the dense gradients.
    grads = build_gpt(model_cfg, SEQ, seed=3)
    with torch.no_grad():
        for param, full in zip(grads.parameters(), dense.parameters(), strict=True):
            param.copy_(full.grad)
    apply_tensor_parallel(grads, ctx.mesh, plan)
    shards = dict(grads.named_parameters())
    for name, param in model.named_parameters():
        assert_rel_close(param.grad, shards[name], f"{what} grad of {name}")
    cube = _cube(ctx)
    assert_rel_close(
        model.embed.weight.grad, _weight_shard(dense.embed.weight.grad, "P", cube), what
    )
    replicated = {n for n, p in model.named_parameters() if tp.replicas[id(p)] == Q * Q}
    assert replicated == {n for n, _ in model.named_parameters() if ".norm" in f".{n}"}


def _gpt_and_errors() -> list[str]:
    ctx = _context()
    _gpt(ctx, "gelu", tie=True)
    _gpt(ctx, "swiglu", tie=True)
    _gpt(ctx, "swiglu", tie=False)
    errors = []
    embed = Embedding3D().apply(nn.Embedding(VOCAB, D_IN), ctx)
    for attempt in (
        lambda: Linear3D().apply(nn.Embedding(VOCAB, D_IN), ctx),
        lambda: Embedding3D().apply(nn.Linear(D_IN, D_IN), ctx),
        lambda: LayerNorm3D().apply(nn.Linear(D_IN, D_IN), ctx),
        lambda: Linear3D(input_layout="Q"),
        lambda: embed(torch.zeros(Q * Q + 2, T, dtype=torch.long)),
        lambda: loss_3d(ctx)(torch.zeros(1, T, VOCAB // Q), torch.zeros(2, T, dtype=torch.long)),
        lambda: gpt_plan_3d(gpt_config_from(ModelConfig(**TINY, positions="learned"), SEQ)),
    ):
        with pytest.raises(ConfigError) as info:
            attempt()
        errors.append(str(info.value))
    return errors


def test_layers_match_dense_and_closed_form_bytes(pool8):
    tokens = B * T
    for wires in pool8.run(_layers):
        for layout, fused, bias in LINEARS:
            want = linear_wire_bytes(tokens, D_IN, D_OUT, Q, 4, input_layout=layout, bias=bias)
            assert_wire(wires[f"linear {layout}/{fused}"], want, f"linear {layout} fused={fused}")
        for name, want in (
            ("layer_norm", layer_norm_wire_bytes(tokens, D_IN, Q, 4)),
            ("embedding", embedding_wire_bytes(VOCAB, D_IN, Q, 4)),
        ):
            assert_wire(wires[name], want, name)


def test_gpt_matches_dense_and_bad_input_is_clear(pool8):
    errors = pool8.run(_gpt_and_errors)[0]
    assert "Linear3D applies to Linear, not Embedding" in errors[0]
    assert "Embedding3D applies to Embedding, not Linear" in errors[1]
    assert "LayerNorm3D applies to LayerNorm, not Linear" in errors[2]
    assert "use 'P' or 'S'" in errors[3]
    for batch_error in errors[4:6]:
        assert "q^2=4" in batch_error and "micro_batch divisible by 4" in batch_error
    assert "positions='rope'" in errors[6]


def test_closed_forms_without_processes():
    # One rank per axis: nothing on the wire.
    for cost in (
        linear_wire_bytes(12, 8, 12, 1, 4, bias=True),
        embedding_wire_bytes(VOCAB, D_IN, 1, 4),
        layer_norm_wire_bytes(12, D_IN, 1, 4),
    ):
        assert not any(any(phase.values()) for phase in cost.values())
    # Without the two backward re-gathers, the paper's 2(q-1)(|X| + |W| + |Y|)/q^3.
    q, x, w, y = 3, 27 * 8 * 2, 8 * 9 * 2, 27 * 9 * 2
    cost = linear_wire_bytes(27, 8, 9, q, 2, input_layout="S")
    total = sum(cost["forward"].values()) + sum(cost["backward"].values())
    assert total - (q - 1) * (x + w) / q**3 == pytest.approx(2 * (q - 1) * (x + w + y) / q**3)
    assert cost["forward"][("tp_col", "all_gather")] == pytest.approx((q - 1) * x / q**3)
    assert gpt_split_factors_3d(2) == {"n_heads": 2, "d_model": 4, "d_ff": 4, "vocab_size": 4}
