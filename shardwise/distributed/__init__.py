"""Distributed building blocks: the parallel context and the counted collectives.

- `dims`: `ParallelDims`, degrees validated against the world size, and the one DeviceMesh
  with named axes ``("dp_replicate", "dp_shard", "pp", "sp", "tp")`` (+ flattened ``"dp"``).
- `comm`: every collective (in-place, async and autograd-aware), counted by `CommStats`.
- `link`: an emulated slow link (``distributed.emulate_gbps``) that comm's collectives wait on.
- `compressed`: 1-bit Adam's compressed gradient exchange with error feedback.

Submodules are imported explicitly (``from shardwise.distributed import comm``) so importing
the package starts nothing and pulls in no optional dependency.
"""
