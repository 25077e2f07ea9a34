"""`shardwise` command lines run in the test process (the launcher still spawns the ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardwise.cli import main

TINY_RUN = [
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "data.seq_len=32",
    "data.max_bytes=20000",
    "precision.dtype=fp32",
    "train.micro_batch=2",
    "log.progress=false",
]
"""`--set` settings of a run small enough for a launcher test (fp32, whatever the machine)."""


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``shardwise *argv``."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def settings_args(settings: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    return [arg for setting in settings for arg in ("--set", setting)]


def logged_losses(out: Path) -> list[float]:
    """The loss of every step in a run's metrics.jsonl."""
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_on_two_ranks(
    out: Path, settings: list[str], capsys, shows: str, options: list[str] = ()
) -> list[float]:
    """``shardwise train --nproc 2 --out out *options`` with `settings`: checks that it
    succeeded and that its plan printed `shows`; the logged losses."""
    argv = ["train", "--nproc", "2", "--out", str(out), *options, *settings_args(settings)]
    code, printed = run_cli(argv, capsys)
    assert code == 0, printed
    assert shows in printed
    return logged_losses(out)
