"""Bucketed gradient reduction that overlaps with backward.

Gradients live in flat per-bucket buffers, so a bucket is reduced with one collective.
A post-accumulate-grad hook counts the parameters of a bucket that are ready; a full bucket
is launched asynchronously while backward goes on computing earlier layers.

[Note: first touch] After a step every ``.grad`` is released (None). The first backward of
the next step hands each parameter a fresh gradient, which the hook copies into the bucket
before pointing ``.grad`` at its bucket view; later micro-batches accumulate into the view
in place. One copy per step instead of zeroing 4 bytes per parameter and accumulating into
them (measured 12 ms/step for 25M parameters on one CPU core). Parameters that got no
gradient in a step have their slot zeroed in `finish`.

[Note: launch order] gloo and NCCL match collectives by issue order, so every rank must
launch buckets in the same order. Buckets are only launched in index order: a bucket that
becomes ready early waits until all buckets before it were launched. Buckets that never get
ready (parameters unused this step) are launched in `finish`, still in index order.

[Note: shard-ready layout] Buckets are padded to a multiple of the group size. ZeRO-1/2
reduce-scatter the same buffers: rank r then owns the slice [r*n/P, (r+1)*n/P) of every
bucket, and each parameter knows its offset in the bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from shardwise.distributed import comm


@dataclass
class Bucket:
    """Parameters whose gradients are reduced together, and their flat buffers."""

    params: list[nn.Parameter]
    offsets: list[int]
    """Element offset of each parameter in `grads` / `reduced`."""
    grads: torch.Tensor
    """Flat gradient buffer in the parameter dtype; every ``param.grad`` is a view of it."""
    reduced: torch.Tensor
    """Flat buffer in the result dtype holding the averaged gradient (may be `grads` itself)."""
    comm_buffer: torch.Tensor
    """The buffer the collective runs on: `reduced`, or `grads` when reducing in the
    parameter dtype (then copied into `reduced` once the collective is done)."""
    ready: int = 0
    """Parameters whose gradient for this step is complete (counted in the sync backward)."""
    work: object | None = field(default=None, repr=False)

    def view_of(self, buffer: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter `index`'s slice of a flat buffer, shaped like the parameter."""
        param = self.params[index]
        start = self.offsets[index]
        return buffer[start : start + param.numel()].view_as(param)


class GradReducer:
    """Averages gradients over a data-parallel group in buckets, overlapped with backward."""

    def __init__(
        self,
        params: list[nn.Parameter],
        group: object | None,
        group_size: int,
        bucket_bytes: int,
        reduce_dtype: torch.dtype,
        result_dtype: torch.dtype,
    ) -> None:
        """`group` is a 1-D DeviceMesh (or None with `group_size` 1); params in model order.

        Gradients are reduced in `reduce_dtype` and delivered in `result_dtype` (the dtype
        of the optimizer's master weights)."""
        self.group = group
        self.group_size = group_size
        self.buckets = [
            _make_bucket(group_params, reduce_dtype, result_dtype, group_size)
            for group_params in _bucket_params(params, bucket_bytes)
        ]
        self._slot = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._sync = False
        self._next_launch = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]

    def prepare(self, sync: bool) -> None:
        """Arm (sync=True) or disarm the hooks for the next backward."""
        self._sync = sync

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket, index = self._slot[id(param)]
        view = bucket.view_of(bucket.grads, index)
        if param.grad.data_ptr() != view.data_ptr():  # first touch this step
            view.copy_(param.grad)
            param.grad = view
        if not self._sync:
            return  # accumulation micro-batch: gradients stay local
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.ready < len(bucket.params):
                return
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        # Pre-divide: the sum of x/P over P ranks is the mean; gloo has no AVG op, and
        # dividing first keeps fp16 sums in range.
        if bucket.comm_buffer is bucket.reduced and bucket.reduced is not bucket.grads:
            bucket.reduced.copy_(bucket.grads)
        if self.group_size > 1:
            bucket.comm_buffer.div_(self.group_size)
            bucket.work = comm.all_reduce_(bucket.comm_buffer, self.group, async_op=True)
        self._next_launch += 1

    def finish(self) -> None:
        """Launch what is left (unused parameters), wait for every bucket, reset counters."""
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            for index, param in enumerate(bucket.params):
                if param.grad is None:  # no gradient this step: its slot holds an old one
                    param.grad = bucket.view_of(bucket.grads, index).zero_()
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            if bucket.comm_buffer is not bucket.reduced:
                bucket.reduced.copy_(bucket.comm_buffer)
            bucket.work, bucket.ready = None, 0
        self._next_launch = 0
        self._sync = False

    def release_grads(self) -> None:
        """Drop the parameters' gradients after a step (see [Note: first touch])."""
        for bucket in self.buckets:
            for param in bucket.params:
                param.grad = None

    def reduced_flat(self) -> list[torch.Tensor]:
        """The reduced gradient buffers (padding is zero), for norms and unscaling."""
        return [b.reduced for b in self.buckets]

    def reduced_grad(self, param: nn.Parameter) -> torch.Tensor:
        """The reduced gradient of `param`, a view shaped like it."""
        bucket, index = self._slot[id(param)]
        return bucket.view_of(bucket.reduced, index)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()


FIRST_BUCKET_BYTES = 2**20
"""The first bucket closes early (as DDP's does) so communication starts as soon as the last
layers' gradients exist, instead of after `bucket_bytes` of them."""


def _bucket_params(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Group parameters in reverse model order (≈ the order backward produces gradients),
    one dtype per bucket, closing a bucket once it holds its byte budget."""
    groups: list[list[nn.Parameter]] = []
    open_by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    size_by_dtype: dict[torch.dtype, int] = {}
    for param in reversed(params):
        current = open_by_dtype.get(param.dtype)
        budget = min(FIRST_BUCKET_BYTES, bucket_bytes) if len(groups) <= 1 else bucket_bytes
        if current is None or size_by_dtype[param.dtype] >= budget:
            current = open_by_dtype[param.dtype] = []
            size_by_dtype[param.dtype] = 0
            groups.append(current)
        current.append(param)
        size_by_dtype[param.dtype] += param.numel() * param.element_size()
    return groups


def _make_bucket(
    params: list[nn.Parameter],
    reduce_dtype: torch.dtype,
    result_dtype: torch.dtype,
    group_size: int,
) -> Bucket:
    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += param.numel()
    padded = -(-total // group_size) * group_size
    device, dtype = params[0].device, params[0].dtype
    grads = torch.zeros(padded, dtype=dtype, device=device)
    reduced = (
        grads if result_dtype == dtype else torch.zeros(padded, dtype=result_dtype, device=device)
    )
    comm_buffer = grads if reduce_dtype == dtype else reduced
    if comm_buffer.dtype != reduce_dtype:
        raise ValueError(f"cannot reduce {dtype} gradients in {reduce_dtype} into {result_dtype}")
    bucket = Bucket(
        params=params, offsets=offsets, grads=grads, reduced=reduced, comm_buffer=comm_buffer
    )
    for index, param in enumerate(params):
        param.grad = bucket.view_of(grads, index)
    return bucket
