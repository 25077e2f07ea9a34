"""Starting ranks and reporting how they ended: `shardwise run` and `train --nproc N`.

Both go through torch's elastic agent (the machinery behind ``torchrun``), never a home-made
launcher, so everything torchrun supports (multi-node rendezvous, ``--nnodes``,
``--rdzv-endpoint``, restarts) keeps working.

Parent side:
    `launch(entry_module, args, nproc)` runs ``python -m entry_module *args`` on ``nproc`` local
    ranks with a standalone rendezvous; `run_torchrun(argv)` hands a torchrun command line to
    `torch.distributed.run`. Either raises one `LaunchError` with one line per failed rank.

Worker side:
    `init_worker(timeout_s)` joins the process group with the collective timeout;
    `run_worker(main)` turns whatever ended ``main`` into one line and an exit code.

Multi-node under Slurm (one agent per node; the first node hosts the rendezvous)::

    #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun shardwise run --nnodes=$SLURM_NNODES --nproc-per-node=8 \\
        --rdzv-backend=c10d --rdzv-endpoint=$head:29500 --rdzv-id=$SLURM_JOB_ID \\
        -- train.py --config gpt-small.toml

[Note: how a rank's failure reaches the user]
A failing worker (inside `run_worker`) prints ``shardwise: error: rank R: <line>`` on its
stderr and writes the same line to the error file the elastic agent gave it
(``TORCHELASTIC_ERROR_FILE``, torch's "string message" format). The agent stops the other
ranks (SIGTERM, then SIGKILL after `_SHUTDOWN_TIMEOUT_S`) and raises ``ChildFailedError``
carrying every failed rank's exit code and error file; `_summarize` turns that into the
`LaunchError`. A rank that died without writing a file (``os._exit``, a signal, a script not
wrapped by `run_worker`) is described by its exit code or signal alone. torch's own logging
and its framed ``ChildFailedError`` report are silenced for the duration of the launch.
A rank that ended normally meets the others at a final barrier and writes ``finished`` to
its error file before leaving the group; if some rank then dies in gloo's teardown, every
rank had done its work, and the launch succeeds (`_finished`).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from shardwise.errors import LaunchError, ShardwiseError

_SHUTDOWN_TIMEOUT_S = 5
"""Seconds the agent waits after SIGTERM before it SIGKILLs the surviving ranks."""

_TORCH_LAUNCH_LOGGERS = (
    "torch.distributed.elastic",
    "torch.distributed.launcher",
    "torch.distributed.run",
)
"""Prefixes of the loggers torch's launcher logs through (silenced during a launch)."""
_TORCH_LAZY_LOGGER_MODULES = (
    "torch.distributed.elastic.rendezvous.c10d_rendezvous_backend",
    "torch.distributed.elastic.rendezvous.dynamic_rendezvous",
    "torch.distributed.elastic.rendezvous.static_tcp_rendezvous",
    "torch.distributed.launcher.api",
    "torch.distributed.run",
)
"""Modules the agent imports only when it needs them; their loggers are silenced too."""
_AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
"""Signals the elastic agent installs handlers for (its default ``signals_to_handle``)."""


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it; it may be taken later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether a server could not bind ``port`` on all interfaces right now.

    SO_REUSEADDR mirrors torch's TCPStore, so lingering TIME_WAIT connections do not count.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


# --------------------------------------------------------------------------- parent side


def launch(
    entry_module: str,
    args: list[str],
    nproc: int,
    *,
    master_port: int | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run ``python -m entry_module *args`` on ``nproc`` local ranks and wait for all of them.

    The rendezvous store listens on ``master_port``, or on a port the OS picks. ``env`` is
    added to the ranks' environment. Rank output goes straight to this process's stdout and
    stderr. Raises `LaunchError` before starting anything when the options are unusable,
    and once, with one line per failed rank, when a rank fails.
    """
    if nproc < 1:
        raise LaunchError(f"--nproc={nproc} must be at least 1")
    if master_port is not None and port_in_use(master_port):
        raise LaunchError(
            f"port {master_port} is already in use; pass another --master-port or leave it "
            "out to pick a free one"
        )
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rank_env = dict(env or {})
    if nproc > 1:  # torchrun's default too: N ranks with N threads each oversubscribe a CPU
        rank_env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    with _error_dir() as log_dir:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint=f"localhost:{master_port or 0}",  # 0: the store binds a free port
            max_restarts=0,
            logs_specs=DefaultLogsSpecs(log_dir=log_dir),
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        )
        with _agent_scope({"SHARDWISE_ERROR_DIR": log_dir, **rank_env}, _SHUTDOWN_TIMEOUT_S):
            elastic_launch(config, sys.executable)("-u", "-m", entry_module, *args)


def run_torchrun(argv: list[str]) -> int:
    """``shardwise run [torchrun args] -- script.py [script args]``: torchrun, summarised.

    ``argv`` is parsed by `torch.distributed.run` itself; the return value is the exit code
    (0), failures raise `LaunchError` as in `launch`.
    """
    from torch.distributed import run as torchrun

    options = torchrun.parse_args(_with_nproc_alias(argv))
    nproc = str(options.nproc_per_node)
    if nproc.lstrip("-").isdigit() and int(nproc) < 1:
        raise LaunchError(f"--nproc-per-node {nproc} must be at least 1")
    script = options.training_script
    if not (options.module or options.no_python) and not Path(script).is_file():
        raise LaunchError(f"script {script!r} does not exist")
    with _error_dir(options.log_dir) as log_dir:
        options.log_dir = log_dir
        with _agent_scope({"SHARDWISE_ERROR_DIR": log_dir}, options.shutdown_timeout):
            torchrun.run(options)
    return 0


def _with_nproc_alias(argv: list[str]) -> list[str]:
    """``--nproc N`` (as ``shardwise train`` spells it) means torchrun's ``--nproc-per-node``;
    only options before the script are the launcher's."""
    script_at = argv.index("--") if "--" in argv else len(argv)
    own = [
        "--nproc-per-node" + arg[len("--nproc") :]
        if arg == "--nproc" or arg.startswith("--nproc=")
        else arg
        for arg in argv[:script_at]
    ]
    return own + argv[script_at:]


@contextlib.contextmanager
def _error_dir(chosen: str | None = None) -> Iterator[str]:
    """Where ranks leave error files and tracebacks: ``chosen``, or a temporary folder.

    A temporary folder is removed afterwards unless it holds a traceback named to the user.
    """
    folder = chosen or tempfile.mkdtemp(prefix="shardwise-launch-")
    try:
        yield folder
    finally:
        if not chosen and not any(Path(folder).rglob("*.traceback")):
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _agent_scope(rank_env: dict[str, str], grace_s: int | None) -> Iterator[None]:
    """Run the elastic agent quietly, with ``grace_s`` between SIGTERM and SIGKILL of the
    ranks (`_grace_before_kill`), and leave this process as it found it.

    The agent reads the ranks' environment from ``os.environ``, writes to it
    (``TORCHELASTIC_SIGNALS_TO_HANDLE``, ``OMP_NUM_THREADS``) and installs signal handlers;
    all three are restored on the way out. Its exceptions become `LaunchError`s.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    saved_env = dict(os.environ)
    saved_signals = _save_signal_handlers()
    os.environ.update(rank_env)
    try:
        with _quiet_torch_logging(), _grace_before_kill(grace_s):
            yield
    except ChildFailedError as err:
        if not _finished(err.failures):
            raise LaunchError(_summarize(err.failures)) from None
    except RendezvousError as err:
        raise LaunchError(f"rendezvous failed: {type(err).__name__}: {err}") from None
    except SignalException as err:
        if err.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise LaunchError(f"stopped by {err.sigval.name}; every rank was stopped") from None
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _grace_before_kill(grace_s: int | None) -> Iterator[None]:
    """Cap the agent's wait between SIGTERM and SIGKILL at ``grace_s`` (None: torch's own).

    When a rank fails, torch's agent closes the others with a fixed 30 s grace, whatever its
    ``shutdown_timeout`` (pytorch/pytorch#119856; pull 192815, open). A frozen rank (SIGSTOP,
    a call wedged in a driver) does not act on SIGTERM, so such a job ran 30 s past the
    failure.
    """
    if grace_s is None:
        yield
        return
    from torch.distributed.elastic.multiprocessing.api import PContext

    torch_close = PContext.close

    def close(pcontext: PContext, death_sig: object = None, timeout: float = grace_s) -> None:
        torch_close(pcontext, death_sig, min(timeout, grace_s))

    PContext.close = close
    try:
        yield
    finally:
        PContext.close = torch_close


def _save_signal_handlers() -> dict[int, object]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # the agent only installs handlers from the main thread
    signums = [getattr(signal, name) for name in _AGENT_SIGNALS if hasattr(signal, name)]
    return {signum: signal.getsignal(signum) for signum in signums}


@contextlib.contextmanager
def _quiet_torch_logging() -> Iterator[None]:
    """Raise every torch launcher logger to CRITICAL while the agent runs.

    torch gives each of its modules its own logger with its own level (from ``LOGLEVEL``),
    so the parent logger's level does not reach them; set each one, after importing the
    modules whose loggers would otherwise appear only once the launch has started.
    """
    for module in _TORCH_LAZY_LOGGER_MODULES:
        importlib.import_module(module)
    names = [n for n in logging.root.manager.loggerDict if n.startswith(_TORCH_LAUNCH_LOGGERS)]
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


_PR_SET_PDEATHSIG = 1
"""prctl option: the signal this process gets when its parent dies (linux/prctl.h)."""
_NO_MESSAGE = ("", "<NONE>")
"""Messages of a rank that wrote no error file (``<NONE>`` is torch's placeholder)."""
_STOP_SIGNALS = (-signal.SIGTERM, -signal.SIGKILL)
"""Exit codes of ranks the agent stopped because another rank failed."""


def _summarize(failures: dict) -> str:
    """One line per failed rank (``{global rank: ProcessFailure}``), root causes first.

    The agent also reports the ranks it stopped itself (SIGTERM, then SIGKILL); those get
    one common last line, since the rank that never joined a collective is among them. A
    rank killed by SIGKILL while no collective timed out was killed from outside (the
    kernel's OOM killer, a user): a root cause, named as such.
    A rank that only lost its peer (``peer_closed`` in its error file) comes after the rank
    that went away. When ranks timed out in a collective (``waited``), the ranks still
    running are the ones they waited for: named first, as behind. Ranks that failed alike
    share one line (a config error every rank raised is printed once).
    """
    waiters = [rank for rank, f in failures.items() if _error_data(f).get("waited")]
    failed, stopped = [], []
    for rank, failure in failures.items():
        data = _error_data(failure)
        # SIGKILL is also what the agent sends a rank that outlives its SIGTERM (a frozen
        # one, behind the others' timeout); without a timeout, someone else killed it.
        stops = _STOP_SIGNALS if waiters else (-signal.SIGTERM,)
        if not data and failure.exitcode in stops:
            stopped.append(rank)
        else:
            stamp = data.get("timestamp", failure.timestamp)
            key = (bool(data.get("peer_closed")), float(stamp), rank)
            failed.append((key, _describe_failure(rank, failure, data)))
    if not failed:  # someone else stopped the ranks: that is the news
        return "\n".join(f"rank {r} was stopped by {failures[r].signal_name()}" for r in stopped)
    lines = _merge_ranks([line for _, line in sorted(failed)])
    if stopped:
        ranks = ", ".join(map(str, sorted(stopped)))
        one = len(stopped) == 1
        if waiters:  # the ranks the others waited for: the root cause, so first
            lines.insert(
                0,
                f"rank {ranks} is behind: it never joined the collective rank(s) "
                f"{', '.join(map(str, sorted(waiters)))} timed out in; the launcher stopped it"
                if one
                else f"ranks {ranks} are behind: they never joined the collective rank(s) "
                f"{', '.join(map(str, sorted(waiters)))} timed out in; the launcher stopped them",
            )
        else:
            lines.append(
                f"rank {ranks} was still running; the launcher stopped it"
                if one
                else f"ranks {ranks} were still running; the launcher stopped them"
            )
    return "\n".join(lines)


def _finished(failures: dict) -> bool:
    """Whether a failed rank had passed the final barrier (``finished`` in its error file,
    `_destroy_process_group`): then every rank had done its work, and the failure is gloo's
    teardown (a rank aborted while the others closed their connections), not the job's."""
    return any(_error_data(failure).get("finished") for failure in failures.values())


def _merge_ranks(lines: list[str]) -> list[str]:
    """``rank R <what>`` lines that say the same of several ranks become one ``ranks R1, R2
    <what>`` line (ranks in order), where the first of them stood."""
    ranks: dict[str, list[str]] = {}
    for line in lines:
        _, rank, what = line.split(" ", 2)
        ranks.setdefault(what, []).append(rank)
    merged = []
    for what, same in ranks.items():
        if len(same) == 1:
            merged.append(f"rank {same[0]} {what}")
        else:
            plural = what.replace("was killed", "were killed", 1).replace(
                "its output", "their output"
            )
            merged.append(f"ranks {', '.join(sorted(same, key=int))} {plural}")
    return merged


def _error_data(failure: object) -> dict:
    """The rank's error file as a dict, empty when it wrote none."""
    data = getattr(failure, "error_file_data", None) or {}
    message = data.get("message")
    return {} if message is None or message in _NO_MESSAGE else data


def _describe_failure(rank: int, failure: object, data: dict) -> str:
    message = data.get("message")
    if isinstance(message, dict):  # written by torch's @record: first line + where the rest is
        first = (str(message.get("message", "")).strip().splitlines() or ["?"])[0]
        message = f"{first} (traceback in {failure.error_file})"
    code = data.get("exit_code")
    if message and failure.exitcode < 0 and (code or failure.exitcode in _STOP_SIGNALS):
        # The rank had reported its failure and was stopped, or died (gloo's teardown has
        # aborted a rank whose peer had left: SIGABRT), while exiting: its own code.
        head = f"rank {rank} exited with code {code}" if code else f"rank {rank} failed"
        return f"{head}: {message}"
    if failure.exitcode < 0:
        head = f"rank {rank} was killed by signal {failure.signal_name()}"
    else:
        head = f"rank {rank} exited with code {failure.exitcode}"
    return f"{head}: {message}" if message else f"{head} without an error message (see its output)"


# --------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class WorkerInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    local_rank: int
    """Rank on this node; picks the device."""
    world_size: int
    """Number of ranks in the job."""


def init_worker(timeout_s: float) -> WorkerInfo:
    """Join the job's process group; a collective raises after ``timeout_s`` seconds.

    Reads the variables torchrun sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) and binds this process to its device first.
    """
    import torch.distributed as dist

    from shardwise.accelerator import get_accelerator

    try:
        info = WorkerInfo(
            rank=int(os.environ["RANK"]),
            local_rank=int(os.environ["LOCAL_RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    except KeyError as err:
        raise LaunchError(
            f"environment variable {err.args[0]} is not set; start this program with "
            "`shardwise run` or `shardwise train --nproc N`"
        ) from None
    _die_with_the_launcher()
    accelerator = get_accelerator()
    accelerator.set_device(info.local_rank)
    # The timeout given here is the one a blocked collective honours (gloo reads it per op).
    dist.init_process_group(accelerator.backend, timeout=timedelta(seconds=timeout_s))
    return info


def _die_with_the_launcher() -> None:
    """Ask Linux to SIGTERM this rank when the process that started it (the launcher's
    agent) dies, even by SIGKILL: no rank trains on as an orphan. Elsewhere, nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def join_launched_group(timeout_s: float) -> None:
    """Join the process group of a launcher that started this process (torchrun and
    ``shardwise run`` set ``WORLD_SIZE`` and ``MASTER_ADDR``) unless it has been joined: a
    script need not call ``init_process_group`` itself. Outside a launcher, nothing."""
    import torch.distributed as dist

    launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if launched and not dist.is_initialized():
        init_worker(timeout_s)
        # joined here, left here: a group still alive at interpreter exit is torn down with
        # the rest of the process, and gloo then aborted a rank now and then (SIGABRT). A
        # script that raised leaves at once: the other ranks may be inside a collective.
        atexit.register(lambda: _destroy_process_group(together=not hasattr(sys, "last_value")))


def run_worker(main: Callable[[], None]) -> NoReturn:
    """Run ``main()`` on this rank and exit: 0 on success, 2 on a `ShardwiseError`, else 1.

    A failure is printed as one line, ``shardwise: error: rank R: ...``, and written to the
    agent's error file (see [Note: how a rank's failure reaches the user]). An unexpected
    exception's traceback goes to a file named in that line; ``SHARDWISE_DEBUG=1`` prints
    every traceback. The process group is destroyed however ``main`` ends.
    """
    code = 1
    try:
        main()
        code = 0
    except KeyboardInterrupt:  # Ctrl-C reached every rank; the launcher reports it once
        code = 130
    except Exception as err:  # noqa: BLE001 - every failure is reported, then the rank exits
        code = _report_failure(err)
    finally:
        _destroy_process_group(together=code == 0)
    sys.exit(code)


def _report_failure(err: Exception) -> int:
    rank = os.environ.get("RANK", "?")
    if isinstance(err, ShardwiseError):
        line, code = " ".join(str(err).split("\n")), 2
    elif _is_collective_failure(err):
        line, code = _describe_collective_failure(err), 1
    else:
        path = _write_traceback(rank, err)
        line, code = f"{type(err).__name__}: {_first_line(err)} (traceback in {path})", 1
    if os.environ.get("SHARDWISE_DEBUG") == "1":
        traceback.print_exception(err, file=sys.stderr)
    if "SHARDWISE_ERROR_DIR" not in os.environ:  # else the launcher prints it, once
        print(f"shardwise: error: rank {rank}: {line}", file=sys.stderr, flush=True)
    waited = _is_collective_failure(err) and "timed out" in _first_line(err).lower()
    _write_error_file(line, exit_code=code, peer_closed=_is_peer_closed(err), waited=waited)
    return code


# Phrases of transport failures that surface as plain RuntimeErrors (gloo raises those).
_TRANSPORT_FAILURES = ("timed out", "closed by peer", "reset by peer", "broken pipe")
_CLOSED_BY_PEER = ("closed by peer", "reset by peer", "broken pipe")


def _is_collective_failure(err: Exception) -> bool:
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    text = _first_line(err).lower()
    return isinstance(err, RuntimeError) and any(p in text for p in _TRANSPORT_FAILURES)


def _describe_collective_failure(err: Exception) -> str:
    from shardwise.distributed.comm import last_collective

    name = last_collective()
    subject = f"collective {name}" if name else "a collective outside shardwise.distributed.comm"
    first = _first_line(err)
    timeout_s = _collective_timeout_s()
    if "timed out" in first.lower() and timeout_s is not None:
        return (
            f"{subject} timed out after {timeout_s:g} s: another rank never "
            "joined it (raise distributed.timeout_s if that rank is only slow)"
        )
    if _is_peer_closed(err):
        return f"{subject} failed: another rank closed its connection (it probably failed)"
    return f"{subject} failed: {first}"


def _collective_timeout_s() -> float | None:
    """The default process group's collective timeout (what `init_worker` set), read from the
    group itself; None where the backend does not say."""
    import torch
    import torch.distributed as dist

    from shardwise.accelerator import get_accelerator

    try:
        group = dist.distributed_c10d._get_default_group()
        backend = group._get_backend(torch.device(get_accelerator().device_type))
        return backend.options._timeout.total_seconds()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _is_peer_closed(err: Exception) -> bool:
    return _is_collective_failure(err) and any(
        p in _first_line(err).lower() for p in _CLOSED_BY_PEER
    )


def _first_line(err: BaseException) -> str:
    """The first line of an error, without the ``[file.cc:123] `` prefix of C++ errors."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else type(err).__name__
    return re.sub(r"^\[[^\]]+:\d+\]\s*", "", first)


def _write_traceback(rank: str, err: BaseException) -> str:
    agent_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    folder = os.environ.get("SHARDWISE_ERROR_DIR") or (
        os.path.dirname(agent_file) if agent_file else tempfile.gettempdir()
    )
    path = os.path.join(folder, f"rank{rank}.traceback")
    with open(path, "w") as file:
        file.write("".join(traceback.format_exception(err)))
    return path


def _write_error_file(
    line: str, *, exit_code: int, peer_closed: bool, waited: bool, finished: bool = False
) -> None:
    """Hand the line to the agent in torch's string-message error-file format.

    Four fields are ours (torch ignores them): ``exit_code``, since the agent may stop this
    rank with SIGTERM while it exits; ``peer_closed`` and ``waited`` (a collective timed out
    waiting for another rank), which tell `_summarize` that the failure only follows
    another rank's; ``finished``: the rank passed the final barrier (`_finished`).
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {
            "message": line,
            "timestamp": time.time(),
            "exit_code": exit_code,
            "peer_closed": peer_closed,
            "waited": waited,
            "finished": finished,
        }
        # whole or not at all: the agent stops this rank (SIGTERM) as soon as another fails,
        # and reads the file then; a half-written one crashed torch's agent (JSONDecodeError)
        partial = f"{path}.partial"
        with open(partial, "w") as file:
            json.dump(record, file)
        os.replace(partial, path)


def _destroy_process_group(together: bool) -> None:
    """Leave the process group. `together`: this rank ended normally, as every rank does,
    so all meet at a barrier first. Without it gloo aborted a rank now and then (SIGABRT,
    "terminate called without an active exception", 1 exit in 4-10 here): one rank closed its
    connections while another was still tearing its own down. With it, rarely, on a loaded
    machine; so a rank past the barrier says so in its error file (``finished``), and the
    launcher takes such an abort for what it is (`_finished`). A rank that failed leaves at
    once, since the others may be waiting inside a collective it never joins."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # the failure being reported matters more
            if together:
                dist.barrier()
                _write_error_file(
                    "finished", exit_code=0, peer_closed=False, waited=False, finished=True
                )
            dist.destroy_process_group()
