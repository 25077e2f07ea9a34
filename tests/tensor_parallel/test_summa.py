"""2D (q=2 on 4 ranks) and 2.5D (d=2, q=2 on 8 ranks) tensor parallelism against dense torch."""

from __future__ import annotations

from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardwise.config import ModelConfig
from shardwise.distributed.dims import ParallelDims
from shardwise.errors import ConfigError
from shardwise.models.gpt import GPTConfig, build_gpt
from shardwise.models.gpt_plans import gpt_plan_summa
from shardwise.tensor_parallel import apply_tensor_parallel
from shardwise.tensor_parallel.plan import TensorParallelContext, split, split_fused
from shardwise.tensor_parallel.summa import (
    Embedding2p5D,
    LayerNorm2p5D,
    Linear2p5D,
    SummaGrid,
    embedding_wire_bytes,
    layer_norm_wire_bytes,
    linear_wire_bytes,
    loss_summa,
)
from tests.parity import SEQ, TINY
from tests.tensor_parallel import assert_rel_close, assert_wire, run_recorded

BATCH, TOKENS = 4, 3
"""Layer cases: batch rows (d*q = 4 blocks in 2.5D) and tokens per row."""
D_IN, D_OUT, VOCAB = 8, 12, 16

POOLS = {"2d": "pool4", "2.5d": "pool8"}

# --- helpers that run on the ranks -----------------------------------------------------------


@cache
def _mesh(mode: str):
    """2D: q=2 on 4 ranks; 2.5D: depth 2 x q=2 on 8 ranks. Built once per worker process."""
    world = 4 if mode == "2d" else 8
    return ParallelDims.tensor_parallel(world, mode, 1 if mode == "2d" else 2).build_mesh("cpu")


def _ctx(mode: str) -> tuple[TensorParallelContext, SummaGrid]:
    ctx = TensorParallelContext(_mesh(mode), mode)
    return ctx, SummaGrid.of(ctx)


def _check(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert_rel_close(got, want, what)


def _activation_block(t: torch.Tensor, grid: SummaGrid, fused: int = 1) -> torch.Tensor:
    """Batch block (k, i), hidden block j (piece-wise when `fused`) of a full activation."""
    return split_fused(grid.batch_block(t), -1, fused, grid.q, grid.j)


def _weight_block(t: torch.Tensor, grid: SummaGrid, fused: int = 1) -> torch.Tensor:
    """Out block j (piece-wise when `fused`), in block i of a full [out, in] weight."""
    return split(split_fused(t, 0, fused, grid.q, grid.j), 1, grid.q, grid.i)


def _linear_case(mode: str, fused: int) -> None:
    ctx, grid = _ctx(mode)
    dense = nn.Linear(D_IN, D_OUT)
    x = torch.randn(BATCH, TOKENS, D_IN, requires_grad=True)
    grad_y = torch.randn(BATCH, TOKENS, D_OUT)
    layer = Linear2p5D(fused=fused).apply(dense, ctx)
    want = dense(x)
    (want * grad_y).sum().backward()
    x_local = _activation_block(x.detach(), grid).clone().requires_grad_()
    y, wire = run_recorded(layer, x_local, _activation_block(grad_y, grid, fused))
    name = f"linear fused={fused}"
    _check(f"{name} output", y, _activation_block(want.detach(), grid, fused))
    _check(f"{name} input grad", x_local.grad, _activation_block(x.grad, grid))
    _check(f"{name} weight grad", layer.weight.grad, _weight_block(dense.weight.grad, grid, fused))
    want_bias = split_fused(dense.bias.grad, 0, fused, grid.q, grid.j)
    _check(f"{name} bias grad", layer.bias.grad, want_bias)
    assert ctx.replicas[id(layer.weight)] == grid.d
    assert ctx.replicas[id(layer.bias)] == grid.d * grid.q
    closed_form = linear_wire_bytes(BATCH * TOKENS, D_IN, D_OUT, grid.q, grid.d, 4, bias=True)
    assert_wire(wire, closed_form, name)


def _layer_norm_case(mode: str) -> None:
    ctx, grid = _ctx(mode)
    dense = nn.LayerNorm(D_IN)
    with torch.no_grad():
        dense.weight.normal_(1.0, 0.5)
        dense.bias.normal_(0.0, 0.5)
    x = (3 * torch.randn(BATCH, TOKENS, D_IN) + 1).requires_grad_()
    grad_y = torch.randn(BATCH, TOKENS, D_IN)
    layer = LayerNorm2p5D().apply(dense, ctx)
    want = dense(x)
    (want * grad_y).sum().backward()
    x_local = _activation_block(x.detach(), grid).clone().requires_grad_()
    y, wire = run_recorded(layer, x_local, _activation_block(grad_y, grid))
    _check("layer norm output", y, _activation_block(want.detach(), grid))
    _check("layer norm input grad", x_local.grad, _activation_block(x.grad, grid))
    for param in ("weight", "bias"):
        want = split(getattr(dense, param).grad, 0, grid.q, grid.j)
        _check(f"layer norm {param} grad", getattr(layer, param).grad, want)
        assert ctx.replicas[id(getattr(layer, param))] == grid.d * grid.q
    closed_form = layer_norm_wire_bytes(BATCH * TOKENS, D_IN, grid.q, grid.d, 4)
    assert_wire(wire, closed_form, "layer norm")


def _embedding_case(mode: str) -> None:
    ctx, grid = _ctx(mode)
    dense = nn.Embedding(VOCAB, D_IN)
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS))
    grad_y = torch.randn(BATCH, TOKENS, D_IN)
    layer = Embedding2p5D().apply(dense, ctx)
    want = dense(ids)
    (want * grad_y).sum().backward()
    y, wire = run_recorded(layer, ids, _activation_block(grad_y, grid))
    _check("embedding output", y, _activation_block(want.detach(), grid))
    _check("embedding weight grad", layer.weight.grad, _weight_block(dense.weight.grad, grid))
    closed_form = embedding_wire_bytes(BATCH * TOKENS, VOCAB, D_IN, grid.q, grid.d, 4)
    assert_wire(wire, closed_form, "embedding")


def _head_and_loss_case(mode: str) -> None:
    ctx, grid = _ctx(mode)
    dense = nn.Linear(D_IN, VOCAB, bias=False)
    x = torch.randn(BATCH, TOKENS, D_IN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (BATCH, TOKENS))
    head = Linear2p5D().apply(dense, ctx)
    want = F.cross_entropy(dense(x).flatten(0, 1), targets.flatten())
    want.backward()
    x_local = _activation_block(x.detach(), grid).clone().requires_grad_()
    loss = loss_summa(ctx)(head(x_local), targets)
    loss.backward()
    _check("loss", loss.detach(), want.detach())
    _check("head input grad", x_local.grad, _activation_block(x.grad, grid))
    _check("head weight grad", head.weight.grad, _weight_block(dense.weight.grad, grid))


def _layers_match_dense(mode: str) -> bool:
    torch.manual_seed(0)  # the same dense layers and data on every rank
    for fused in (1, 3):
        _linear_case(mode, fused)
    _layer_norm_case(mode)
    _embedding_case(mode)
    _head_and_loss_case(mode)
    return True


def _param_block(name: str, full: torch.Tensor, grid: SummaGrid) -> torch.Tensor:
    if full.ndim == 1:  # layer norm weight or bias: hidden block j
        return split(full, 0, grid.q, grid.j)
    return _weight_block(full, grid, 3 if name.endswith("attn.qkv.weight") else 1)


def _gpt_matches_dense(mode: str, model_cfg: ModelConfig) -> bool:
    gen = torch.Generator().manual_seed(3)
    rows = torch.randint(0, model_cfg.vocab_size, (BATCH, SEQ + 1), generator=gen)
    ids, targets = rows[:, :-1], rows[:, 1:]
    dense = build_gpt(model_cfg, SEQ, seed=0)
    want = F.cross_entropy(dense(ids).flatten(0, 1), targets.flatten())
    want.backward()
    model = build_gpt(model_cfg, SEQ, seed=0)
    tp = apply_tensor_parallel(model, _mesh(mode), gpt_plan_summa(model.cfg, mode))
    grid = SummaGrid.of(tp.ctx)
    loss = tp.loss_fn(model(ids), targets)
    loss.backward()
    _check("loss", loss.detach(), want.detach())
    assert (model.head.weight is model.embed.weight) == model_cfg.tie_embeddings
    names = [name for name, _ in model.named_parameters()]
    assert names == [name for name, _ in dense.named_parameters()]
    for name, param in model.named_parameters():
        _check(f"{name} grad", param.grad, _param_block(name, dense.get_parameter(name).grad, grid))
        want_replicas = grid.d * (grid.q if param.ndim == 1 else 1)
        assert tp.replicas[id(param)] == want_replicas, name
    return True


def _uneven_batch_errors(mode: str) -> list[str]:
    """Three rows on two batch blocks, for the embedding and the loss."""
    ctx, _ = _ctx(mode)
    embed = Embedding2p5D().apply(nn.Embedding(VOCAB, D_IN), ctx)
    ids = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ConfigError) as in_embedding:
        embed(ids)
    with pytest.raises(ConfigError) as in_loss:
        loss_summa(ctx)(torch.zeros(1, 2, VOCAB // 2), ids)
    return [str(in_embedding.value), str(in_loss.value)]


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["2d", "2.5d"])
def test_layers_and_their_bytes_match_dense_torch(request, mode):
    assert all(request.getfixturevalue(POOLS[mode]).run(_layers_match_dense, mode))


@pytest.mark.parametrize("mode", ["2d", "2.5d"])
def test_gpt_loss_and_gradients_match_dense_torch(request, mode):
    pool = request.getfixturevalue(POOLS[mode])
    tied_gelu = ModelConfig(**TINY)
    untied_swiglu = ModelConfig(**TINY, mlp="swiglu", tie_embeddings=False)
    for model_cfg in (tied_gelu, untied_swiglu):
        assert all(pool.run(_gpt_matches_dense, mode, model_cfg))


def test_a_batch_that_does_not_split_into_blocks_is_a_clear_error(pool4):
    for messages in pool4.run(_uneven_batch_errors, "2d"):
        for message in messages:
            assert "batch into depth x q = 1 x 2 = 2 blocks" in message
            assert "has 3 rows; use a micro_batch divisible by 2" in message


@pytest.mark.parametrize(
    ("style", "module"),
    [
        (Linear2p5D(), nn.Embedding(4, 4)),
        (Embedding2p5D(), nn.Linear(4, 4)),
        (LayerNorm2p5D(), nn.Linear(4, 4)),
    ],
)
def test_styles_refuse_the_wrong_module_type(style, module):
    kind = type(style).__name__
    with pytest.raises(ConfigError, match=f"{kind} applies to"):
        style.apply(module, None)  # checked before the context is used


def test_gpt_plan_covers_every_layer_and_refuses_other_layouts():
    plan = gpt_plan_summa(GPTConfig(mlp="swiglu"), "2.5d")
    assert plan.mode == "2.5d" and plan.loss is loss_summa
    assert plan.layers["blocks.*.attn.qkv"] == Linear2p5D(fused=3)
    assert set(plan.layers) == {
        "embed",
        "head",
        "norm_f",
        *(f"blocks.*.{m}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj")),
        *(f"blocks.*.mlp.{m}" for m in ("gate", "up", "down")),
    }
    assert "blocks.*.mlp.gate" not in gpt_plan_summa(GPTConfig(), "2d").layers
    with pytest.raises(ConfigError, match="'2d' or '2.5d', not '1d'"):
        gpt_plan_summa(GPTConfig(), "1d")
    with pytest.raises(ConfigError, match="positions='rope'"):
        gpt_plan_summa(GPTConfig(positions="learned"), "2d")


def test_closed_forms_follow_the_summa_cost_table():
    # |X| = 64 * 16, |W| = 16 * 32 fp32 elements, q = 2, d = 2: forward (q-1)(|X|/d + |W|)/q^2.
    cost = linear_wire_bytes(64, 16, 32, q=2, d=2, elem_bytes=4)
    forward = sum(cost["forward"].values())
    assert forward == (2 - 1) * (64 * 16 / 2 + 16 * 32) / 2**2 * 4
    backward = sum(cost["backward"].values())
    assert backward == 2 * forward + 2 * (2 - 1) / 2 * 16 * 32 / 2**2 * 4
    # 2D has no depth axis: nothing is recorded on it.
    for table in (
        linear_wire_bytes(64, 16, 32, 2, 1, 4, bias=True),
        embedding_wire_bytes(64, 256, 16, 2, 1, 4),
        layer_norm_wire_bytes(64, 16, 2, 1, 4),
    ):
        assert all(axis != "tp_dep" for costs in table.values() for axis, _ in costs)
