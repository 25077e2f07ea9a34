"""Benchmark ``zero3``: our ZeRO-3 engine against torch FSDP2 (and DeepSpeed ZeRO-3 when it is
installed), median step time.

Every contender trains the same GPT (preset "mini", ~25M parameters, 128 tokens) from the same
initial weights on the same data (random tokens from a fixed seed; each rank its own rows),
4 sequences per rank per step, no gradient accumulation, with the same optimizer (torch AdamW,
fused, the weight-decay groups of `shardwise.optim.param_groups`, the same warm-up + cosine
schedule) and global-norm clipping at 1.0. Parameters, gradients and optimizer states are
sharded over both ranks; the units gathered together are the root module and each
``model.blocks[i]``, resharded after forward and gathered again for backward.

- ours: `shardwise.initialize` with ``zero.stage = 3`` -> ``Engine.train_step`` (a chunk per
  unit, zero/params.py, gathered by the module hooks with prefetch; one reduce-scatter per
  unit overlapped with backward; clipping inside the engine).
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

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import gpt_workload
from shardwise.accelerator import get_accelerator
from shardwise.bench import BenchResult, StepFn, worker_main
from shardwise.config import Config
from shardwise.loss import cross_entropy_loss
from shardwise.models.gpt import build_gpt
from shardwise.optim import default_optimizer_factory, lr_multiplier, param_groups

DEEPSPEED = "deepspeed_zero3"
"""Name of the optional DeepSpeed contender."""
ZERO = {"stage": 3, "reshard_after_forward": True, "prefetch": True}
"""Our engine's ZeRO settings for this benchmark."""


def run(quick: bool) -> BenchResult:
    """Launch the 2-rank job and report rank 0's medians."""
    return gpt_workload.run_job("benchmarks.zero3", quick)


# --------------------------------------------------------------------------- the contenders


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
    # After fully_shard: the optimizer's groups get the sharded (DTensor) parameters.
    return gpt_workload.torch_peer_step(model, cfg, batches)


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
    cfg: Config,
    device: torch.device,
    dtype: torch.dtype,
    batches: list,
    version: str,
    zero: dict | None = None,
) -> tuple[StepFn | None, str]:
    """The DeepSpeed step (`deepspeed_step`), or None when DeepSpeed imports but cannot set up
    this workload on some rank (every rank then drops it alike); and the line for the JSON
    config."""
    try:
        step, error = deepspeed_step(cfg, device, dtype, batches, zero), ""
    except Exception as err:  # noqa: BLE001 - a peer that cannot run is left out, and said so
        step, error = None, f"{type(err).__name__}: {err}".splitlines()[0]
    ok = torch.tensor([0.0 if step is None else 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() == 1.0:
        return step, f"deepspeed {version}: contender {DEEPSPEED} ran"
    reason = error or "it failed on another rank"
    return None, f"deepspeed {version} failed to set up ({reason}): contender {DEEPSPEED} omitted"


def deepspeed_step(
    cfg: Config,
    device: torch.device,
    dtype: torch.dtype,
    batches: list,
    zero: dict | None = None,
) -> StepFn:
    """The DeepSpeed peer: ZeRO-3 (`zero`: its ``zero_optimization`` section, e.g. with CPU
    offload) with the same torch AdamW, schedule and clipping. Returns this rank's loss."""
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
        "zero_optimization": zero or {"stage": 3},
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


# --------------------------------------------------------------------------- the worker


def measure(
    settings: gpt_workload.Settings, rank: int, local_rank: int, world_size: int
) -> dict[str, Any]:
    """Every contender on this rank; the per-step times are the slowest rank's."""
    work = gpt_workload.prepare(settings, rank, local_rank, world_size, zero=ZERO)
    cfg, device, dtype, batches = work.cfg, work.device, work.dtype, work.batches
    contenders = {
        "ours": gpt_workload.ours_step(cfg, device, batches),
        "fsdp2": fsdp2_step(cfg, device, dtype, batches),
    }
    version, import_error = deepspeed_version()
    if version is None:
        deepspeed_note = f"not importable ({import_error}): contender {DEEPSPEED} omitted"
    else:
        step, deepspeed_note = deepspeed_contender(cfg, device, dtype, batches, version)
        if step is not None:
            contenders[DEEPSPEED] = step
    detail = precision_detail(dtype, DEEPSPEED in contenders)
    record = gpt_workload.measure_contenders("zero3", work, contenders, detail, order="rotating")
    config = record["config"]
    last = config["last_loss"]
    config["zero_stage"] = 3
    config["units"] = "root + each model.blocks[i]; resharded after forward; prefetch on"
    config["last_loss_max_abs_diff"] = max(last.values()) - min(last.values())
    config["deepspeed"] = deepspeed_note
    return record


def precision_detail(dtype: torch.dtype, with_deepspeed: bool) -> dict[str, str]:
    """The JSON ``config.precision_detail``: each contender's precision at `dtype`."""
    bf16 = dtype == torch.bfloat16
    detail = {
        "ours": "bf16 params, fp32 master weights, fp32 grad reduce" if bf16 else "fp32",
        "fsdp2": "fp32 sharded params, MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)"
        if bf16
        else "fp32",
    }
    if with_deepspeed:
        detail[DEEPSPEED] = "bf16.enabled (bf16 params, fp32 master weights)" if bf16 else "fp32"
    return detail


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank (``python -m benchmarks.zero3``)."""
    worker_main("benchmarks.zero3", gpt_workload.Settings, measure, argv)


if __name__ == "__main__":
    main()
