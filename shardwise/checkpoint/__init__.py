"""Checkpoints: atomic save of engine, data and RNG state; exact resume."""

from shardwise.checkpoint.io import (
    AsyncSaver,
    check_model_fits,
    check_resumable,
    find_checkpoint,
    intact_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "AsyncSaver",
    "check_model_fits",
    "check_resumable",
    "find_checkpoint",
    "intact_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]
