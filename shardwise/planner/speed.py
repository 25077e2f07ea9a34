"""Step time predicted from the plan's work and this machine's measured speeds.

[Note: the time model] Probes, run once per machine and cached (`MachineSpeeds`), the
calibrating ones in two ranks at once as training runs them:

* **operator**: a small reference GPT's forward + backward, its time beyond its traced FLOPs
  per traced operator (dispatch, autograd, module calls), times the operators a plan's trace
  dispatches (`Trace.ops`): what small models spend most on;
* **engine**: the same GPT's data-parallel engine step, its time beyond forward, backward,
  Adam's arithmetic and the all-reduce, per parameter tensor (hooks, bucket copies,
  clipping, per-tensor optimizer work);
* **matmul**: seconds of a [tokens, d] x [d, 4d] product in the plan's dtype, the model's
  most common shape, on one compute thread per rank (as the launcher runs ranks) - the
  speed at which the traced FLOPs (`Trace.flops`, recomputation included) run;
* **optimizer**: seconds per element of a fused AdamW step (memory-bound: parameters,
  gradients and two moments read and written);
* **collective**: an all-reduce between two ranks of the accelerator's backend at two sizes,
  fitted to ``latency + wire bytes / bandwidth``.

A step is then compute (micro-batches x (the rank's traced FLOPs / matmul speed + its
traced operators x the operator's time); pipeline schedules simulated with
`pipeline.schedules.simulate`, which adds their bubble) + the update (the rank's optimizer
elements x seconds per element + its parameter tensors x the engine's time) + communication
(`step_wire_bytes` over the bandwidth, ``distributed.emulate_gbps`` when set, plus a latency
per collective).
Ranks beyond the CPU's cores share them: compute, the update and collective latencies
stretch by ranks / cores. Communication is not assumed to overlap compute.
"""

from __future__ import annotations

import json
import math
import os
import queue
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from shardwise.accelerator import get_accelerator
from shardwise.errors import LaunchError
from shardwise.models import spec_of
from shardwise.pipeline.schedules import simulate
from shardwise.planner.activations import Trace
from shardwise.run_plan import RunPlan

PROBE_SIZES = (2**14, 2**22)
"""Bytes all-reduced by the collective probe (a latency-bound and a bandwidth-bound size)."""


@dataclass(frozen=True)
class MachineSpeeds:
    """What one rank of this machine does per second."""

    matmul_flops: dict[str, float]
    """FLOP/s of the probe product, per ``"<dtype>/<tokens>x<d>"`` probed."""
    adam_s_per_element: float
    """Seconds of a fused AdamW step per fp32 element."""
    link_bytes_per_s: float
    """Collective bandwidth in wire bytes per second per rank."""
    link_latency_s: float
    """Fixed cost of one collective."""
    op_s: float
    """Seconds of one operator of a small model's step beyond its FLOPs (dispatch, autograd,
    module calls), with two ranks running."""
    tensor_s: float
    """Seconds per parameter tensor per step the engine spends beyond forward, backward, the
    update's arithmetic and the all-reduce (hooks, bucket copies, clipping, the optimizer's
    per-tensor work)."""
    cores: int
    """CPU cores this process may run on (ranks beyond them share cores); 0 on a GPU."""

    @classmethod
    def load(cls, path: Path) -> MachineSpeeds | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))

    def flops_for(self, dtype: torch.dtype, tokens: int, width: int) -> float:
        """The matmul probe's FLOP/s at this shape (probed now, then kept)."""
        key = f"{str(dtype).removeprefix('torch.')}/{tokens}x{width}"
        if key not in self.matmul_flops:
            self.matmul_flops[key] = probe_matmul(dtype, tokens, width)
        return self.matmul_flops[key]


def machine_speeds(cache: Path) -> MachineSpeeds:
    """The speeds cached at `cache`, or probed (~10 s: two processes join a group) and
    saved there."""
    speeds = MachineSpeeds.load(cache)
    if speeds is None:
        speeds = probe_machine()
        speeds.save(cache)
    return speeds


def probe_machine() -> MachineSpeeds:
    """Every probe but the matmul's per-shape ones (`MachineSpeeds.flops_for`), measured in
    two ranks running at once, as training runs them."""
    cores = len(os.sched_getaffinity(0)) if get_accelerator().device_type == "cpu" else 0
    return MachineSpeeds(matmul_flops={}, cores=cores, **_run_probe_ranks())


def probe_matmul(dtype: torch.dtype, tokens: int, width: int, repeats: int = 5) -> float:
    """FLOP/s of [tokens, width] @ [width, 4 width] on one thread (the best of `repeats`)."""
    device = get_accelerator().device(0)
    a = torch.randn(tokens, width, device=device).to(dtype)
    b = torch.randn(width, 4 * width, device=device).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = _best_seconds(lambda: a @ b, repeats)
    finally:
        torch.set_num_threads(threads)
    return 2 * tokens * width * 4 * width / best


def probe_adam(elements: int = 2**20, repeats: int = 5) -> float:
    """Seconds per element of a fused AdamW step over fp32 parameters, one thread."""
    device = get_accelerator().device(0)
    param = torch.nn.Parameter(torch.randn(elements, device=device))
    param.grad = torch.randn_like(param)
    optimizer = torch.optim.AdamW([param], fused=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _best_seconds(optimizer.step, repeats) / elements
    finally:
        torch.set_num_threads(threads)


def _run_probe_ranks() -> dict:
    """Start the two probe ranks (`_probe_rank`) and return rank 0's measurements (the
    `MachineSpeeds` fields but the matmuls and the cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.get_context("spawn")
        results = context.Queue()
        store = os.path.join(tmp, "store")
        procs = [context.Process(target=_probe_rank, args=(r, store, results)) for r in range(2)]
        for proc in procs:
            proc.start()
        timings = None
        while timings is None:
            try:
                timings = results.get(timeout=0.5)
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or all(p.exitcode is not None for p in procs):
                    raise LaunchError(
                        f"the speed probe's ranks exited (codes {failed}) before measuring; "
                        "run `shardwise plan --no-time`, or check that two processes can join "
                        "a group here"
                    ) from None
        for proc in procs:
            proc.join()
    return timings


PROBE_MODEL = {"n_layers": 2, "d_model": 64, "n_heads": 4}
"""The small reference GPT whose real steps calibrate the operator and per-tensor costs."""
PROBE_SEQ, PROBE_BATCH = 64, 4


def _probe_rank(rank: int, store: str, results: object) -> None:
    """One of two probe ranks, one thread each: all-reduce at two sizes, then, both ranks
    at once, a small GPT's forward + backward (its time beyond the traced FLOPs, per traced
    operator), its data-parallel engine step (the time beyond forward, backward, the update
    and the all-reduce, per parameter tensor) and a fused AdamW step per element."""
    from shardwise.config import Config
    from shardwise.engine import initialize
    from shardwise.loss import cross_entropy_loss
    from shardwise.models import spec_of
    from shardwise.models.gpt import build_gpt
    from shardwise.planner.activations import trace_micro_batch
    from shardwise.run_plan import meta_model

    accelerator = get_accelerator()
    torch.set_num_threads(1)
    dist.init_process_group(
        accelerator.backend,
        init_method=f"file://{store}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    device = accelerator.device(rank)
    seconds = []
    for nbytes in PROBE_SIZES:
        tensor = torch.zeros(nbytes // 4, device=device)

        def reduce(tensor: torch.Tensor = tensor) -> None:
            dist.all_reduce(tensor)
            accelerator.synchronize()

        seconds.append(_best_seconds(reduce, 5))
    # a ring all-reduce on 2 ranks sends nbytes: fit latency + nbytes / bandwidth
    (small, large), (small_s, large_s) = PROBE_SIZES, seconds
    bandwidth = (large - small) / max(large_s - small_s, 1e-9)
    timings = {"link_bytes_per_s": bandwidth, "link_latency_s": max(small_s - small / bandwidth, 0)}
    config = Config().replace(
        model=PROBE_MODEL,
        data={"seq_len": PROBE_SEQ},
        precision={"dtype": "fp32"},
        train={"micro_batch": PROBE_BATCH, "global_batch": 2 * PROBE_BATCH},
    )
    shape = meta_model(config)
    trace = trace_micro_batch(shape, spec_of(shape), PROBE_BATCH, PROBE_SEQ)
    model = build_gpt(config.model, PROBE_SEQ, device=device, seed=rank)
    ids = torch.randint(0, 256, (PROBE_BATCH, PROBE_SEQ + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def forward_backward() -> None:
        cross_entropy_loss(model(inputs), targets).backward()

    dist.barrier()
    passes = _best_seconds(forward_backward, 5)
    flops_s = probe_matmul(torch.float32, PROBE_BATCH * PROBE_SEQ, PROBE_MODEL["d_model"])
    timings["op_s"] = max(passes - trace.flops / flops_s, 0.0) / trace.ops
    engine = initialize(model, None, config)
    dist.barrier()
    step = _best_seconds(lambda: engine.train_step((inputs, targets)), 5)
    adam = probe_adam()
    elements = sum(p.numel() for p in model.parameters())
    reduce_s = timings["link_latency_s"] + 4 * elements / bandwidth
    rest = step - passes - adam * elements - reduce_s
    timings["tensor_s"] = max(rest, 0.0) / len(list(model.parameters()))
    timings["adam_s_per_element"] = adam
    if rank == 0:
        results.put(timings)
    dist.destroy_process_group()


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        get_accelerator().synchronize()
        start = time.perf_counter()
        fn()
        get_accelerator().synchronize()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class TimePrediction:
    """Seconds of one step on one rank, by part."""

    compute: float
    update: float
    comm: float

    @property
    def step(self) -> float:
        return self.compute + self.update + self.comm


def predict_time(
    plan: RunPlan,
    trace: Trace,
    wire: dict[str, dict[str, float]],
    speeds: MachineSpeeds,
    model: nn.Module,
) -> TimePrediction:
    """`plan`'s step time from a rank's trace of one micro-batch (FLOPs, operators), its
    step's wire bytes (`step_wire_bytes`), `speeds` and the `model`'s shape (on the meta
    device: its hidden size for the matmul probe, its blocks, its parameter tensors)."""
    config = plan.config
    tokens = config.train.micro_batch * config.data.seq_len // plan.dims.sp
    params = [p for p in model.parameters() if p.requires_grad]
    width = max((p for p in params if p.ndim == 2), key=lambda p: p.numel()).shape[1]
    spec = spec_of(model)
    layers = len(spec.named_blocks(model, "the planner")) if spec.blocks else 1
    flops_s = speeds.flops_for(plan.precision.param_dtype, tokens, width)
    # ranks sharing a CPU core share its time (one rank per GPU shares nothing)
    crowding = max(1.0, plan.world_size / speeds.cores) if speeds.cores else 1.0
    micro = (trace.flops / flops_s + trace.ops * speeds.op_s) * crowding
    if plan.pipeline is not None:  # forward 1/3 of a micro-batch's work, backward 2/3
        per_stage = micro / len(plan.pipeline.stages_of(0))
        compute = simulate(plan.pipeline, per_stage / 3, 2 * per_stage / 3).makespan
    else:
        compute = plan.micro_batches * micro
    elements = plan.trainable_params / plan.dims.tp / plan.dims.pp
    tensors = len(params) / plan.dims.pp
    if plan.sharding.optimizer:
        elements /= plan.dims.dp_shard
    bandwidth = speeds.link_bytes_per_s
    if config.distributed.emulate_gbps:
        bandwidth = min(bandwidth, config.distributed.emulate_gbps * 1e9 / 8)
    wire_bytes = sum(nbytes for ops in wire.values() for nbytes in ops.values())
    calls = _collective_calls(plan, wire, layers)
    return TimePrediction(
        compute=compute,
        update=(elements * speeds.adam_s_per_element + tensors * speeds.tensor_s) * crowding,
        comm=wire_bytes / bandwidth + calls * speeds.link_latency_s * crowding,
    )


def _collective_calls(plan: RunPlan, wire: dict[str, dict[str, float]], layers: int) -> float:
    """Collectives one rank issues per step (each pays the probed latency): gradient buckets,
    ZeRO-3 units (gathered per pass, reduce-scattered once), and per layer and micro-batch
    those of tensor parallelism (1D: the f/g pairs; grid layouts: gathers and reduce-scatters
    per linear and layer norm), of ring or Ulysses attention and of pipeline sends."""
    micro, dims = plan.micro_batches, plan.dims
    calls = 0.0
    bucket = plan.config.distributed.bucket_mb * 2**20
    for axis in ("dp", "dp_replicate"):
        for nbytes in wire.get(axis, {}).values():
            calls += max(1, math.ceil(nbytes / bucket))
    if plan.sharding.params:
        passes = 2 if plan.sharding.reshard_after_forward else 1
        calls += (layers + 1) * (passes * micro + 1)
    linears, norms = 4 * layers + 1, 2 * layers + 1
    if dims.tp > 1:
        calls += micro * (linears + 2 if dims.tp_mode == "1d" else 6 * linears + 2 * norms)
    if dims.sp > 1:
        per_layer = 8 if plan.sequence_parallel == "ulysses" else 3 * (dims.sp - 1)
        calls += micro * layers * per_layer
    if plan.pipeline is not None:
        calls += 2 * micro * len(plan.pipeline.stages_of(0))
    return calls
