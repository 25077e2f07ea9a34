"""Benchmark ``zero3``: our ZeRO-3 engine against torch FSDP2 (and DeepSpeed ZeRO-3 when it is
installed), median step time.

Every contender trains the same GPT (preset "mini", ~25M parameters, 128 tokens) from the same
initial weights on the same data (random tokens from a fixed seed; each rank its own rows),
4 sequences per rank per step, no gradient accumulation, with the same optimizer (torch AdamW,
fused, the weight-decay groups of `shardwise.optim.param_groups`, the same warm-up + cosine
schedule) and global-norm clipping at 1.0. Parameters, gradients and optimizer states are
sharded over both ranks; the units gathered together are the root module and each
``model.blocks[i]``, resharded after forward and gathered again for backward.

- ours: `shardwise.initialize` with ``zero.stage = 3`` -> ``Engine.train_step`` (units gathered
  by the hooks of zero/params.py with prefetch, one reduce-scatter per unit overlapped with
  backward, clipping inside the engine).
- fsdp2: ``torch.distributed.fsdp.fully_shard`` on each ``model.blocks[i]``, then on the root,
  ``reshard_after_forward=True``, default prefetching; ``clip_grad_norm_`` on the DTensor
  parameters, ``optimizer.step()``.
- deepspeed_zero3 (only where ``import deepspeed`` works): ``deepspeed.initialize`` with
  ``zero_optimization.stage = 3`` and the same torch AdamW passed in
  (``zero_force_ds_cpu_optimizer: false``); on CPU ``DS_ACCELERATOR=cpu`` and gloo.

Peers are written with plain torch (and DeepSpeed) here: they are never dependencies of
shardwise.

Precision is the accelerator's default: fp32, or where bf16 is fast, ours with
``precision.dtype = "bf16"`` (fp32 master weights, fp32 gradient reduce) against FSDP2 with
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (fp32 sharded parameters) and
DeepSpeed with ``bf16.enabled``.

[Note: fair timing] As in benchmarks/dp.py: one launched 2-rank job runs every contender, one
step each per round, the order rotating every round, so machine drift hits all alike. Each
rank computes on one thread. A barrier precedes every step (untimed); a step's time is that
of the slowest rank. After the measured steps the last losses of all contenders are reported
(averaged over the ranks): equal up to rounding, they show the contenders did the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from shardwise.accelerator import get_accelerator
from shardwise.bench import (
    BenchResult,
    StepFn,
    interleaved_step_times,
    launch_workers,
    write_worker_result,
)
from shardwise.config import Config
from shardwise.engine import cross_entropy_loss, initialize
from shardwise.models.gpt import GPT, build_gpt, count_params, gpt_config_from
from shardwise.optim import default_optimizer_factory, lr_multiplier, param_groups

NPROC = 2
"""Ranks of the benchmark job."""
DEEPSPEED = "deepspeed_zero3"
"""Name of the optional DeepSpeed contender."""


@dataclass(frozen=True)
class Settings:
    """The workload; the same for every contender."""

    warmup: int
    """Untimed steps per contender before the measured ones."""
    iters: int
    """Measured steps per contender."""
    preset: str = "mini"
    """GPT size preset."""
    seq_len: int = 128
    """Tokens per sequence."""
    micro_batch: int = 4
    """Sequences per rank per step."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 1234
    """Seed of the initial weights and of the data."""


QUICK = Settings(warmup=3, iters=10)
FULL = Settings(warmup=5, iters=40)


def run(quick: bool) -> BenchResult:
    """Launch the 2-rank job and report rank 0's medians."""
    settings = QUICK if quick else FULL
    record = launch_workers("benchmarks.zero3", ["--settings", json.dumps(asdict(settings))], NPROC)
    medians = record["median_s"]
    return BenchResult(
        metric="median_step_s",
        ours=medians["ours"],
        peers={name: value for name, value in medians.items() if name != "ours"},
        config=record["config"],
    )


# --------------------------------------------------------------------------- the contenders


def engine_config(settings: Settings, dtype: torch.dtype) -> Config:
    """Our engine's config for the workload (also the source of the peers' optimizer)."""
    return Config.from_dict(
        {
            "model": {"preset": settings.preset},
            "data": {"seq_len": settings.seq_len},
            "train": {
                "micro_batch": settings.micro_batch,
                "steps": settings.warmup + settings.iters,
                "seed": settings.seed,
            },
            "precision": {"dtype": "bf16" if dtype == torch.bfloat16 else "fp32"},
            "optim": {"grad_clip": settings.grad_clip},
            "zero": {"stage": 3, "reshard_after_forward": True, "prefetch": True},
        }
    )


def make_batches(
    settings: Settings, rank: int, world_size: int, vocab_size: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of every step: this rank's rows of a seeded global batch."""
    generator = torch.Generator().manual_seed(settings.seed)
    rows = slice(rank * settings.micro_batch, (rank + 1) * settings.micro_batch)
    batches = []
    for _ in range(settings.warmup + settings.iters):
        shape = (world_size * settings.micro_batch, settings.seq_len + 1)
        tokens = torch.randint(0, vocab_size, shape, generator=generator)[rows].to(device)
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    return batches


def ours_step(cfg: Config, device: torch.device, batches: list) -> StepFn:
    """Our contender: the engine's whole step (gathers, forward, backward, reduce-scatter,
    clip, update). Returns the loss averaged over the ranks."""
    model = build_gpt(cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed)
    engine = initialize(model, default_optimizer_factory(cfg.optim), cfg)

    def step(index: int) -> float:
        return engine.train_step(batches[index])

    return step


def fsdp2_step(cfg: Config, device: torch.device, dtype: torch.dtype, batches: list) -> StepFn:
    """The torch peer: FSDP2 on every block, then the root, with the same optimizer, schedule
    and clipping. Returns this rank's loss."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = build_gpt(cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": True}
    if dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    # After fully_shard: the groups hold the sharded (DTensor) parameters.
    optimizer = default_optimizer_factory(cfg.optim)(param_groups(model, cfg.optim.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg.optim, cfg.train.steps)
    )

    def step(index: int) -> float:
        inputs, targets = batches[index]
        optimizer.zero_grad(set_to_none=True)
        loss = cross_entropy_loss(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        return loss.item()

    return step


def deepspeed_version() -> tuple[str | None, str]:
    """DeepSpeed's version if it can be imported here, else None and why not."""
    if get_accelerator().device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported
    try:
        import deepspeed
    except Exception as err:  # noqa: BLE001 - any import failure just drops the contender
        return None, f"{type(err).__name__}: {err}".splitlines()[0]
    return str(deepspeed.__version__), ""


def deepspeed_contender(
    cfg: Config, device: torch.device, dtype: torch.dtype, batches: list, version: str
) -> tuple[StepFn | None, str]:
    """The DeepSpeed step, or None when DeepSpeed imports but cannot set up this workload on
    some rank (every rank then drops it alike); and the line for the JSON config."""
    try:
        step, error = deepspeed_step(cfg, device, dtype, batches), ""
    except Exception as err:  # noqa: BLE001 - a peer that cannot run is left out, and said so
        step, error = None, f"{type(err).__name__}: {err}".splitlines()[0]
    ok = torch.tensor([0.0 if step is None else 1.0], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() == 1.0:
        return step, f"deepspeed {version}: contender {DEEPSPEED} ran"
    reason = error or "it failed on another rank"
    return None, f"deepspeed {version} failed to set up ({reason}): contender {DEEPSPEED} omitted"


def deepspeed_step(cfg: Config, device: torch.device, dtype: torch.dtype, batches: list) -> StepFn:
    """The DeepSpeed peer: ZeRO-3 with the same torch AdamW, schedule and clipping. Returns
    this rank's loss."""
    import deepspeed

    # DeepSpeed still calls the c10d names torch 2.13 deprecated, one warning per call.
    warnings.filterwarnings(
        "ignore", message=r".* is deprecated\. Please use ", category=FutureWarning
    )
    deepspeed.init_distributed(dist_backend=get_accelerator().backend)
    model = build_gpt(cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed)
    optimizer = default_optimizer_factory(cfg.optim)(param_groups(model, cfg.optim.weight_decay))
    multiplier = lr_multiplier(cfg.optim, cfg.train.steps)
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": 3},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier),
        config=ds_config,
    )

    def step(index: int) -> float:
        inputs, targets = batches[index]
        loss = cross_entropy_loss(engine(inputs), targets)
        engine.backward(loss)
        engine.step()
        return loss.item()

    return step


def recording(step: StepFn, losses: list[float]) -> StepFn:
    """`step`, appending each loss it returns to `losses` (for the progress lines)."""

    def recorded(index: int) -> float:
        loss = step(index)
        losses.append(loss)
        return loss

    return recorded


# --------------------------------------------------------------------------- the worker


def measure(settings: Settings, rank: int, local_rank: int, world_size: int) -> dict[str, Any]:
    """Every contender on this rank; the per-step times are the slowest rank's."""
    accel = get_accelerator()
    device = accel.device(local_rank)
    dtype = accel.default_dtype()
    cfg = engine_config(settings, dtype)
    batches = make_batches(settings, rank, world_size, cfg.model.vocab_size, device)
    built = {
        "ours": ours_step(cfg, device, batches),
        "fsdp2": fsdp2_step(cfg, device, dtype, batches),
    }
    version, import_error = deepspeed_version()
    if version is None:
        deepspeed_note = f"not importable ({import_error}): contender {DEEPSPEED} omitted"
    else:
        step, deepspeed_note = deepspeed_contender(cfg, device, dtype, batches, version)
        if step is not None:
            built[DEEPSPEED] = step
    losses: dict[str, list[float]] = {name: [] for name in built}
    steps = {name: recording(step, losses[name]) for name, step in built.items()}
    total = settings.warmup + settings.iters

    def progress(name: str, index: int, seconds: float) -> None:
        if rank == 0:
            phase = "warm-up" if index < settings.warmup else "measured"
            whose = "mean over ranks" if name == "ours" else "rank 0"
            print(
                f"[zero3] step {index + 1}/{total} ({phase}) {name:15s} {seconds:.3f} s "
                f"loss {losses[name][-1]:.4f} ({whose})",
                file=sys.stderr,
                flush=True,
            )

    times = interleaved_step_times(
        steps,
        warmup=settings.warmup,
        iters=settings.iters,
        before_step=dist.barrier,
        sync=accel.synchronize,
        on_step=progress,
    )
    slowest = {name: over_ranks(t, device, dist.ReduceOp.MAX) for name, t in times.items()}
    # train_step returns the loss averaged over the ranks; the peers' loops saw their own rows.
    for name in losses:
        if name != "ours":
            summed = over_ranks(losses[name], device, dist.ReduceOp.SUM)
            losses[name] = [value / world_size for value in summed]
    config = describe(settings, cfg, dtype, world_size, slowest, losses)
    config["deepspeed"] = deepspeed_note
    return {
        "median_s": {name: statistics.median(values) for name, values in slowest.items()},
        "config": config,
    }


def over_ranks(
    values: list[float], device: torch.device, op: dist.ReduceOp.RedOpType
) -> list[float]:
    """Element-wise reduction of a list of numbers over the ranks (run after the timing)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def describe(
    settings: Settings,
    cfg: Config,
    dtype: torch.dtype,
    world_size: int,
    seconds: dict[str, list[float]],
    losses: dict[str, list[float]],
) -> dict[str, Any]:
    """The JSON ``config``: the workload, the precision of each side, the spread of times,
    the last losses."""
    accel = get_accelerator()
    bf16 = dtype == torch.bfloat16
    with torch.device("meta"):
        params = count_params(GPT(gpt_config_from(cfg.model, cfg.data.seq_len)))
    last = {name: values[-1] for name, values in losses.items()}
    precision = {
        "ours": "bf16 params, fp32 master weights, fp32 grad reduce" if bf16 else "fp32",
        "fsdp2": "fp32 sharded params, MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)"
        if bf16
        else "fp32",
    }
    if DEEPSPEED in losses:
        precision[DEEPSPEED] = "bf16.enabled (bf16 params, fp32 master weights)" if bf16 else "fp32"
    return {
        "model": f"gpt-{settings.preset}",
        "params": params,
        "seq_len": settings.seq_len,
        "nproc": world_size,
        "micro_batch_per_rank": settings.micro_batch,
        "grad_accum": 1,
        "zero_stage": 3,
        "units": "root + each model.blocks[i]; resharded after forward; prefetch on",
        "precision": "bf16" if bf16 else "fp32",
        "precision_detail": precision,
        "optimizer": "torch AdamW fused, shardwise.optim.param_groups, warm-up + cosine lr",
        "grad_clip": settings.grad_clip,
        "device": accel.device_type,
        "backend": accel.backend,
        "threads_per_rank": torch.get_num_threads(),
        "torch": torch.__version__.split("+")[0],
        "warmup_steps": settings.warmup,
        "measured_steps": settings.iters,
        "schedule": "interleaved, one step each per round, order rotating; "
        "barrier before each step; time = slowest rank",
        "min_s": {name: min(values) for name, values in seconds.items()},
        "max_s": {name: max(values) for name, values in seconds.items()},
        "last_loss": last,
        "last_loss_max_abs_diff": max(last.values()) - min(last.values()),
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank (``python -m benchmarks.zero3``)."""
    from shardwise.distributed.launch import init_worker, run_worker

    parser = argparse.ArgumentParser(prog="benchmarks.zero3")
    parser.add_argument("--settings", required=True, help="Settings as a JSON object")
    parser.add_argument("--result", required=True, help="file rank 0 writes its record to")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = Settings(**json.loads(args.settings))
        torch.set_num_threads(1)
        info = init_worker(Config().distributed.timeout_s)
        record = measure(settings, info.rank, info.local_rank, info.world_size)
        if info.rank == 0:
            write_worker_result(args.result, record)

    run_worker(body)


if __name__ == "__main__":
    main()
