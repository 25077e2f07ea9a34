"""Block-sparse attention against dense attention with the equivalent element mask: every
layout, causal and not, shared and per head, outputs and input gradients (fp32, 1e-5)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import shardwise.attention.block_sparse as block_sparse
from shardwise.attention import (
    LAYOUTS,
    BlockSparsePlan,
    LayoutSpec,
    block_sparse_attention,
    build_layout,
    element_mask,
)
from shardwise.attention.flex import flex_available, flex_block_sparse_attention
from shardwise.errors import ConfigError

BLOCK = 8
BLOCKS = 12
HEADS = 2


def qkv(dtype=torch.float32, batch=2, heads=HEADS, seq=BLOCK * BLOCKS, dim=8):
    gen = torch.Generator().manual_seed(3)
    return [
        torch.randn(batch, heads, seq, dim, generator=gen, dtype=dtype).requires_grad_()
        for _ in range(3)
    ]


def outputs_and_grads(fn, tensors, seed=5):
    out = fn(*tensors)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return [out.detach(), *torch.autograd.grad(out, tensors, grad)]


def masked_sdpa(layout, causal):
    mask = element_mask(layout, BLOCK, causal)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


SETTINGS = {"window": 3, "global_blocks": 1, "random_blocks": 2, "windows": (2, 3)}


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("name", LAYOUTS.names())
def test_every_layout_equals_masked_dense_attention(name, causal, per_head, monkeypatch):
    spec = LayoutSpec(BLOCKS, HEADS, causal, per_head=per_head, seed=1, **SETTINGS)
    layout = build_layout(name, spec)
    assert layout.shape == (HEADS if per_head else 1, BLOCKS, BLOCKS)
    plan = BlockSparsePlan(layout, BLOCK, causal)
    tensors = qkv()
    want = outputs_and_grads(masked_sdpa(layout, causal), tensors)
    for chunk in (block_sparse.CHUNK_SCORES, 1):  # whole groups; then one row per chunk
        monkeypatch.setattr(block_sparse, "CHUNK_SCORES", chunk)
        got = outputs_and_grads(lambda q, k, v: block_sparse_attention(q, k, v, plan), tensors)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("causal", "per_head"), [(True, False), (True, True), (False, True)], ids=str
)
def test_flex_attention_path_gives_the_same_output(causal, per_head):
    """The CUDA path (FlexAttention with the layout as its block mask), run here through
    torch's eager FlexAttention, forward only: FlexAttention has no backward on CPU, and no
    GPU runs in CI, so the fused CUDA kernels and their backward are not checked here."""
    spec = LayoutSpec(BLOCKS, HEADS, causal, per_head=per_head, seed=4, **SETTINGS)
    plan = BlockSparsePlan(build_layout("bigbird", spec), BLOCK, causal)
    q, k, v = (t.detach() for t in qkv())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is slow
        got = flex_block_sparse_attention(q, k, v, plan, compiled=False)
    torch.testing.assert_close(got, block_sparse_attention(q, k, v, plan), rtol=1e-5, atol=1e-6)
    assert not flex_available(torch.device("cpu"))


def test_dense_causal_layout_equals_sdpa():
    layout = build_layout("dense", LayoutSpec(BLOCKS))
    assert torch.equal(layout[0], torch.ones(BLOCKS, BLOCKS, dtype=torch.bool).tril())
    plan = BlockSparsePlan(layout, BLOCK, causal=True)
    tensors = qkv()
    got = outputs_and_grads(lambda q, k, v: block_sparse_attention(q, k, v, plan), tensors)
    sdpa = outputs_and_grads(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), tensors
    )
    for a, b in zip(got, sdpa, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


BF16_TOL = {"rtol": 2e-2, "atol": 1e-2}
"""bf16 inputs and outputs, fp32 softmax and gradient sums, against fp32 attention of the same
(rounded) inputs: the bf16 results round the matmul products to 8 mantissa bits a few times
(2^-8 = 0.4% each). Measured: at most 1.2e-2 relative, 2.2e-2 absolute on a gradient of 1.9."""


def test_bf16_inputs_keep_fp32_softmax():
    layout = build_layout("bigbird", LayoutSpec(BLOCKS, seed=2))
    plan = BlockSparsePlan(layout, BLOCK, causal=True)
    low = qkv(torch.bfloat16)
    wide = [t.detach().float().requires_grad_() for t in low]
    got = outputs_and_grads(lambda q, k, v: block_sparse_attention(q, k, v, plan), low)
    want = outputs_and_grads(masked_sdpa(layout, True), wide)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, **BF16_TOL)


def test_layouts_follow_their_patterns():
    window = build_layout("sliding_window", LayoutSpec(BLOCKS, window=3))[0]
    assert window.sum(-1).tolist() == [1, 2] + [3] * (BLOCKS - 2)
    longformer = build_layout("bslongformer", LayoutSpec(BLOCKS, window=2, global_blocks=2))[0]
    assert longformer[:, :2].tril().equal(torch.ones(BLOCKS, 2, dtype=torch.bool).tril())
    fixed = build_layout("fixed", LayoutSpec(BLOCKS, causal=False, window=4, global_blocks=1))[0]
    assert fixed[:, [3, 7, 11]].all() and fixed[[3, 7, 11], :].all()  # last of each window
    assert fixed[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 7, 11]
    variable = build_layout(
        "variable",
        LayoutSpec(BLOCKS, causal=False, windows=(2, 3), global_blocks=0, random_blocks=0),
    )[0]
    assert variable[2].nonzero().flatten().tolist() == [2, 3, 4]  # second window: 2-4
    assert variable[11].nonzero().flatten().tolist() == [11]  # windows of 3 from 2: 2,5,8,11
    for name in LAYOUTS.names():
        causal = build_layout(name, LayoutSpec(BLOCKS))[0]
        assert not causal.triu(1).any(), name


def test_random_blocks_are_seeded_and_drawn_per_head():
    spec = LayoutSpec(BLOCKS, HEADS, causal=False, window=1, global_blocks=0, random_blocks=3)
    one, again = build_layout("bigbird", spec), build_layout("bigbird", spec)
    assert torch.equal(one, again)
    other_seed = build_layout("bigbird", LayoutSpec(**{**vars(spec), "seed": 9}))
    assert not torch.equal(one, other_seed)
    heads = build_layout("bigbird", LayoutSpec(**{**vars(spec), "per_head": True}))
    assert not torch.equal(heads[0], heads[1])
    assert (one[0].sum(-1) <= 1 + 3).all() and (one[0].sum(-1) >= 3).all()


def test_bad_layouts_and_shapes_are_one_line_errors():
    cases = [
        (lambda: build_layout("bigbrid", LayoutSpec(BLOCKS)), "did you mean 'bigbird'"),
        (
            lambda: build_layout("bigbird", LayoutSpec(BLOCKS, global_blocks=13)),
            "attention.global_blocks=13 exceeds the 12 blocks",
        ),
        (
            lambda: BlockSparsePlan(torch.eye(4, dtype=torch.bool)[None].roll(1, 2), 2, False),
            None,
        ),
        (
            lambda: BlockSparsePlan(torch.ones(1, 4, 4, dtype=torch.bool), 2, True),
            "keeps a block above the diagonal",
        ),
        (
            lambda: BlockSparsePlan(torch.zeros(1, 4, 4, dtype=torch.bool), 2, False),
            "block layout row 0 of head 0 keeps no block: its queries would attend to nothing",
        ),
        (
            lambda: block_sparse_attention(
                *qkv(seq=BLOCK * BLOCKS - 1),
                BlockSparsePlan(build_layout("dense", LayoutSpec(BLOCKS)), BLOCK, True),
            ),
            "sequence length 95 does not match the block layout (12 blocks of 8 = 96)",
        ),
    ]
    for build, message in cases:
        if message is None:  # a permuted diagonal is a legal non-causal layout
            build()
            continue
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            build()
        assert "\n" not in str(info.value)
