"""Benchmark ``pipeline``: every pipeline schedule's measured idle time against its theory,
and our 1F1B against torch.distributed.pipelining's ``Schedule1F1B`` on the same split.

Two ranks (``parallel.pp = 2``), one compute thread each, fp32, a GPT of uniform blocks whose
embedding and head are small beside them (vocabulary 256), so the theory's equal-stage
assumption holds: 8 blocks of width 256, 128 tokens, 8 micro-batches of 2 sequences per step.
Each contender trains from the same weights on the same batches, AdamW, no clipping (equal
work for all; clipping would add a global norm to ours only).

- ours (one per schedule): `shardwise.initialize` with ``parallel.pp = 2`` and
  ``pipeline.schedule`` = gpipe, 1f1b, interleaved_1f1b (2 stages per rank), zb_h1, zbv
  (2 stages per rank), then ``Engine.train_step``. The runtime records each step's seconds in
  compute actions (`PipelineSchedule.busy_s`) and in all actions (`step_s`); the measured
  idle fraction is the theory's quantity: ``1 - (busy summed over ranks) / (ranks x the
  slowest rank's step_s)`` (the ranks start together after a barrier, and the step ends when
  the last one does: the last stage's wait for the first stage's final backward is idle
  too), averaged over steps.
- torch_pipelining: the same blocks split the same way into two ``PipelineStage`` modules
  (embedding + blocks 0-3, blocks 4-7 + head), ``Schedule1F1B`` with 8 micro-batches, then
  fused AdamW. torch's stages share no weight, so the pair runs the GPT with its head untied
  (``model.tie_embeddings = false``) on both sides: one model, and neither sums a tied
  gradient across the stages (our other engines keep the tie).

The formulas assume stages of equal cost; here the last stage also runs the head, the final
norm and the loss (~4% more per forward), and every rank's extra wait for it counts as idle
in the measure above. So the JSON config also gives each rank's busy seconds over the ranks'
mean (``busy_per_rank_over_mean``) and the idle fraction of the slowest rank alone over the
theory (``slowest_rank_bubble_over_theory``: ``1 - its busy / the step``, which is the
formula's quantity when the stages are equal and leaves the imbalance out otherwise). The
ratio keys keep the all-ranks measure.

The JSON ``ratio`` keys: ``bubble_<schedule>`` = measured idle fraction / the schedule's
theoretical bubble (`theoretical_bubble`: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(vm+p-1)
interleaved, the zero-bubble paper's for ZB-H1 and ZB-V at F = I = W); ``zb_vs_1f1b`` = ZB-H1
step time / 1F1B's; ``torch_pipelining`` = our 1F1B step time / the peer's;
``activation_<schedule>`` = the most tensor bytes a step's micro-batches (forwards and
backwards, not the update) create and hold at once on a rank (`PeakTensorBytes`, after the
timed steps: activations, and a backward's working tensors and fresh gradients) / the
schedule's bound there: its in-flight activations on that rank
(`Schedule.in_flight_peak`, the bound `check` enforces) x one micro-batch's activations of a
stage part, measured as GPipe's peak / m (GPipe holds all m; a part of a 2-chunk schedule
holds half a stage); the largest over the ranks. ``memory_partition`` = the largest rank's
peak (the same count) under 1F1B with ``pipeline.partition = "memory"`` / with the default
``"layers"`` (below 1: the split by held activations lowers the peak). Step times are
the slowest rank's medians, contenders interleaved one step each per round (rotating order):
our five schedules in one rotation, then our 1F1B (untied) and the peer in a pair of their
own.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardwise.bench import BenchResult, interleaved_step_times, launch_workers, worker_main
from shardwise.config import Config
from shardwise.engine import initialize
from shardwise.loss import cross_entropy_loss
from shardwise.models.gpt import build_gpt
from shardwise.optim import default_optimizer_factory
from shardwise.pipeline.schedules import build_schedule, theoretical_bubble
from shardwise.planner.tracker import PeakTensorBytes

NPROC = 2
SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "zb_h1": 1, "zbv": 2}
"""Schedule -> stages per rank."""


@dataclass(frozen=True)
class Settings:
    warmup: int
    iters: int
    n_layers: int = 8
    d_model: int = 256
    n_heads: int = 4
    seq_len: int = 128
    rows: int = 2
    """Sequences per micro-batch."""
    micro_batches: int = 8
    seed: int = 1234


QUICK = Settings(warmup=2, iters=6)
FULL = Settings(warmup=3, iters=20)


def run(quick: bool) -> BenchResult:
    settings = QUICK if quick else FULL
    record = launch_workers(
        "benchmarks.pipeline", ["--settings", json.dumps(asdict(settings))], NPROC
    )
    medians, bubbles = record["median_s"], record["bubble"]
    theory = {
        name: theoretical_bubble(name, NPROC, settings.micro_batches, v)
        for name, v in SCHEDULES.items()
    }
    peers = {f"bubble_{name}": theory[name] for name in SCHEDULES}
    ratio = {f"bubble_{name}": bubbles[name] / theory[name] for name in SCHEDULES}
    peers["zb_vs_1f1b"] = medians["1f1b"]
    ratio["zb_vs_1f1b"] = medians["zb_h1"] / medians["1f1b"]
    peers["torch_pipelining"] = medians["torch_pipelining"]
    ratio["torch_pipelining"] = medians["1f1b_pair"] / medians["torch_pipelining"]
    peaks, m = record["peak_bytes"], settings.micro_batches
    per_micro = [bytes_ / m for bytes_ in peaks["gpipe"]]  # one micro-batch, a whole stage
    for name, chunks in SCHEDULES.items():
        held = build_schedule(name, NPROC, m, chunks).in_flight_peak()
        bound = [held[r] * per_micro[r] / chunks for r in range(NPROC)]
        worst = max(range(NPROC), key=lambda r: peaks[name][r] / bound[r])
        peers[f"activation_{name}"] = bound[worst]
        ratio[f"activation_{name}"] = peaks[name][worst] / bound[worst]
    by_layers = max(peaks["1f1b"])
    peers["memory_partition"] = by_layers
    ratio["memory_partition"] = max(peaks["1f1b_memory_partition"]) / by_layers
    config = {
        **record["config"],
        "measured_bubble": bubbles,
        "slowest_rank_bubble_over_theory": {
            name: record["bubble_slowest_rank"][name] / theory[name] for name in SCHEDULES
        },
        "busy_per_rank_over_mean": record["busy_over_mean"],
        "peak_bytes_per_rank": record["peak_bytes"],
        "theoretical_bubble": theory,
        "peers": "bubble_<schedule>: the theoretical bubble (ratio measured / theory); "
        "zb_vs_1f1b: 1F1B's median step seconds (ratio ZB-H1 / 1F1B); torch_pipelining: "
        "Schedule1F1B's median step seconds (ratio our 1F1B / it); activation_<schedule>: the "
        "in-flight bound in bytes on the rank furthest from it (ratio measured peak / bound); "
        "memory_partition: 1F1B's largest peak split by layers (ratio split by memory / it)",
    }
    return BenchResult(
        metric="median_step_s", ours=medians["1f1b"], peers=peers, config=config, ratio=ratio
    )


def engine_config(settings: Settings, schedule: str, chunks: int, tied: bool = True) -> Config:
    return Config.from_dict(
        {
            "model": {
                "n_layers": settings.n_layers,
                "d_model": settings.d_model,
                "n_heads": settings.n_heads,
                "vocab_size": 256,
                "tie_embeddings": tied,
            },
            "data": {"seq_len": settings.seq_len},
            "parallel": {"pp": NPROC},
            "pipeline": {"schedule": schedule, "chunks": chunks},
            "train": {
                "micro_batch": settings.rows,
                "global_batch": settings.rows * settings.micro_batches,
                "steps": settings.warmup + settings.iters,
                "seed": settings.seed,
            },
            "precision": {"dtype": "fp32"},
            "optim": {"grad_clip": 0.0, "warmup_steps": 0},
            "log": {"progress": False},
        }
    )


class _TorchStage(nn.Module):
    """Blocks `blocks` of `model`, after its embedding (first) or before its head (last);
    only what the stage runs is registered (its parameters are the optimizer's)."""

    def __init__(self, model: nn.Module, blocks: range, first: bool, last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: it holds every block
        self.blocks = nn.ModuleList(model.blocks[i] for i in blocks)
        ends = ("embed", "pos_embed") if first else ("norm_f", "head")
        self.ends = nn.ModuleList(getattr(model, n) for n in ends if hasattr(model, n))
        self.first, self.last = first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self._model.embed_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self._model.finish(x) if self.last else x


def torch_pipelining_step(cfg: Config, settings: Settings, batches: list, rank: int):
    """The peer: torch.distributed.pipelining's Schedule1F1B on the same split, fused AdamW
    (`cfg`'s model untied: torch's stages share no weight)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    model = build_gpt(cfg.model, cfg.data.seq_len, device="cpu", seed=cfg.train.seed)
    half = settings.n_layers // NPROC
    part = _TorchStage(model, range(rank * half, (rank + 1) * half), rank == 0, rank == 1)
    stage = PipelineStage(part, rank, NPROC, torch.device("cpu"))
    schedule = Schedule1F1B(stage, settings.micro_batches, loss_fn=cross_entropy_loss)
    optimizer = default_optimizer_factory(cfg.optim)([{"params": list(part.parameters())}])

    def step(index: int) -> None:
        inputs, targets = batches[index]
        if rank == 0:
            schedule.step(inputs)
        else:
            schedule.step(target=targets, losses=[])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(settings: Settings, rank: int, local_rank: int, world_size: int) -> dict[str, Any]:
    del local_rank, world_size
    gen = torch.Generator().manual_seed(settings.seed)
    rows = settings.rows * settings.micro_batches
    tokens = [
        torch.randint(0, 256, (rows, settings.seq_len + 1), generator=gen)
        for _ in range(settings.warmup + settings.iters)
    ]
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    steps, engines = {}, {}
    for name, chunks in SCHEDULES.items():
        cfg = engine_config(settings, name, chunks)
        model = build_gpt(cfg.model, cfg.data.seq_len, device="cpu", seed=cfg.train.seed)
        engine = initialize(model, None, cfg)
        engines[name] = engine
        steps[name] = lambda i, e=engine: e.train_step(batches[i])
    untied = engine_config(settings, "1f1b", 1, tied=False)
    model = build_gpt(untied.model, untied.data.seq_len, device="cpu", seed=untied.train.seed)
    pair_engine = initialize(model, None, untied)
    peer = {
        "1f1b_pair": lambda i: pair_engine.train_step(batches[i]),
        "torch_pipelining": torch_pipelining_step(untied, settings, batches, rank),
    }
    spans: dict[str, list[tuple[float, float]]] = {name: [] for name in SCHEDULES}
    """Per schedule, (busy_s, step_s) of each measured step on this rank."""

    def on_step(name: str, index: int, seconds: float) -> None:
        if name in engines and index >= settings.warmup:
            runner = engines[name].schedule
            spans[name].append((runner.busy_s, runner.step_s))
        print(f"rank {rank} {name} step {index}: {seconds:.3f} s", file=sys.stderr)

    times = interleaved_step_times(
        steps,
        warmup=settings.warmup,
        iters=settings.iters,
        before_step=dist.barrier,
        on_step=on_step,
    )
    pair = interleaved_step_times(
        peer, warmup=settings.warmup, iters=settings.iters, before_step=dist.barrier
    )
    times.update(pair)
    slowest = {}
    for name, values in times.items():
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        slowest[name] = statistics.median(t.tolist())
    cfg = engine_config(settings, "1f1b", 1).replace(pipeline={"partition": "memory"})
    model = build_gpt(cfg.model, cfg.data.seq_len, device="cpu", seed=cfg.train.seed)
    engines["1f1b_memory_partition"] = initialize(model, None, cfg)
    engines["1f1b_memory_partition"].train_step(batches[0])  # as the others: after a step
    peak_bytes = {}
    for name, engine in engines.items():  # one more step each, its micro-batches counted
        with PeakTensorBytes("cpu", existing=False) as tracker:
            engine.schedule.run(batches[0], engine)
        engine.step()
        mine = torch.zeros(NPROC, dtype=torch.float64)
        mine[rank] = tracker.peak
        dist.all_reduce(mine)
        peak_bytes[name] = mine.tolist()
    bubble, slowest_rank, busy_share = {}, {}, {}
    for name, values in spans.items():
        mine, span = (t.contiguous() for t in torch.tensor(values, dtype=torch.float64).T)
        busy = torch.zeros(NPROC, len(values), dtype=torch.float64)
        busy[rank] = mine
        dist.all_reduce(busy)
        dist.all_reduce(span, op=dist.ReduceOp.MAX)
        bubble[name] = (1 - busy.sum(0) / (NPROC * span)).mean().item()
        slowest_rank[name] = (1 - busy.max(0).values / span).mean().item()
        busy_share[name] = (busy.mean(1) / busy.mean()).tolist()
    return {
        "median_s": slowest,
        "bubble": bubble,
        "bubble_slowest_rank": slowest_rank,
        "busy_over_mean": busy_share,
        "peak_bytes": peak_bytes,
        "config": {
            **asdict(settings),
            "pp": NPROC,
            "precision": "fp32",
            "threads_per_rank": 1,
            "torch": torch.__version__,
        },
    }


if __name__ == "__main__":
    worker_main("benchmarks.pipeline", Settings, measure)
