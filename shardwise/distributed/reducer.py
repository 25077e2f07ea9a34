"""Bucketed gradient reduction that overlaps with backward: all-reduce (DP, ZeRO-1) or
reduce-scatter (ZeRO-2).

Gradients live in flat per-bucket buffers, so a bucket is reduced with one collective.
A post-accumulate-grad hook counts the parameters of a bucket that are ready; a full bucket
is launched asynchronously while backward goes on computing earlier layers.

[Note: launch order] gloo and NCCL match collectives by issue order, so every rank must
launch buckets in the same order. While backward runs, buckets are only launched in index
order: a bucket that becomes ready early waits until all buckets before it were launched.
What is left is launched in `finish`, still in index order: at the step's last backward
every bucket (parameters unused this step are zeroed), at an earlier one that reduces the
buckets that are ready (the same on every rank: the same graph gave the same parameters
their gradients).

[Note: first touch] After a step every ``.grad`` is released (None). The first backward of
the next step hands each parameter a fresh gradient, which the hook copies into the bucket
before pointing ``.grad`` at its bucket view; later micro-batches accumulate into the view
in place. One copy per step instead of zeroing 4 bytes per parameter and accumulating into
them (measured 12 ms/step for 25M parameters on one CPU core). Parameters that got no
gradient in a step have their slot zeroed in `finish`.

[Note: division on arrival] An all-reduce averages by summing x / P, so every gradient is
divided by P before it is sent. Where a bucket is all-reduced whole and in the parameter dtype,
the first touch of the step's only backward writes grad / P into the bucket instead of a copy
(one pass over the gradients where a copy and then a division over the bucket took two; torch
DDP fuses them the same way; ~30 ms of backward a step for 23M parameters on one CPU core,
the wide shape of bench dp). A gradient copied in by an accumulation micro-batch marks its
bucket `undivided`, and the bucket is then divided whole at its launch, as every other path
(reduce-scatter, compression) does.

[Note: shard layout] Buckets are padded to a multiple of the group size P; rank r owns the
slice [r*n/P, (r+1)*n/P) of every bucket of n elements (`Bucket.shard`). In reduce-scatter
mode (ZeRO-2) a rank keeps only the reduced gradient of its slice. A bucket's full-size
gradient buffer is freed as soon as the next bucket is launched (its own reduce-scatter is
waited on then), so during backward at most two full buckets are alive, and between steps
gradients cost n/P elements a bucket.

[Note: reducing every micro-batch] Reduce-scattering (ZeRO-2) in exact steps, every backward
reduces its ready buckets, not only the step's last: a later micro-batch's reduced slice is
added to the kept one, and the full-size buffers are freed as in the step's last backward, so
gradient accumulation keeps n/P elements a bucket between micro-batches as between steps
(DeepSpeed's stage 2 does the same). A bucket ready once backward is done but behind one
that is not (a pipeline rank's other stage, whose buckets come first in launch order) is
reduced in `finish`; a bucket not ready (a parameter without a gradient in this backward)
keeps its gradients local until a backward completes it, or the step's last. At the last,
a bucket reduced earlier in the step and given no gradient since is not reduced again.
All-reducing (stages 0, 1) and 1-bit Adam's compressed steps reduce in the last backward
only.

[Note: 1-bit Adam over replicas] With hierarchical data parallelism (ZeRO-2 sharded over
`group`, typically within a node, replicated over `replicate_group`, across nodes) the slow
link is the replicas' all-reduce. 1-bit Adam's exchange replaces that one: the slice is first
reduce-scattered exactly within the shard group (divided by the shard group's size only), then
averaged compressed over the replicas, as a bucket is over a flat group at ZeRO stage 0
(every replica needs the whole slice: worker and server errors, an all-to-all and an
all-gather). Buckets are padded so that each slice splits into one whole-chunk piece per
replica. Without replicas the exchange replaces the bucket's own collective.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import nn

from shardwise.distributed import comm
from shardwise.distributed.compressed import OneBitExchange


@dataclass
class Bucket:
    """Parameters whose gradients are reduced together, and their flat buffers."""

    params: list[nn.Parameter]
    offsets: list[int]
    """Element offset of each parameter in the bucket's flat layout."""
    numel: int
    """Elements of the flat layout, padded to a multiple of the group size."""
    shard: tuple[int, int]
    """[start, end) of the flat layout whose reduced gradient this rank keeps: its slice
    when reduce-scattering, else the whole bucket."""
    reduced: torch.Tensor
    """Averaged gradient in the reduce dtype: the whole bucket, or only `shard` when
    reduce-scattering. Without sharding and with the reduce dtype equal to the parameter
    dtype it is `grads` itself."""
    grads: torch.Tensor | None = None
    """Full-size gradient buffer in the parameter dtype (every ``param.grad`` is a view of
    it); None between steps when reduce-scattering."""
    ready: int = 0
    """Parameters whose gradient is complete (counted in a backward that reduces)."""
    reduced_in_step: bool = False
    """Whether a reduction of this step has written `reduced` already: a later one (the next
    micro-batch's, [Note: reducing every micro-batch]) is added to it."""
    partial: torch.Tensor | None = field(default=None, repr=False)
    """Where the reduction in flight writes when it is added to `reduced` after it."""
    undivided: bool = False
    """Whether some gradient in `grads` was copied in as it came, not divided by the ranks
    averaged ([Note: division on arrival]); reset at each step's end."""
    work: object | None = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def used(self) -> int:
        """Elements of the flat layout that hold parameters (the rest is padding)."""
        return self.offsets[-1] + self.params[-1].numel()

    @property
    def device(self) -> torch.device:
        return self.reduced.device

    def view_of(self, buffer: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter `index`'s slice of a full-size flat buffer, shaped like the parameter."""
        param = self.params[index]
        start = self.offsets[index]
        return buffer[start : start + param.numel()].view_as(param)

    def reduced_range(self, start: int, end: int) -> torch.Tensor:
        """The reduced gradient of flat range [start, end) (inside `shard`)."""
        return self.reduced[start - self.shard[0] : end - self.shard[0]]


class Exchange(enum.Enum):
    """How a step's gradients travel between the ranks (1-bit and 0/1 Adam change it)."""

    EXACT = "exact"
    """All-reduced (or reduce-scattered) in the reduce dtype."""
    COMPRESSED = "compressed"
    """Through the 1-bit exchange ([Note: 1-bit Adam over replicas])."""
    LOCAL = "local"
    """Not at all: each rank keeps its own gradients (0/1 Adam's local steps; 1-bit Adam's
    compressed steps at zero.stage 0, whose momenta travel instead)."""


class GradReducer:
    """Averages gradients over a data-parallel group in buckets, overlapped with backward."""

    def __init__(
        self,
        buckets: list[Bucket],
        group: object | None,
        scatter: bool = False,
        replicate_group: object | None = None,
        compression: OneBitExchange | None = None,
    ) -> None:
        """`buckets` from `make_buckets`, in launch order; `group` is a 1-D DeviceMesh (or
        None for one process).

        With `scatter` each rank keeps only the reduced gradient of its shard of every bucket
        (ZeRO-2). With `replicate_group` (hierarchical data parallelism, reduce-scatter
        only) the kept slices are then all-reduced across the replicas. Hooks are registered
        at the first `prepare`, after whoever materialises the parameters (ZeRO, see
        zero/optimizer.py) has swapped them in.

        `compression` (1-bit Adam's `OneBitExchange` over `compressed_sizes`) replaces the
        collective of every bucket in a step whose gradients travel compressed, or with
        `replicate_group` the all-reduce across the replicas ([Note: 1-bit Adam over
        replicas])."""
        self.buckets = buckets
        self.group = group
        self.group_size = comm.group_size(group)
        self.replicate_group = replicate_group
        replicas = 1 if replicate_group is None else comm.group_size(replicate_group)
        self._ranks_averaged = self.group_size * replicas
        self.scatter = scatter
        self.compression = compression
        self.exchange = Exchange.EXACT
        """How this step's gradients travel (set by `prepare`)."""
        self._slot = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._sync = False
        self._next_launch = 0
        self._handles: list = []
        self._in_flight: list[tuple[int, Bucket]] = []

    def prepare(self, sync: bool, exchange: Exchange = Exchange.EXACT) -> None:
        """Arm (sync=True) or disarm the hooks for the next backward; `exchange`: how this
        step's gradients travel (COMPRESSED needs a `compression`)."""
        if exchange is Exchange.COMPRESSED and self.compression is None:
            raise ValueError("a compressed exchange needs the reducer's compression")
        if self._in_flight or self._next_launch:
            raise RuntimeError("GradReducer.finish() must follow every backward")
        if not self._handles:
            hook = self._on_grad_ready
            params = [p for bucket in self.buckets for p in bucket.params]
            self._handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
        self._sync = sync
        self.exchange = exchange

    @property
    def _reduces_now(self) -> bool:
        """Whether this backward reduces its ready buckets ([Note: reducing every
        micro-batch])."""
        return self._sync or (self.scatter and self.exchange is Exchange.EXACT)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket, index = self._slot[id(param)]
        if bucket.grads is None:
            bucket.grads = _new_grads(bucket)
        view = bucket.view_of(bucket.grads, index)
        if param.grad.data_ptr() != view.data_ptr():  # first touch this step
            if self._divides_on_arrival(bucket):
                torch.div(param.grad, self._ranks_averaged, out=view)
            else:
                view.copy_(param.grad)
                bucket.undivided = True
            param.grad = view
        if not self._reduces_now:
            return  # accumulation micro-batch: gradients stay local
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.ready < len(bucket.params):
                return
            self._launch(self._next_launch)
            self._next_launch += 1

    def _compressing(self) -> bool:
        return self.exchange is Exchange.COMPRESSED

    def _divides_on_arrival(self, bucket: Bucket) -> bool:
        """Whether a gradient's first touch divides it on its way into `bucket`: in the sync
        backward of a bucket all-reduced whole, as is, and not yet holding a gradient copied
        in undivided by an accumulation micro-batch ([Note: division on arrival])."""
        return (
            self._sync
            and not bucket.undivided
            and not self.scatter
            and self.group_size > 1
            and bucket.reduced is bucket.grads
            and self.exchange is Exchange.EXACT
        )

    def _launch(self, index: int) -> None:
        # Pre-divide: the sum of x/P over P ranks is the mean; gloo has no AVG op, and
        # dividing first keeps fp16 sums in range.
        bucket = self.buckets[index]
        if self._compressing() and self.replicate_group is None:
            out = bucket.reduced_range(*self.compression.owned_range(index))
            bucket.work = self.compression.launch(index, bucket.grads, out)
        elif self.scatter:
            # a compressed average over the replicas comes next: it divides by their number
            ranks = self.group_size if self._compressing() else self._ranks_averaged
            source = bucket.grads.to(bucket.reduced.dtype).div_(ranks)
            out = bucket.reduced
            if bucket.reduced_in_step:  # a later micro-batch's: added after it is done
                out = bucket.partial = torch.empty_like(bucket.reduced)
            bucket.reduced_in_step = True
            bucket.work = comm.reduce_scatter_(out, source, self.group, async_op=True)
        else:
            if bucket.reduced is not bucket.grads:
                bucket.reduced.copy_(bucket.grads)
            if self.group_size > 1 and self.exchange is not Exchange.LOCAL:
                if bucket.undivided:
                    bucket.reduced.div_(self._ranks_averaged)
                bucket.work = comm.all_reduce_(bucket.reduced, self.group, async_op=True)
        self._in_flight.append((index, bucket))
        while self.scatter and len(self._in_flight) > 1:
            self._retire(*self._in_flight.pop(0))  # see [Note: shard layout]

    def _retire(self, index: int, bucket: Bucket) -> None:
        """Wait for a bucket's reduction; when reduce-scattering, free its full-size buffer."""
        if bucket.work is not None:
            bucket.work.wait()
            bucket.work = None
        out = bucket.reduced if bucket.partial is None else bucket.partial
        if self.replicate_group is not None and self._compressing():
            self.compression.launch(index, bucket.reduced, bucket.reduced).wait()
        elif self.replicate_group is not None:
            comm.all_reduce_(out, self.replicate_group)
        if bucket.partial is not None:
            bucket.reduced.add_(bucket.partial)
            bucket.partial = None
        if self.scatter:
            bucket.grads = None
            for param in bucket.params:
                param.grad = None

    def finish(self, last: bool = True) -> None:
        """After a backward: launch what is left ([Note: launch order]) and wait for every
        bucket launched; reset counters."""
        for index in range(self._next_launch, len(self.buckets)):
            bucket = self.buckets[index]
            if last and not (bucket.grads is None and bucket.reduced_in_step):
                if bucket.grads is None:  # no parameter of this bucket got a gradient
                    bucket.grads = _new_grads(bucket)
                for slot, param in enumerate(bucket.params):
                    if param.grad is None:  # no gradient this step: its slot holds an old one
                        param.grad = bucket.view_of(bucket.grads, slot).zero_()
                self._launch(index)
            elif not last and self._reduces_now and bucket.ready == len(bucket.params):
                self._launch(index)
        while self._in_flight:
            self._retire(*self._in_flight.pop(0))
        for bucket in self.buckets:
            bucket.ready = 0
            if last:
                bucket.undivided = bucket.reduced_in_step = False
        self._next_launch = 0
        self._sync = False

    def release_grads(self) -> None:
        """Drop the parameters' gradients after a step (see [Note: first touch])."""
        for bucket in self.buckets:
            for param in bucket.params:
                param.grad = None

    def reduced_grad(self, param: nn.Parameter) -> torch.Tensor:
        """`param`'s reduced gradient as this rank keeps it: all of it, or when
        reduce-scattering its slice of a bucket `param` has alone (flat, padding included)."""
        bucket, index = self._slot[id(param)]
        if not self.scatter:
            return bucket.view_of(bucket.reduced, index)
        if len(bucket.params) > 1:
            raise ValueError("a reduce-scattered parameter's gradient needs a bucket of its own")
        return bucket.reduced


def _new_grads(bucket: Bucket) -> torch.Tensor:
    """A full-size gradient buffer for a reduce-scatter step. Only the padding is zeroed:
    every parameter's slot is written by its first gradient or zeroed in `finish`."""
    grads = torch.empty(bucket.numel, dtype=bucket.dtype, device=bucket.device)
    grads[bucket.used :].zero_()
    return grads


FIRST_BUCKET_BYTES = 2**20
"""The first bucket closes early (as DDP's does) so communication starts as soon as the last
layers' gradients exist, instead of after `bucket_bytes` of them."""


def _bucket_params(
    params: list[nn.Parameter],
    bucket_bytes: int,
    alone: nn.Parameter | None = None,
    stage_of: dict[int, int] | None = None,
) -> list[list[nn.Parameter]]:
    """Group parameters in reverse model order (≈ the order backward produces gradients),
    one dtype and one stage (`stage_of`, by parameter id) per bucket, closing a bucket once
    it holds its byte budget; `alone` in a bucket of its own."""
    stage_of = stage_of or {}
    groups: list[list[nn.Parameter]] = []
    open_by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    size_by_dtype: dict[torch.dtype, int] = {}
    for param in reversed(params):
        if param is alone:
            groups.append([param])
            continue
        current = open_by_dtype.get(param.dtype)
        budget = min(FIRST_BUCKET_BYTES, bucket_bytes) if len(groups) <= 1 else bucket_bytes
        stage = stage_of.get(id(param))
        if (
            current is None
            or size_by_dtype[param.dtype] >= budget
            or stage_of.get(id(current[0])) != stage
        ):
            current = open_by_dtype[param.dtype] = []
            size_by_dtype[param.dtype] = 0
            groups.append(current)
        current.append(param)
        size_by_dtype[param.dtype] += param.numel() * param.element_size()
    return groups


def make_buckets(
    params: list[nn.Parameter],
    group: object | None,
    reduce_dtype: torch.dtype,
    bucket_bytes: int,
    scatter: bool = False,
    device: torch.device | None = None,
    align: int = 1,
    alone: nn.Parameter | None = None,
    stage_of: dict[int, int] | None = None,
) -> list[Bucket]:
    """The flat buckets of `params` (in model order) over `group`, in launch order, with
    their gradient buffers on `device` (default: the first parameter's, so parameters may
    still be on the meta device). Gradients are averaged in `reduce_dtype`; with `scatter`
    each rank keeps only its shard's (see [Note: shard layout]). Each bucket's slices are a
    multiple of `align` elements (1-bit compression packs 8 signs a byte and scales whole
    chunks); `alone` gets a bucket of its own, so that its reduced slices are the same on
    every rank holding a copy of it (a pipeline's tied weight); parameters of different
    stages (`stage_of`: the schedule's) share none, so that a backward through one stage
    completes its buckets."""
    size, rank = comm.group_size(group), comm.group_rank(group)
    device = device or params[0].device
    return [
        _make_bucket(group_params, reduce_dtype, size, rank, scatter, device, align)
        for group_params in _bucket_params(params, bucket_bytes, alone, stage_of)
    ]


def compressed_sizes(buckets: list[Bucket], replicated: bool) -> list[tuple[int, int]]:
    """(elements, of which used) of each tensor a compressed exchange averages: the buckets,
    or with replicas of ZeRO shards this rank's reduced slice of each ([Note: 1-bit Adam over
    replicas])."""
    if not replicated:
        return [(bucket.numel, bucket.used) for bucket in buckets]
    return [
        (end - start, min(max(bucket.used - start, 0), end - start))
        for bucket in buckets
        for start, end in [bucket.shard]
    ]


def _make_bucket(
    params: list[nn.Parameter],
    reduce_dtype: torch.dtype,
    group_size: int,
    rank: int,
    scatter: bool,
    device: torch.device,
    align: int,
) -> Bucket:
    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += param.numel()
    multiple = group_size * align
    numel = -(-total // multiple) * multiple
    shard_numel = numel // group_size
    shard = (rank * shard_numel, (rank + 1) * shard_numel) if scatter else (0, numel)
    dtype = params[0].dtype
    grads = None if scatter else torch.zeros(numel, dtype=dtype, device=device)
    if scatter:
        reduced = torch.zeros(shard_numel, dtype=reduce_dtype, device=device)
    elif reduce_dtype == dtype:
        reduced = grads
    else:
        reduced = torch.zeros(numel, dtype=reduce_dtype, device=device)
    return Bucket(params, offsets, numel, shard, reduced, grads)
