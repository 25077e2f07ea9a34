"""Optimizers and learning-rate schedules."""

from shardwise.optim.factory import (
    OptimizerFactory,
    default_optimizer_factory,
    lr_multiplier,
    param_groups,
)

__all__ = ["OptimizerFactory", "default_optimizer_factory", "lr_multiplier", "param_groups"]
