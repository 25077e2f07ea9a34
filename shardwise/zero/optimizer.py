"""ZeRO stages 0, 1 and 2 as one mechanism: which slice of every bucket a rank's optimizer owns.

ZeRO (Rajbhandari et al., SC'20, section 5): with N data-parallel ranks, stage 1 partitions
the optimizer states (fp32 master weights, Adam m and v) so each rank updates 1/N of the
parameters and all-gathers the result; stage 2 also partitions the gradients
(reduce-scatter instead of all-reduce). Per-rank model-state bytes with mixed-precision Adam:
16Ψ (DP), 4Ψ + 12Ψ/N (stage 1), 2Ψ + 14Ψ/N (stage 2).

[Note: flat buffers and pieces] Model parameters become views of one flat buffer per reducer
bucket (a chunk laid out as the bucket, padded to a multiple of N), held by the bucket's
`FlatGroup` (zero/flat_group.py). A rank owns one contiguous slice of every bucket: all of
it at stage 0, slice r at stages 1 and 2. The optimizer steps *pieces*: the part of one
parameter that falls in the owned slice, as a 1-D view of the owned master buffer (an fp32
copy when parameters are bf16/fp16, else the flat parameter buffer itself, so fp32 training
keeps no second copy). Pieces keep per-parameter optimizer settings (weight-decay groups)
and record which global slice of which parameter they hold, which checkpoints save so that a
later resharding can map them to any layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from shardwise.distributed import comm
from shardwise.distributed.reducer import Bucket
from shardwise.precision import MixedPrecisionPolicy
from shardwise.zero.chunks.chunk import Chunk, ParamInit, Slot, Tier, TierIO, cut
from shardwise.zero.flat_group import FlatGroup

if TYPE_CHECKING:
    from shardwise.run_plan import Sharding


# [Note: building from the meta device] A model built on the meta device is materialised
# one bucket at a time, as its chunk is (`Chunk.materialize`): each parameter is filled by
# `param_init` directly in its slot of the bucket's flat buffer and the meta parameter is
# swapped for that view (`torch.utils.swap_tensors` keeps the Python object, so modules,
# ties and the reducer's lists still point at it). Hooks do not survive a swap, which is
# why the reducer registers its hooks only at the first backward. (At stage 3 a unit's
# chunk is filled and cut down to this rank's shard one at a time,
# zero/chunks/sharding.py: a model larger than one rank's memory is built directly as
# shards.)


class OptimizerShards:
    """Owns this rank's slice of every bucket: one `FlatGroup` per bucket (flat parameters,
    master weights, pieces)."""

    def __init__(
        self,
        model: nn.Module,
        buckets: list[Bucket],
        policy: MixedPrecisionPolicy,
        group: object | None,
        sharding: Sharding,
        param_init: ParamInit | None = None,
    ) -> None:
        """`sharding` says whether optimizer states (and parameters) are sharded over `group`;
        `param_init(name, tensor)` fills parameters still on the meta device, straight into
        their flat buffer (see [Note: building from the meta device])."""
        self.param_init = param_init
        self.policy = policy
        self.group = group
        self.sharded = sharding.optimizer
        names = {id(p): name for name, p in model.named_parameters()}
        rank, size = (comm.group_rank(group), comm.group_size(group)) if self.sharded else (0, 1)
        self.groups = [
            self._own(index, bucket, names, rank, size) for index, bucket in enumerate(buckets)
        ]
        self._piece_of_param: dict[int, list[nn.Parameter]] = {}
        for owned in self.groups:
            for piece, owner in zip(owned.pieces, owned.owners, strict=True):
                self._piece_of_param.setdefault(id(owner.param), []).append(piece.param)

    def _own(
        self,
        index: int,
        bucket: Bucket,
        names: dict[int, str],
        rank: int,
        size: int,
    ) -> FlatGroup:
        slots = [
            Slot(names[id(param)], param, offset, param.numel())
            for param, offset in zip(bucket.params, bucket.offsets, strict=True)
        ]
        chunk = Chunk(index, f"bucket.{index}", bucket.numel, bucket.dtype, slots)
        chunk.materialize(Tier.DEVICE, TierIO(bucket.device), self.param_init)
        shard_numel = bucket.numel // size
        start, end = rank * shard_numel, (rank + 1) * shard_numel
        shard = chunk.payload[start:end]
        if self.policy.needs_master_weights:
            master = shard.to(self.policy.master_dtype)
        else:
            master = shard
        pieces, owners = cut(
            slots, start, end, lambda slot, lo, hi: nn.Parameter(master[lo - start : hi - start])
        )
        return FlatGroup(bucket, self.sharded, start, end, chunk, shard, master, pieces, owners)

    # -- the optimizer's view ------------------------------------------------------------

    def param_groups(self, groups: list[dict]) -> list[dict]:
        """Model param groups (e.g. weight decay) rewritten over this rank's pieces."""
        return [
            {**g, "params": [pc for p in g["params"] for pc in self._piece_of_param.get(id(p), [])]}
            for g in groups
        ]

    @property
    def norm_group(self) -> object | None:
        """Group whose ranks hold disjoint gradient slices (None: every rank holds all)."""
        return self.group if self.sharded else None

    def owned_grads(self) -> list[torch.Tensor]:
        """The reduced gradient of every owned slice (for clipping and loss-scale checks)."""
        return [owned.owned_grad() for owned in self.groups]

    def attach_grads(self) -> None:
        """Point each piece's ``.grad`` at its reduced gradient (upcast when the reduce dtype
        is not the master dtype; the copy lives until `release_grads`)."""
        for owned in self.groups:
            for piece in owned.pieces:
                grad, stepped = owned.piece_grad(piece), piece.param
                stepped.grad = grad if grad.dtype == stepped.dtype else grad.to(stepped.dtype)

    def release_grads(self) -> None:
        for owned in self.groups:
            for piece in owned.pieces:
                piece.param.grad = None

    def sync_params(self) -> None:
        """After the step: write the owned slice back into the parameters; all-gather the
        slices at stages 1 and 2."""
        for owned in self.groups:
            owned.write_back(self.policy.needs_master_weights, self.group)
