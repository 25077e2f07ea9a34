"""Activation checkpointing: same names, same numbers, fewer saved activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardwise.activation_checkpointing import apply_activation_checkpointing
from shardwise.config import ModelConfig
from shardwise.errors import ConfigError
from shardwise.models import build_gpt, spec_of

SEQ_LEN = 16


def checkpoint(model: nn.Module, mode: str, **kw) -> int:
    """Checkpointing as the engine applies it: through the model's spec."""
    return apply_activation_checkpointing(model, spec_of(model), mode, **kw)


def tiny_gpt() -> nn.Module:
    cfg = ModelConfig(n_layers=4, d_model=32, n_heads=4, dropout=0.1)
    return build_gpt(cfg, SEQ_LEN, seed=7)


def loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward on fixed tokens, with a fixed dropout RNG state."""
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (2, SEQ_LEN + 1), generator=generator)
    torch.manual_seed(1)
    logits = model(idx[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def saved_bytes(model: nn.Module) -> int:
    """Bytes of tensors autograd saves for backward outside checkpointed regions."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_and_grads(model)
    return total


@pytest.mark.parametrize(("mode", "count"), [("none", 0), ("full", 4), ("every_n", 2)])
def test_names_loss_and_grads_are_unchanged(mode: str, count: int) -> None:
    reference, model = tiny_gpt(), tiny_gpt()
    assert checkpoint(model, mode, every_n=2) == count
    assert list(model.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    ref_loss, ref_grads = loss_and_grads(reference)
    loss, grads = loss_and_grads(model)
    assert torch.equal(loss, ref_loss)
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name  # recomputation is bit-exact on CPU


def test_checkpointing_saves_fewer_activations() -> None:
    sizes = {}
    for mode in ("none", "every_n", "full"):
        model = tiny_gpt()
        checkpoint(model, mode, every_n=2)
        sizes[mode] = saved_bytes(model)
    assert sizes["full"] < sizes["every_n"] < sizes["none"]


def test_every_n_picks_blocks_0_n_2n() -> None:
    model = tiny_gpt()
    assert checkpoint(model, "every_n", every_n=3) == 2  # blocks 0 and 3


def test_errors() -> None:
    with pytest.raises(ConfigError, match="^train.activation_checkpointing='some' is unknown; "
                       "use one of none, full, every_n$"):  # fmt: skip
        checkpoint(tiny_gpt(), "some")
    with pytest.raises(ConfigError, match="^train.activation_checkpointing='full' needs the "
                       "repeated blocks of Linear, and none were found"):  # fmt: skip
        checkpoint(nn.Linear(2, 2), "full")
    assert checkpoint(nn.Linear(2, 2), "none") == 0
    with pytest.raises(ConfigError, match="checkpoint_every_n=0"):
        checkpoint(tiny_gpt(), "every_n", every_n=0)
    model = tiny_gpt()
    checkpoint(model, "every_n")
    with pytest.raises(ValueError, match="^blocks.0 is already checkpointed"):
        checkpoint(model, "full")
