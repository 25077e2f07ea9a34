"""Two pipeline stages of a 2.5D and a 3D tensor-parallel grid (q = 2): 16 ranks, so a module
of their own, whose pool starts only here."""

from __future__ import annotations

import pytest

from tests.parity import reference_run
from tests.pipeline.test_pipeline import config
from tests.tensor_parallel.test_gpt_parity import tp_engine_run


@pytest.mark.parametrize(
    "layout",
    [{"tp_mode": "2.5d", "tp_depth": 2}, {"tp_mode": "3d"}],
    ids=["2.5d-depth2-q2", "3d-q2"],
)
def test_two_stages_of_a_deep_grid_match_single_process(pool16, layout):
    """pp=2 x tp=8: each rank passes its batch block (of depth x q, or q^2) and hidden block
    (of q) to the rank of the same grid position on the next stage; parity per shard."""
    cfg = config(2, "1f1b", tp=8, **layout).replace(
        model={"n_layers": 2}, train={"micro_batch": 4, "global_batch": 8}
    )
    held = pool16.run(tp_engine_run, cfg, 16)
    assert set().union(*held) == set(reference_run(cfg)[1])
