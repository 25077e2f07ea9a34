"""Run outputs: metrics.jsonl (one object per step), loss.png, and the progress display."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

METRIC_KEYS = ("step", "loss", "lr", "tokens_per_s", "step_s", "peak_mem_bytes", "grad_norm")
"""Every step's record; fp16 runs add ``loss_scale`` and ``skipped`` (steps skipped so far),
offload runs `TIER_KEYS`."""
TIER_KEYS = ("mem_device_bytes", "mem_host_bytes", "mem_disk_bytes")
"""Offload runs: rank 0's model-state bytes per tier after the step (`memory_tiers`)."""


class MetricsLog:
    """Appends one JSON object per step; on resume, drops records past the resumed step.

    With `tensorboard` set, every value but the step also goes to TensorBoard scalars there
    (named as in metrics.jsonl); a resumed run purges the events past its step, as the jsonl.
    """

    def __init__(self, path: Path, resume_step: int = 0, tensorboard: Path | None = None) -> None:
        self.path = path
        kept = [r for r in read_metrics(path) if r["step"] <= resume_step] if resume_step else []
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = path.open("a")
        self._board = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(tensorboard), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses at most the step in flight
        if self._board is not None:
            for key, value in record.items():
                if key != "step":
                    self._board.add_scalar(key, value, record["step"])
            self._board.flush()

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    losses = {"loss": [r["loss"] for r in records]}
    _plot(records, losses, "training loss (nats/token)", "shardwise train", path)


def plot_memory(records: list[dict[str, Any]], path: Path) -> None:
    """Model-state MiB per tier (device, host, disk) over the steps of an offload run (a
    resumed run's steps before the resume may have run without tiers: left out)."""
    records = [r for r in records if all(key in r for key in TIER_KEYS)]
    tiers = {key.split("_")[1]: [r[key] / 2**20 for r in records] for key in TIER_KEYS}
    _plot(records, tiers, "model states (MiB, rank 0)", "shardwise train: memory by tier", path)


def _plot(
    records: list[dict[str, Any]], lines: dict[str, list], ylabel: str, title: str, path: Path
) -> None:
    """`lines` (label -> a value per record) over the records' steps, saved to `path`; a
    legend when there is more than one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in records]
    for label, values in lines.items():
        ax.plot(steps, values, linewidth=1.2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(lines) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class ProgressDisplay:
    """A rich progress bar on a terminal; a plain line every `every` steps otherwise (CI)."""

    def __init__(self, total: int, start: int, every: int, enabled: bool) -> None:
        self.console = Console(stderr=True)
        self.every = every
        self.enabled = enabled
        self._bar: Progress | None = None
        if enabled and self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, stats="")
            self._bar.start()

    def update(self, record: dict[str, Any], total: int) -> None:
        if not self.enabled:
            return
        stats = (
            f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s  "
            f"mem {record['peak_mem_bytes'] / 2**20:,.0f} MiB"
        )
        if record.get("skipped"):
            stats += f"  fp16 skipped {record['skipped']} (scale {record['loss_scale']:g})"
        if self._bar is not None:
            self._bar.update(self._task, completed=record["step"], stats=stats)
        elif record["step"] % self.every == 0 or record["step"] in (1, total):
            self.console.print(f"step {record['step']}/{total}  {stats}", highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
