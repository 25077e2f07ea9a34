"""Splitting blocks into pipeline stages (pipeline/partition.py): contiguous, balanced."""

from __future__ import annotations

import itertools

import pytest

from shardwise.errors import ConfigError
from shardwise.pipeline.partition import balanced_split


def brute_force_best(costs: list[int], stages: int) -> int:
    """The smallest largest-stage cost over every contiguous split."""
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        worst = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize(
    ("costs", "stages"),
    [
        ([1] * 8, 2),
        ([1] * 8, 4),
        ([1] * 7, 3),
        ([5, 1, 1, 1, 1, 5], 3),
        ([3, 9, 2, 2, 7, 1, 4], 4),
        ([0, 0, 4, 0], 2),
        ([2, 2], 2),
    ],
)
def test_split_is_contiguous_covering_and_optimal(costs, stages):
    split = balanced_split(costs, stages)
    assert len(split) == stages and all(len(r) > 0 for r in split)
    assert [i for r in split for i in r] == list(range(len(costs)))
    assert max(sum(costs[i] for i in r) for r in split) == brute_force_best(costs, stages)


def test_equal_layers_split_equally():
    assert balanced_split([1] * 8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]


def test_more_stages_than_blocks_is_one_line():
    with pytest.raises(ConfigError, match="4 pipeline stages need at least 4 blocks") as info:
        balanced_split([1, 1, 1], 4)
    assert "\n" not in str(info.value)
