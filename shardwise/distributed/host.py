"""All-gathers and reduce-scatters of tensors in host memory (gloo), in pieces.

[Note: host collectives in pieces] On tensors in host memory, a collective whose buffers
reach 32 MiB runs at about half the speed of smaller ones: gloo allocates a buffer of that
size per call, and from 32 MiB glibc serves every allocation with a fresh mmap, whose pages
fault in anew each time (measured on 2 ranks: all-gathering 33 MiB 23.5 ms whole, 13.0 ms in
two pieces; with ``MALLOC_MMAP_MAX_=0`` the step disappears). And gloo's
reduce_scatter_tensor is slower than its list form at every size (8 MiB: 11.0 vs 5.5 ms;
33 MiB: 33.1 vs 19.1 ms). So on the host a reduce-scatter runs in the list form over views of
its input, and both run in pieces of at most `PIECE_BYTES` (every rank's part of a piece
together): one call per piece, which comm.py records as one collective. All-gathers give the
same bytes; a reduce-scatter sums each element over the same ranks, bit for bit as before on
2 ranks, and on more in another order than reduce_scatter_tensor's (a few ulps apart).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

PIECE_BYTES = 24 * 2**20
"""The most bytes of one piece, every rank's part together: below glibc's 32 MiB."""


def reduce_scatter_single(
    out: torch.Tensor, inp: torch.Tensor, *, op: Any, group: Any, async_op: bool
) -> Any:
    """`out` = this rank's part of the sum over `group` of contiguous `inp` (one part per
    rank), in the list form and in pieces."""
    mine, every = out.view(-1), inp.view(-1)
    n, ranks = mine.numel(), dist.get_world_size(group)
    works = [
        dist.reduce_scatter(
            mine[lo:hi],
            [every[rank * n + lo : rank * n + hi] for rank in range(ranks)],
            op=op,
            group=group,
            async_op=async_op,
        )
        for lo, hi in _pieces(n, ranks, inp.element_size())
    ]
    return _PieceWorks(works) if async_op else None


def all_gather_single(out: torch.Tensor, inp: torch.Tensor, *, group: Any, async_op: bool) -> Any:
    """`out` = every rank's contiguous `inp` over `group`, in rank order (`inp` may be this
    rank's part of `out`): whole up to `PIECE_BYTES`, in pieces above."""
    if out.nbytes <= PIECE_BYTES:
        return dist.all_gather_single(out, inp, group=group, async_op=async_op)
    every, mine = out.view(-1), inp.view(-1)
    n, ranks = mine.numel(), dist.get_world_size(group)
    works = [
        dist.all_gather(
            [every[rank * n + lo : rank * n + hi] for rank in range(ranks)],
            mine[lo:hi],
            group=group,
            async_op=async_op,
        )
        for lo, hi in _pieces(n, ranks, inp.element_size())
    ]
    return _PieceWorks(works) if async_op else None


def _pieces(per_rank: int, ranks: int, itemsize: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of each rank's `per_rank` elements, a piece's parts at most
    `PIECE_BYTES` together."""
    step = max(1, PIECE_BYTES // (ranks * itemsize))
    return [(lo, min(lo + step, per_rank)) for lo in range(0, per_rank, step)]


class _PieceWorks:
    """The works of one collective issued in pieces: complete when every piece is."""

    def __init__(self, works: list[Any]) -> None:
        self._works = works

    def wait(self, *args: Any) -> bool:
        for work in self._works:
            work.wait(*args)
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self._works)
