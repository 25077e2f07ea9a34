"""Chunks sharded over data-parallel ranks (zero/chunk_shards.py), against plain torch.

Two ranks, each training on its rows of the global batch with every parameter chunk split in
two: gathered for compute, gradients reduce-scattered, each rank updating and placing its own
shards. Losses and parameters are checked against tests/parity.py's single-process reference
(not bit for bit: the gradient average and the norm are summed in another order).
"""

from __future__ import annotations

import torch.distributed as dist

from shardwise.engine import initialize
from shardwise.zero.chunks import Tier
from tests.parity import assert_parity, build_model, global_batches, make_config, reference_run

SMALLEST_CHUNKS = {"chunk_search_range_mb": 0}
BUDGET_MB = 0.21
"""Below the 192 KiB of parameter chunks plus their gradients on one rank, above what the
warm-up step needs beside this rank's shards."""
PLACEMENTS = {
    "static-third": {"policy": "static", "param_device_fraction": 0.34},
    "auto": {"policy": "auto", "device_budget_mb": BUDGET_MB},
    "auto-disk-adam-on-disk": {
        "policy": "auto",
        "device_budget_mb": BUDGET_MB,
        "host_budget_mb": 0.02,
        "optimizer": "disk",
    },
}


def config(**offload):
    """Two micro-batches of one sequence per rank and step: gradient shards accumulate."""
    return make_config(micro_batch=1, global_batch=4).replace(
        offload={**SMALLEST_CHUNKS, **offload}
    )


def train_rows(cfg) -> dict:
    """On every rank: train on this rank's rows; losses, weights, memory figures."""
    engine = initialize(build_model(cfg), None, cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for inputs, targets in global_batches(cfg):
        rows = inputs.shape[0] // world
        part = slice(rank * rows, (rank + 1) * rows)
        losses.append(engine.train_step((inputs[part], targets[part])))
    chunked = engine.chunked
    return {
        "losses": losses,
        "state": {k: v.float() for k, v in engine.full_state_dict().items()},
        "report": engine.memory_report(),
        "budget": chunked.manager.device_budget,
        "chunk_bytes": chunked.chunks[0].nbytes,
        "home_bytes": [h.nbytes for h in chunked.homes],
        "tiers": sorted({h.tier.value for h in chunked.homes}),
        "gathers": sum(c.tier is Tier.DEVICE for c in chunked.chunks),
    }


def test_every_placement_matches_single_process_on_two_ranks(pool2, tmp_path):
    want = reference_run(config())
    for name, offload in PLACEMENTS.items():
        cfg = config(**offload, disk_path=str(tmp_path))
        for got in pool2.run(train_rows, cfg):
            assert_parity((got["losses"], got["state"]), want, rtol=1e-5)
            assert all(size == got["chunk_bytes"] // 2 for size in got["home_bytes"]), name
            peak = got["report"]["chunks_device_peak"]
            assert peak <= got["budget"], f"{name}: device peak {peak} > {got['budget']}"
        if name == "auto-disk-adam-on-disk":
            assert "disk" in got["tiers"], "the host budget holds less than every shard"
            assert got["report"]["offloaded_disk"] > 0
