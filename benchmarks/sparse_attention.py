"""Benchmark ``sparse-attention``: block-sparse attention against dense causal attention.

One forward and backward of causal attention on the CPU, q, k, v [1, 8 heads, seq, 64] in
fp32, at seq 4096 and 16384 (blocks of 64 tokens), torch's default thread count. Contenders:

- ours, one per layout (`shardwise.attention.block_sparse_attention`): ``bigbird`` (window 3,
  1 global, 2 random blocks per row: 8.4% of the full square kept at 4096), ``fixed``
  (windows of 8 blocks, the last of each global: 12.5%) and ``sliding_window`` (3 blocks:
  4.6%).
- dense_causal: ``F.scaled_dot_product_attention(is_causal=True)``, the best dense kernel
  torch has on the machine (its flash kernel on CPU, which skips the blocks above the
  diagonal).
- masked: the same SDPA with the boolean element mask of our BigBird layout (the way to run
  a sparse layout without a sparse kernel), at 4096 only: at 16384 the mask alone is 256 MiB
  and the kernel's time ~16x that at 4096.

Times are medians of interleaved rounds (`interleaved_step_times`), one process per sequence
length. Peak memory: each contender in a fresh process, its peak resident set during one
forward and backward above its resident set with the inputs (q, k, v, the output gradient and,
for masked, the mask) allocated (``VmHWM`` after resetting it through /proc/self/clear_refs):
the output, the three input gradients, every temporary, and what the first parallel region
of the process adds (the compute threads' stacks and buffers, the same for every contender).
glibc maps large blocks on their own there (`LIVE_BYTES_MALLOC`), so freed temporaries leave
the resident set.

The JSON ``ratio`` keys: ``speed_vs_dense`` = dense causal time / ours (BigBird) at 4096,
``speed_vs_masked`` = masked SDPA time / ours (BigBird) at 4096, ``mem_vs_dense`` = our
largest peak (any layout, either length) / dense causal's peak at the same length, and
``scaling_16k_vs_4k`` = our sliding-window time at 16384 / at 4096 (linear: 4; dense: ~16).
``config`` holds every time and peak.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.offload import current_rss_bytes, peak_rss_bytes
from shardwise.attention import (
    BlockSparsePlan,
    LayoutSpec,
    block_sparse_attention,
    build_layout,
    element_mask,
)
from shardwise.bench import BenchResult, interleaved_step_times, repo_root

SEQS = (4096, 16384)
LAYOUTS = {
    "bigbird": {"window": 3, "global_blocks": 1, "random_blocks": 2},
    "fixed": {"window": 8, "global_blocks": 1},
    "sliding_window": {"window": 3},
}
"""Our contenders: layout name -> its `LayoutSpec` settings."""
LIVE_BYTES_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
"""glibc: every allocation of 64 KiB or more mapped on its own and unmapped when freed, so
the resident set follows the live bytes. By default the threshold grows to the largest
freed block (up to 32 MiB) and freed heap memory stays resident: the peak then reads the
allocator's history (measured: up to +60 MiB, varying between runs), not the contender."""
MASKED_UP_TO = 4096
"""Longest sequence the masked SDPA runs at."""


@dataclass(frozen=True)
class Settings:
    warmup: int
    iters: int
    heads: int = 8
    head_dim: int = 64
    block: int = 64


QUICK = Settings(warmup=1, iters=2)
FULL = Settings(warmup=2, iters=5)


def contenders(seq: int) -> list[str]:
    return [*LAYOUTS, "dense_causal", *(["masked"] if seq <= MASKED_UP_TO else [])]


def layout_of(name: str, seq: int, settings: Settings) -> torch.Tensor:
    return build_layout(name, LayoutSpec(seq // settings.block, **LAYOUTS[name]))


def attention_fn(name: str, seq: int, settings: Settings) -> Callable:
    """(q, k, v) -> output of contender `name` (its plan or mask built here, untimed)."""
    if name in LAYOUTS:
        plan = BlockSparsePlan(layout_of(name, seq, settings), settings.block, causal=True)
        return lambda q, k, v: block_sparse_attention(q, k, v, plan)
    if name == "dense_causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = element_mask(layout_of("bigbird", seq, settings), settings.block, causal=True)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def inputs(seq: int, settings: Settings) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (1, settings.heads, seq, settings.head_dim)
    qkv = [torch.randn(shape, generator=gen).requires_grad_() for _ in range(3)]
    return qkv, torch.randn(shape, generator=gen)


def step(fn: Callable, qkv: list[torch.Tensor], grad: torch.Tensor) -> None:
    """One forward and backward; the input gradients are dropped after it."""
    fn(*qkv).backward(grad)
    for tensor in qkv:
        tensor.grad = None


def measure_times(seq: int, settings: Settings) -> dict[str, float]:
    """Median seconds of one forward and backward per contender at `seq`."""
    qkv, grad = inputs(seq, settings)
    steps = {}
    for name in contenders(seq):
        fn = attention_fn(name, seq, settings)
        steps[name] = lambda index, fn=fn: step(fn, qkv, grad)

    def report(name: str, index: int, seconds: float) -> None:
        progress(f"seq {seq}: {name} step {index}: {seconds:.3f} s")

    times = interleaved_step_times(
        steps, warmup=settings.warmup, iters=settings.iters, on_step=report
    )
    return {name: statistics.median(values) for name, values in times.items()}


def measure_peak(name: str, seq: int, settings: Settings) -> int:
    """Peak bytes of one forward and backward of `name`, in a fresh process."""
    python_path = os.pathsep.join(p for p in (str(repo_root()), os.environ.get("PYTHONPATH")) if p)
    args = json.dumps({"name": name, "seq": seq, "settings": asdict(settings)})
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.sparse_attention", args],
        env={**os.environ, "PYTHONPATH": python_path, **LIVE_BYTES_MALLOC},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory run of {name} at {seq} failed:\n{done.stderr}")
    return int(json.loads(done.stdout.splitlines()[-1])["peak_bytes"])


def peak_of_one_step(name: str, seq: int, settings: Settings) -> int:
    """In this (fresh) process: one step's peak resident bytes above the inputs'."""
    fn = attention_fn(name, seq, settings)
    qkv, grad = inputs(seq, settings)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from now
    before = current_rss_bytes()
    step(fn, qkv, grad)
    return peak_rss_bytes() - before


def run(quick: bool) -> BenchResult:
    settings = QUICK if quick else FULL
    times = {seq: measure_times(seq, settings) for seq in SEQS}
    peaks = {}
    for seq in SEQS:
        for name in contenders(seq):
            peaks[f"{name}@{seq}"] = measure_peak(name, seq, settings)
            progress(f"seq {seq}: {name} peak {peaks[f'{name}@{seq}'] / 2**20:.1f} MiB")
    return summarise(settings, times, peaks)


def summarise(
    settings: Settings, times: dict[int, dict[str, float]], peaks: dict[str, int]
) -> BenchResult:
    short, long = SEQS
    ours = times[short]["bigbird"]
    memory = {
        (name, seq): peaks[f"{name}@{seq}"] / peaks[f"dense_causal@{seq}"]
        for name in LAYOUTS
        for seq in SEQS
    }
    worst_name, worst_seq = max(memory, key=memory.get)
    peers = {
        "speed_vs_dense": times[short]["dense_causal"],
        "speed_vs_masked": times[short]["masked"],
        "mem_vs_dense": float(peaks[f"dense_causal@{worst_seq}"]),
        "scaling_16k_vs_4k": times[short]["sliding_window"],
    }
    ratio = {
        "speed_vs_dense": times[short]["dense_causal"] / ours,
        "speed_vs_masked": times[short]["masked"] / ours,
        "mem_vs_dense": memory[worst_name, worst_seq],
        "scaling_16k_vs_4k": times[long]["sliding_window"] / times[short]["sliding_window"],
    }
    config = {
        "shape": f"[1, {settings.heads}, seq, {settings.head_dim}]",
        "dtype": "fp32",
        "block": settings.block,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "layouts": LAYOUTS,
        "kept_of_full_square_at_4096": {
            name: float(layout_of(name, short, settings).float().mean()) for name in LAYOUTS
        },
        "fwd_bwd_s": {f"{name}@{seq}": t for seq, row in times.items() for name, t in row.items()},
        "peak_bytes": peaks,
        "worst_mem_case": f"{worst_name}@{worst_seq}",
        "warmup": settings.warmup,
        "iters": settings.iters,
    }
    return BenchResult(
        metric="fwd_bwd_s_bigbird_4096", ours=ours, peers=peers, config=config, ratio=ratio
    )


def progress(line: str) -> None:
    print(f"[sparse-attention] {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """A fresh process measuring one contender's peak (``python -m benchmarks.sparse_attention
    '{"name": ..., "seq": ..., "settings": {...}}'``): prints ``{"peak_bytes": n}``."""
    request: dict[str, Any] = json.loads((argv or sys.argv[1:])[0])
    settings = Settings(**request["settings"])
    peak = peak_of_one_step(request["name"], request["seq"], settings)
    print(json.dumps({"peak_bytes": peak}))


if __name__ == "__main__":
    main()
