from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


def _all_reduce_rank() -> float:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one() -> None:
    assert dist.get_rank() != 1, "rank one refuses"


def test_pool_runs_many_cases_in_one_group(pool2):
    assert pool2.run(_all_reduce_rank) == [1.0, 1.0]
    assert pool2.run(_all_reduce_rank) == [1.0, 1.0]


def test_pool_reports_the_failing_rank_and_recovers(pool2):
    with pytest.raises(AssertionError, match="(?s)rank 1.*rank one refuses"):
        pool2.run(_fail_on_rank_one)
    assert pool2.run(_all_reduce_rank) == [1.0, 1.0]
