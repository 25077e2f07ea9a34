"""Benchmark ``capacity`` (issue 19; not quick: about 35 minutes on this 2-core machine): the
largest GPT that trains under a host-memory cap, ours against DeepSpeed ZeRO-3 with its
parameters and optimizer states offloaded to NVMe (ZeRO-Infinity).

One model family: shardwise's GPT, d_model 2048, 16 heads, vocabulary 256, 128 tokens, one
sequence per step, fp32, AdamW (lr 2e-6 after the default warm-up, clipping 1.0), grown by
its number of blocks along `LADDER` (8, 14, 20, 30, 40, 60 blocks: 0.40, 0.71, 1.01, 1.51,
2.01 and 3.02 billion parameters; 16 bytes of model state each). Each contender trains each
size in a fresh process (launched as the other benchmarks' workers, 2 compute threads) for 3
steps on one fixed batch, and climbs the ladder until a size fails. A size **trains** when
its 3 losses are finite and the last is below the first, while the process's resident set
stays under the cap (`CAP_BYTES`, 8 GiB): a watchdog reads it every 0.1 s and ends the
process that passes it (the figure is then the resident set it reached).

- ours: `shardwise.initialize` with ``offload.policy = "auto"`` (parameter and gradient
  chunks within 512 MiB of "device" memory, 256 MiB of host memory for chunks, the rest on
  disk: lean budgets, the module computing and a little read-ahead), full activation
  checkpointing (without it the activations of 20 blocks alone take 400 MB of that budget,
  which would have to grow with depth) and ``offload.optimizer = "disk"`` (Adam's states
  streamed from disk), the model built on
  the meta device and filled chunk by chunk, as the capacity run of docs/offload.md;
- deepspeed (where ``deepspeed`` imports: ``PYTHONPATH=<deepspeed 0.19.8 side dir>``, with
  ``libaio-dev`` installed; ``DS_ACCELERATOR=cpu`` is set here): the same GPT class built
  under ``deepspeed.zero.Init`` and given our initial weights (a parameter at a time, so both
  start from the same loss), ``deepspeed.initialize`` with torch's AdamW
  (``zero_force_ds_cpu_optimizer`` false), ZeRO stage 3, ``offload_param`` and
  ``offload_optimizer`` on ``nvme`` in a directory on the same disk, its async IO op built on
  first use.

JSON ``ratio`` keys: ``largest_vs_deepspeed`` = the parameters of our largest size that
trains / DeepSpeed's (target >= 2; a contender that trains the ladder's top is bounded by it,
``config.at_ladder_top`` says so); ``rss_vs_deepspeed`` = our peak resident set / DeepSpeed's
at the ladder's first size, which both train (target <= 0.5). Without DeepSpeed the one key is
``rss_vs_cap`` (our peak resident set at our largest size / the cap). ``ours`` = the
parameters of our largest size that trains.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.offload import current_rss_bytes, peak_rss_bytes
from benchmarks.zero3 import deepspeed_version
from shardwise.bench import BenchResult, launch_workers, worker_main
from shardwise.config import Config
from shardwise.engine import initialize
from shardwise.errors import LaunchError
from shardwise.loss import cross_entropy_loss
from shardwise.models.gpt import GPT, build_gpt, gpt_config_from
from shardwise.optim import lr_multiplier

CAP_BYTES = 8 * 2**30
LADDER = (8, 14, 20, 30, 40, 60)
"""Blocks of each size tried, smallest first."""
QUICK_LADDER = (8, 14)
CONTENDERS = ("ours", "deepspeed")


@dataclass(frozen=True)
class Settings:
    """One contender training one size in one process."""

    contender: str
    n_layers: int
    disk_path: str
    d_model: int = 2048
    n_heads: int = 16
    seq_len: int = 128
    steps: int = 3
    lr: float = 2e-6
    cap_bytes: int = CAP_BYTES
    threads: int = 2
    seed: int = 1234

    def config(self) -> Config:
        """Our run's config (DeepSpeed's takes the model, data and optimizer sections)."""
        return Config().replace(
            model={"n_layers": self.n_layers, "d_model": self.d_model, "n_heads": self.n_heads},
            data={"seq_len": self.seq_len},
            precision={"dtype": "fp32"},
            optim={"lr": self.lr},
            train={
                "micro_batch": 1,
                "steps": self.steps,
                "seed": self.seed,
                "activation_checkpointing": "full",
            },
            offload={
                "policy": "auto",
                "device_budget_mb": 512,
                "host_budget_mb": 256,
                "optimizer": "disk",
                "disk_path": self.disk_path,
            },
            log={"progress": False},
        )


def run(quick: bool) -> BenchResult:
    ladder = QUICK_LADDER if quick else LADDER
    version, why = deepspeed_version()
    contenders = CONTENDERS if version else CONTENDERS[:1]
    runs: dict[str, list[dict[str, Any]]] = {}
    for contender in contenders:
        runs[contender] = []
        for layers in ladder:
            record = one_size(contender, layers)
            runs[contender].append(record)
            progress(
                f"{contender} {layers} blocks ({record['params'] / 1e9:.2f} B parameters): "
                f"{'trained' if record['trained'] else 'did not train'} ({record['why']}), "
                f"peak RSS {record['peak_rss_bytes'] / 2**30:.2f} GiB"
            )
            if not record["trained"]:
                break
    note = f"deepspeed {version}" if version else f"deepspeed not importable here ({why})"
    return summarise(ladder, runs, note)


def one_size(contender: str, layers: int) -> dict[str, Any]:
    """Train `layers` blocks with `contender` in a fresh process; its record (a failed
    launch is a size that did not train)."""
    with tempfile.TemporaryDirectory(prefix="shardwise-capacity-") as disk:
        settings = Settings(contender, layers, disk)
        try:
            return launch_workers(
                "benchmarks.capacity", ["--settings", json.dumps(asdict(settings))], 1
            )
        except LaunchError as err:
            record = {"params": parameter_count(settings), "trained": False}
            if cap_file(disk).is_file():
                rss = json.loads(cap_file(disk).read_text())["rss_bytes"]
                why = f"stopped at the cap: resident set {rss / 2**30:.2f} GiB"
            else:
                rss, why = 0, f"the process failed: {str(err).splitlines()[0]}"
            return {**record, "why": why, "peak_rss_bytes": rss}


def parameter_count(settings: Settings) -> int:
    model = build_gpt(settings.config().model, settings.seq_len, device="meta")
    return sum(p.numel() for p in model.parameters())


def summarise(
    ladder: tuple[int, ...], runs: dict[str, list[dict[str, Any]]], note: str
) -> BenchResult:
    largest = {
        name: max((r["params"] for r in records if r["trained"]), default=0)
        for name, records in runs.items()
    }
    config = {
        "cap_bytes": CAP_BYTES,
        "ladder_blocks": list(ladder),
        "runs": runs,
        "deepspeed": note,
        "at_ladder_top": [
            name
            for name, records in runs.items()
            if len(records) == len(ladder) and records[-1]["trained"]
        ],
    }
    ours = runs["ours"]
    if largest["ours"] == 0:
        raise RuntimeError(f"our smallest size did not train: {ours[0]['why']}")
    theirs = runs.get("deepspeed")
    if theirs and largest["deepspeed"] > 0:
        peers = {
            "largest_vs_deepspeed": float(largest["deepspeed"]),
            "rss_vs_deepspeed": float(theirs[0]["peak_rss_bytes"]),
        }
        ratio = {
            "largest_vs_deepspeed": largest["ours"] / largest["deepspeed"],
            "rss_vs_deepspeed": ours[0]["peak_rss_bytes"] / theirs[0]["peak_rss_bytes"],
        }
    else:
        at_largest = next(r for r in reversed(ours) if r["trained"])
        peers = {"rss_vs_cap": float(CAP_BYTES)}
        ratio = {"rss_vs_cap": at_largest["peak_rss_bytes"] / CAP_BYTES}
    return BenchResult(
        metric="largest_trained_params",
        ours=float(largest["ours"]),
        peers=peers,
        config=config,
        ratio=ratio,
    )


def progress(line: str) -> None:
    print(f"[capacity] {line}", file=sys.stderr, flush=True)


# -- the worker: one contender, one size ------------------------------------------------------


def measure(settings: Settings, rank: int, local_rank: int, world_size: int) -> dict[str, Any]:
    del rank, local_rank, world_size
    torch.set_num_threads(settings.threads)
    watchdog = CapWatchdog(settings.cap_bytes, functools.partial(stop_at_cap, settings))
    record: dict[str, Any] = {"params": parameter_count(settings)}
    started = time.perf_counter()
    train = train_ours if settings.contender == "ours" else train_deepspeed
    losses, step_s = train(settings)
    watchdog.stop()
    if not all(map(math.isfinite, losses)):
        trained, why = False, f"a loss is not finite: {losses}"
    else:
        trained, why = losses[-1] < losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    record.update(
        trained=trained,
        why=why,
        losses=losses,
        step_s=step_s,
        total_s=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        disk_bytes=sum(
            f.stat().st_size for f in Path(settings.disk_path).rglob("*") if f.is_file()
        ),
    )
    return record


def cap_file(disk_path: str) -> Path:
    """Where a run stopped at the cap leaves the resident set it reached."""
    return Path(disk_path) / "passed_the_cap.json"


def stop_at_cap(settings: Settings, rss: int) -> None:
    """The worker's end at the cap: the figure for `one_size`, then an immediate exit (a
    process past its memory budget is stopped, not asked to stop)."""
    cap_file(settings.disk_path).write_text(json.dumps({"rss_bytes": rss}))
    os._exit(3)


class CapWatchdog:
    """Calls `on_pass(rss)` from a thread of its own once this process's resident set passes
    `cap` bytes (read every 0.1 s)."""

    def __init__(self, cap: int, on_pass: Callable[[int], None]) -> None:
        self.cap, self.on_pass = cap, on_pass
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.1):
            rss = current_rss_bytes()
            if rss > self.cap:
                self.on_pass(rss)
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def fixed_batch(settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(settings.seed)
    tokens = torch.randint(0, 256, (1, settings.seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def timed_steps(step, settings: Settings) -> tuple[list[float], list[float]]:
    losses, step_s = [], []
    for index in range(settings.steps):
        started = time.perf_counter()
        losses.append(step())
        step_s.append(time.perf_counter() - started)
        progress(
            f"{settings.contender} step {index + 1}: {step_s[-1]:.1f} s, loss {losses[-1]:.4f}"
        )
    return losses, step_s


def train_ours(settings: Settings) -> tuple[list[float], list[float]]:
    cfg = settings.config()
    model = build_gpt(cfg.model, settings.seq_len, device="meta")
    param_init = functools.partial(model.init_parameter, seed=settings.seed)
    engine = initialize(model, None, cfg, param_init=param_init)
    batch = fixed_batch(settings)
    return timed_steps(lambda: engine.train_step(batch), settings)


def train_deepspeed(settings: Settings) -> tuple[list[float], list[float]]:
    import deepspeed

    # DeepSpeed still calls the c10d names torch 2.13 deprecated, one warning per call.
    warnings.filterwarnings("ignore", message=r".* is deprecated\. Please use ")
    cfg = settings.config()
    nvme = str(Path(settings.disk_path) / "nvme")
    largest = 4 * settings.d_model * settings.d_model  # the MLP's matrices
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_bucket_size": 10**6,
            "stage3_prefetch_bucket_size": 10**6,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 2 * 10**7,
            "stage3_max_reuse_distance": 0,
            "sub_group_size": 10**7,
            "offload_param": {
                "device": "nvme",
                "nvme_path": nvme,
                "pin_memory": False,
                "buffer_count": 5,
                "buffer_size": largest,
                "max_in_cpu": 0,
            },
            "offload_optimizer": {
                "device": "nvme",
                "nvme_path": nvme,
                "pin_memory": False,
                "buffer_count": 4,
                "fast_init": False,
            },
        },
        "aio": {
            "block_size": 1 << 20,
            "queue_depth": 8,
            "intra_op_parallelism": 1,
            "single_submit": False,
            "overlap_events": True,
        },
    }
    deepspeed.init_distributed(dist_backend="gloo")
    # no dtype argument: on the CPU accelerator DeepSpeed 0.19.8 turns any given one into bf16
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = GPT(gpt_config_from(cfg.model, settings.seq_len))
    for name, param in model.named_parameters():  # our initial weights, a parameter at a time
        with deepspeed.zero.GatheredParameters(param, modifier_rank=0):
            model.init_parameter(name, param.data, settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    multiplier = lr_multiplier(cfg.optim, cfg.train.steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier),
        config=ds_config,
    )
    inputs, targets = fixed_batch(settings)

    def step() -> float:
        loss = cross_entropy_loss(engine(inputs), targets)
        engine.backward(loss)
        engine.step()
        return loss.item()

    return timed_steps(step, settings)


if __name__ == "__main__":
    worker_main("benchmarks.capacity", Settings, measure)
