"""Checkpoints: atomic save of engine, data and RNG state; exact resume."""

from shardwise.checkpoint.io import (
    check_resumable,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["check_resumable", "find_checkpoint", "load_checkpoint", "save_checkpoint"]
