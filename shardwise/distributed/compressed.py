"""1-bit compressed gradient reduction with error feedback (the exchange of 1-bit Adam).

1-bit Adam (Tang et al., ICML 2021) freezes Adam's variance after a warm-up; what is left of
the update is linear in the gradient, so the gradient can travel compressed to one sign bit
per element, with the compression error fed back into the next step (error-compensated
compression: what a step's compression drops is added to the next step's input, so nothing
is lost, only delayed).

[Note: the compressed exchange] A bucket of n elements over N ranks is cut into N slices, one
per rank (the slice a rank's optimizer owns under ZeRO, [Note: shard layout] of reducer.py).

1. Worker: c = local gradient + worker error (the whole bucket, fp32; an fp16 gradient is
   divided by the loss scale first, so errors survive a change of scale); each slice is sent as
   its signs, 8 per byte, and one fp32 scale per `chunk` elements, ||c_chunk|| / sqrt(len),
   so the decompressed chunk scale * sign(c) has the norm of c_chunk. The worker error
   becomes c - decompress(compress(c)) (`compress_`). One all-to-all sends slice j to rank j.
2. Server (rank j, for slice j): the mean of the N decompressed slices is this step's estimate
   of the averaged gradient of its slice.
3. With optimizer states sharded (ZeRO 1 and 2) the estimate is all this rank's optimizer
   needs: the exchange replaces the reduce-scatter, and the parameters are all-gathered after
   the step as ZeRO always does. Unsharded (stage 0) every rank needs every slice: the server
   compresses estimate + server error once more (the server error keeps what that drops) and
   one all-gather of the packed slices gives every rank the same decompressed bucket.

Bytes one rank sends for a bucket (comm's [Note: byte accounting]): the all-to-all
(N-1)/N * N * m and, at stage 0, the all-gather (N-1) * m, where m = n/(8N) + 4n/(N chunk)
is one packed slice (buckets are padded so that chunks and bytes divide the slices); an fp32
all-reduce of the same bucket sends 2 (N-1)/N * 4n. Stage 0's ratio is 1/32 + 1/chunk.

Unlike DeepSpeed's 1-bit Adam, which compresses each worker's whole local momentum, the
workers here compress their gradient: a rank under ZeRO holds the momentum of its slice only.
The server folds the estimate into the momentum (m = b1 m + (1 - b1) g), which is what every
worker's local momentum has in common plus the mean of what differs, so the update is the
same in expectation; the error feedback works on the gradient as EF-SGD does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from shardwise.distributed import comm
from shardwise.errors import CheckpointError

_GATHER_BITS = 0x0102040810204080
"""Times 8 bytes of 0 / 1 read as one little-endian int64: byte k's bit lands on bit 56 + k
(no two products overlap, so nothing carries) -- packing 8 flags per multiply."""


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """One bit per element of fp32 `x` (rows, n), n a multiple of 8: 1 where the sign bit is set
    (negative, and -0.0), 8 per byte, element 8j + k in bit k of byte j -> uint8 (rows, n/8)."""
    # the sign bit as a byte 0 / 1: arithmetic shift to 0 / -1, bytes 0 / 255, bit 0 (this is
    # 1.7x faster than torch.signbit's bool on a CPU)
    negative = x.view(torch.int32).bitwise_right_shift(31).to(torch.uint8).bitwise_and_(1)
    words = negative.view(*x.shape[:-1], -1, 8).view(torch.int64).squeeze(-1)
    return words.mul(_GATHER_BITS).bitwise_right_shift(56).to(torch.uint8)


@functools.cache
def _sign_table(device: torch.device) -> torch.Tensor:
    """Row b: the 8 signs (+1.0 / -1.0) that byte b packs."""
    bits = (
        torch.arange(256, device=device)
        .unsqueeze(-1)
        .bitwise_right_shift(torch.arange(8, device=device))
    )
    return 1.0 - 2.0 * bits.bitwise_and(1).float()


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """The signs `pack_signs` packed, as +1.0 / -1.0 in fp32 (rows, 8 * bytes)."""
    signs = torch.nn.functional.embedding(packed.int(), _sign_table(packed.device))
    return signs.view(*packed.shape[:-1], -1)


def packed_bytes(n: int, chunk: int) -> int:
    """Bytes of `n` elements compressed: n / 8 of signs and 4 per chunk of scales."""
    return n // 8 + 4 * (n // chunk)


_PIECE = 1 << 18
"""Elements per step of the compression loops: their temporaries stay in the cache and in the
allocator's reuse, where whole-bucket temporaries would be fresh pages at every call (on a CPU
the page faults cost more than the arithmetic: 2x for `compress_`, 3x for `decompress_mean`)."""


def _pieces(rows: int, n: int, align: int):
    """Column ranges (a, b) covering 0..n, each a multiple of `align` elements (n is one) and
    about `_PIECE` elements over the `rows`."""
    step = max(1, _PIECE // (rows * align)) * align
    return ((a, min(n, a + step)) for a in range(0, n, step))


def compress_(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each row of fp32 `x` (rows, n; n a multiple of 8 and of `chunk`) as one uint8 message
    (rows, `packed_bytes(n, chunk)`): its signs, then one scale per chunk, ||x_chunk|| /
    sqrt(chunk) (signed copies of it keep the chunk's norm). `x` is left holding what the
    compression dropped: x - decompress(message)."""
    rows, n = x.shape
    signs = x.new_empty(rows, n // 8, dtype=torch.uint8)
    scales = x.new_empty(rows, n // chunk)
    for a, b in _pieces(rows, n, math.lcm(8, chunk)):
        blocks = x[:, a:b].unflatten(1, (-1, chunk))
        signs[:, a // 8 : b // 8] = pack_signs(x[:, a:b])
        scale = torch.linalg.vector_norm(blocks, dim=-1).div_(math.sqrt(chunk))
        scales[:, a // chunk : b // chunk] = scale
        blocks.sub_(torch.copysign(scale.unsqueeze(-1), blocks))  # the sign bit decides
    return torch.cat([signs, scales.view(torch.uint8)], dim=1)


def _decompressed_pieces(message: torch.Tensor, n: int, chunk: int):
    """(a, b, the fp32 rows' columns a..b) of what `compress_`'s `message` stands for."""
    rows = message.shape[0]
    signs = message[:, : n // 8]
    scales = message[:, n // 8 :].contiguous().view(torch.float32)
    for a, b in _pieces(rows, n, math.lcm(8, chunk)):
        values = unpack_signs(signs[:, a // 8 : b // 8]).unflatten(1, (-1, chunk))
        yield a, b, values.mul_(scales[:, a // chunk : b // chunk].unsqueeze(-1)).flatten(1)


def decompress(message: torch.Tensor, n: int, chunk: int, out: torch.Tensor) -> torch.Tensor:
    """Writes the fp32 rows (rows, n) that `compress_` messages stand for, scale * sign, into
    `out` and returns it."""
    for a, b, values in _decompressed_pieces(message, n, chunk):
        out[:, a:b] = values
    return out


def decompress_mean(message: torch.Tensor, n: int, chunk: int, out: torch.Tensor) -> torch.Tensor:
    """Writes the mean over the rows of `decompress`'s result into `out` (n,) and returns it."""
    for a, b, values in _decompressed_pieces(message, n, chunk):
        torch.sum(values, 0, out=out[a:b])
    return out.div_(message.shape[0])


class OneBitExchange:
    """Averages flat gradient tensors over a group, compressed to one bit per element, with
    worker and server error feedback ([Note: the compressed exchange]), in the steps whose
    gradients travel compressed (the reducer's `Exchange`). Tensor `index` is the same on
    every rank: the reducer's bucket `index`, or with replicas of ZeRO shards, this rank's
    slice of that bucket ([Note: 1-bit Adam over replicas] in reducer.py)."""

    def __init__(
        self,
        sizes: list[tuple[int, int]],
        group: object | None,
        chunk: int,
        gather: bool,
        device: torch.device,
        loss_scale: Callable[[], float] | None = None,
    ) -> None:
        """`sizes`: (elements, of which the first `used` hold gradients, the rest padding) of
        each tensor, its elements a multiple of the group size times 8 and `chunk`; `gather`:
        every rank needs the whole averaged tensor, not only its slice; `loss_scale`: fp16's,
        which the gradients arrive multiplied by (the errors are kept unscaled, so a change of
        scale leaves them valid, and as they were before the step, which an overflow undoes)."""
        self.group = group
        self.size = comm.group_size(group)
        self.rank = comm.group_rank(group)
        self.chunk = chunk
        self.gather = gather
        self.sizes = sizes
        self.worker_errors = [
            torch.zeros(numel, dtype=torch.float32, device=device) for numel, _ in sizes
        ]
        self.server_errors = [
            torch.zeros(numel // self.size, dtype=torch.float32, device=device)
            for numel, _ in sizes
            if gather
        ]
        """Gathering only: what the server's second compression dropped, per slice."""
        self.previous = [torch.empty_like(e) for e in self.errors] if loss_scale else []
        """fp16: each error as it was before this step's exchange changed it."""
        self.loss_scale = loss_scale or (lambda: 1.0)

    @property
    def errors(self) -> list[torch.Tensor]:
        """The worker errors, then the server errors."""
        return self.worker_errors + self.server_errors

    def _keep(self, kind: int, index: int) -> None:
        """fp16: remember error `index` of `kind` (0 worker, 1 server) before it changes."""
        if self.previous:
            offset = 0 if kind == 0 else len(self.worker_errors)
            self.previous[offset + index].copy_(self.errors[offset + index])

    def owned_range(self, index: int) -> tuple[int, int]:
        """The range of tensor `index` whose average this rank receives: its slice, or the
        whole tensor when gathering."""
        numel = self.sizes[index][0]
        if self.gather:
            return 0, numel
        slice_numel = numel // self.size
        return self.rank * slice_numel, (self.rank + 1) * slice_numel

    def launch(
        self, index: int, local: torch.Tensor, out: torch.Tensor, scaled: bool = True
    ) -> _CompressedWork:
        """Compress this rank's `local` tensor `index` and start the all-to-all; the returned
        work's `wait()` writes the average into `out` (its `owned_range`; `out` may be
        `local`, which is read here). `scaled`: `local` is a gradient as backward left it
        (times fp16's loss scale), not an optimizer's unscaled tensor."""
        error = self.worker_errors[index]
        self._keep(0, index)
        scale = self.loss_scale() if scaled else 1.0
        corrected = error.add_(local, alpha=1 / scale).view(self.size, -1)  # c = g + e
        message = compress_(corrected, self.chunk)  # leaves e = c - C(c)
        error[self.sizes[index][1] :].zero_()  # padding carries no error
        received = torch.empty_like(message)
        work = comm.all_to_all_(received, message, self.group, async_op=True)
        return _CompressedWork(self, index, received, work, out, scale)

    def _finish(self, index: int, received: torch.Tensor, out: torch.Tensor, scale: float) -> None:
        numel, used = self.sizes[index]
        slice_numel = numel // self.size
        if self.gather:
            error = self.server_errors[index]
            self._keep(1, index)
            mine = out.view(self.size, -1)[self.rank]  # free until the gathered tensor lands
            error.add_(decompress_mean(received, slice_numel, self.chunk, mine))
            message = compress_(error.view(1, -1), self.chunk)
            error[max(0, used - self.rank * slice_numel) :].zero_()
            everyone = message.new_empty(self.size, message.shape[1])
            comm.all_gather_(everyone, message, self.group)
            decompress(everyone, slice_numel, self.chunk, out.view(self.size, -1))
        else:
            decompress_mean(received, slice_numel, self.chunk, out)
        if scale != 1:
            out.mul_(scale)  # scaled, as the grads
        start, _ = self.owned_range(index)
        out[max(0, used - start) :].zero_()  # padding: norms read the whole slice

    def zero_errors(self) -> None:
        """Start the errors afresh: what they hold is in the units of another input (0/1
        Adam's switch from gradients to displacements)."""
        for error in self.errors:
            error.zero_()

    def restore_errors(self) -> None:
        """The errors as they were before this step (fp16 only), after a step whose gradients
        were discarded (an overflow): they hold non-finite values, or the residue of gradients
        that were never applied."""
        for error, previous in zip(self.errors, self.previous, strict=True):
            error.copy_(previous)

    def state_dict(self) -> dict:
        return {
            "worker": [e.clone() for e in self.worker_errors],
            "server": [e.clone() for e in self.server_errors],
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state["worker"] + state["server"]
        mine = self.errors
        if [t.shape for t in saved] != [t.shape for t in mine]:
            raise CheckpointError(
                "the checkpoint's 1-bit Adam error buffers have other shapes than this run's "
                "buckets; resume with the layout it was saved with"
            )
        for target, value in zip(mine, saved, strict=True):
            target.copy_(value)


class _CompressedWork:
    """A compressed average in flight; `wait()` completes it."""

    def __init__(self, exchange, index, received, work, out, scale) -> None:
        self._args = (index, received, out, scale)
        self._exchange = exchange
        self._work = work

    def wait(self) -> None:
        self._work.wait()
        self._exchange._finish(*self._args)
