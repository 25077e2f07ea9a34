"""Sequence parallelism: attention over a sequence split across the ``sp`` ranks — ring
attention (blocks of keys and values passed around) and Ulysses (all-to-all between sequence
and head sharding) and their product (hybrid): the ops, and `model.py` running a model on each
rank's part of every sequence. See docs/sequence_parallel.md."""

from shardwise.sequence_parallel.hybrid import hybrid_attention, hybrid_positions
from shardwise.sequence_parallel.masks import contiguous_positions, visible, zigzag_positions
from shardwise.sequence_parallel.ring import ring_attention
from shardwise.sequence_parallel.ulysses import ulysses_attention

__all__ = [
    "contiguous_positions",
    "hybrid_attention",
    "hybrid_positions",
    "ring_attention",
    "ulysses_attention",
    "visible",
    "zigzag_positions",
]
