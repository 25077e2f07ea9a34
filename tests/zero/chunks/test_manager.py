"""ChunkManager (zero/chunks/manager.py): budgets, Belady eviction, tiers, prefetch, placement."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from shardwise.errors import ConfigError
from shardwise.zero.chunks.chunk import (
    Chunk,
    ChunkState,
    ChunkStateError,
    GatheredChunk,
    Tier,
    build_grad_chunks,
)
from shardwise.zero.chunks.manager import ChunkManager
from shardwise.zero.chunks.packing import build_chunks
from shardwise.zero.chunks.placement import apply_placement, placement_summary, static_placement
from shardwise.zero.offload.disk import DiskFullError, DiskTier


class FakeDisk:
    """The disk tier's interface in memory; reads and writes run on a worker thread."""

    def __init__(self) -> None:
        self.store: dict[str, torch.Tensor] = {}
        self.writes = self.reads = 0
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._lock = threading.Lock()

    def write(self, key: str, tensor: torch.Tensor) -> Future:
        self.writes += 1

        def run() -> None:
            with self._lock:
                self.store[key] = tensor.detach().clone()

        return self._pool.submit(run)

    def read(self, key: str, out: torch.Tensor) -> Future:
        self.reads += 1

        def run() -> None:
            with self._lock:
                out.copy_(self.store[key])

        return self._pool.submit(run)

    def discard(self, key: str) -> None:
        with self._lock:
            self.store.pop(key, None)

    def flush(self) -> None:
        self._pool.submit(lambda: None).result()

    def nbytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for t in self.store.values())


CPU = torch.device("cpu")


def make_chunks(sizes: list[int], chunk_numel: int, seed: int = 0) -> list[Chunk]:
    """One parameter per entry of `sizes` (elements, fp32), packed into chunks."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        (f"p{i}", nn.Parameter(torch.randn(size, generator=gen))) for i, size in enumerate(sizes)
    ]
    return build_chunks(params, chunk_numel * 4)


def bits(chunk: Chunk) -> list[torch.Tensor]:
    """The parameters' bit patterns (exact comparison, NaN-safe)."""
    return [slot.param.detach().view(torch.int32).clone() for slot in chunk.slots]


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def chunk_of_each(n: int, numel: int = 16) -> list[Chunk]:
    """`n` chunks of one `numel`-element parameter each."""
    return make_chunks([numel] * n, numel)


def run_moment(manager: ChunkManager, chunks: list[Chunk], uses, after="forward") -> None:
    for i in uses:
        manager.access(chunks[i])
    for i in uses:
        manager.release(chunks[i], after)


# -- eviction policy ---------------------------------------------------------------------------


def test_belady_evicts_the_chunk_needed_furthest_ahead():
    chunks = chunk_of_each(3)
    one = chunks[0].nbytes
    manager = ChunkManager(chunks, CPU, device_budget=2 * one, host_budget=None)
    uses = [[0], [1], [2], [0], [1]]
    manager.set_schedule(uses)
    for moment in uses[:3]:
        run_moment(manager, chunks, moment)
    # Bringing 2 in: 0 is needed at moment 3, 1 only at moment 4 -> 1 goes (LRU would evict 0).
    assert [c.tier for c in chunks] == [Tier.DEVICE, Tier.HOST, Tier.DEVICE]
    run_moment(manager, chunks, [0])
    assert chunks[0].tier is Tier.DEVICE, "a chunk already on the device does not move"


def test_the_schedule_repeats_every_step():
    chunks = chunk_of_each(3)
    manager = ChunkManager(chunks, CPU, device_budget=2 * chunks[0].nbytes, host_budget=None)
    manager.set_schedule([[0], [1], [2]])
    for moment in [[0], [1], [2]]:
        run_moment(manager, chunks, moment)
    # Bringing 2 in, neither 0 nor 1 has a use left in this step; the next step starts with 0.
    assert [c.tier for c in chunks] == [Tier.DEVICE, Tier.HOST, Tier.DEVICE]


def test_without_a_schedule_the_least_recently_used_goes():
    chunks = chunk_of_each(3)
    manager = ChunkManager(chunks, CPU, device_budget=2 * chunks[0].nbytes, host_budget=None)
    for moment in [[0], [1], [2]]:
        run_moment(manager, chunks, moment)
    assert [c.tier for c in chunks] == [Tier.HOST, Tier.DEVICE, Tier.DEVICE]


def test_chunks_in_compute_are_never_evicted():
    chunks = chunk_of_each(3)
    manager = ChunkManager(chunks, CPU, device_budget=2 * chunks[0].nbytes, host_budget=None)
    manager.set_schedule([[0], [1], [2], [0]])
    manager.access(chunks[0])  # still computing: 0 is the natural victim but must stay
    run_moment(manager, chunks, [1])
    manager.access(chunks[2])
    assert chunks[0].tier is Tier.DEVICE and chunks[1].tier is Tier.HOST


def test_chunk_used_by_two_modules_stays_in_compute_until_both_release():
    chunks = chunk_of_each(2)
    manager = ChunkManager(chunks, CPU, device_budget=None, host_budget=None)
    manager.access(chunks[0])
    manager.access(chunks[0])  # e.g. a tied weight
    manager.release(chunks[0], "forward")
    assert chunks[0].state is ChunkState.COMPUTE
    manager.release(chunks[0], "forward")
    assert chunks[0].state is ChunkState.HOLD_AFTER_FWD


# -- budgets and round trips -------------------------------------------------------------------


def check_accounting(manager: ChunkManager, budget: int | None, host_budget: int | None):
    report = manager.memory_report()
    for tier in Tier:
        want = sum(c.nbytes for c in manager.chunks if c.tier is tier)
        assert report[tier.value] == want
    if budget is not None:
        assert report["device"] <= budget
    if host_budget is not None:
        assert report["host"] <= host_budget
    for chunk in manager.chunks:
        if chunk.state is not ChunkState.FREE:
            held = chunk.payload.untyped_storage().nbytes()
            assert held == (chunk.nbytes if chunk.tier is Tier.DEVICE else 0)
            assert (chunk.host is not None) == (chunk.tier is Tier.HOST)


@pytest.mark.parametrize("seed", range(12))
def test_random_sequences_stay_within_budget_and_round_trip_bit_exact(seed):
    run_random_sequence(seed, FakeDisk() if seed % 2 else None)


@pytest.mark.parametrize("seed", [1, 5, 11])
def test_random_sequences_through_the_real_disk_tier(seed, tmp_path):
    with open_disk("real", tmp_path) as disk_tier:
        run_random_sequence(seed, disk_tier)


def run_random_sequence(seed: int, disk: object | None) -> None:
    rng = random.Random(seed)
    sizes = [rng.randint(1, 40) for _ in range(rng.randint(8, 16))]
    chunks = make_chunks(sizes, chunk_numel=48, seed=seed)
    n, one = len(chunks), chunks[0].nbytes
    moments = [rng.sample(range(n), k=min(n, rng.randint(1, 2))) for _ in range(40)]
    budget = rng.randint(2, max(2, n - 1)) * one
    host_budget = rng.randint(1, 3) * one if disk else None
    manager = ChunkManager(chunks, CPU, budget, host_budget, disk=disk)
    if seed % 3:  # Belady from a schedule; otherwise the LRU fallback of a warm-up step
        per_moment = [rng.randint(2, max(2, n)) * one for _ in moments] if seed % 3 == 2 else None
        manager.set_schedule(moments, per_moment)
        if per_moment is not None:
            budget_at = [min(budget, b) for b in per_moment]
    expected: dict[int, list[torch.Tensor]] = {}
    for t, uses in enumerate(moments):
        for i in uses:
            manager.access(chunks[i])
            check_accounting(manager, budget, host_budget)
            if seed % 3 == 2:
                assert manager.memory_report()["device"] <= budget_at[t]
        for i in uses:
            if i in expected:
                assert same_bits(bits(chunks[i]), expected[i]), f"chunk {i} changed in transit"
            if rng.random() < 0.5:  # an update, as the optimizer would make
                for slot in chunks[i].slots:
                    slot.param.data.add_(rng.random())
            expected[i] = bits(chunks[i])
        if t + 1 < len(moments) and rng.random() < 0.5:
            for i in moments[t + 1]:
                manager.prefetch(chunks[i])
                check_accounting(manager, budget, host_budget)
        for i in uses:
            manager.release(chunks[i], rng.choice(["forward", "backward"]))
    manager.end_step()
    for i, want in expected.items():
        manager.access(chunks[i])
        assert same_bits(bits(chunks[i]), want)
        manager.release(chunks[i], "forward")
    manager.end_step()  # the writes behind the last evictions land
    assert manager.device_peak_bytes <= budget
    if host_budget is not None:
        assert manager.host_peak_bytes <= host_budget
        if isinstance(disk, FakeDisk):
            assert disk.nbytes() == manager.memory_report()["disk"]


@contextlib.contextmanager
def open_disk(kind: str, path: Path) -> Iterator[object]:
    """The in-memory fake, or zero/offload/disk.py's `DiskTier` on a temporary directory."""
    if kind == "fake":
        yield FakeDisk()
        return
    disk_tier = pytest.importorskip("shardwise.zero.offload.disk").DiskTier(path)
    try:
        yield disk_tier
    finally:
        disk_tier.close()


@pytest.fixture(params=["fake", "real"])
def disk(request, tmp_path):
    with open_disk(request.param, tmp_path) as opened:
        yield opened


def test_round_trip_through_host_and_disk_is_bit_exact(disk):
    chunks = chunk_of_each(3)
    one = chunks[0].nbytes
    manager = ChunkManager(chunks, CPU, device_budget=one, host_budget=one, disk=disk)
    for chunk in chunks:
        manager.place(chunk, Tier.HOST)  # the third spills to disk: host holds one chunk
    assert sorted(c.tier.value for c in chunks).count("disk") == 2
    want = []
    for chunk in chunks:
        manager.access(chunk)
        want.append(bits(chunk))
        manager.release(chunk, "forward")
    for _ in range(2):
        for chunk, expected in zip(chunks, want, strict=True):
            manager.access(chunk)
            assert same_bits(bits(chunk), expected)
            manager.release(chunk, "backward")
    assert manager.device_peak_bytes == one and manager.host_peak_bytes <= one


def test_prefetch_reads_from_disk_in_the_background():
    chunks = chunk_of_each(2)
    disk = FakeDisk()
    one = chunks[0].nbytes
    manager = ChunkManager(chunks, CPU, device_budget=2 * one, host_budget=0, disk=disk)
    manager.place(chunks[0], Tier.DEVICE)
    manager.place(chunks[1], Tier.DISK)
    manager.access(chunks[0])
    assert manager.prefetch(chunks[1])
    assert chunks[1].tier is Tier.DEVICE and chunks[1].pending is not None
    manager.access(chunks[1])  # waits for the read
    assert chunks[1].pending is None and "p1" not in disk.store


def test_prefetch_does_not_evict_chunks_needed_sooner():
    chunks = chunk_of_each(3)
    manager = ChunkManager(chunks, CPU, device_budget=2 * chunks[0].nbytes, host_budget=None)
    manager.place(chunks[2], Tier.HOST)
    manager.set_schedule([[0], [1], [0], [1], [2]])
    run_moment(manager, chunks, [0])
    run_moment(manager, chunks, [1])
    assert not manager.prefetch(chunks[2]), "0 and 1 are both needed before 2"
    assert chunks[2].tier is Tier.HOST
    run_moment(manager, chunks, [0])
    assert manager.prefetch(chunks[2]), "0 is never needed again: it makes room"
    assert chunks[0].tier is Tier.HOST and chunks[1].tier is Tier.DEVICE


def test_prefetch_of_a_gathered_chunk_gathers_from_a_home_on_the_device():
    """A FREE gathered chunk: with its home off the device the prefetch brings the home;
    with the home on the device it starts the all-gather (one rank: a copy) and holds the
    home in use until the gather is done, so that nothing moves it meanwhile; the access
    completes the gather and lets the home go."""
    (home,) = chunk_of_each(1)
    home.index = 1
    gathered = GatheredChunk(
        0, "gathered", home.numel, home.dtype, [], payload=torch.empty(home.numel), home=home
    )
    manager = ChunkManager([gathered, home], CPU, device_budget=None, host_budget=None)
    manager.place(home, Tier.HOST)
    assert manager.prefetch(gathered)
    assert home.tier is Tier.DEVICE and gathered.state is ChunkState.FREE
    assert manager.prefetch(gathered)
    assert gathered.tier is Tier.DEVICE and gathered.pending is not None
    assert home.state is ChunkState.COMPUTE
    with pytest.raises(ChunkStateError, match="COMPUTE"):
        manager._move(home, Tier.HOST)
    manager.access(gathered)
    assert gathered.pending is None and home.state is not ChunkState.COMPUTE
    assert torch.equal(gathered.payload, home.payload)


def test_fetch_of_a_free_chunk_materialises_it_lazily_from_meta():
    with torch.device("meta"):
        params = [(f"p{i}", nn.Parameter(torch.empty(8))) for i in range(2)]

    def fill(name: str, view: torch.Tensor) -> None:
        view.fill_(float(name[1:]) + 1)

    chunks = build_chunks(params, 8 * 4)
    manager = ChunkManager(chunks, CPU, device_budget=chunks[0].nbytes, host_budget=None)
    manager.param_init = fill
    for chunk, value in zip(chunks, [1.0, 2.0], strict=True):
        manager.access(chunk)
        assert torch.equal(chunk.slots[0].param.detach(), torch.full((8,), value))
        manager.release(chunk, "forward")
    assert chunks[0].tier is Tier.HOST and not params[0][1].is_meta


# -- errors ------------------------------------------------------------------------------------


def test_budget_below_one_chunk_names_the_minimum():
    chunks = chunk_of_each(2, numel=16)
    with pytest.raises(ConfigError, match=r"device_budget=32 bytes .* the minimum is 64 bytes"):
        ChunkManager(chunks, CPU, device_budget=32, host_budget=None)


def test_working_set_over_budget_names_the_minimum():
    chunks = chunk_of_each(3, numel=16)
    manager = ChunkManager(chunks, CPU, device_budget=128, host_budget=None)
    manager.access(chunks[0])
    manager.access(chunks[1])
    with pytest.raises(
        ConfigError, match=r"chunk 2 .* in use or pinned \[0, 1\]; the minimum is 192"
    ):
        manager.access(chunks[2])


def test_schedule_needing_more_than_the_budget_names_the_minimum():
    chunks = chunk_of_each(3, numel=16)
    manager = ChunkManager(chunks, CPU, device_budget=128, host_budget=None)
    with pytest.raises(ConfigError, match=r"blocks.0 forward.*minimum device_budget is 192 bytes"):
        manager.set_schedule([[0], [0, 1, 2]], names=["embed forward", "blocks.0 forward"])
    with pytest.raises(ConfigError, match=r"minimum device_budget is 144 bytes"):
        manager.set_schedule([[0], [0, 1]], chunk_budgets=[128, 112])
    unlimited = ChunkManager(chunks, CPU, device_budget=None, host_budget=None)
    with pytest.raises(ConfigError, match=r"leaves 100 bytes .* minimum device_budget is 128"):
        unlimited.set_schedule([[0, 1]], chunk_budgets=[100])


def test_full_host_without_disk_is_a_config_error():
    chunks = chunk_of_each(2)
    manager = ChunkManager(chunks, CPU, device_budget=chunks[0].nbytes, host_budget=0)
    run_moment(manager, chunks, [0])
    with pytest.raises(ConfigError, match="host_budget=0 bytes is full"):
        manager.access(chunks[1])


def test_full_disk_fails_when_the_write_behind_settles_and_keeps_the_chunk(tmp_path):
    """An eviction to disk returns once its write is issued; a write that failed (the disk
    past its cap) raises when it is settled (here at the step's end), with the chunk back in
    host memory, its bytes unchanged and the manager's counts saying so."""
    chunks = chunk_of_each(3)
    one = chunks[0].nbytes
    with DiskTier(tmp_path, max_bytes=one + one // 2) as disk:
        manager = ChunkManager(chunks, CPU, device_budget=2 * one, host_budget=0, disk=disk)
        run_moment(manager, chunks, [0])
        run_moment(manager, chunks, [1])
        run_moment(manager, chunks, [2])  # chunk 0 to disk: one chunk fits under the cap
        manager.end_step()
        assert chunks[0].tier is Tier.DISK and chunks[0].writing is None
        kept = chunks[1].payload.clone()
        run_moment(manager, chunks, [0])  # chunk 1 out: its file would pass the cap
        assert chunks[1].tier is Tier.DISK and chunks[1].writing is not None
        with pytest.raises(DiskFullError, match="offload.disk_max_bytes|cap"):
            manager.end_step()
        assert chunks[1].tier is Tier.HOST and not chunks[1].on_disk
        assert torch.equal(chunks[1].host, kept)
        assert manager.memory_report() == {"device": 2 * one, "host": one, "disk": 0}


def test_misuse_is_a_state_error():
    chunks = chunk_of_each(1)
    manager = ChunkManager(chunks, CPU, device_budget=None, host_budget=None)
    with pytest.raises(ChunkStateError, match="RELEASE_FWD is not legal in state FREE"):
        manager.release(chunks[0], "forward")
    manager.access(chunks[0])
    with pytest.raises(ValueError, match="'sideways'"):
        manager.release(chunks[0], "sideways")
    with pytest.raises(ChunkStateError, match="END_STEP is not legal in state COMPUTE"):
        manager.end_step()


# -- static placement --------------------------------------------------------------------------


def test_static_placement_pins_the_last_chunks_and_they_never_leave():
    chunks = chunk_of_each(6)
    one = chunks[0].nbytes
    placement = static_placement(chunks, param_device_fraction=1 / 3, optim_device_fraction=0.5)
    assert placement.pinned == {4, 5}
    assert placement.optim_on_device == (False, False, False, True, True, True)
    manager = ChunkManager(chunks, CPU, device_budget=3 * one, host_budget=None)
    apply_placement(manager, placement)
    assert [c.tier for c in chunks] == [Tier.HOST] * 4 + [Tier.DEVICE] * 2
    rng = random.Random(0)
    for _ in range(30):
        run_moment(manager, chunks, [rng.randrange(6)])
        assert chunks[4].tier is Tier.DEVICE and chunks[5].tier is Tier.DEVICE
    summary = placement_summary(chunks, placement)
    assert "pinned on device: chunks 4-5" in summary and "on host: chunks 0-3" in summary
    with pytest.raises(ConfigError, match="minimum is 256 bytes: pin fewer"):
        manager.pin(chunks[3])


def test_static_placement_rejects_a_fraction_outside_0_1():
    with pytest.raises(ConfigError, match="param_device_fraction=1.5"):
        static_placement(chunk_of_each(2), 1.5, 0.0)


def test_gradient_chunks_are_evicted_first_and_discarding_frees_their_bytes():
    """A released gradient chunk has no scheduled use: it leaves the device before any
    parameter chunk; `discard` takes its bytes off the manager's count."""
    params = make_chunks([8, 8, 8], 8)
    grads = build_grad_chunks(params)
    manager = ChunkManager([*params, *grads], CPU, device_budget=3 * 32, host_budget=None)
    manager.set_schedule([[0], [1], [2], [2], [1], [0]])
    for chunk in params:
        manager.place(chunk, Tier.HOST)
    for t in (0, 1):
        manager.access(params[t])
        manager.release(params[t], "forward")
    manager.access(grads[1])  # a gradient arrives
    manager.release(grads[1], "backward")
    manager.access(params[2])  # needs room: the gradient chunk goes, not chunk 0 or 1
    assert grads[1].tier is Tier.HOST
    assert params[0].tier is params[1].tier is Tier.DEVICE
    assert manager.memory_report() == {"device": 96, "host": 32, "disk": 0}
    manager.release(params[2], "forward")
    manager.discard(grads[1])
    assert grads[1].state is ChunkState.FREE
    assert manager.memory_report() == {"device": 96, "host": 0, "disk": 0}
    assert manager.device_peak_bytes <= 96
