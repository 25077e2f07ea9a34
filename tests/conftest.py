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
