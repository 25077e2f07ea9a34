"""Every rank joins the group, writes ``<dir>/rank<R>.pid`` and waits for ever (until a signal)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from shardwise.distributed.launch import init_worker, run_worker


def main() -> None:
    info = init_worker(timeout_s=30)
    (Path(sys.argv[1]) / f"rank{info.rank}.pid").write_text(str(os.getpid()))
    threading.Event().wait()


if __name__ == "__main__":
    run_worker(main)
