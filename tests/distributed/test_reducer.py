from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from shardwise.accelerator import get_accelerator
from shardwise.distributed import comm
from shardwise.distributed.dims import ParallelDims, dp_mesh
from shardwise.distributed.reducer import FIRST_BUCKET_BYTES, GradReducer, make_buckets


class TwoPaths(nn.Module):
    """`skip` is used only when asked: an unused parameter in some steps or on some ranks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.skip = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, use_skip: bool) -> torch.Tensor:
        h = self.a(x)
        if use_skip:
            h = h + self.skip(x)
        return self.b(h).sum()


def make(model: nn.Module, group=None, bucket_bytes: int = 64, scatter: bool = False):
    params = list(model.parameters())
    buckets = make_buckets(params, group, torch.float32, bucket_bytes, scatter)
    return GradReducer(buckets, group, scatter)


def reduced_grad(reducer: GradReducer, param: nn.Parameter) -> torch.Tensor:
    """The averaged gradient of `param` (all of it must lie in this rank's kept range)."""
    for bucket in reducer.buckets:
        for offset, p in zip(bucket.offsets, bucket.params, strict=True):
            if p is param:
                flat = bucket.reduced_range(offset, offset + p.numel())
                return flat.view_as(p)
    raise KeyError(param)


def reference_grads(model: nn.Module, batches: list[tuple[torch.Tensor, bool]]) -> list:
    model.zero_grad(set_to_none=True)
    for x, use_skip in batches:
        model(x, use_skip).backward()
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
    ]


def run_step(model, reducer, batches) -> list[torch.Tensor]:
    for i, (x, use_skip) in enumerate(batches):
        last = i == len(batches) - 1
        reducer.prepare(sync=last)
        model(x, use_skip).backward()
        reducer.finish(last=last)
    grads = [reduced_grad(reducer, p).clone() for p in model.parameters()]
    reducer.release_grads()
    return grads


def test_accumulation_and_unused_parameters_give_exact_gradients():
    model = TwoPaths()
    reducer = make(model)
    x = [torch.randn(2, 4) for _ in range(3)]
    steps = [
        [(x[0], True), (x[1], True)],  # every parameter used
        [(x[2], False)],  # `skip` unused: its slot must not keep step 1's gradient
        [(x[0], False), (x[1], True)],  # `skip` used only in the second micro-batch
    ]
    for batches in steps:
        got = run_step(model, reducer, batches)
        ref_model = TwoPaths()
        ref_model.load_state_dict(model.state_dict())
        want = reference_grads(ref_model, batches)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_gradients_live_in_the_bucket_after_backward():
    model = TwoPaths()
    reducer = make(model)
    reducer.prepare(sync=True)
    model(torch.randn(2, 4), True).backward()
    storages = {b.grads.untyped_storage().data_ptr() for b in reducer.buckets}
    assert all(p.grad.untyped_storage().data_ptr() in storages for p in model.parameters())
    reducer.finish()


def test_buckets_reverse_order_padding_and_small_first_bucket():
    layers = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(6)])  # 256 KiB each
    reducer = make(layers, bucket_bytes=3 * 2**20)
    first = reducer.buckets[0]
    assert first.params[0] is layers[-1].weight  # backward order: last layer first
    assert sum(p.numel() * 4 for p in first.params) >= FIRST_BUCKET_BYTES
    assert len(first.params) == FIRST_BUCKET_BYTES // (256 * 256 * 4)
    assert sum(len(b.params) for b in reducer.buckets) == 6


def _average_with_a_rank_skipping_a_parameter() -> list[torch.Tensor]:
    rank = dist.get_rank()
    mesh = ParallelDims(1, 2, 1, 1, 1, "1d", 1, 2).build_mesh(get_accelerator().device_type)
    model = TwoPaths()
    reducer = make(model, dp_mesh(mesh))
    x = torch.full((2, 4), float(rank + 1))
    return run_step(model, reducer, [(x, rank == 0)])


def test_two_ranks_average_even_when_one_rank_skips_a_parameter(pool2):
    got = pool2.run(_average_with_a_rank_skipping_a_parameter)
    model = TwoPaths()
    per_rank = [
        reference_grads(model, [(torch.full((2, 4), float(r + 1)), r == 0)]) for r in range(2)
    ]
    want = [(a + b) / 2 for a, b in zip(*per_rank, strict=True)]
    for rank_grads in got:
        for g, w in zip(rank_grads, want, strict=True):
            torch.testing.assert_close(g, w)


def _reduce_scatter_keeps_own_slice(bucket_bytes: int) -> dict:
    rank = dist.get_rank()
    mesh = ParallelDims(1, 2, 1, 1, 1, "1d", 1, 2).build_mesh(get_accelerator().device_type)
    model = TwoPaths()
    reducer = make(model, dp_mesh(mesh), bucket_bytes=bucket_bytes, scatter=True)
    names = {id(p): name for name, p in model.named_parameters()}
    x = torch.arange(8.0).view(2, 4) * (rank + 1)
    reducer.prepare(sync=True)
    model(x, True).backward()
    reducer.finish()
    return {
        "numel": [b.numel for b in reducer.buckets],
        "shards": [b.shard for b in reducer.buckets],
        "kept": [b.reduced.clone() for b in reducer.buckets],
        "grads_freed": all(b.grads is None for b in reducer.buckets)
        and all(p.grad is None for p in model.parameters()),
        "order": [[names[id(p)] for p in b.params] for b in reducer.buckets],
    }


def test_reduce_scatter_keeps_only_this_ranks_slice(pool2):
    results = pool2.run(_reduce_scatter_keeps_own_slice, 64)
    model = TwoPaths()
    inputs = [torch.arange(8.0).view(2, 4) * (r + 1) for r in range(2)]
    grads = [reference_grads(model, [(x, True)]) for x in inputs]
    mean = {id(p): (a + b) / 2 for p, a, b in zip(model.parameters(), *grads, strict=True)}
    names = {id(p): name for name, p in model.named_parameters()}
    mean_by_name = {names[k]: v for k, v in mean.items()}
    for rank, result in enumerate(results):
        assert result["grads_freed"]
        for numel, (start, end), kept, order in zip(
            result["numel"], result["shards"], result["kept"], result["order"], strict=True
        ):
            assert (start, end) == (rank * numel // 2, (rank + 1) * numel // 2)
            flat = torch.zeros(numel)  # the averaged bucket, rebuilt from the reference
            offset = 0
            for name in order:
                grad = mean_by_name[name].flatten()
                flat[offset : offset + grad.numel()] = grad
                offset += grad.numel()
            torch.testing.assert_close(kept, flat[start:end])


def _alive_full_buffers_during_backward() -> tuple[int, bool]:
    mesh = ParallelDims(1, 2, 1, 1, 1, "1d", 1, 2).build_mesh(get_accelerator().device_type)
    torch.manual_seed(0)
    layers = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(6)])
    group = dp_mesh(mesh)
    params = list(layers.parameters())
    buckets = make_buckets(params, group, torch.float32, 64, scatter=True)  # one per weight
    assert [b.params for b in buckets] == [[layer.weight] for layer in reversed(layers)]
    reducer = GradReducer(buckets, group, scatter=True)
    most = 0

    def count(_param) -> None:
        nonlocal most
        most = max(most, sum(b.grads is not None for b in reducer.buckets))

    for layer in layers:
        layer.weight.register_post_accumulate_grad_hook(count)
    reducer.prepare(sync=True)
    layers(torch.randn(4, 8)).sum().backward()
    reducer.finish()
    return most, all(b.grads is None for b in reducer.buckets)


def test_reduce_scatter_frees_each_full_buffer_after_the_next_launch(pool2):
    for most, all_freed in pool2.run(_alive_full_buffers_during_backward):
        assert most <= 2, most  # one in flight, one being filled
        assert all_freed


def _reduce_scatter_every_micro_batch() -> dict:
    rank = dist.get_rank()
    mesh = ParallelDims(1, 2, 1, 1, 1, "1d", 1, 2).build_mesh(get_accelerator().device_type)
    model = TwoPaths()
    reducer = make(model, dp_mesh(mesh), scatter=True)
    batches = [(torch.full((2, 4), float(rank + 1 + m)), m != 1) for m in range(3)]
    freed = []
    for m, (x, use_skip) in enumerate(batches):
        reducer.prepare(sync=m == 2)
        model(x, use_skip).backward()
        reducer.finish(last=m == 2)
        freed.append([b.grads is None for b in reducer.buckets])
    return {"freed": freed, **_kept_slices(model, reducer)}


def _kept_slices(model: nn.Module, reducer: GradReducer) -> dict:
    """This rank's reduced slice of every bucket, and the buckets' layouts by name."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        "kept": [b.reduced.clone() for b in reducer.buckets],
        "layout": [
            ([names[id(p)] for p in b.params], b.offsets, b.numel, b.shard) for b in reducer.buckets
        ],
    }


def assert_kept_slices(result: dict, model: nn.Module, batches_per_rank: list[list]) -> None:
    """The kept slices are those of the reference gradients (`model` over each rank's
    micro-batches, summed) averaged over the ranks."""
    per_rank = [reference_grads(model, batches) for batches in batches_per_rank]
    names = [name for name, _ in model.named_parameters()]
    ranks = len(per_rank)
    mean = {n: (sum(grads) / ranks).flatten() for n, *grads in zip(names, *per_rank, strict=True)}
    for kept, (params, offsets, numel, (start, end)) in zip(
        result["kept"], result["layout"], strict=True
    ):
        flat = torch.zeros(numel)  # the averaged bucket, rebuilt from the reference
        for name, offset in zip(params, offsets, strict=True):
            flat[offset : offset + mean[name].numel()] = mean[name]
        torch.testing.assert_close(kept, flat[start:end])


def test_reduce_scatter_runs_every_micro_batch_and_keeps_only_slices(pool2):
    """[Note: reducing every micro-batch]: after each backward only the reduced slices are
    alive, but for a bucket not ready (`skip` gets no gradient in the second of three
    micro-batches: its bucket keeps it local until the last backward; the bucket after it
    is reduced once backward is done); the kept slices add up to the average of all three
    micro-batches."""
    got = pool2.run(_reduce_scatter_every_micro_batch)
    batches = [[(torch.full((2, 4), float(r + 1 + m)), m != 1) for m in range(3)] for r in range(2)]
    for result in got:
        assert result["freed"] == [[True, True], [False, True], [True, True]]
        assert_kept_slices(result, TwoPaths(), batches)


class Branches(nn.Module):
    """Two halves, each micro-batch's backward reaching one of them: an interleaved pipeline
    rank's two stages (the later one's bucket first in launch order)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, which: str) -> torch.Tensor:
        return getattr(self, which)(x).sum()


BRANCHES = ["first", "second", "first"]


def _one_branch_per_micro_batch() -> dict:
    rank = dist.get_rank()
    mesh = ParallelDims(1, 2, 1, 1, 1, "1d", 1, 2).build_mesh(get_accelerator().device_type)
    model = Branches()
    reducer = make(model, dp_mesh(mesh), scatter=True)
    launched, real = [], comm.reduce_scatter_

    def counted(*args, **kwargs):
        launched[-1] += 1
        return real(*args, **kwargs)

    freed = []
    comm.reduce_scatter_ = counted
    try:
        for m, which in enumerate(BRANCHES):
            launched.append(0)
            last = m == len(BRANCHES) - 1
            reducer.prepare(sync=last)
            model(torch.full((2, 4), float(rank + 1 + m)), which).backward()
            reducer.finish(last=last)
            freed.append(all(b.grads is None for b in reducer.buckets))
    finally:
        comm.reduce_scatter_ = real
    return {"freed": freed, "launched": launched, **_kept_slices(model, reducer)}


def test_a_bucket_behind_one_without_gradients_is_reduced_after_backward(pool2):
    """[Note: launch order]: the first branch's bucket, second in launch order, is reduced
    at the end of each backward that completes it, so no full-size gradient outlives a
    backward; the step's last backward does not reduce the second branch's bucket again
    (one reduce-scatter per backward). Each rank keeps the average of its slice."""
    got = pool2.run(_one_branch_per_micro_batch)
    batches = [
        [(torch.full((2, 4), float(r + 1 + m)), w) for m, w in enumerate(BRANCHES)]
        for r in range(2)
    ]
    for result in got:
        assert [params for params, *_ in result["layout"]] == [
            ["second.bias", "second.weight"],
            ["first.bias", "first.weight"],
        ]
        assert result["freed"] == [True, True, True]
        assert result["launched"] == [1, 1, 1]
        assert_kept_slices(result, Branches(), batches)
