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
