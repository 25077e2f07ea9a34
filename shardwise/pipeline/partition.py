"""Splitting a model's blocks into pipeline stages: contiguous runs of blocks, balanced.

Each (virtual) stage takes a contiguous run of the blocks of the model's `ModelSpec`; the
embedding goes with the first stage and the head with the last (`PipelineCalls`). A run's
cost is the sum of its blocks' costs: one per block (``pipeline.partition = "layers"``), its
parameter count (``"params"``, for blocks of unequal width), the FLOPs of a forward and
backward counted on the meta device (``"flops"``), or the time or activation bytes of one
measured (``"time"``, ``"memory"``; costs.py), where the first and the last stage also carry
the embedding's and the head's. The split minimises the largest stage's cost (the pipeline's
steady state runs at the pace of its slowest stage), found exactly by a binary search over
that bound with a greedy fill, as in Megatron's and DeepSpeed's ``partition_balanced``; ties
keep earlier stages no larger than later ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardwise.errors import ConfigError


def balanced_split(
    costs: Sequence[int],
    stages: int,
    first: int = 0,
    last: int = 0,
    weights: Sequence[int] | None = None,
) -> list[range]:
    """Contiguous, non-empty index ranges of `costs`, one per stage, minimising the largest
    stage's cost: its blocks' total, the first stage's counting `first` more and the last's
    `last`, times the stage's weight (`weights`, default 1: e.g. the micro-batches whose
    activations a stage holds at once)."""
    if stages > len(costs):
        raise ConfigError(
            f"{stages} pipeline stages need at least {stages} blocks, the model has "
            f"{len(costs)}: lower parallel.pp (x pipeline.chunks)"
        )
    weights = list(weights) if weights is not None else [1] * stages
    if any(c < 0 for c in (*costs, first, last)) or min(weights) < 1:
        raise ValueError(
            f"costs must be non-negative and weights positive, got {list(costs)}, {first}, "
            f"{last}, {weights}"
        )
    extra = [0] * stages
    extra[0] += first
    extra[-1] += last
    low, high = max(costs, default=0), (sum(costs) + first + last) * max(weights)
    while low < high:
        bound = (low + high) // 2
        if _fill(costs, extra, weights, bound) is None:
            low = bound + 1
        else:
            high = bound
    split = _fill(costs, extra, weights, low)
    assert split is not None  # `low` is feasible by the search
    return split


def _fill(
    costs: Sequence[int], extra: list[int], weights: list[int], bound: int
) -> list[range] | None:
    """Stages of cost at most `bound` (stage s starting from `extra[s]`, its total times
    `weights[s]`), filled from the last backwards (later stages, which also hold the head,
    take the larger share of a tie), each left with at least one block per stage before it;
    None if the stages do not suffice."""
    ends, end = [], len(costs)
    for stage in range(len(extra) - 1, -1, -1):
        start, total = end, extra[stage]
        # stage `stage` may not reach into the `stage` blocks the stages before it need
        while start > stage and (total + costs[start - 1]) * weights[stage] <= bound:
            start -= 1
            total += costs[start]
        if stage == 0 and start > 0:
            return None
        if start == end:
            return None
        ends.append(range(start, end))
        end = start
    return ends[::-1]
