"""Disk tier (zero/offload/disk.py): roundtrips, ordering, checksums, errors, cleanup, stats."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from shardwise.errors import ConfigError
from shardwise.zero.offload import disk, run_dirs
from shardwise.zero.offload.disk import (
    PIECE_BYTES,
    ChecksumError,
    DiskFullError,
    DiskTier,
    measure_raw_throughput,
)


@pytest.fixture(params=[False, True], ids=["buffered", "direct"])
def tier(request, tmp_path):
    """A tier with buffered IO, and one with O_DIRECT ([Note: direct IO])."""
    tier = DiskTier(tmp_path, direct=request.param)
    if request.param and not tier.direct:
        tier.close()
        pytest.skip(f"{tmp_path} does not take O_DIRECT (the fallback has its own test)")
    yield tier
    tier.close()


def _random(dtype: torch.dtype, numel: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(numel, generator=gen) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return (torch.randn(numel, generator=gen) * 100).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, (numel,), generator=gen).to(dtype)


def _stored_files(tier: DiskTier) -> list:
    return sorted(tier.run_dir.glob("*.bin"))


def _roundtrip(tier: DiskTier, key: str, tensor: torch.Tensor) -> torch.Tensor:
    tier.write(key, tensor).result()
    out = torch.empty_like(tensor)
    tier.read(key, out).result()
    return out


DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [0, 1, 7, 1024, 4099])
def test_roundtrip_is_exact(tier, dtype, numel):
    tensor = _random(dtype, numel)
    assert torch.equal(_roundtrip(tier, "chunk", tensor), tensor)


def test_roundtrip_of_a_scalar_and_of_a_non_contiguous_tensor(tier):
    scalar = torch.tensor(3.5, dtype=torch.bfloat16)
    assert torch.equal(_roundtrip(tier, "scalar", scalar), scalar)
    strided = torch.arange(24, dtype=torch.float32).view(4, 6).t()  # written as a copy
    tier.write("strided", strided).result()
    out = torch.empty(6, 4)
    tier.read("strided", out).result()
    assert torch.equal(out, strided)


def test_large_roundtrip_spans_several_pieces(tier):
    numel = 8 * 2**20 + 3  # 32 MiB + 12 bytes: three pieces, the last block partial
    assert numel * 4 > 2 * PIECE_BYTES
    tensor = _random(torch.float32, numel)
    assert torch.equal(_roundtrip(tier, "big", tensor), tensor)


def test_many_keys_in_flight_at_once(tmp_path):
    with DiskTier(tmp_path, workers=4) as tier:
        tensors = {f"layer.{i}/grad": _random(torch.float32, 1000 + i, seed=i) for i in range(64)}
        writes = [tier.write(key, t) for key, t in tensors.items()]
        outs = {key: torch.empty_like(t) for key, t in tensors.items()}
        reads = [tier.read(key, outs[key]) for key in tensors]
        for future in writes + reads:
            future.result()
        for key, t in tensors.items():
            assert torch.equal(outs[key], t), key
        assert len(_stored_files(tier)) == 64


def test_overwrite_keeps_only_the_latest_version(tier):
    first, second = _random(torch.float32, 500, seed=1), _random(torch.float32, 500, seed=2)
    tier.write("k", first)
    tier.write("k", second)  # issued before the first is done: per-key order holds
    out = torch.empty(500)
    tier.read("k", out).result()
    assert torch.equal(out, second)
    tier.flush()  # the replaced version is unlinked in the background
    assert len(_stored_files(tier)) == 1
    assert tier.stats["bytes_on_disk"] == 2000


def test_read_waits_for_the_pending_write_of_its_key(tier, monkeypatch):
    gate = threading.Event()
    write_file = disk._write_file

    def slow_write_file(*args, **kwargs):
        assert gate.wait(10)
        return write_file(*args, **kwargs)

    monkeypatch.setattr(disk, "_write_file", slow_write_file)
    tensor = _random(torch.float32, 256)
    written = tier.write("k", tensor)
    out = torch.zeros(256)
    read = tier.read("k", out)
    time.sleep(0.1)
    assert not written.done() and not read.done()
    gate.set()
    read.result(timeout=10)
    assert written.done()
    assert torch.equal(out, tensor)


def test_corrupted_file_fails_the_read_naming_file_and_bytes(tier):
    tensor = _random(torch.float32, 5000)
    tier.write("k", tensor).result()
    (path,) = _stored_files(tier)
    with open(path, "r+b") as file:
        file.seek(12345)
        byte = file.read(1)
        file.seek(12345)
        file.write(bytes([byte[0] ^ 0x01]))  # one flipped bit
    mismatch = r"checksum mismatch in bytes \[0, 20000\) of 20000"
    with pytest.raises(ChecksumError, match=mismatch) as e:
        tier.read("k", torch.empty(5000)).result()
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_file_fails_the_read(tier):
    tier.write("k", _random(torch.float32, 5000)).result()
    (path,) = _stored_files(tier)
    os.truncate(path, 100)
    written = disk._aligned(20000) if tier.direct else 20000  # direct IO pads the last block
    with pytest.raises(ChecksumError, match=f"has 100 bytes, {written} were written"):
        tier.read("k", torch.empty(5000)).result()


def test_direct_io_pads_files_and_moves_unaligned_tensors_through_aligned_staging(tmp_path):
    """A tensor at an odd address, of a size no block divides, over several pieces: the file
    is the tensor padded to the alignment; the bytes come back exact."""
    with DiskTier(tmp_path, direct=True) as tier:
        if not tier.direct:
            pytest.skip(f"{tmp_path} does not take O_DIRECT (the fallback has its own test)")
        base = _random(torch.uint8, PIECE_BYTES * 2 + 4097 + 1)
        tensor = base[1:]  # one byte past the allocation's alignment
        assert tensor.data_ptr() % disk.DIRECT_ALIGN != 0
        assert torch.equal(_roundtrip(tier, "k", tensor), tensor)
        (path,) = _stored_files(tier)
        assert path.stat().st_size == disk._aligned(tensor.numel()) > tensor.numel()


def test_direct_io_falls_back_to_buffered_io_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(disk, "_takes_direct_io", lambda directory: False)
    with caplog.at_level("WARNING", logger="shardwise"), DiskTier(tmp_path, direct=True) as tier:
        assert not tier.direct
        tensor = _random(torch.float32, 1000)
        assert torch.equal(_roundtrip(tier, "k", tensor), tensor)
        (path,) = _stored_files(tier)
        assert path.stat().st_size == 4000  # unpadded: buffered
    assert "does not take O_DIRECT: the disk tier uses buffered IO" in caplog.text


def test_moved_blocks_are_detected():
    data = torch.arange(4096, dtype=torch.int32).view(torch.uint8)  # four 4 KiB blocks
    swapped = torch.cat([data[4096:8192], data[:4096], data[8192:]])
    assert disk._checksum(memoryview(data.numpy())) != disk._checksum(memoryview(swapped.numpy()))


def test_read_checks_key_and_size(tier):
    with pytest.raises(KeyError, match="no stored version"):
        tier.read("missing", torch.empty(4))
    tier.write("k", torch.ones(4)).result()
    with pytest.raises(ValueError, match="out has 12 bytes, the stored tensor 16"):
        tier.read("k", torch.empty(3)).result()


def test_missing_root_is_a_config_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as e:
        DiskTier(missing)
    assert str(e.value) == (
        f"offload.disk_path='{missing}' does not exist; create it or choose another directory"
    )


def test_a_file_as_root_is_a_config_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        DiskTier(path)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root writes into a chmod 0o555 directory; the unwritable path is covered by "
    "test_failed_probe_write_is_a_config_error",
)
def test_read_only_root_is_a_config_error(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            DiskTier(root)
    finally:
        root.chmod(0o755)


def test_failed_probe_write_is_a_config_error(tmp_path, monkeypatch):
    def refuse(directory):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_dirs, "_probe_write", refuse)
    with pytest.raises(ConfigError, match=r"offload.disk_path='.*' is not writable \(Permission"):
        DiskTier(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_bytes": -1}, "offload.disk_max_bytes=-1 is not a byte count"),
        ({"max_bytes": 1.5}, "offload.disk_max_bytes=1.5 is not a byte count"),
        ({"workers": 0}, "offload.disk_workers=0 must be an integer >= 1"),
    ],
)
def test_bad_arguments_are_config_errors_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DiskTier(tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_write_past_the_cap_fails_and_keeps_the_previous_version(tmp_path):
    first, second = _random(torch.float32, 1000, seed=1), _random(torch.float32, 1000, seed=2)
    with DiskTier(tmp_path, max_bytes=6000) as tier:
        tier.write("k", first).result()
        failed = tier.write("k", second)  # the old and new version would both be on disk
        with pytest.raises(DiskFullError) as e:
            failed.result()
        message = str(e.value)
        assert "'k'" in message and "(4000 bytes)" in message and "=6000" in message
        assert "4000 bytes in use, 2000 free" in message and "\n" not in message
        out = torch.empty(1000)
        tier.read("k", out).result()
        assert torch.equal(out, first)
        assert tier.stats["bytes_on_disk"] == 4000 and tier.stats["files"] == 1
        assert len(_stored_files(tier)) == 1
        tier.write("small", torch.ones(500)).result()  # 2000 bytes still fit


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_no_space_from_the_os_fails_and_keeps_the_previous_version(tier, monkeypatch):
    first = _random(torch.float32, 1000, seed=1)
    tier.write("k", first).result()
    path_of = tier._path_of

    def path_to_a_full_device(key, version):
        path = path_of(key, version)
        path.symlink_to("/dev/full")  # writing there fails with ENOSPC
        return path

    monkeypatch.setattr(tier, "_path_of", path_to_a_full_device)
    with pytest.raises(DiskFullError, match=r"'k' \(4000 bytes\).*no space left.*bytes free"):
        tier.write("k", _random(torch.float32, 1000, seed=2)).result()
    out = torch.empty(1000)
    tier.read("k", out).result()
    assert torch.equal(out, first)
    assert len(_stored_files(tier)) == 1  # the failed file (here the link) was removed


def test_flush_reraises_only_unobserved_failures(tmp_path):
    with DiskTier(tmp_path, max_bytes=100) as tier:
        seen = tier.write("seen", torch.ones(100))
        assert isinstance(seen.exception(timeout=10), DiskFullError)
        tier.flush()  # the failure was observed: nothing to raise
        tier.write("unseen", torch.ones(100))
        with pytest.raises(DiskFullError, match="'unseen'"):
            tier.flush()
        tier.flush()  # reported once


def test_discard_removes_the_file(tier):
    tier.write("k", torch.ones(100))
    tier.discard("k").result()  # after the write
    assert _stored_files(tier) == [] and tier.stats["bytes_on_disk"] == 0
    tier.write("k", torch.ones(100))
    tier.discard("k")  # in the background: what follows on the key waits for it
    tier.write("k", torch.full((100,), 2.0))
    out = torch.empty(100)
    tier.read("k", out).result()
    assert torch.equal(out, torch.full((100,), 2.0))
    tier.discard("k")
    tier.flush()
    assert _stored_files(tier) == [] and tier.stats["bytes_on_disk"] == 0
    tier.discard("k").result()  # not stored: ignored
    with pytest.raises(KeyError):
        tier.read("k", torch.empty(100))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _fake_run_dir(root, name: str, owner: dict) -> os.PathLike:
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "owner.json").write_text(json.dumps(owner))
    (run_dir / "chunk.bin").write_bytes(b"\0" * 100)
    return run_dir


def test_run_directories_of_dead_processes_are_removed(tmp_path):
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "start": run_dirs._start_time(os.getpid())}
    dead = _fake_run_dir(tmp_path, "shardwise-1-dead", {"pid": _dead_pid(), "host": host})
    reused = _fake_run_dir(tmp_path, "shardwise-2-reused", {**me, "start": "not-my-start"})
    alive = _fake_run_dir(tmp_path, "shardwise-3-alive", me)
    elsewhere = _fake_run_dir(tmp_path, "shardwise-4-other", {"pid": 1, "host": host + ".x"})
    unowned = tmp_path / "shardwise-5-unowned"
    unowned.mkdir()
    trash = tmp_path / ".shardwise-trash-6-x"
    trash.mkdir()
    with DiskTier(tmp_path) as tier:
        assert not dead.exists() and not reused.exists() and not trash.exists()
        assert alive.exists() and elsewhere.exists() and unowned.exists()
        owner = json.loads((tier.run_dir / "owner.json").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == host


def test_close_removes_the_run_directory_and_is_idempotent(tmp_path):
    tier = DiskTier(tmp_path)
    tier.write("k", torch.ones(10))
    run_dir = tier.run_dir
    assert run_dir.parent == tmp_path and run_dir.name.startswith(f"shardwise-{os.getpid()}-")
    tier.close()
    tier.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="closed"):
        tier.write("k", torch.ones(10))


def test_a_dropped_tier_removes_its_run_directory(tmp_path):
    tier = DiskTier(tmp_path)
    tier.write("k", torch.ones(10)).result()
    del tier
    # The last reference may be dropped in a worker, just after the future is done, and the
    # directory is then deleted there.
    deadline = time.monotonic() + 10
    while list(tmp_path.iterdir()) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert list(tmp_path.iterdir()) == []


_CHILD = """
import os, sys, torch
from shardwise.zero.offload import DiskTier
tier = DiskTier(sys.argv[1])
tier.write("k", torch.ones(1000))  # left pending: exit must still clean up
print(tier.run_dir, flush=True)
if sys.argv[2] == "crash":
    os._exit(1)
"""


def test_exit_cleans_up_and_a_crash_is_cleaned_up_by_the_next_tier(tmp_path):
    def child(mode: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp_path), mode],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done.stdout.strip()

    child("exit")
    assert list(tmp_path.iterdir()) == []  # removed at interpreter exit, without close()
    crashed = child("crash")
    assert [str(path) for path in tmp_path.iterdir()] == [crashed]
    with DiskTier(tmp_path) as tier:
        assert list(tmp_path.iterdir()) == [tier.run_dir]


def test_stats_count_bytes(tier):
    tier.write("a", torch.ones(100))
    tier.write("b", torch.ones(50, dtype=torch.float64))
    tier.flush()
    tier.read("a", torch.empty(100)).result()
    stats = tier.stats
    assert stats["bytes_written"] == 800 and stats["bytes_read"] == 400
    assert stats["files"] == 2 and stats["bytes_on_disk"] == 800
    assert stats["write_seconds"] > 0 and stats["read_seconds"] > 0


def test_measure_raw_throughput_removes_its_file(tmp_path):
    rates = measure_raw_throughput(tmp_path, 1 << 20)
    assert rates["write_bytes_per_s"] > 0 and rates["read_bytes_per_s"] > 0
    assert list(tmp_path.iterdir()) == []
