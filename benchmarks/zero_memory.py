"""Benchmark ``zero-memory``: model-state bytes per rank at ZeRO stages 0-3 vs the formulas.

ZeRO (Rajbhandari et al., SC'20, section 3 and figure 1) gives the model-state bytes per rank
of Adam training with Ψ parameters on N data-parallel ranks. Mixed precision keeps bf16
parameters (2Ψ), bf16 gradients (2Ψ), fp32 master weights (4Ψ) and fp32 Adam m and v (8Ψ):
16Ψ for plain data parallelism (stage 0), 4Ψ + 12Ψ/N (stage 1: optimizer states and master
weights sharded), 2Ψ + 14Ψ/N (stage 2: gradients too), 16Ψ/N (stage 3: parameters too).
Pure fp32 Adam keeps no master copy (4Ψ params, 4Ψ grads, 8Ψ Adam): 16Ψ, 8Ψ + 8Ψ/N,
4Ψ + 12Ψ/N, 16Ψ/N.

Measured: the sum of ``Engine.memory_report()`` (bytes per category read from the tensors the
engine holds, each storage once, padding included) after one training step, i.e. between
steps, with Ψ = the elements of ``engine.params``; at stage 3, whose gradient shards are
chunks freed after the update, its gradients as they were at the end of backward. Gradients
stay in the parameter dtype (``precision.reduce_dtype = "param"``), as in the paper. Each
case gets a fresh engine; one 2-rank and one 4-rank job each run all 8 cases (4 stages x
{mixed, fp32}). A case's figure is that of its largest rank (ranks differ only by Adam's
per-piece step counters). These are the states kept between steps, as in the paper: the
transient full-size gradient buffer of stages 2 and 3 during backward and the gathered units
of stage 3 are not in them. As a cross-check that the report misses nothing, each case also
records the bytes of every tensor storage created since the case began and still referenced
after the step (a scan of Python objects).

There is no peer process: each case is a "peer" whose value is the formula's bytes per rank,
and its ratio is measured / formula (1.00 means the engine holds exactly what the paper
says). ``ours`` is the ratio farthest from 1. The JSON ``config.cases`` gives, per case, the
measured and formula bytes per parameter element of every category.
"""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from shardwise.accelerator import get_accelerator
from shardwise.bench import BenchResult, launch_workers, worker_main
from shardwise.config import Config
from shardwise.engine import initialize
from shardwise.models.gpt import build_gpt

NPROCS = (2, 4)
"""Ranks of the benchmark jobs (one job each)."""
STAGES = (0, 1, 2, 3)
PRECISIONS = {
    "mixed": {"dtype": "bf16", "reduce_dtype": "param"},
    "fp32": {"dtype": "fp32", "reduce_dtype": "param"},
}
"""Precision name (the JSON key prefix) -> the config's ``precision`` section."""
CATEGORIES = ("params", "grads", "master_params", "optimizer_states", "buffers")
"""The categories of ``Engine.memory_report()``."""
TIERS = ("device", "host", "disk")
TOLERANCE = 0.05
"""A ratio within 1 ± this agrees with the formula."""

# Precision -> category -> (bytes per parameter element, first ZeRO stage that shards it).
MODEL_STATES: dict[str, dict[str, tuple[int, int]]] = {
    "mixed": {
        "params": (2, 3),
        "grads": (2, 2),
        "master_params": (4, 1),
        "optimizer_states": (8, 1),
        "buffers": (0, 0),
    },
    "fp32": {
        "params": (4, 3),
        "grads": (4, 2),
        "master_params": (0, 1),
        "optimizer_states": (8, 1),
        "buffers": (0, 0),
    },
}


@dataclass(frozen=True)
class Settings:
    """The model every case trains for one step."""

    preset: str = "tiny"
    """GPT size preset; the fields below override its sizes when set."""
    n_layers: int | None = 2
    d_model: int | None = 64
    n_heads: int | None = 4
    seq_len: int = 32
    """Tokens per sequence."""
    micro_batch: int = 1
    """Sequences per rank in the one step."""
    seed: int = 1234
    """Seed of the initial weights and of the data."""


QUICK = Settings()
FULL = Settings(preset="mini", n_layers=None, d_model=None, n_heads=None, seq_len=64)
"""~25M parameters: padding and Adam's step counters weigh even less than in `QUICK`."""


def case_key(precision: str, stage: int, nproc: int) -> str:
    return f"{precision}_stage{stage}_n{nproc}"


def formula_per_param(precision: str, stage: int, nproc: int) -> dict[str, float]:
    """Bytes per parameter element of each category on one of `nproc` ranks."""
    return {
        category: per_element / nproc if stage >= first_sharded else float(per_element)
        for category, (per_element, first_sharded) in MODEL_STATES[precision].items()
    }


def formula_text(precision: str, stage: int) -> str:
    """The formula as the paper writes it, e.g. ``"2Ψ + 14Ψ/N"``."""
    replicated = sharded = 0
    for per_element, first_sharded in MODEL_STATES[precision].values():
        if stage >= first_sharded:
            sharded += per_element
        else:
            replicated += per_element
    terms = [f"{replicated}Ψ"] if replicated else []
    terms += [f"{sharded}Ψ/N"] if sharded else []
    return " + ".join(terms)


def run(quick: bool) -> BenchResult:
    """One job per rank count; every case's measured bytes against its formula."""
    settings = QUICK if quick else FULL
    records = {}
    for nproc in NPROCS:
        print(f"[zero-memory] launching {nproc} ranks", file=sys.stderr, flush=True)
        records[nproc] = launch_workers(
            "benchmarks.zero_memory", ["--settings", json.dumps(asdict(settings))], nproc
        )
    return summarise(settings, records)


def summarise(settings: Settings, records: dict[int, dict[str, Any]]) -> BenchResult:
    """The result from each job's record (`measure`), keyed by its number of ranks."""
    formulas: dict[str, float] = {}
    ratios: dict[str, float] = {}
    cases: dict[str, Any] = {}
    psis = set()
    for precision in PRECISIONS:
        for nproc, record in records.items():
            for stage in STAGES:
                key = case_key(precision, stage, nproc)
                ranks = record["cases"][key]  # one `measure_case` result per rank
                totals = [sum(r["report"].values()) for r in ranks]
                worst = ranks[max(range(len(ranks)), key=totals.__getitem__)]
                psi = worst["psi"]
                expected = formula_per_param(precision, stage, nproc)
                formula_bytes = sum(expected.values()) * psi
                psis.update(r["psi"] for r in ranks)
                formulas[key] = formula_bytes
                ratios[key] = max(totals) / formula_bytes
                cases[key] = {
                    "formula": formula_text(precision, stage),
                    "measured_bytes_per_rank": max(totals),
                    "measured_bytes_spread_over_ranks": max(totals) - min(totals),
                    "live_tensor_bytes_per_rank": max(r["live_tensor_bytes"] for r in ranks),
                    "bytes_per_param": {c: worst["report"][c] / psi for c in CATEGORIES},
                    "formula_bytes_per_param": expected,
                }
    ours_key = max(ratios, key=lambda k: abs(ratios[k] - 1))
    first = records[min(records)]
    config = {
        "model": first["model"],
        "psi": sorted(psis)[0] if len(psis) == 1 else sorted(psis),
        "seq_len": settings.seq_len,
        "micro_batch_per_rank": settings.micro_batch,
        "nprocs": list(records),
        "stages": list(STAGES),
        "precision": {
            "mixed": "bf16 params and grads (precision.reduce_dtype='param'), fp32 master "
            "weights and AdamW m, v",
            "fp32": "fp32 params, grads and AdamW m, v (no master copy)",
        },
        "optimizer": "torch AdamW fused (shardwise default)",
        "measured": "sum of Engine.memory_report() after one training step, largest rank",
        "live_tensor_bytes": "cross-check: bytes of the tensor storages created in the case "
        "and still referenced after the step (gc scan), largest rank",
        "peers": "no peer process: each case's peer value is the ZeRO paper's formula in "
        "bytes per rank; ratio = measured / formula",
        "worst_case": ours_key,
        "tolerance": TOLERANCE,
        "all_within_tolerance": all(abs(r - 1) <= TOLERANCE for r in ratios.values()),
        "device": first["device"],
        "torch": torch.__version__.split("+")[0],
        "cases": cases,
    }
    return BenchResult(
        metric="model_state_bytes_per_rank_over_formula",
        ours=ratios[ours_key],
        peers=formulas,
        config=config,
        ratio=ratios,
    )


# --------------------------------------------------------------------------- the worker


def case_config(settings: Settings, precision: str, stage: int, world_size: int) -> Config:
    sizes = {
        "n_layers": settings.n_layers,
        "d_model": settings.d_model,
        "n_heads": settings.n_heads,
    }
    return Config().replace(
        model={"preset": settings.preset, **sizes},
        data={"seq_len": settings.seq_len},
        zero={"stage": stage},
        precision=PRECISIONS[precision],
        train={
            "micro_batch": settings.micro_batch,
            "global_batch": settings.micro_batch * world_size,
            "steps": 1,
            "seed": settings.seed,
        },
    )


def live_storages() -> dict[int, int]:
    """Address -> bytes of every tensor storage a Python object still refers to.

    An independent check of ``memory_report()``: what the engine adds to this set is what it
    holds, whether or not the report knows of it (tensors held only by C++ are not seen)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        # type(), not isinstance(): some module objects warn when asked for their __class__.
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            try:
                storages[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # no real storage: a fake tensor torch's tracing left behind
                continue
    return storages


def measure_case(
    settings: Settings,
    precision: str,
    stage: int,
    rank: int,
    world_size: int,
    device: torch.device,
    cross_check: bool = True,
) -> dict[str, Any]:
    """Ψ, this rank's ``memory_report()`` and (with `cross_check`, a scan costing ~0.3 s) the
    bytes of the tensors the engine keeps alive (`live_storages`), after one step of a fresh
    engine on its rows of a seeded batch."""
    cfg = case_config(settings, precision, stage, world_size)
    before = live_storages() if cross_check else {}
    model = build_gpt(cfg.model, settings.seq_len, device=device, seed=settings.seed)
    engine = initialize(model, None, cfg)
    generator = torch.Generator().manual_seed(settings.seed)
    rows = world_size * settings.micro_batch
    tokens = torch.randint(
        0, cfg.model.vocab_size, (rows, settings.seq_len + 1), generator=generator
    )
    mine = tokens[rank * settings.micro_batch : (rank + 1) * settings.micro_batch]
    engine.backward(engine.loss_of(engine.forward(mine[:, :-1]), mine[:, 1:]))
    # ZeRO-3's gradient shards (chunks) live from backward to the update only
    in_step = sum(engine.memory_report().get(f"grad_chunks_{t}", 0) for t in TIERS)
    engine.step()
    del tokens, mine
    live = None
    if cross_check:
        live = sum(n for ptr, n in live_storages().items() if ptr not in before)
    report = engine.memory_report()
    report = {category: report[category] for category in CATEGORIES}
    report["grads"] += in_step
    measured = {
        "psi": sum(p.numel() for p in engine.params),
        "report": report,
        "live_tensor_bytes": live,
    }
    del engine, model
    return measured


def measure(settings: Settings, rank: int, local_rank: int, world_size: int) -> dict[str, Any]:
    """Every case on this rank; rank 0's record holds every rank's measurements."""
    device = get_accelerator().device(local_rank)
    cases = {}
    for precision in PRECISIONS:
        for stage in STAGES:
            mine = measure_case(settings, precision, stage, rank, world_size, device)
            # The engine's reference cycles (hooks) go now, while the process group its mesh
            # refers to is alive, not at interpreter exit after it was destroyed.
            gc.collect()
            ranks: list[Any] = [None] * world_size
            dist.all_gather_object(ranks, mine)
            key = case_key(precision, stage, world_size)
            cases[key] = ranks
            if rank == 0:
                total = sum(mine["report"].values())
                print(
                    f"[zero-memory] {key}: {total / mine['psi']:.3f} bytes/param on rank 0 "
                    f"(formula {formula_text(precision, stage)} = "
                    f"{sum(formula_per_param(precision, stage, world_size).values()):.3f})",
                    file=sys.stderr,
                    flush=True,
                )
    model = settings.preset
    if settings.n_layers or settings.d_model or settings.n_heads:
        model += f" (n_layers={settings.n_layers}, d_model={settings.d_model}, "
        model += f"n_heads={settings.n_heads})"
    return {"cases": cases, "model": f"gpt-{model}", "device": get_accelerator().device_type}


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank (``python -m benchmarks.zero_memory``)."""
    worker_main("benchmarks.zero_memory", Settings, measure, argv)


if __name__ == "__main__":
    main()
