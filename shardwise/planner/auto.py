"""``shardwise plan --auto``: every layout of N ranks that fits a memory cap, fastest first.

The candidates vary what the issue of layouts is about and keep the model, data, batch and
optimizer as configured: the degrees (dp x tp x pp x sp over N ranks; tp as 1D, and 2D where
tp is a square), the ZeRO stage (0-3 with dp > 1), activation checkpointing (none / full) and,
on an accelerator with its own memory, Adam states on the host. A candidate is any config
that `resolve` accepts (combinations it refuses are skipped); its peak is `predict`'s (on the
CPU device and host are one memory: the cap applies to both), its rank the predicted step
time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from shardwise.accelerator import get_accelerator
from shardwise.config import Config
from shardwise.errors import ConfigError
from shardwise.planner import Prediction, predict
from shardwise.planner.speed import MachineSpeeds
from shardwise.run_plan import resolve

MIB = 2**20


@dataclass(frozen=True)
class Candidate:
    """One layout: the ``--set`` lines that select it and what it costs."""

    sections: dict[str, dict]
    """The config sections that select the layout (`Config.replace`)."""
    prediction: Prediction

    @property
    def settings(self) -> tuple[str, ...]:
        """``section.key=value`` lines for ``--set``."""
        return tuple(
            f"{section}.{key}={value}"
            for section, keys in self.sections.items()
            for key, value in keys.items()
        )

    @property
    def peak(self) -> float:
        return peak_bytes(self.prediction)


def peak_bytes(prediction: Prediction) -> float:
    """The peak a memory cap bounds: the device's, or device + host where they are one."""
    memory = prediction.memory
    return memory.memory_peak if get_accelerator().device_type == "cpu" else memory.device_peak


def choose_layouts(
    config: Config, nproc: int, cap_bytes: float, speeds: MachineSpeeds
) -> list[Candidate]:
    """The candidates of `nproc` ranks under `cap_bytes`, fastest predicted first; raises a
    one-line `ConfigError` naming the smallest predicted peak when none fits."""
    traces: dict = {}
    candidates = []
    train = config.train
    # every layout trains the same tokens per step: the batch of data parallelism over all
    global_batch = train.global_batch or train.micro_batch * nproc
    for sections in layouts(nproc):
        sections["train"]["global_batch"] = global_batch
        try:
            plan = resolve(config.replace(**sections), nproc)
        except ConfigError:
            continue
        candidates.append(Candidate(sections, predict(plan, speeds, traces)))
    if not candidates:
        raise ConfigError(f"no layout of {nproc} ranks is valid for this model and batch")
    fitting = [c for c in candidates if c.peak <= cap_bytes]
    if not fitting:
        smallest = min(candidates, key=lambda c: c.peak)
        raise ConfigError(
            f"no layout of {nproc} ranks fits --memory-cap {cap_bytes / MIB:,.1f} MiB: the "
            f"smallest predicted peak is {smallest.peak / MIB:,.1f} MiB per rank, with "
            f"{' '.join(smallest.settings)}"
        )
    return sorted(fitting, key=lambda c: c.prediction.time.step)


def layouts(nproc: int) -> Iterator[dict[str, dict]]:
    """The config sections of every candidate layout of `nproc` ranks."""
    offload = ("device", "host") if get_accelerator().device_type != "cpu" else ("device",)
    for tp, mode in _tensor_parallel(nproc):
        for pp in _divisors(nproc // tp):
            for sp in _divisors(nproc // (tp * pp)):
                dp = nproc // (tp * pp * sp)
                for stage in range(4) if dp > 1 else (0,):
                    for checkpointing in ("none", "full"):
                        for optimizer in offload:
                            yield {
                                "parallel": {
                                    "tp": tp,
                                    "tp_mode": mode,
                                    "pp": pp,
                                    "sp": sp,
                                    "dp_replicate": 1,
                                    "dp_shard": dp,
                                },
                                "zero": {"stage": stage},
                                "train": {"activation_checkpointing": checkpointing},
                                "offload": {"optimizer": optimizer},
                            }


def _tensor_parallel(nproc: int) -> Iterator[tuple[int, str]]:
    for tp in _divisors(nproc):
        yield tp, "1d"
        side = round(tp**0.5)
        if tp > 1 and side * side == tp:
            yield tp, "2d"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
