"""``shardwise plan``: memory, communication and time of a run, predicted before launch.

`predict(plan, speeds)` -> `Prediction` (per-rank peak memory by category and tier, wire
bytes per step by axis and collective, step time); `choose_layouts(config, nproc, cap,
speeds)` ranks the layouts that fit a memory cap (``--auto``). See docs/planner.md and the
notes in `memory.py`, `comm.py` and `speed.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.models.gpt import GPTConfig, gpt_config_from
from shardwise.planner.comm import step_wire_bytes
from shardwise.planner.memory import TIERS, MemoryPrediction, predict_memory
from shardwise.planner.speed import MachineSpeeds, TimePrediction, machine_speeds, predict_time
from shardwise.planner.tracker import PeakTensorBytes, live_storages
from shardwise.run_plan import RunPlan, meta_model

__all__ = [
    "MachineSpeeds",
    "MemoryPrediction",
    "PeakTensorBytes",
    "Prediction",
    "live_storages",
    "machine_speeds",
    "predict",
]

MIB = 2**20


@dataclass(frozen=True)
class Prediction:
    """What `plan` costs one rank."""

    plan: RunPlan
    memory: MemoryPrediction
    wire: dict[str, dict[str, float]]
    """Axis -> collective -> wire bytes per step (`step_wire_bytes`)."""
    time: TimePrediction | None
    """None when no machine speeds were given."""

    def as_json(self) -> dict:
        memory = self.memory
        out = {
            "layout": self.plan.layout(),
            "memory_bytes": {
                "states": memory.states,
                "buffers": memory.buffers,
                "activations": memory.activations,
                "gathered": memory.gathered,
                "in_flight_micro_batches": memory.in_flight,
                "tiers": {tier: memory.tier(tier) for tier in TIERS},
                "device_peak": memory.device_peak,
                "memory_peak": memory.memory_peak,
            },
            "wire_bytes_per_step": self.wire,
            "flops_per_micro_batch": memory.trace.flops if memory.trace else None,
        }
        if self.time is not None:
            time = self.time
            out["step_s"] = {
                "compute": time.compute,
                "update": time.update,
                "comm": time.comm,
                "step": time.step,
            }
        return out

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) lines for a table."""
        memory = self.memory
        rows = []
        for name, tiers in memory.states.items():
            where = ", ".join(f"{tier} {nbytes / MIB:.1f}" for tier, nbytes in tiers.items())
            rows.append((name, f"{sum(tiers.values()) / MIB:.1f} MiB ({where})"))
        rows.append(("buffers", f"{memory.buffers / MIB:.1f} MiB"))
        flight = f", {memory.in_flight} micro-batches in flight" if memory.in_flight > 1 else ""
        rows.append(("activations", f"{memory.activations / MIB:.1f} MiB{flight}"))
        if memory.gathered:
            rows.append(("gathered units", f"{memory.gathered / MIB:.1f} MiB (ZeRO-3)"))
        tiers = ", ".join(f"{tier} {memory.tier(tier) / MIB:.1f}" for tier in ("host", "disk"))
        rows.append(
            ("peak", f"{memory.device_peak / MIB:.1f} MiB on the device (states also on: {tiers})")
        )
        for axis, ops in self.wire.items():
            sent = ", ".join(f"{op} {nbytes / MIB:.2f} MiB" for op, nbytes in ops.items())
            rows.append((f"comm {axis}", f"{sent} per step"))
        if self.time is not None:
            time = self.time
            rows.append(
                (
                    "step time",
                    f"{time.step:.3f} s (compute {time.compute:.3f}, update {time.update:.3f}, "
                    f"comm {time.comm:.3f})",
                )
            )
        return rows


def predict(
    plan: RunPlan, speeds: MachineSpeeds | None = None, traces: dict | None = None
) -> Prediction:
    """Memory, communication and (with `speeds`) time of `plan`'s registered model; `traces`
    as `predict_memory` takes it."""
    memory = predict_memory(plan, traces)
    gpt = _gpt_shape(plan)
    wire = step_wire_bytes(plan, gpt)
    time = None
    if speeds is not None:
        time = predict_time(plan, memory.trace, wire, speeds, meta_model(plan.config))
    return Prediction(plan, memory, wire, time)


def _gpt_shape(plan: RunPlan) -> GPTConfig | None:
    config = plan.config
    return (
        gpt_config_from(config.model, config.data.seq_len) if config.model.name == "gpt" else None
    )
