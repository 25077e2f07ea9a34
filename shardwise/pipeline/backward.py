"""Zero-bubble's two halves of a stage's backward (Qi et al. 2024, "Zero Bubble Pipeline
Parallelism"): I, the gradient of the stage's input, which the previous stage waits for, and
W, the gradients of the stage's weights, which nothing waits for and the schedule defers.

[Note: I and W] I runs autograd from the stage's output to its input alone, so the engine
skips every edge that leads only to weights. A weight's gradient is made inside a node that
also lies on the input's path (a matmul's backward yields dX and dW): call it a *join*. I
records the gradient arriving at each join and keeps the graph. W runs each join again from
its recorded gradient with that join's weights as the only inputs, so the engine computes the
weight-side outputs and nothing on the input's path a second time: I + W cost one backward.
One autograd call per join keeps the joins apart: a single call from all of them would also
carry each join's input-side gradient down to the joins below it, counting those twice.
W accumulates into ``.grad`` through each weight's own accumulation node, so the store's
gradient hooks fire as in any backward. A weight reached from two joins (used twice in the
stage) cannot be split this way; such a stage's W runs the whole backward instead (correct,
at about 1.5 backwards per micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.graph import GradientEdge, Node


@dataclass
class _Join:
    node: Node
    weights: list[torch.Tensor]
    """The leaves this node's weight-side edges lead to."""
    grads: tuple[torch.Tensor | None, ...] = ()
    """The gradient that arrived at the node in I, per output of its forward."""


class WeightGradients:
    """What I leaves for W: each join with its recorded gradient and its weights."""

    def __init__(self, joins: list[_Join]) -> None:
        self._joins = joins

    def run(self) -> None:
        """W: every weight's gradient, accumulated into its ``.grad``; the graph is freed."""
        for join in self._joins:
            kept = [(k, grad) for k, grad in enumerate(join.grads) if grad is not None]
            if kept:
                roots = [GradientEdge(join.node, k) for k, _ in kept]
                torch.autograd.backward(roots, [grad for _, grad in kept], inputs=join.weights)
        self._joins = []


def backward_input(
    output: torch.Tensor, grad: torch.Tensor | None, stage_input: torch.Tensor
) -> tuple[torch.Tensor, WeightGradients | None]:
    """I: the gradient of `stage_input` (a leaf) from `output` (with `grad`, unless a scalar
    loss), and what W needs; None instead when the stage's weights cannot be split from the
    input's path (see [Note: I and W]): W must then run the whole backward from `output`,
    whose graph is kept."""
    joins = _joins(output.grad_fn, stage_input)
    handles = [join.node.register_prehook(_recorder(join)) for join in joins or ()]
    try:
        (input_grad,) = torch.autograd.grad(output, stage_input, grad, retain_graph=True)
    finally:
        for handle in handles:
            handle.remove()
    return input_grad, None if joins is None else WeightGradients(joins)


def _recorder(join: _Join) -> Callable[[tuple[torch.Tensor | None, ...]], None]:
    def record(grads: tuple[torch.Tensor | None, ...]) -> None:
        join.grads = grads

    return record


def _joins(root: Node, stage_input: torch.Tensor) -> list[_Join] | None:
    """The nodes on the input's path with an edge leaving it toward weights, each with the
    weights beyond that edge; None if a weight lies beyond two of them."""
    children: dict[Node, list[Node]] = {}
    parents: dict[Node, list[Node]] = {root: []}
    todo = [root]
    while todo:
        node = todo.pop()
        children[node] = [child for child, _ in node.next_functions if child is not None]
        for child in children[node]:
            if child not in parents:
                parents[child] = []
                todo.append(child)
            parents[child].append(node)
    input_node = next((n for n in children if getattr(n, "variable", None) is stage_input), None)
    if input_node is None:
        return None
    on_path = {input_node}  # every node from which the input's accumulation is reached
    todo = [input_node]
    while todo:
        for parent in parents[todo.pop()]:
            if parent not in on_path:
                on_path.add(parent)
                todo.append(parent)
    joins, owner = [], {}
    for node in children:  # in the order found from the root: the same on every rank
        if node not in on_path or node is input_node:
            continue
        weights = _weights_beyond([c for c in children[node] if c not in on_path], children)
        if not weights:
            continue
        for weight in weights:
            if owner.setdefault(id(weight), node) is not node:
                return None  # a weight used twice: its joins would overlap
        joins.append(_Join(node, weights))
    return joins


def _weights_beyond(starts: list[Node], children: dict[Node, list[Node]]) -> list[torch.Tensor]:
    """The leaves requiring grad (weights) whose accumulation nodes `starts` lead to."""
    seen, todo, weights = set(starts), list(starts), []
    while todo:
        node = todo.pop()
        variable = getattr(node, "variable", None)
        if variable is not None:
            weights.append(variable)
        for child in children[node]:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return weights
