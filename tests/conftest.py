from __future__ import annotations

import pytest

from tests.harness import DistributedPool


@pytest.fixture(scope="module")
def pool2():
    """Two ranks in one gloo group, spawned once per test module."""
    pool = DistributedPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool4():
    """Four ranks in one gloo group, spawned once per test module."""
    pool = DistributedPool(4)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool8():
    """Eight ranks (2.5D and 3D tensor parallelism at q=2), spawned once per session: eight
    processes on a small machine are slow to start, and every 8-rank test shares them."""
    pool = DistributedPool(8)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool16():
    """Sixteen ranks: two pipeline stages of a 2.5D or 3D grid (q=2). Only
    tests/pipeline/test_deep_grids.py uses them."""
    pool = DistributedPool(16)
    yield pool
    pool.close()


@pytest.fixture
def no_ranks_started(monkeypatch):
    """Fails the test if ``shardwise train`` gets as far as starting ranks (or training in
    process): for inputs that must be refused before launch."""

    def started(*args, **kwargs):
        raise AssertionError("ranks were started for input that must be refused before launch")

    import shardwise.distributed.launch
    import shardwise.trainer

    monkeypatch.setattr(shardwise.distributed.launch, "launch", started)
    monkeypatch.setattr(shardwise.trainer, "train", started)
    monkeypatch.setattr(shardwise.trainer, "reshard", started)
