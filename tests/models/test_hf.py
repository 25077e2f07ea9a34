"""Hugging Face GPT-2 and LLaMA: built from a config, their specs (declared and discovered),
config errors, and 1D tensor parallelism at tp=2 against the unsplit model: loss, full
logits and every gradient shard (fp32, 1e-5 relative)."""

from __future__ import annotations

import json
import re
import sys
from fnmatch import fnmatchcase

import pytest
import torch
from torch import nn

from shardwise.config import ModelConfig
from shardwise.distributed.dims import ParallelDims
from shardwise.errors import ConfigError
from shardwise.models import MODELS, SPECS, spec_of
from shardwise.models.hf import HF_MISSING, HF_PRESETS, build_hf
from shardwise.models.spec import qualified_name
from shardwise.tensor_parallel import TensorParallelContext, apply_tensor_parallel
from shardwise.tensor_parallel.conv1d import ColwiseParallelConv1D, RowwiseParallelConv1D
from shardwise.tensor_parallel.one_d import LocalSizes
from shardwise.tensor_parallel.plan import split, split_fused
from tests.tensor_parallel import assert_rel_close

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face models need the hf extra (transformers)"
)

SEQ_LEN = 16
TP = 2


def hf_cfg(hf_config: str | None) -> ModelConfig:
    return ModelConfig(name="hf", hf_config=hf_config)


def tokens(batch: int = 2, seq: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=generator)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "kind"),
    [("gpt2-tiny", "GPT2LMHeadModel"), ("llama-tiny", "LlamaForCausalLM")],
)
def test_build_from_preset(preset: str, kind: str) -> None:
    model = MODELS.get("hf")(hf_cfg(preset), SEQ_LEN)
    assert type(model).__name__ == kind
    assert model.config._attn_implementation == "shardwise"
    ids = tokens()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, SEQ_LEN, 256)
    assert torch.isfinite(out.loss)
    # While its cores are the plain ones, the registered attention is HF's sdpa, bit for bit.
    plain = MODELS.get("hf")(hf_cfg(preset), SEQ_LEN)
    plain.set_attn_implementation("sdpa")
    assert torch.equal(plain(input_ids=ids, labels=ids).logits, out.logits)


def test_build_is_seeded_and_leaves_the_callers_rng_alone() -> None:
    state = torch.random.get_rng_state()
    first, again = build_hf(hf_cfg("llama-tiny"), SEQ_LEN), build_hf(hf_cfg("llama-tiny"), SEQ_LEN)
    other = build_hf(hf_cfg("llama-tiny"), SEQ_LEN, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, a), b in zip(first.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_meta_device_builds_on_cpu() -> None:
    model = build_hf(hf_cfg("gpt2-tiny"), SEQ_LEN, device="meta")
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_build_from_config_json_file_and_directory(tmp_path) -> None:
    fields = {**HF_PRESETS["gpt2-tiny"], "n_layer": 1}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    for where in (tmp_path, tmp_path / "config.json"):
        model = build_hf(hf_cfg(str(where)), SEQ_LEN)
        assert type(model).__name__ == "GPT2LMHeadModel"
        assert len(model.transformer.h) == 1


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BUILD_ERRORS = {
    "no-config": (lambda tmp: None, "model.name='hf' needs model.hf_config"),
    "unknown-preset": (lambda tmp: "gpt3-tiny", "is neither a built-in config"),
    "missing-dir": (lambda tmp: str(tmp / "nowhere"), "is neither a built-in config"),
    "bad-json": (lambda tmp: _write(tmp, "bad.json", "{"), "cannot read"),
    "no-model-type": (lambda tmp: _write(tmp, "c.json", "{}"), "has no 'model_type'"),
    "unknown-model-type": (
        lambda tmp: _write(tmp, "c.json", '{"model_type": "no-such-model"}'),
        "model.hf_config=",
    ),
    "not-a-causal-lm": (
        lambda tmp: _write(tmp, "c.json", '{"model_type": "t5", "d_model": 8}'),
        "model.hf_config=",
    ),
}


@pytest.mark.parametrize(("where", "message"), list(BUILD_ERRORS.values()), ids=list(BUILD_ERRORS))
def test_build_errors_are_one_line(tmp_path, where, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        build_hf(hf_cfg(where(tmp_path)), SEQ_LEN)
    assert "\n" not in str(err.value)


def test_sequence_longer_than_the_position_table() -> None:
    with pytest.raises(ConfigError, match=re.escape("data.seq_len=65 exceeds the 64 positions")):
        build_hf(hf_cfg("gpt2-tiny"), 65)


def test_missing_transformers(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=re.escape(HF_MISSING)):
        build_hf(hf_cfg("gpt2-tiny"), SEQ_LEN)


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------


SPEC_FIELDS = {
    "gpt2-tiny": ("transformer.h", "transformer.wte", "lm_head", "transformer.h.*.attn.core", True),
    "llama-tiny": (
        "model.layers",
        "model.embed_tokens",
        "lm_head",
        "model.layers.*.self_attn.core",
        False,
    ),
}


@pytest.mark.parametrize("preset", list(SPEC_FIELDS))
def test_declared_specs(preset: str) -> None:
    model = build_hf(hf_cfg(preset), SEQ_LEN)
    assert qualified_name(type(model)) in SPECS
    spec = spec_of(model)
    blocks, embedding, head, attention, tied = SPEC_FIELDS[preset]
    assert (spec.blocks, spec.embedding, spec.head, spec.attention) == (
        blocks,
        embedding,
        head,
        attention,
    )
    assert spec.tied(model) is tied
    assert len(spec.attention_cores(model, "this test")) == 2  # one per layer
    assert (spec.positions, spec.positions_rows) == ("position_ids", True)
    assert spec.max_seq_len == 64
    assert len(spec.named_blocks(model, "this test")) == 2
    assert spec.tp_plan is not None


def test_discovered_spec_of_an_hf_model_without_a_declared_one() -> None:
    config = transformers.GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
        max_position_embeddings=48,
    )
    model = transformers.GPTNeoXForCausalLM(config)
    assert not any(qualified_name(kind) in SPECS for kind in type(model).__mro__)
    spec = spec_of(model)
    assert (spec.blocks, spec.embedding, spec.head) == (
        "gpt_neox.layers",
        "gpt_neox.embed_in",
        "lm_head",
    )
    assert spec.max_seq_len == 48
    assert spec.tp_plan is None


TP_ERRORS = {
    "gpt2-heads": (
        "gpt2-tiny",
        ParallelDims.tensor_parallel(3),
        False,
        "the Hugging Face config's n_head=4 does not split over parallel.tp=3 (tp_mode='1d' "
        "needs a multiple of 3); tp degrees that fit: 2, 4",
    ),
    "llama-kv-heads": (
        "llama-tiny",
        ParallelDims.tensor_parallel(4),
        False,
        "the Hugging Face config's num_key_value_heads=2 does not split over parallel.tp=4 "
        "(tp_mode='1d' needs a multiple of 4); tp degrees that fit: 2",
    ),
    "2d-layout": (
        "llama-tiny",
        ParallelDims.tensor_parallel(4, "2d"),
        False,
        "Hugging Face models split with parallel.tp_mode='1d' only, not '2d'",
    ),
    "sequence-parallel": (
        "gpt2-tiny",
        ParallelDims.tensor_parallel(2),
        True,
        "parallel.tp_sequence_parallel is not supported for Hugging Face models",
    ),
}


@pytest.mark.parametrize(
    ("preset", "dims", "sequence_parallel", "message"),
    list(TP_ERRORS.values()),
    ids=list(TP_ERRORS),
)
def test_tp_plan_errors(preset, dims, sequence_parallel, message) -> None:
    spec = spec_of(build_hf(hf_cfg(preset), SEQ_LEN))
    with pytest.raises(ConfigError, match=re.escape(message)):
        spec.tp_plan(dims, 2, sequence_parallel)


# ---------------------------------------------------------------------------------------------
# Tensor parallelism on two ranks
# ---------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor, rank: int) -> torch.Tensor:
    return split(t, 0, TP, rank)


def _cols(t: torch.Tensor, rank: int) -> torch.Tensor:
    return split(t, 1, TP, rank)


def _qkv_last(t: torch.Tensor, rank: int) -> torch.Tensor:
    return split_fused(t, -1, 3, TP, rank)


def _last(t: torch.Tensor, rank: int) -> torch.Tensor:
    return split(t, -1, TP, rank)


SHARD_OF = {
    # Conv1D weights are [in, out]: output features are the last dim.
    "gpt2-tiny": {
        "transformer.wte.weight": _rows,
        "transformer.h.*.attn.c_attn.*": _qkv_last,
        "transformer.h.*.attn.c_proj.weight": _rows,
        "transformer.h.*.mlp.c_fc.*": _last,
        "transformer.h.*.mlp.c_proj.weight": _rows,
    },
    "llama-tiny": {
        "model.embed_tokens.weight": _rows,
        "model.layers.*.self_attn.[qkv]_proj.weight": _rows,
        "model.layers.*.self_attn.o_proj.weight": _cols,
        "model.layers.*.mlp.gate_proj.weight": _rows,
        "model.layers.*.mlp.up_proj.weight": _rows,
        "model.layers.*.mlp.down_proj.weight": _cols,
        "lm_head.weight": _rows,
    },
}
"""Each split parameter's block on a rank, by name; the others are whole on every rank."""


def _expected_shard(preset: str, name: str, full: torch.Tensor, rank: int) -> torch.Tensor:
    for pattern, shard_of in SHARD_OF[preset].items():
        if fnmatchcase(name, pattern):
            return shard_of(full, rank)
    return full


def tp_parity(preset: str) -> None:
    """On every rank: the unsplit model and the plan's split twin, same weights, same ids."""
    dims = ParallelDims.tensor_parallel(TP)
    mesh = dims.build_mesh("cpu")
    rank = torch.distributed.get_rank()
    full, model = build_hf(hf_cfg(preset), SEQ_LEN), build_hf(hf_cfg(preset), SEQ_LEN)
    tp = apply_tensor_parallel(model, mesh, spec_of(model).tp_plan(dims, 2, False))
    assert tp.loss_fn is None  # the output is whole: the model's own loss applies

    ids = tokens()
    want = full(input_ids=ids, labels=ids)
    want.loss.backward()
    got = model(input_ids=ids, labels=ids)
    got.loss.backward()

    assert_rel_close(got.loss, want.loss.detach(), f"{preset} loss")
    assert_rel_close(got.logits, want.logits.detach(), f"{preset} logits")
    full_grads = {name: p.grad for name, p in full.named_parameters()}
    split_params = dict(model.named_parameters())
    assert split_params.keys() == full_grads.keys()
    for name, param in split_params.items():
        want_grad = _expected_shard(preset, name, full_grads[name], rank)
        assert_rel_close(param.grad, want_grad, f"{preset} {name} grad")


def tp_gpt2_attention_sizes() -> None:
    """GPT-2's attention computes on its local heads: split_size (the width of q, k and v in
    c_attn's output) and the head count halve, the head size does not; the head stays tied."""
    dims = ParallelDims.tensor_parallel(TP)
    model = build_hf(hf_cfg("gpt2-tiny"), SEQ_LEN)
    apply_tensor_parallel(model, dims.build_mesh("cpu"), spec_of(model).tp_plan(dims, 1, False))
    attn = model.transformer.h[0].attn
    assert (attn.split_size, attn.embed_dim, attn.num_heads, attn.head_dim) == (32, 32, 2, 16)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.shape == (128, 64)


def tp_style_errors() -> None:
    """Styles refuse modules they cannot split, with one line."""
    ctx = TensorParallelContext(ParallelDims.tensor_parallel(TP).build_mesh("cpu"), "1d")
    for style in (ColwiseParallelConv1D(), RowwiseParallelConv1D()):
        with pytest.raises(ConfigError, match="applies to a Conv1D"):
            style.apply(nn.Linear(4, 4), ctx)
    with pytest.raises(ConfigError, match="has no integer attribute 'num_heads'"):
        LocalSizes(("num_heads",)).apply(nn.Linear(4, 4), ctx)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_tp2_parity(pool2, preset: str) -> None:
    pool2.run(tp_parity, preset)


def test_tp2_gpt2_attention_sizes(pool2) -> None:
    pool2.run(tp_gpt2_attention_sizes)


def test_tp2_style_errors(pool2) -> None:
    pool2.run(tp_style_errors)
