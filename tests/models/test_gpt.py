"""The reference GPT: shapes, causality, variants, meta-device init, presets, config errors."""

from __future__ import annotations

import re

import pytest
import torch

from shardwise.config import ModelConfig
from shardwise.data.tokenizer import DOCUMENT_TOKEN, document_ids
from shardwise.errors import ConfigError
from shardwise.models import (
    GPT,
    MODELS,
    PRESETS,
    GPTConfig,
    build_gpt,
    count_params,
    gpt_config_from,
)

SEQ_LEN = 16


def tiny_model_cfg(**fields) -> ModelConfig:
    return ModelConfig(**{"n_layers": 2, "d_model": 32, "n_heads": 4, **fields})


def tokens(batch: int = 2, seq: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=generator)


def test_logits_shape() -> None:
    model = build_gpt(tiny_model_cfg(), SEQ_LEN)
    assert model(tokens(batch=3, seq=10)).shape == (3, 10, 256)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_future_tokens_do_not_change_earlier_logits(positions: str) -> None:
    model = build_gpt(tiny_model_cfg(positions=positions), SEQ_LEN).eval()
    idx = tokens(batch=1)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 256
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_packed_documents_attend_within_themselves() -> None:
    """Documents packed in one sequence (``data.pack_documents``): with RoPE, whose scores
    depend on relative positions only, each document's logits equal those of the document
    run alone; without the documents the later ones see the earlier."""
    model = build_gpt(tiny_model_cfg(), SEQ_LEN).eval()
    first, second = tokens(batch=2, seq=7).clamp(min=1), tokens(batch=2, seq=9, seed=1)
    second[:, 0] = DOCUMENT_TOKEN
    packed = torch.cat([first, second], dim=1)
    with torch.no_grad():
        masked = model(packed, documents=document_ids(packed))
        alone = model(first), model(second)
        unmasked = model(packed)
    torch.testing.assert_close(masked[:, :7], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked[:, 7:], alone[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[:, 7:], alone[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_variants_run_forward_and_backward(positions: str, mlp: str) -> None:
    model = build_gpt(tiny_model_cfg(positions=positions, mlp=mlp, dropout=0.1), SEQ_LEN)
    logits = model(tokens())
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens(seed=1).flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert hasattr(model, "pos_embed") == (positions == "learned")
    names = {"gate", "up", "down"} if mlp == "swiglu" else {"up", "down"}
    assert {name for name, _ in model.blocks[0].mlp.named_children()} == names


def test_swiglu_d_ff_is_rounded_up_to_64() -> None:
    assert gpt_config_from(tiny_model_cfg(mlp="swiglu"), SEQ_LEN).d_ff == 128  # 8/3*32 = 85
    assert gpt_config_from(tiny_model_cfg(mlp="gelu"), SEQ_LEN).d_ff == 128
    assert gpt_config_from(ModelConfig(preset="small", mlp="swiglu"), SEQ_LEN).d_ff == 2048
    assert gpt_config_from(tiny_model_cfg(d_ff=100), SEQ_LEN).d_ff == 100


def test_module_names_are_the_tensor_parallel_contract() -> None:
    names = set(build_gpt(tiny_model_cfg(tie_embeddings=False), SEQ_LEN).state_dict())
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight"]
    per_block += ["norm2.weight", "norm2.bias", "mlp.up.weight", "mlp.down.weight"]
    expected = {"embed.weight", "norm_f.weight", "norm_f.bias", "head.weight"}
    expected |= {f"blocks.{i}.{name}" for i in range(2) for name in per_block}
    assert names == expected


def test_meta_build_is_allocated_and_init_is_deterministic() -> None:
    first = build_gpt(tiny_model_cfg(), SEQ_LEN, seed=3)
    again = build_gpt(tiny_model_cfg(), SEQ_LEN, seed=3)
    other = build_gpt(tiny_model_cfg(), SEQ_LEN, seed=4)
    assert all(p.device.type == "cpu" for p in first.parameters())
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert not torch.equal(first.blocks[0].attn.qkv.weight, other.blocks[0].attn.qkv.weight)


def test_init_statistics() -> None:
    model = build_gpt(ModelConfig(preset="tiny", n_layers=8), SEQ_LEN)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert torch.equal(model.norm_f.weight, torch.ones(128))
    assert torch.equal(model.blocks[1].norm2.bias, torch.zeros(128))


def test_tied_head_is_the_embedding_and_counted_once() -> None:
    tied = build_gpt(tiny_model_cfg(), SEQ_LEN)
    untied = build_gpt(tiny_model_cfg(tie_embeddings=False), SEQ_LEN)
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert count_params(untied) - count_params(tied) == 256 * 32
    assert "head.weight" not in dict(tied.named_parameters())


def test_registered_builder() -> None:
    model = MODELS.get("gpt")(tiny_model_cfg(), SEQ_LEN, device="cpu", seed=0)
    assert isinstance(model, GPT)


def expected_params(cfg: GPTConfig) -> int:
    """Elements from the architecture: per block 4d^2 (attention) + MLP + 2 LayerNorms."""
    d = cfg.d_model
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    per_block = 4 * d * d + mlp + 2 * 2 * d
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * per_block + embeddings + 2 * d


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_param_counts(preset: str) -> None:
    cfg = gpt_config_from(ModelConfig(preset=preset), 1024)
    with torch.device("meta"):
        model = GPT(cfg)
    assert count_params(model) == expected_params(cfg)
    approx = 12 * cfg.n_layers * cfg.d_model**2 + cfg.vocab_size * cfg.d_model
    assert count_params(model) == pytest.approx(approx, rel=0.01)
    if preset == "mini":
        assert count_params(model) == pytest.approx(25e6, rel=0.1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"preset": "huge"}, "model.preset='huge' is unknown; use one of tiny, mini, small"),
        (
            {"n_heads": 5, "d_model": 128},
            "model.n_heads=5 does not divide d_model=128; use one of 1, 2, 4, 8, 16, 32, 64",
        ),  # fmt: skip
        (
            {"n_heads": 2, "d_model": 30},
            "model.d_model=30 / n_heads=2 gives an odd head_dim=15, "
            "but rope rotates pairs; use n_heads in 1, 3, 5, 15 or positions='learned'",
        ),  # fmt: skip
    ],
)
def test_config_errors(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as info:
        gpt_config_from(ModelConfig(**fields), SEQ_LEN)
    assert "\n" not in str(info.value)


def test_odd_head_dim_is_fine_with_learned_positions() -> None:
    cfg = gpt_config_from(ModelConfig(d_model=30, n_heads=2, positions="learned"), SEQ_LEN)
    assert cfg.head_dim == 15
    build_gpt(ModelConfig(d_model=30, n_heads=2, n_layers=1, positions="learned"), 4)(tokens(1, 4))


def test_builds_on_meta_and_runs_in_bf16() -> None:
    assert all(p.is_meta for p in build_gpt(tiny_model_cfg(), SEQ_LEN, device="meta").parameters())
    model = build_gpt(tiny_model_cfg(), SEQ_LEN).to(torch.bfloat16)
    assert model(tokens()).dtype == torch.bfloat16  # RoPE tables follow the activation dtype
