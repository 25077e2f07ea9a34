"""The disk tier's run directories: one private directory per process under the chosen root,
with an owner file (pid, host, process start time), so that a crashed run's files are found and
removed by the next tier on the same host; and the check of the root itself.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from shardwise.errors import ConfigError

_RUN_PREFIX = "shardwise-"
_NEW_PREFIX = ".shardwise-new-"
_TRASH_PREFIX = ".shardwise-trash-"
_OWNER_FILE = "owner.json"


def check_root(root: str | os.PathLike[str], max_bytes: int | None, workers: int) -> Path:
    """Validate the arguments of `DiskTier` before anything is created (the CLI calls it
    before launching ranks, so a bad disk path fails before any process waits)."""
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0
    ):
        raise ConfigError(
            f"offload.disk_max_bytes={max_bytes!r} is not a byte count; use an integer >= 0, "
            f"or no value for no cap"
        )
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"offload.disk_workers={workers!r} must be an integer >= 1")
    path = Path(os.fspath(root))
    if not path.exists():
        raise ConfigError(
            f"offload.disk_path={str(path)!r} does not exist; create it or choose another directory"
        )
    if not path.is_dir():
        raise ConfigError(
            f"offload.disk_path={str(path)!r} is not a directory; choose a directory for "
            f"offloaded tensors"
        )
    try:
        _probe_write(path)
    except OSError as exc:
        raise ConfigError(
            f"offload.disk_path={str(path)!r} is not writable ({exc.strerror or exc}); choose a "
            f"directory this process can write to"
        ) from exc
    return path


def _probe_write(directory: Path) -> None:
    """Create, write and delete a file: the only reliable test (os.access is not, e.g. for
    root, read-only mounts or ACLs)."""
    descriptor, name = tempfile.mkstemp(prefix=".shardwise-probe-", dir=directory)
    try:
        os.write(descriptor, b"\0")
    finally:
        os.close(descriptor)
        os.unlink(name)


def create_run_dir(root: Path) -> Path:
    """Make `root/shardwise-<pid>-<token>/` with its owner file already inside: it is built
    under a hidden name and renamed, so no run directory is ever seen without an owner."""
    building = Path(tempfile.mkdtemp(prefix=_NEW_PREFIX, dir=root))
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}
    (building / _OWNER_FILE).write_text(json.dumps(owner))
    run_dir = root / f"{_RUN_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(building, run_dir)
    return run_dir


def remove_stale_run_dirs(root: Path) -> None:
    """Delete run directories whose owner process died (crash restart) and leftover trash.

    Only directories with an owner file naming this host are judged: on a file system shared
    between hosts, a pid from another host says nothing here.
    """
    for entry in os.scandir(root):
        if entry.name.startswith(_TRASH_PREFIX):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.name.startswith((_RUN_PREFIX, _NEW_PREFIX)) and entry.is_dir():
            owner = _read_owner(Path(entry.path))
            if owner is not None and _owner_is_gone(owner):
                delete_dir(Path(entry.path))


def _read_owner(run_dir: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads((run_dir / _OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _owner_is_gone(owner: dict[str, Any]) -> bool:
    """Whether the process that wrote `owner` has exited (its pid may since have been reused:
    the start time tells the two apart)."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    start = owner.get("start")
    return start is not None and _start_time(pid) not in (None, start)


def _start_time(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), if known."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return fields[19] if len(fields) > 19 else None


def delete_dir(path: Path) -> None:
    """Rename `path` to a trash name, then delete it: the rename is atomic, so a crash midway
    leaves trash that the next tier removes, never a run directory without its owner file.
    Of processes racing to delete the same directory, the one whose rename succeeds does it."""
    trash = path.parent / f"{_TRASH_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
