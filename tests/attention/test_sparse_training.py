"""Block-sparse attention inside the model: the engine swaps the GPT's attention cores and
trains in parity with the single-process run (dp=2 ZeRO-3; tp=2 with activation
checkpointing); `shardwise train` through the launcher with a config switch; bad settings are
one-line errors before launch."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from shardwise.attention import SparseAttentionCore, apply_sparse_attention, sparse_attention
from shardwise.config import AttentionConfig
from shardwise.errors import ConfigError
from shardwise.models import spec_of
from shardwise.run_plan import resolve
from tests.cli_runs import TINY_RUN, train_on_two_ranks
from tests.parity import (
    NO_CORE_MODEL,
    SEQ,
    assert_parity,
    build_model,
    engine_run,
    global_batches,
    make_config,
    reference_run,
)
from tests.tensor_parallel.test_gpt_parity import tp_engine_run

SPARSE = {"kind": "sparse", "layout": "bigbird", "block": 2, "window": 2, "random_blocks": 1}
"""16 tokens in 8 blocks of 2: each query block keeps 2-4 of the blocks before it."""


def sparse_config(**train):
    return make_config(**train).replace(attention=SPARSE)


def test_dense_layout_core_equals_the_gpt_core():
    """The swap itself: a GPT whose cores compute the dense causal layout block-sparsely
    gives the plain GPT's loss and gradients."""
    cfg = make_config()
    inputs, targets = global_batches(cfg.replace(train={"global_batch": 2}), steps=1)[0]
    plain, sparse = build_model(cfg), build_model(cfg)
    dense = sparse_attention(AttentionConfig(kind="sparse", layout="dense", block=4), SEQ)
    assert apply_sparse_attention(sparse, spec_of(sparse), dense) == cfg.model.n_layers
    assert isinstance(sparse.blocks[0].attn.core, SparseAttentionCore)
    for model in (plain, sparse):
        F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
    for (name, a), b in zip(plain.named_parameters(), sparse.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_sparse_attention_changes_the_model():
    """The parity runs below compare sparse with sparse: this one shows the layout matters."""
    cfg = sparse_config(micro_batch=2, global_batch=2)
    dense_losses, _ = reference_run(make_config(micro_batch=2, global_batch=2))
    sparse_losses, _ = reference_run(cfg)
    assert abs(sparse_losses[1] - dense_losses[1]) > 1e-4
    assert resolve(cfg, 1).attention.plan(1, SEQ).density < 0.5


def test_shorter_inputs_get_their_own_layout():
    """Layouts are built per input length (any multiple of the block), e.g. a shorter batch
    at the end of a file; a length that is not a multiple is a one-line error."""
    cfg = make_config()
    model = build_model(cfg)
    apply_sparse_attention(model, spec_of(model), sparse_attention(AttentionConfig(**SPARSE), SEQ))
    assert model(torch.randint(0, 256, (1, 8))).shape == (1, 8, 256)
    with pytest.raises(ConfigError, match="a sequence of 7 tokens is not a multiple") as info:
        model(torch.randint(0, 256, (1, 7)))
    assert "\n" not in str(info.value)


def test_dp2_zero3_matches_single_process(pool2):
    cfg = sparse_config(micro_batch=1, global_batch=4, zero_stage=3)
    want = reference_run(cfg)
    for got in pool2.run(engine_run, cfg):
        assert_parity(got, want, rtol=1e-5)


def test_tp2_with_activation_checkpointing_matches_single_process(pool2):
    cfg = sparse_config(micro_batch=2, global_batch=2).replace(
        parallel={"tp": 2}, train={"activation_checkpointing": "full"}
    )
    pool2.run(tp_engine_run, cfg, 2)  # losses 1e-5, shards within TP_PARAM_RTOL


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"attention": {"block": 5}}, "data.seq_len=16 is not a multiple of attention.block=5"),
        ({"attention": {"layout": "longformer"}}, "unknown attention layout 'longformer'"),
        ({"model": {"dropout": 0.1}}, "has no dropout on attention weights"),
        (
            {"attention": {"per_head": True}, "parallel": {"tp": 2}},
            "attention.per_head=true with parallel.tp=2",
        ),
        (
            {"model": {"name": "hf", "hf_config": str(NO_CORE_MODEL)}},
            "ModelSpec.attention (None) names none",
        ),
    ],
    ids=["block", "layout", "dropout", "per-head-tp", "hf"],
)
def test_bad_sparse_settings_are_one_line_errors(sections, message):
    cfg = make_config(micro_batch=2, global_batch=4).replace(
        attention={**SPARSE, **sections.pop("attention", {})}, **sections
    )
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        resolve(cfg, 2)
    assert "\n" not in str(info.value)


def test_train_on_two_ranks_through_the_launcher(tmp_path, capsys):
    settings = [
        *TINY_RUN,
        "train.steps=12",
        "optim.warmup_steps=2",
        "zero.stage=3",
        "attention.kind=sparse",
        "attention.layout=bigbird",
        "attention.block=4",
    ]
    shows = "attention     block-sparse bigbird, block 4, "
    losses = train_on_two_ranks(tmp_path / "run", settings, capsys, shows)
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
