"""The embedded corpus: the Python standard library's own source text, read in place.

Every Python installation carries about 10 MB of well-written, varied text in its standard
library, so a training run can start with no download and no data preparation. The text
is the same on every machine with the same Python version, because the file list is
sorted and everything that depends on how or where Python was built is left out.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
"""Directory names never entered: installed packages, test suites, tools rather than library."""


def embedded_corpus(max_bytes: int, start: bytes = b"") -> bytes:
    """The first `max_bytes` bytes of the concatenated standard-library sources.

    Each file (a document) is preceded by `start` and a ``# file: relative/path.py`` line.
    Files are read in order of their relative POSIX path, and reading stops as soon as
    `max_bytes` are in hand.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    remaining = max_bytes
    for rel_path in stdlib_source_paths(root):
        if remaining <= 0:
            break
        header = start + f"# file: {rel_path}\n".encode()
        with open(root / rel_path, "rb") as file:
            body = file.read(max(remaining - len(header), 0))
        # A file without a final newline would run into the next header line.
        if body and not body.endswith(b"\n"):
            body += b"\n"
        chunk = (header + body)[:remaining]
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def stdlib_source_paths(root: Path) -> list[str]:
    """Relative POSIX paths of the pure-library ``.py`` files under `root`, sorted."""
    found: list[str] = []
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        with os.scandir(root / rel_dir) as entries:
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    if _is_library_dir(entry.name):
                        pending.append(rel)
                elif entry.name.endswith(".py") and _is_library_file(entry.name):
                    found.append(rel)
    return sorted(found)


def _is_library_dir(name: str) -> bool:
    # config-3.X-<platform> holds the build's Makefile and python-config.py.
    return name not in _EXCLUDED_DIRS and not name.startswith("config-")


def _is_library_file(name: str) -> bool:
    # _sysconfigdata_*.py records the build's paths and compiler flags: machine-specific.
    return not name.startswith("_sysconfigdata_")
