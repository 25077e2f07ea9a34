"""Benchmark ``tp``: 1D tensor parallelism against torch DTensor, and every layout's memory and
communication against its formulas.

Part 1 — step time, 1D at tp=2 (one launched 2-rank job). Both contenders train the same GPT
(preset "mini", ~25M parameters, 128 tokens) from the same initial weights on the same data
(random tokens from a fixed seed; both tp ranks read the same 8 sequences per step), fp32,
with the same optimizer (torch AdamW, fused, the weight-decay groups of
`shardwise.optim.param_groups`, warm-up + cosine schedule) and global-norm clipping at 1.0.

- ours: `shardwise.initialize(..., mesh=mesh)` (the GPT spec's plan) -> ``Engine.train_step``:
  Megatron's layout (one_d.py): qkv, mlp.up column-parallel, attn.proj, mlp.down
  row-parallel, vocab-parallel tied embedding/head and vocab-parallel cross-entropy.
- dtensor_tp: torch's own tensor parallelism on the same modules,
  ``parallelize_module`` with ``ColwiseParallel`` (qkv, mlp.up, head with
  ``output_layouts=Shard(-1)``) and ``RowwiseParallel`` (attn.proj, mlp.down, the embedding
  with ``input_layouts=Replicate()``), the tied head re-tied to the embedding's DTensor after
  parallelising (both are ``Shard(0)`` of the [vocab, hidden] table), ``loss_parallel()``
  around ``F.cross_entropy`` and backward, the layer norms made replicated DTensors
  (``distribute_module``) so that one fused AdamW and ``clip_grad_norm_`` see DTensors only
  (torch refuses foreach/fused kernels over a mix of Tensors and DTensors). The fused q|k|v
  rows are interleaved once before sharding ([q_0 k_0 v_0 | q_1 k_1 v_1], our
  ``split_fused`` layout), so ``Shard(0)`` hands each rank whole heads; the math is the
  dense model's (the last losses of both contenders agree).

[Note: fair timing] As in benchmarks/dp.py: one job runs both contenders, one step each per
round, the order alternating every round; one compute thread per rank; an untimed barrier
before every step; a step's time is the slowest rank's.

Part 2 — memory and communication of the four layouts on one small GPT (`LayoutModel`,
rope positions, micro-batch split into q^2 blocks where the layout asks): 1D tp=2 (2 ranks),
2D q=2 (4 ranks), 2.5D q=2 d=2 (8 ranks), 3D q=2 (8 ranks); one launched job per world size.
Each rank splits the model with the layout's plan (`apply_tensor_parallel`), runs forward,
the plan's loss and backward on one micro-batch (no engine: no data-parallel or norm-group
collectives), and measures:

* parameter bytes: the local shards (a tied shard once);
* activation bytes: every tensor autograd saves for backward during forward and loss
  (``torch.autograd.graph.saved_tensors_hooks``), each storage once, parameters excluded,
  attributed to the module that saved it;
* wire bytes: `CommStats` around forward + loss and around backward (all on tp axes).

[Note: layout formulas] A rank's figure is the largest over the job's ranks; the formulas:

* parameters: Σ_p numel(p) · r_p / tp · 4 B over the dense model's parameters, r_p the ranks
  holding one shard of p in the layout's paper: 1D matrices 1 (split tp ways), norms tp
  (replicated); 2D matrices 1 (q x q blocks), norms q (hidden block j on every grid row);
  2.5D matrices d (q x q blocks on each of d layers), norms d q; 3D matrices 1 (q^3 blocks),
  norms q^2 (hidden block on a q x q face). I.e. matrices 1/tp, 1/q^2, 1/q^2, 1/q^3; norms 1,
  1/q, 1/q, 1/q. The plan's own ``replicas`` are checked against this table too.
* activations: the dense model's saved tensors (measured the same way on one process),
  each scaled by the fraction of it a layout keeps: a [tokens, features] tensor 1/tp in the
  1D regions between a column- and a row-parallel linear (attention, attn.proj's input, the
  MLP hidden, the vocab-split loss) and 1 elsewhere (replicated); 1/q^2 in 2D, 1/(d q^2) in
  2.5D, 1/q^3 in 3D (Colossal-AI, Bian et al. 2021, Table 1); a per-token tensor (ids,
  targets, layer-norm statistics) by the layout's token split only (1, 1/q, 1/(d q),
  1/q^2); a tensor without a batch dimension (rope tables) 1.
* wire bytes: the sum over the model's modules of the layout module's closed forms
  (``one_d``/``summa``/``three_d``: ``linear_wire_bytes``, ``embedding_wire_bytes``,
  ``layer_norm_wire_bytes``, ``cross_entropy_wire_bytes``) plus the loss's all-reduces.

The JSON line: ``ours`` = our median step seconds; peers ``dtensor_tp`` (its median; ratio
ours / peer), and per layout ``mem_ratio_<mode>`` (peer value: formula bytes of parameters +
activations; ratio measured / formula) and ``comm_ratio_<mode>`` (formula wire bytes; ratio
measured / formula), mode in 1d, 2d, 2p5d, 3d. ``config.layouts`` has the parts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchmarks import gpt_workload
from shardwise.accelerator import get_accelerator
from shardwise.bench import BenchResult, StepFn, launch_workers, worker_main
from shardwise.config import Config
from shardwise.distributed.comm import CommStats
from shardwise.distributed.cost import WireBytes
from shardwise.distributed.dims import ParallelDims
from shardwise.engine import initialize
from shardwise.loss import cross_entropy_loss
from shardwise.models.gpt import build_gpt, gpt_config_from
from shardwise.optim import default_optimizer_factory, lr_multiplier, param_groups
from shardwise.planner.activations import activation_fraction, by_region, grid, saved_tensors
from shardwise.planner.comm import tp_wire_bytes
from shardwise.run_plan import resolve
from shardwise.tensor_parallel import apply_tensor_parallel
from shardwise.tensor_parallel.plan import split_fused

TIMING_NPROC = 2
"""Ranks of the step-time job (1D, tp = 2)."""
JOBS: dict[int, tuple[str, ...]] = {2: ("1d",), 4: ("2d",), 8: ("2.5d", "3d")}
"""World size of each launched job -> the layouts it measures (tp = world size)."""
DEPTH_2P5D = 2
"""Depth d of the 2.5D layout."""
MODE_KEYS = {"1d": "1d", "2d": "2d", "2.5d": "2p5d", "3d": "3d"}
"""Layout -> its suffix in the JSON ratio keys."""
ELEM_BYTES = 4
"""fp32 parameters and activations everywhere in this benchmark."""
TOLERANCE = 0.05
"""A ratio within 1 ± this agrees with its formula."""


@dataclass(frozen=True)
class LayoutModel:
    """The small GPT every layout splits, and its one micro-batch."""

    n_layers: int = 2
    d_model: int = 64
    """Divisible by q^2 = 4 (3D splits a weight's output dim over two axes)."""
    n_heads: int = 4
    seq_len: int = 32
    """Tokens per sequence; differs from `micro_batch` (see `saved_kind`)."""
    micro_batch: int = 4
    """Sequences; divisible by q^2 = 4 and by d q = 4 (2.5D, 3D split the batch)."""
    seed: int = 1234


@dataclass(frozen=True)
class Job:
    """What one launched job measures."""

    modes: tuple[str, ...]
    """Layouts, each at tp = world size."""
    layout: LayoutModel
    timing: gpt_workload.Settings | None = None
    """The step-time workload (the 2-rank job only)."""


def job_from_json(
    modes: list[str], layout: dict[str, Any], timing: dict[str, Any] | None = None
) -> Job:
    """`Job` from the ``--settings`` JSON object (`job_settings`)."""
    step_settings = None if timing is None else gpt_workload.Settings(**timing)
    return Job(tuple(modes), LayoutModel(**layout), step_settings)


def job_settings(job: Job) -> str:
    return json.dumps(
        {
            "modes": list(job.modes),
            "layout": asdict(job.layout),
            "timing": None if job.timing is None else asdict(job.timing),
        }
    )


QUICK_TIMING = gpt_workload.Settings(warmup=3, iters=10, micro_batch=8)
FULL_TIMING = gpt_workload.Settings(warmup=5, iters=40, micro_batch=8)
QUICK_LAYOUT = LayoutModel()
FULL_LAYOUT = LayoutModel(n_layers=4, d_model=128, n_heads=8, seq_len=64, micro_batch=8)


def run(quick: bool) -> BenchResult:
    """One job per world size (`JOBS`); the 2-rank job also times both contenders."""
    layout = QUICK_LAYOUT if quick else FULL_LAYOUT
    timing = QUICK_TIMING if quick else FULL_TIMING
    records = {}
    for nproc, modes in JOBS.items():
        job = Job(modes, layout, timing if nproc == TIMING_NPROC else None)
        print(f"[tp] launching {nproc} ranks: {', '.join(modes)}", file=sys.stderr, flush=True)
        records[nproc] = launch_workers("benchmarks.tp", ["--settings", job_settings(job)], nproc)
    return summarise(layout, records)


# --------------------------------------------------------------------------- the result


def summarise(layout: LayoutModel, records: dict[int, dict[str, Any]]) -> BenchResult:
    """The result from each job's record (`measure`), keyed by its number of ranks."""
    timing = records[TIMING_NPROC]["timing"]
    medians = timing["median_s"]
    peers = {"dtensor_tp": medians["dtensor_tp"]}
    ratios = {"dtensor_tp": medians["ours"] / medians["dtensor_tp"]}
    layouts = {}
    for nproc, record in records.items():
        for mode, measured in record["layouts"].items():
            key = MODE_KEYS[mode]
            summary = summarise_layout(layout, layout_dims(mode, nproc), measured)
            peers[f"mem_ratio_{key}"] = summary["mem"]["formula"]
            ratios[f"mem_ratio_{key}"] = summary["mem"]["ratio"]
            peers[f"comm_ratio_{key}"] = summary["comm"]["formula"]
            ratios[f"comm_ratio_{key}"] = summary["comm"]["ratio"]
            layouts[key] = summary
    layout_ratios = [v for k, v in ratios.items() if k != "dtensor_tp"]
    config = {
        **timing["config"],
        "peers": "dtensor_tp: its median step seconds (ratio ours / peer); mem_ratio_<mode>, "
        "comm_ratio_<mode>: the formula's bytes per rank (ratio measured / formula)",
        "layout_model": {**asdict(layout), "positions": "rope", "precision": "fp32"},
        "layout_measured": "one forward + loss + backward of the split model without the "
        "engine; parameters: local shards; activations: tensors saved for backward, each "
        "storage once, parameters excluded; comm: CommStats wire bytes; largest rank",
        "layout_formulas": {
            "params": "sum_p bytes(p) * r_p / tp; r_p (matrix, norm vector): 1d (1, tp), "
            "2d (1, q), 2.5d (d, d q), 3d (1, q^2)",
            "activations": "dense saved bytes x fraction: [tokens, features] 1d 1/tp between "
            "column and row linears (else 1), 2d 1/q^2, 2.5d 1/(d q^2), 3d 1/q^3; per-token "
            "1, 1/q, 1/(d q), 1/q^2; no batch dim 1",
            "comm": "sum of the layout module's closed forms over embed, each linear, norm "
            "and the loss",
        },
        "tolerance": TOLERANCE,
        "layouts_within_tolerance": all(abs(r - 1) <= TOLERANCE for r in layout_ratios),
        "layouts": layouts,
    }
    return BenchResult(
        metric="median_step_s", ours=medians["ours"], peers=peers, config=config, ratio=ratios
    )


def summarise_layout(
    layout: LayoutModel, dims: ParallelDims, measured: dict[str, Any]
) -> dict[str, Any]:
    """One layout's measured figures (largest rank) against its formulas."""
    ranks, dense = measured["ranks"], measured["dense"]
    gpt = gpt_config_from(layout_config(layout, dims).model, layout.seq_len)
    params = max(r["param_bytes"] for r in ranks)
    saved = max(sum(r["saved"].values()) for r in ranks)
    wire = max(total_bytes(r["comm"]) for r in ranks)
    param_expected = param_formula(dense["params"], dims)
    saved_expected = activation_formula(dense["saved"], dims)
    wire_expected = tp_wire_bytes(gpt, layout.micro_batch, dims, ELEM_BYTES)
    mem_expected = param_expected + sum(saved_expected.values())
    q, d = grid(dims)
    summary = {
        "ranks": dims.tp,
        "grid": {"1d": f"tp={dims.tp}", "2d": f"q={q}", "2.5d": f"q={q} d={d}"}.get(
            dims.tp_mode, f"q={q}"
        ),
        "plan_replicas_match_formula": all(r["replicas_agree"] for r in ranks),
        "loss_max_rel_diff_vs_dense": max(
            abs(r["loss"] - dense["loss"]) / abs(dense["loss"]) for r in ranks
        ),
        "dense": {
            "param_bytes": sum(dense["params"].values()),
            "saved_bytes": sum(dense["saved"].values()),
        },
        "mem": {"measured": params + saved, "formula": mem_expected},
        "param": {"measured": params, "formula": param_expected},
        "activation": {
            "measured": saved,
            "formula": sum(saved_expected.values()),
            "measured_by_region_rank0": ranks[0]["saved"],
            "formula_by_region": saved_expected,
        },
        "comm": {
            "measured": wire,
            "formula": total_bytes(wire_expected),
            "measured_rank0": ranks[0]["comm"],
            "formula_by_op": readable(wire_expected),
        },
    }
    for part in ("mem", "param", "activation", "comm"):
        summary[part]["ratio"] = summary[part]["measured"] / summary[part]["formula"]
    return summary


# ----------------------------------------------------------------- [Note: layout formulas]


def layout_dims(mode: str, world_size: int) -> ParallelDims:
    """The whole job as one tp group of `mode` (2.5D at depth `DEPTH_2P5D`)."""
    return ParallelDims.tensor_parallel(world_size, mode, DEPTH_2P5D if mode == "2.5d" else 1)


def param_replicas(dims: ParallelDims, kind: str) -> int:
    """Ranks holding one shard of a "matrix" (Linear/Embedding weight) or "vector" (norm
    weight or bias) in the layout's paper."""
    q, d = grid(dims)
    table = {
        "1d": {"matrix": 1, "vector": dims.tp},
        "2d": {"matrix": 1, "vector": q},
        "2.5d": {"matrix": d, "vector": d * q},
        "3d": {"matrix": 1, "vector": q * q},
    }
    return table[dims.tp_mode][kind]


def param_kind(param: torch.Tensor) -> str:
    return "matrix" if param.ndim >= 2 else "vector"


def param_formula(dense_params: dict[str, int], dims: ParallelDims) -> float:
    """Bytes per rank: Σ_p bytes(p) · r_p / tp over the dense parameters, `dense_params`
    being bytes per kind."""
    return sum(
        nbytes * param_replicas(dims, kind) / dims.tp for kind, nbytes in dense_params.items()
    )


def activation_formula(dense_saved: dict[str, int], dims: ParallelDims) -> dict[str, float]:
    """Bytes per rank and region: the dense saved bytes (``"region/kind"`` -> bytes), each
    scaled by `activation_fraction`."""
    return by_region(
        {
            key: nbytes * activation_fraction(dims, *key.rsplit("/", 1))
            for key, nbytes in dense_saved.items()
        }
    )


def readable(costs: WireBytes) -> dict[str, dict[str, float]]:
    """A `WireBytes` with ``"axis/op"`` keys, for JSON (worker records, the result line)."""
    return {phase: {f"{a}/{o}": v for (a, o), v in ops.items()} for phase, ops in costs.items()}


def total_bytes(costs: WireBytes) -> float:
    return sum(nbytes for ops in costs.values() for nbytes in ops.values())


# --------------------------------------------------------------------------- measuring a layout


def layout_config(layout: LayoutModel, dims: ParallelDims) -> Config:
    return Config().replace(
        model={"n_layers": layout.n_layers, "d_model": layout.d_model, "n_heads": layout.n_heads},
        data={"seq_len": layout.seq_len},
        train={"micro_batch": layout.micro_batch, "seed": layout.seed},
        precision={"dtype": "fp32"},
        parallel={"tp": dims.tp, "tp_mode": dims.tp_mode, "tp_depth": dims.tp_depth},
    )


def layout_batch(layout: LayoutModel, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(layout.seed)
    shape = (layout.micro_batch, layout.seq_len + 1)
    tokens = torch.randint(0, vocab_size, shape, generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def dense_profile(layout: LayoutModel, cfg: Config, device: torch.device) -> dict[str, Any]:
    """The unsplit model in this process: parameter bytes per kind, saved bytes per
    region/kind of one forward + loss, and the loss."""
    model = build_gpt(cfg.model, layout.seq_len, device=device, seed=layout.seed)
    inputs, targets = (t.to(device) for t in layout_batch(layout, cfg.model.vocab_size))
    params: dict[str, int] = {}
    for p in model.parameters():
        params[param_kind(p)] = params.get(param_kind(p), 0) + p.numel() * p.element_size()
    with saved_tensors(model, inputs.shape[0], inputs.numel()) as saved:
        loss = cross_entropy_loss(model(inputs), targets)
    return {"params": params, "saved": saved, "loss": loss.item()}


def measure_layout(layout: LayoutModel, dims: ParallelDims, device: torch.device) -> dict[str, Any]:
    """This rank's parameter bytes, saved bytes per region and wire bytes per pass, axis
    and op of one forward + loss + backward of the split model."""
    cfg = layout_config(layout, dims)
    mesh = dims.build_mesh(device.type)
    plan = resolve(cfg, dims.world_size).tp_plan
    model = build_gpt(cfg.model, layout.seq_len, device=device, seed=layout.seed)
    tp = apply_tensor_parallel(model, mesh, plan)
    inputs, targets = (t.to(device) for t in layout_batch(layout, cfg.model.vocab_size))
    with CommStats() as forward, saved_tensors(model, inputs.shape[0], inputs.numel()) as saved:
        loss = tp.loss_fn(model(inputs), targets)
    with CommStats() as backward:
        loss.backward()
    replicas_agree = all(
        tp.replicas[id(p)] == param_replicas(dims, param_kind(p)) for p in model.parameters()
    )
    comm = readable({"forward": forward.wire_by_axis_op(), "backward": backward.wire_by_axis_op()})
    return {
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "saved": by_region(saved),
        "comm": comm,
        "loss": loss.item(),
        "replicas_agree": replicas_agree,
    }


def measure_layouts(job: Job, rank: int, world_size: int, device: torch.device) -> dict[str, Any]:
    """Every layout of `job` with the GPT's plan (its `ModelSpec`'s): all
    ranks' `measure_layout` records and the dense profile."""
    out = {}
    for mode in job.modes:
        dims = layout_dims(mode, world_size)
        dense = dense_profile(job.layout, layout_config(job.layout, dims), device)
        mine = measure_layout(job.layout, dims, device)
        ranks: list[Any] = [None] * world_size
        dist.all_gather_object(ranks, mine)
        out[mode] = {"dense": dense, "ranks": ranks}
        if rank == 0:
            comm = sum(sum(ops.values()) for ops in mine["comm"].values())
            print(
                f"[tp] {mode} tp={world_size}: params {mine['param_bytes']} B, saved "
                f"{sum(mine['saved'].values())} B, wire {comm:.0f} B on rank 0 "
                f"(loss {mine['loss']:.6f}, dense {dense['loss']:.6f})",
                file=sys.stderr,
                flush=True,
            )
    return out


# --------------------------------------------------------------------------- the timed contenders


def ours_step(cfg: Config, device: torch.device, batches: list) -> StepFn:
    """Our engine with the registered 1D plan on a tp-only mesh. Returns the loss."""
    dims = ParallelDims.from_config(cfg.parallel, dist.get_world_size())
    mesh = dims.build_mesh(device.type)
    model = build_gpt(cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed)
    engine = initialize(model, None, cfg, mesh=mesh)
    return lambda index: engine.train_step(batches[index])


def interleave_fused_rows(weight: torch.Tensor, fused: int, parts: int) -> torch.Tensor:
    """Rows [q | k | v] -> [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], so that block r of `parts`
    contiguous row blocks is our column-parallel shard r of a fused projection."""
    return torch.cat([split_fused(weight, 0, fused, parts, r) for r in range(parts)])


def dtensor_parallelize(model: nn.Module, device_type: str, tp: int) -> None:
    """torch's tensor parallelism on the reference GPT, in place (see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh(device_type, (tp,), mesh_dim_names=("tp",))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.copy_(interleave_fused_rows(block.attn.qkv.weight, 3, tp))
    plan = {
        "embed": RowwiseParallel(input_layouts=Replicate()),
        "blocks.*.attn.qkv": ColwiseParallel(),
        "blocks.*.attn.proj": RowwiseParallel(),
        "blocks.*.mlp.up": ColwiseParallel(),
        "blocks.*.mlp.down": RowwiseParallel(),
        **({"blocks.*.mlp.gate": ColwiseParallel()} if model.cfg.mlp == "swiglu" else {}),
        "head": ColwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False
        ),
    }
    parallelize_module(model, mesh, plan)
    model.head.weight = model.embed.weight  # the styles made two DTensors of the tied table

    def replicated_in(_module, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)

    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            distribute_module(
                module, mesh, input_fn=replicated_in, output_fn=lambda _m, y, _d: y.to_local()
            )


def dtensor_step(cfg: Config, device: torch.device, batches: list) -> StepFn:
    """The peer: DTensor tensor parallelism with the same optimizer, schedule and clipping.
    Returns the loss."""
    from torch.distributed.tensor.parallel import loss_parallel

    model = build_gpt(cfg.model, cfg.data.seq_len, device=device, seed=cfg.train.seed)
    dtensor_parallelize(model, device.type, dist.get_world_size())
    optimizer = default_optimizer_factory(cfg.optim)(param_groups(model, cfg.optim.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg.optim, cfg.train.steps)
    )

    def step(index: int) -> float:
        inputs, targets = batches[index]
        optimizer.zero_grad(set_to_none=True)
        with loss_parallel():  # backward too: the loss's gradient is vocabulary-split
            loss = cross_entropy_loss(model(inputs), targets)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        return loss.full_tensor().item()

    return step


def time_contenders(
    settings: gpt_workload.Settings, rank: int, local_rank: int, world_size: int
) -> dict[str, Any]:
    """Both contenders interleaved; medians of the slowest rank and the JSON config."""
    device = get_accelerator().device(local_rank)
    cfg = gpt_workload.engine_config(settings, torch.float32, parallel={"tp": world_size})
    # Tensor parallelism: every rank reads the same rows (the whole micro-batch).
    batches = gpt_workload.make_batches(settings, 0, 1, cfg.model.vocab_size, device)
    work = gpt_workload.RankWorkload(
        settings, rank, world_size, device, torch.float32, cfg, batches
    )
    contenders = {
        "ours": ours_step(cfg, device, batches),
        "dtensor_tp": dtensor_step(cfg, device, batches),
    }
    detail = {"ours": "fp32", "dtensor_tp": "fp32"}
    record = gpt_workload.measure_contenders("tp", work, contenders, detail, order="alternating")
    config = record["config"]
    config.pop("micro_batch_per_rank")
    last = config["last_loss"]
    config.update(
        {
            "tp": world_size,
            "tp_mode": "1d",
            "micro_batch_per_tp_group": settings.micro_batch,
            "data": "both tp ranks read the same micro-batch (no data parallelism)",
            "last_loss_max_abs_diff": max(last.values()) - min(last.values()),
            "ours_layout": "one_d: qkv (fused, split per piece), mlp.up column-parallel; "
            "attn.proj, mlp.down row-parallel; vocab-parallel tied embed/head and loss",
            "dtensor_layout": "parallelize_module: ColwiseParallel qkv (rows interleaved "
            "q_r|k_r|v_r), mlp.up, head (Shard(-1) output); RowwiseParallel attn.proj, "
            "mlp.down, embed (Replicate input); head re-tied to embed's DTensor; "
            "loss_parallel cross-entropy; layer norms replicated DTensors",
        }
    )
    return record


# --------------------------------------------------------------------------- the worker


def measure(job: Job, rank: int, local_rank: int, world_size: int) -> dict[str, Any]:
    """This job's layouts, then (2-rank job) the timed contenders; rank 0's record."""
    device = get_accelerator().device(local_rank)
    record: dict[str, Any] = {"layouts": measure_layouts(job, rank, world_size, device)}
    if job.timing is not None:
        record["timing"] = time_contenders(job.timing, rank, local_rank, world_size)
    record["device"] = get_accelerator().device_type
    return record


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank (``python -m benchmarks.tp``)."""
    worker_main("benchmarks.tp", job_from_json, measure, argv)


if __name__ == "__main__":
    main()
