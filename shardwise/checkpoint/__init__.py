"""Checkpoints: atomic save of engine, data and RNG state; exact resume."""

from shardwise.checkpoint.io import find_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["find_checkpoint", "load_checkpoint", "save_checkpoint"]
