"""Zero-bubble's split backward (shardwise/pipeline/backward.py) in one process: I then W give
the gradients of one whole backward, W computes no input-path gradient again, and a weight
used twice falls back to the whole backward. (Activation checkpointing is refused with the
zero-bubble schedules: torch's recomputation serves one backward pass per region.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardwise.config import Config
from shardwise.models.gpt import build_gpt
from shardwise.pipeline.backward import backward_input


def middle_stage(mlp: str = "gelu") -> tuple[nn.Module, torch.Tensor]:
    """Two GPT blocks as a middle pipeline stage sees them, and a hidden-state input."""
    cfg = Config().replace(model={"n_layers": 2, "d_model": 32, "n_heads": 2, "mlp": mlp})
    model = build_gpt(cfg.model, 16, seed=3)
    stage = nn.Sequential(*model.blocks)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(4))
    return stage, x


def whole_backward(stage: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict:
    leaf = x.clone().requires_grad_()
    stage(leaf).backward(grad)
    grads = {name: p.grad.clone() for name, p in stage.named_parameters()}
    stage.zero_grad(set_to_none=True)
    return {"input": leaf.grad, **grads}


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_input_then_weights_give_the_whole_backward(mlp):
    stage, x = middle_stage(mlp)
    grad = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5))
    expected = whole_backward(stage, x, grad)
    ready = []
    for name, param in stage.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, n=name: ready.append(n))

    leaf = x.clone().requires_grad_()
    input_grad, weights = backward_input(stage(leaf), grad, leaf)
    assert weights is not None
    assert not ready and all(p.grad is None for p in stage.parameters())  # I made no dW
    torch.testing.assert_close(input_grad, expected["input"], rtol=1e-6, atol=1e-7)
    weights.run()
    assert sorted(ready) == sorted(name for name, _ in stage.named_parameters())  # each once
    for name, param in stage.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-6, atol=1e-7)
    assert leaf.grad is None  # W computed no input gradient again


def test_weights_run_no_input_path_node_again():
    """Counted on the graph: W executes the joins (matmul backwards) and the weight-side
    nodes, never a node that lies only on the input's path (the activation function)."""
    stage, x = middle_stage()
    leaf = x.clone().requires_grad_()
    out = stage(leaf)
    ran: list[str] = []
    nodes, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        node.register_hook(lambda *_, n=node: ran.append(type(n).__name__))
        todo.extend(child for child, _ in node.next_functions)
    _, weights = backward_input(out, torch.ones_like(out), leaf)
    in_input_half = list(ran)
    ran.clear()
    weights.run()
    assert "GeluBackward0" in in_input_half and "GeluBackward0" not in ran
    assert ran.count("AccumulateGrad") == len(list(stage.parameters()))


def test_a_weight_used_twice_leaves_w_the_whole_backward():
    layer = nn.Linear(8, 8)
    x = torch.randn(3, 8, requires_grad=True)
    out = layer(torch.tanh(layer(x)))
    input_grad, weights = backward_input(out, torch.ones_like(out), x)
    assert weights is None
    expected_x = torch.autograd.grad(layer(torch.tanh(layer(x))).sum(), x)[0]
    torch.testing.assert_close(input_grad, expected_x)
    out.backward(torch.ones_like(out))  # the graph was kept for the whole backward
    assert layer.weight.grad is not None
