"""The disk tier of the heterogeneous memory manager: tensors kept as files, moved asynchronously.

ZeRO-Infinity (Rajbhandari et al., SC'21, §5.1 and §6.2) keeps parameters, gradients and
optimizer states on NVMe and hides the transfers behind compute: evicted chunks are written
behind, the next ones read ahead. `DiskTier` is that tier on an ordinary file system. Each key
(one chunk: a contiguous tensor of any dtype) is one file in a private run directory, and a
small pool of worker threads does the IO with large sequential reads and writes.

What it guarantees:

- **Atomic versions.** A write goes to a new file, which becomes the key's version only once it
  is complete, so a failed write (disk full, IO error) leaves the previous version readable.
  See [Note: no rename].
- **Per-key order.** Operations on one key run in the order they were issued (a read waits for
  the pending write of its key); different keys proceed in parallel.
- **Verified reads.** A checksum of every 4 MiB piece stays in memory; a read whose bytes do
  not match fails with the file and the byte range. See [Note: checksum].
- **No leftovers.** The run directory is deleted by `close()`, at interpreter exit and, after a
  crash, by the next `DiskTier` created under the same root on the same host.

[Note: staging] Offloading exists to save memory, so a CPU tensor is written straight from its
own memory, with no staging copy: the caller must leave it unchanged until the write's future
is done (a change made earlier shows up as a checksum mismatch on the read, not as silently
stored bytes). A tensor on an accelerator is copied into a host buffer (pinned where the
accelerator supports it) before `write` returns, so its device memory may be reused at once,
which is the reason to evict it; only the file write is asynchronous. A read fills a CPU
`out` in place; a device `out` is filled from a host buffer once the checksum has passed, by a
blocking copy in the worker (on that thread's current stream), so the bytes are there when the
future is done; no queued device work may still be using `out` when the read is issued.

[Note: page cache] With ``fsync=False`` (the default) a write is done when the kernel holds the
bytes in its page cache, not when they reach the device: throughput measured then is memory
speed for files that fit in RAM, and the kernel writes the dirty pages back later (stalling
writers once `vm.dirty_ratio` is reached). Offloaded state is scratch, deleted when the run
ends, so durability is not needed; ``fsync=True`` makes every write wait for the device, which
gives the disk's own throughput and bounds dirty memory. Reads may likewise come from the page
cache. With ``direct=True`` neither happens: see [Note: direct IO].

[Note: direct IO] With ``direct=True`` (``offload.direct_io``, the default) files are read and
written with O_DIRECT where the file system takes it (probed when the tier opens; where it
does not, the log says so and IO is buffered). The page cache then holds none of the offloaded
bytes, so host memory the budget gave to something else is not taken by cached chunk files
(a run whose states exceed the RAM would only churn the cache anyway). O_DIRECT needs
block-aligned memory, offsets and lengths: each IO thread moves its pieces through one
page-aligned staging buffer of `PIECE_BYTES` (so staging is bounded: IO threads x 4 MiB), and
a file's last piece is padded with zeros to `DIRECT_ALIGN` bytes (the file is that much longer
than the tensor; reads copy only the tensor's bytes). Checksums are of the tensor's bytes, as
with buffered IO. Every write and read is then one to the device: a file read back soon after
it was written no longer comes from memory.

[Note: no rename] The usual atomic write, a temporary file that `os.replace` moves over the old
one, halved overwrite throughput on ext4 (4.5 -> 2.1 GB/s for 256 MiB, measured): with the
default `auto_da_alloc` mount option, renaming over an existing file (or truncating one) makes
the kernel start writing the new file back at once. The index of versions lives in memory
(the files are scratch: a crashed run's directory is deleted, not recovered), so each version
gets its own file name instead; the index switches to it when it is complete, and the old
file is unlinked then. Nothing is ever renamed over or truncated.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import mmap
import os
import re
import secrets
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shardwise.accelerator import get_accelerator
from shardwise.errors import ShardwiseError
from shardwise.zero.offload.run_dirs import (
    check_root,
    create_run_dir,
    delete_dir,
    remove_stale_run_dirs,
)

log = logging.getLogger("shardwise")

DIRECT_ALIGN = 4096
"""O_DIRECT alignment of memory, file offsets and lengths in bytes (a page; a multiple of the
logical block size of the disks we meet)."""

PIECE_BYTES = 4 << 20
"""IO and checksum granularity in bytes: one syscall and one checksum per piece. 4 MiB beat
1 and 16 MiB (read 12.0 vs 10.4 and 10.9 GB/s): small enough that a piece's checksum overlaps
the next piece's IO, large enough that per-piece overhead stays small."""

_BLOCK_BYTES = 4096


class DiskFullError(ShardwiseError):
    """A write did not fit: the tier's byte cap or the file system's free space was exceeded."""


class ChecksumError(ShardwiseError):
    """An offload file does not hold the bytes that were written to it."""


class IOFuture(Future[None]):
    """The `Future[None]` of one disk operation.

    It remembers whether its failure was looked at (`result()` or `exception()` on a done
    future), so that `DiskTier.flush` re-raises only failures nobody has seen. It cannot be
    cancelled: operations on one key run in order, and a cancelled link would break the chain.
    """

    def __init__(self) -> None:
        super().__init__()
        self._observed = False

    def result(self, timeout: float | None = None) -> None:
        try:
            return super().result(timeout)
        finally:
            self._observed = self._observed or self.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        finally:
            self._observed = self._observed or self.done()

    def cancel(self) -> bool:
        return False

    def _unseen_failure(self) -> BaseException | None:
        """The failure of this done future, unless it was already observed."""
        return None if self._observed else super().exception(0)


@dataclass(frozen=True)
class _Entry:
    """The stored version of one key."""

    path: Path
    nbytes: int
    sums: tuple[tuple[int, int], ...]
    """One `_checksum` per `PIECE_BYTES` piece of the file."""


class DiskTier:
    """Tensors stored as files under a private run directory, written and read by workers.

    Args:
        root: an existing, writable directory; the run directory is created inside it.
        max_bytes: cap on the bytes of stored files (old and new version of a key both count
            while it is rewritten); a write past it fails with `DiskFullError`. None: no cap.
        workers: IO threads; operations on different keys run in parallel up to this many.
        fsync: make every write wait until the bytes reach the device; see [Note: page cache].
        direct: read and write with O_DIRECT where the file system takes it ([Note: direct IO]).

    Error messages name the config fields `offload.disk_path`, `offload.disk_max_bytes` and
    `offload.disk_workers` that feed these arguments.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        workers: int = 2,
        fsync: bool = False,
        direct: bool = False,
    ) -> None:
        root_path = check_root(root, max_bytes, workers)
        remove_stale_run_dirs(root_path)
        self.run_dir: Path = create_run_dir(root_path)
        """Directory holding this tier's files; deleted by `close()`."""
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.direct = direct and _takes_direct_io(self.run_dir)
        """Whether files are read and written with O_DIRECT ([Note: direct IO])."""
        self._thread_state = threading.local()  # each IO thread's staging buffer
        if direct and not self.direct:
            log.warning(
                "offload.disk_path %s does not take O_DIRECT: the disk tier uses buffered IO "
                "(the page cache holds what it writes)",
                root_path,
            )
        thread_prefix = _thread_prefix(self.run_dir)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_prefix)
        # Checksums, and unlinking superseded versions, overlap the IO; they never wait.
        self._helpers = ThreadPoolExecutor(workers, thread_name_prefix=f"{thread_prefix}-help")
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._tails: dict[str, IOFuture] = {}  # the last operation issued on each key
        self._unreported: dict[int, IOFuture] = {}  # pending or failed, by issue order
        self._issue_order = itertools.count()
        self._reserved_bytes = 0  # files being written, not yet a key's version
        self._versions = itertools.count()  # makes every file name new
        self._deletions: set[Future[None]] = set()  # superseded versions being unlinked
        self._bytes_on_disk = 0
        self._counters = {
            "bytes_written": 0,
            "bytes_read": 0,
            "write_seconds": 0.0,
            "read_seconds": 0.0,
        }
        self._closed = False
        # Runs on close(), at interpreter exit, or when the tier is garbage collected.
        self._finalizer = weakref.finalize(
            self, _release, (self._pool, self._helpers), self.run_dir
        )

    # ----------------------------------------------------------------------------- public API

    def write(self, key: str, tensor: torch.Tensor) -> IOFuture:
        """Store `tensor` under `key`, replacing any previous version; returns at once.

        A CPU tensor is written from its own memory and must stay unchanged until the future
        is done; a device tensor is first copied to the host (see [Note: staging]). The future
        fails with `DiskFullError` when the bytes do not fit; the previous version then stays.
        """
        _check_key(key)
        data = _host_bytes(tensor)
        return self._issue(key, self._write_now, key, data)

    def read(self, key: str, out: torch.Tensor) -> IOFuture:
        """Fill `out` (contiguous, same number of bytes as the stored tensor) with the stored
        version of `key`; returns at once. The future fails with `ChecksumError` when the file
        changed since it was written (the contents of a CPU `out` are then undefined)."""
        _check_key(key)
        if not out.is_contiguous():
            raise ValueError(f"offload read of key {key!r}: out must be contiguous")
        with self._lock:
            known = key in self._entries or key in self._tails
        if not known:
            raise KeyError(
                f"offload key {key!r} has no stored version: never written, discarded, or its "
                f"write failed"
            )
        return self._issue(key, self._read_now, key, out)

    def discard(self, key: str) -> Future:
        """Delete the stored version of `key` once its pending operations are done, in the
        background (unlinking a large file takes milliseconds; later operations on `key` wait
        for it); a key that is not stored is ignored."""
        _check_key(key)
        return self._issue(key, self._discard_now, key)

    def flush(self) -> None:
        """Wait for every operation issued so far (and the deletion of the versions they
        replaced); re-raise the first failure (in issue order) that was not already observed
        through its future. Later failures count as reported."""
        with self._lock:
            issued = list(self._unreported.items())
        wait([future for _, future in issued])
        with self._lock:
            deletions = list(self._deletions)
        wait(deletions)
        first = None
        with self._lock:
            for order, future in issued:
                failure = future._unseen_failure()
                future._observed = True
                self._unreported.pop(order, None)
                if first is None:
                    first = failure
        if first is not None:
            raise first

    def close(self) -> None:
        """Flush, stop the workers and delete the run directory; calling it again does nothing.
        A failure that `flush` re-raises is raised after the directory is deleted."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.flush()
        finally:
            self._finalizer()

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stats(self) -> dict[str, float]:
        """Bytes moved, worker seconds spent on it, and what is stored now.

        `write_seconds` and `read_seconds` add the time of each operation in its worker
        (checksum included), so with several workers they can exceed the wall time.
        """
        with self._lock:
            return {
                **self._counters,
                "files": len(self._entries),
                "bytes_on_disk": self._bytes_on_disk,
            }

    # --------------------------------------------------------------------- operation ordering

    def _issue(self, key: str, fn: Callable[..., None], *args: Any) -> IOFuture:
        """Run `fn(*args)` on a worker after the previous operation on `key` is done."""
        future = IOFuture()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"DiskTier at {self.run_dir} is closed")
            previous = self._tails.get(key)
            self._tails[key] = future
            order = next(self._issue_order)
            self._unreported[order] = future
        future.add_done_callback(partial(self._settle, key, order))
        start = partial(self._start, future, fn, args)
        if previous is None:
            start()
        else:
            previous.add_done_callback(lambda _: start())
        return future

    def _start(self, future: IOFuture, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            self._pool.submit(_run, future, fn, args)
        except RuntimeError as exc:  # the pool was shut down: interpreter exit
            future.set_running_or_notify_cancel()
            future.set_exception(exc)

    def _settle(self, key: str, order: int, future: IOFuture) -> None:
        with self._lock:
            if self._tails.get(key) is future:
                del self._tails[key]
            if future._unseen_failure() is None:
                self._unreported.pop(order, None)

    # ---------------------------------------------------------------- operations (in workers)

    def _write_now(self, key: str, data: torch.Tensor) -> None:
        nbytes = data.numel()
        path = self._path_of(key, next(self._versions))
        self._reserve(key, nbytes)
        started = time.perf_counter()
        try:
            sums = _write_file(
                path, memoryview(data.numpy()), self.fsync, self._helpers, self._staging()
            )
        except BaseException as exc:
            with self._lock:
                self._reserved_bytes -= nbytes
            _unlink_quietly(path)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._no_space(key, nbytes) from exc
            raise
        seconds = time.perf_counter() - started
        with self._lock:
            previous = self._entries.get(key)
            self._entries[key] = _Entry(path, nbytes, sums)
            self._reserved_bytes -= nbytes
            self._bytes_on_disk += nbytes - (previous.nbytes if previous else 0)
            self._counters["bytes_written"] += nbytes
            self._counters["write_seconds"] += seconds
        if previous is not None:  # no other operation on this key runs: they are chained
            # Freeing a large file's cached pages took ~1/3 of a 256 MiB write (measured).
            try:
                deletion = self._helpers.submit(_unlink_quietly, previous.path)
            except RuntimeError:  # the helpers were shut down: interpreter exit
                _unlink_quietly(previous.path)
                return
            with self._lock:
                self._deletions.add(deletion)
            deletion.add_done_callback(self._forget_deletion)

    def _read_now(self, key: str, out: torch.Tensor) -> None:
        started = time.perf_counter()
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            raise KeyError(
                f"offload key {key!r} has no stored version (its write failed or it was discarded)"
            )
        target = out.detach().reshape(-1).view(torch.uint8)
        if target.numel() != entry.nbytes:
            raise ValueError(
                f"offload read of key {key!r}: out has {target.numel()} bytes, "
                f"the stored tensor {entry.nbytes}"
            )
        on_host = target.device.type == "cpu"
        host = target if on_host else _host_buffer(entry.nbytes, target.device)
        _read_file(
            entry.path, memoryview(host.numpy()), entry.sums, key, self._helpers, self._staging()
        )
        if not on_host:
            target.copy_(host)
        seconds = time.perf_counter() - started
        with self._lock:
            self._counters["bytes_read"] += entry.nbytes
            self._counters["read_seconds"] += seconds

    def _discard_now(self, key: str) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes_on_disk -= entry.nbytes
        if entry is not None:
            _unlink_quietly(entry.path)

    # ---------------------------------------------------------------------------- helpers

    def _forget_deletion(self, deletion: Future[None]) -> None:
        with self._lock:
            self._deletions.discard(deletion)

    def _staging(self) -> memoryview | None:
        """With direct IO, this IO thread's page-aligned staging buffer of `PIECE_BYTES`
        (anonymous maps are page-aligned), made at its first IO; it goes with the thread."""
        if not self.direct:
            return None
        state = self._thread_state
        if not hasattr(state, "buffer"):
            state.buffer = memoryview(mmap.mmap(-1, PIECE_BYTES))
        return state.buffer

    def _path_of(self, key: str, version: int) -> Path:
        """A file for `key`: a readable prefix plus a hash, so that any string is a valid key,
        plus the version number (see [Note: no rename])."""
        readable = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:64]
        digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
        return self.run_dir / f"{readable}-{digest}.{version}.bin"

    def _reserve(self, key: str, nbytes: int) -> None:
        with self._lock:
            in_use = self._bytes_on_disk + self._reserved_bytes
            if self.max_bytes is not None and in_use + nbytes > self.max_bytes:
                raise DiskFullError(
                    f"offload disk full: writing key {key!r} ({nbytes} bytes) would exceed "
                    f"offload.disk_max_bytes={self.max_bytes} ({in_use} bytes in use, "
                    f"{self.max_bytes - in_use} free); discard keys or raise the cap "
                    f"(any previous version of the key stays readable)"
                )
            self._reserved_bytes += nbytes

    def _no_space(self, key: str, nbytes: int) -> DiskFullError:
        try:
            free = f"{shutil.disk_usage(self.run_dir).free} bytes free"
        except OSError:
            free = "free space unknown"
        return DiskFullError(
            f"offload disk full: writing key {key!r} ({nbytes} bytes) to {self.run_dir} "
            f"failed, no space left on the file system ({free}); free space or choose another "
            f"offload.disk_path (any previous version of the key stays readable)"
        )


# -------------------------------------------------------------------------------- file IO


def _run(future: IOFuture, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    future.set_running_or_notify_cancel()
    try:
        fn(*args)
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(None)


def _write_file(
    path: Path,
    data: memoryview,
    fsync: bool,
    checksums: ThreadPoolExecutor,
    staging: memoryview | None = None,
) -> tuple[tuple[int, int], ...]:
    """Write `data` to a new file at `path`, one piece per syscall; return the piece checksums,
    computed by `checksums` while the pieces are written (both release the GIL). With an
    aligned `staging` buffer: through it with O_DIRECT ([Note: direct IO])."""
    sums = []
    fd, direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, staging is not None)
    staging = staging if direct else None
    with open(fd, "wb", buffering=0) as file:
        for start in range(0, len(data), PIECE_BYTES):
            piece = data[start : start + PIECE_BYTES]
            sums.append(checksums.submit(_checksum, piece))
            if staging is not None:
                length = _aligned(len(piece))
                staging[: len(piece)] = piece
                staging[len(piece) : length] = bytes(length - len(piece))
                piece = staging[:length]
            while piece:  # a write may be partial
                piece = piece[file.write(piece) :]
        if fsync:
            os.fsync(file.fileno())
    return tuple(future.result() for future in sums)


def _read_file(
    path: Path,
    out: memoryview,
    sums: tuple[tuple[int, int], ...],
    key: str,
    checksums: ThreadPoolExecutor,
    staging: memoryview | None = None,
) -> None:
    """Read the file at `path` into `out`; check each piece against `sums` (on `checksums`,
    while the next piece is read). With an aligned `staging` buffer: with O_DIRECT through
    it, the file padded as `_write_file` padded it ([Note: direct IO])."""
    computed = []
    fd, direct = _open(path, os.O_RDONLY, staging is not None)
    staging = staging if direct else None
    with open(fd, "rb", buffering=0) as file:
        size = os.fstat(file.fileno()).st_size
        expected = _aligned(len(out)) if staging is not None else len(out)
        if size != expected:
            raise ChecksumError(
                f"offload file {path} (key {key!r}) has {size} bytes, {expected} were written; "
                f"it was truncated or changed outside shardwise"
            )
        for start in range(0, len(out), PIECE_BYTES):
            piece = out[start : start + PIECE_BYTES]
            rest = piece if staging is None else staging[: _aligned(len(piece))]
            while rest:  # a read may be partial
                count = file.readinto(rest)
                if not count:
                    raise ChecksumError(f"offload file {path} (key {key!r}) ended early")
                rest = rest[count:]
            if staging is not None:
                piece[:] = staging[: len(piece)]
            computed.append(checksums.submit(_checksum, piece))
    for index, future in enumerate(computed):
        if future.result() != sums[index]:
            start = index * PIECE_BYTES
            end = min(start + PIECE_BYTES, len(out))
            raise ChecksumError(
                f"offload file {path} (key {key!r}): checksum mismatch in bytes "
                f"[{start}, {end}) of {len(out)}; the file was corrupted or changed outside "
                f"shardwise (check the disk or choose another offload.disk_path)"
            )


def _aligned(nbytes: int) -> int:
    """`nbytes` rounded up to `DIRECT_ALIGN`."""
    return -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN


def _open(path: Path, flags: int, direct: bool) -> tuple[int, bool]:
    """A descriptor of `path`, and whether it is O_DIRECT: it is when `direct` and the file
    takes it (a link to a device, say, may not: then it is opened without)."""
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o600), True
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o600), False


def _takes_direct_io(directory: Path) -> bool:
    """Whether files in `directory` can be written and read back with O_DIRECT."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / ".direct-io-probe"
    block = mmap.mmap(-1, DIRECT_ALIGN)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        try:
            os.write(fd, block)
        finally:
            os.close(fd)
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.readv(fd, [block]) == DIRECT_ALIGN
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        _unlink_quietly(probe)


def _checksum(piece: memoryview) -> tuple[int, int]:
    """A Fletcher-style checksum over 4 KiB blocks, modulo 2**64.

    [Note: checksum] zlib.crc32 runs at ~3.5 GB/s on one core, slower than the page-cache
    IO it would guard (5-6 GB/s measured on the project machine): crc32 per piece cut
    DiskTier's throughput to ~0.4x of plain file IO. Summing uint64 words with numpy runs at
    ~27 GB/s. With r_i the wrapping sum of block i's words, the checksum is (Σ r_i, Σ (i+1) r_i):
    the first term catches every single-bit error and any change inside one 8-byte word; the
    second catches blocks that are moved or swapped; zeroed, stale or misdirected blocks change
    both unless their sums happen to collide. It is not a defence against deliberate tampering,
    and two compensating errors in one block (the same bit flipped up in one word and down in
    another) go unseen, which crc32 would catch. The file size is checked separately.
    """
    raw = np.frombuffer(piece, dtype=np.uint8)
    whole = len(raw) - len(raw) % _BLOCK_BYTES
    blocks = raw[:whole].view(np.uint64).reshape(-1, _BLOCK_BYTES // 8).sum(axis=1)
    if whole < len(raw):  # zero-pad the last partial block
        tail = np.zeros(_BLOCK_BYTES, dtype=np.uint8)
        tail[: len(raw) - whole] = raw[whole:]
        blocks = np.append(blocks, tail.view(np.uint64).sum(dtype=np.uint64))
    weights = np.arange(1, len(blocks) + 1, dtype=np.uint64)
    return int(blocks.sum(dtype=np.uint64)), int(np.dot(blocks, weights))


def _host_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of `tensor` as a flat uint8 CPU tensor: a view for a contiguous CPU tensor,
    otherwise a copy (see [Note: staging])."""
    flat = tensor.detach()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    flat = flat.reshape(-1).view(torch.uint8)
    if flat.device.type == "cpu":
        return flat
    host = _host_buffer(flat.numel(), flat.device)
    host.copy_(flat)  # synchronous: the device memory may be reused when write() returns
    return host


def _host_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 host buffer for transfers with `device`, pinned where that helps."""
    accelerator = get_accelerator()
    pinned = accelerator.supports_pinned_memory and device.type == accelerator.device_type
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise TypeError(f"offload keys are non-empty strings, got {key!r}")


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _thread_prefix(run_dir: Path) -> str:
    return f"shardwise-disk-{run_dir.name}"


def _release(pools: tuple[ThreadPoolExecutor, ...], run_dir: Path) -> None:
    """Stop the workers and delete the run directory (the finalizer: holds no DiskTier)."""
    # The last reference to a dropped tier may go away in one of its own workers, which
    # cannot wait for itself.
    in_worker = threading.current_thread().name.startswith(_thread_prefix(run_dir))
    for pool in pools:
        pool.shutdown(wait=not in_worker, cancel_futures=True)
    delete_dir(run_dir)


def measure_raw_throughput(
    root: str | os.PathLike[str], nbytes: int, *, fsync: bool = False
) -> dict[str, float]:
    """Bytes per second of one plain sequential `write` then `readinto` of `nbytes` under
    `root`: the baseline `DiskTier`'s throughput is compared with. The file is removed.

    Returns ``{"write_bytes_per_s": ..., "read_bytes_per_s": ...}``. Random bytes, so that
    compressing file systems do not flatter it; the read may come from the page cache, as
    `DiskTier`'s reads may (see [Note: page cache]). The file is created new, not truncated
    (see [Note: no rename]), and the read target is touched first, as a tier's `out` would be.
    """
    # Buffers from torch, as a tier's tensors are: torch asks for transparent huge pages, which
    # made page-cache reads 2x faster than into a numpy buffer (12.4 vs 6.3 GB/s, measured).
    data = torch.empty(nbytes, dtype=torch.uint8).numpy()
    data[:] = np.frombuffer(np.random.default_rng(0).bytes(nbytes), dtype=np.uint8)
    out = torch.zeros(nbytes, dtype=torch.uint8).numpy()
    out.fill(1)  # fault its pages in now, not during the timed read
    name = Path(root) / f".shardwise-raw-{os.getpid()}-{secrets.token_hex(4)}.bin"
    try:
        started = time.perf_counter()
        with open(name, "xb") as file:
            file.write(memoryview(data))
            if fsync:
                file.flush()
                os.fsync(file.fileno())
        write_seconds = time.perf_counter() - started
        started = time.perf_counter()
        with open(name, "rb") as file:
            file.readinto(memoryview(out))
        read_seconds = time.perf_counter() - started
    finally:
        _unlink_quietly(name)
    return {
        "write_bytes_per_s": nbytes / max(write_seconds, 1e-9),
        "read_bytes_per_s": nbytes / max(read_seconds, 1e-9),
    }
