"""AdamW with weight-decay groups and a warm-up + decay learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from shardwise.config import OptimConfig

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]
"""Builds an optimizer from param groups (``[{"params": [...], "weight_decay": x}, ...]``)."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave biases, norms and embeddings (tied heads included) undecayed.

    Each parameter appears once even when shared; the order is ``model.parameters()``.
    """
    # A tensor-parallel embedding stands in for an nn.Embedding and says so (``is_embedding``).
    embeddings = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Embedding) or getattr(m, "is_embedding", False)
    }
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def default_optimizer_factory(cfg: OptimConfig) -> OptimizerFactory:
    """torch AdamW, fused (one kernel for all tensors; fast on CPU and CUDA)."""

    def build(groups: list[dict]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)

    return build


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Factor on the peak lr at optimizer step `step`: linear warm-up, then a cosine or linear
    decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        decay_steps = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
        if cfg.decay == "cosine":
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            remaining = 1.0 - progress
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * remaining

    return factor
