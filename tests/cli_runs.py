"""`shardwise` command lines run in the test process (the launcher still spawns the ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardwise.cli import main


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
