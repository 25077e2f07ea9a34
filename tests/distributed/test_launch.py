"""Tests of shardwise/distributed/launch.py.

Logic (ports, the failure summary, `run_worker`'s classification) is tested in this process;
the launcher itself with real 2-rank jobs through torch's elastic agent. Each job runs under
a SIGALRM deadline: the agent shuts its ranks down on any exception, so a hang becomes a
failure, not a stuck test run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shardwise.distributed import launch as launch_mod
from shardwise.distributed.launch import (
    free_port,
    init_worker,
    launch,
    port_in_use,
    run_torchrun,
    run_worker,
)
from shardwise.engine import initialize
from shardwise.errors import ConfigError, LaunchError
from shardwise.models.gpt import build_gpt
from tests.distributed.scripts.killed_in_phase import STEPS, rank_batch, run_config

REPO = str(Path(__file__).resolve().parents[2])
SCRIPTS = "tests.distributed.scripts"
JOB_DEADLINE_S = 60
"""A job still running after this long is interrupted (its ranks are stopped) and fails."""


@contextmanager
def deadline(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"job still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_job(module: str, *args: str, nproc: int = 2) -> tuple[float, LaunchError | None]:
    """Launch ``module`` on ``nproc`` ranks; the seconds it took and its error, if any."""
    start = time.monotonic()
    try:
        with deadline(JOB_DEADLINE_S):
            launch(f"{SCRIPTS}.{module}", list(args), nproc, env={"PYTHONPATH": REPO})
    except LaunchError as err:
        return time.monotonic() - start, err
    return time.monotonic() - start, None


_EARLIER_CHILDREN: set[int] = set()


@pytest.fixture(autouse=True)
def _note_earlier_children():
    """Children that exist before a test (other modules' pools, multiprocessing's resource
    tracker) are not the launcher's."""
    _EARLIER_CHILDREN.clear()
    _EARLIER_CHILDREN.update(_all_child_pids())


def child_pids() -> list[int]:
    """Children started during this test and still alive (ranks the agent left behind)."""
    return [pid for pid in _all_child_pids() if pid not in _EARLIER_CHILDREN]


def _all_child_pids() -> list[int]:
    me, found = str(os.getpid()), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                found.append(int(entry.name))
    return found


# --------------------------------------------------------------------------- ports


def test_port_in_use_sees_a_listening_socket():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert port_in_use(sock.getsockname()[1])
    port = free_port()
    assert 0 < port < 65536 and not port_in_use(port)


def test_busy_master_port_fails_before_anything_starts():
    with socket.socket() as sock:
        sock.bind(("", 0))
        sock.listen()
        port = sock.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(LaunchError) as info:
            launch(f"{SCRIPTS}.allreduce_ok", [], 2, master_port=port)
    assert str(info.value) == (
        f"port {port} is already in use; pass another --master-port or leave it out to pick "
        "a free one"
    )
    assert time.monotonic() - start < 1.0 and not child_pids()


def test_nproc_below_one_is_refused():
    with pytest.raises(LaunchError, match=r"^--nproc=0 must be at least 1$"):
        launch(f"{SCRIPTS}.allreduce_ok", [], 0)


def test_run_torchrun_missing_script():
    with pytest.raises(LaunchError, match=r"^script 'no_such_script\.py' does not exist$"):
        run_torchrun(["--nproc-per-node", "2", "--", "no_such_script.py", "--lr", "3"])


# --------------------------------------------------------------------------- summary


def failure(exitcode: int, message=None, timestamp: float = 100.0, **extra) -> SimpleNamespace:
    """Stand-in for torch's ProcessFailure (``<NONE>``: the rank wrote no error file)."""
    data = {"message": "<NONE>"} if message is None else {"message": message, **extra}
    if isinstance(message, str):
        data.setdefault("timestamp", timestamp)
    names = {-signal.SIGTERM: "SIGTERM", -signal.SIGKILL: "SIGKILL", -signal.SIGSEGV: "SIGSEGV"}
    return SimpleNamespace(
        exitcode=exitcode,
        error_file_data=data,
        error_file="/logs/0/error.json",
        timestamp=int(timestamp),
        signal_name=lambda: names.get(exitcode, "<N/A>"),
    )


def test_summary_puts_the_root_cause_first_and_the_stopped_ranks_last():
    summary = launch_mod._summarize(
        {
            0: failure(
                1, "collective x failed: another rank closed its connection", 99.0, peer_closed=True
            ),
            1: failure(2, "parallel.tp=3 does not divide n_heads=8", 100.5),
            2: failure(-signal.SIGTERM),
            3: failure(-signal.SIGTERM),
        }
    )
    assert summary.splitlines() == [
        "rank 1 exited with code 2: parallel.tp=3 does not divide n_heads=8",
        "rank 0 exited with code 1: collective x failed: another rank closed its connection",
        "ranks 2, 3 were still running; the launcher stopped them",
    ]


def test_summary_names_a_rank_killed_from_outside_before_those_that_lost_it():
    summary = launch_mod._summarize(
        {
            0: failure(
                1, "collective x failed: another rank closed its connection", 99.0, peer_closed=True
            ),
            1: failure(-signal.SIGKILL, timestamp=100.0),
            2: failure(-signal.SIGTERM),
        }
    )
    assert summary.splitlines() == [
        "rank 1 was killed by signal SIGKILL without an error message (see its output)",
        "rank 0 exited with code 1: collective x failed: another rank closed its connection",
        "rank 2 was still running; the launcher stopped it",
    ]


def test_summary_says_once_what_several_ranks_said():
    summary = launch_mod._summarize(
        {
            0: failure(2, "loss is nan at step 2: training diverged", 100.0),
            1: failure(2, "loss is nan at step 2: training diverged", 100.2),
            2: failure(-signal.SIGSEGV),
            3: failure(-signal.SIGSEGV),
        }
    )
    assert summary.splitlines() == [
        "ranks 0, 1 exited with code 2: loss is nan at step 2: training diverged",
        "ranks 2, 3 were killed by signal SIGSEGV without an error message (see their output)",
    ]


def test_summary_names_the_ranks_the_others_waited_for_first():
    waited = "collective all_reduce on axis 'dp' (4 B float32, call #7) timed out after 20 s"
    summary = launch_mod._summarize(
        {
            0: failure(1, waited, 100.0, waited=True),
            1: failure(-signal.SIGKILL),
            2: failure(1, waited, 100.1, waited=True),
            3: failure(-signal.SIGTERM),
        }
    )
    assert summary.splitlines() == [
        "ranks 1, 3 are behind: they never joined the collective rank(s) 0, 2 timed out in; "
        "the launcher stopped them",
        f"ranks 0, 2 exited with code 1: {waited}",
    ]


def test_summary_of_ranks_without_a_message():
    summary = launch_mod._summarize(
        {
            1: failure(3),
            0: failure(-signal.SIGSEGV),
            2: failure(-signal.SIGTERM, "lost a peer"),  # stopped while exiting after a failure
            4: failure(-signal.SIGTERM, "config is wrong", 101.0, exit_code=2),
            5: failure(-signal.SIGABRT, "config is wrong", 101.2, exit_code=2),  # died exiting
            3: failure(1, {"message": "ValueError: bad\nmore", "extraInfo": {"timestamp": "100"}}),
        }
    ).splitlines()
    assert summary == [
        "rank 0 was killed by signal SIGSEGV without an error message (see its output)",
        "rank 1 exited with code 3 without an error message (see its output)",
        "rank 2 failed: lost a peer",
        "rank 3 exited with code 1: ValueError: bad (traceback in /logs/0/error.json)",
        "ranks 4, 5 exited with code 2: config is wrong",
    ]
    only_stopped = launch_mod._summarize({0: failure(-signal.SIGTERM)})
    assert only_stopped == "rank 0 was stopped by SIGTERM"


# --------------------------------------------------------------------------- run_worker


@pytest.fixture
def worker_env(tmp_path, monkeypatch):
    """A rank outside shardwise's launcher (torchrun's own): it prints its failure itself.
    Under shardwise's launcher (``SHARDWISE_ERROR_DIR`` set) the launcher prints it."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.delenv("SHARDWISE_ERROR_DIR", raising=False)
    monkeypatch.delenv("SHARDWISE_DEBUG", raising=False)
    return tmp_path


def run_worker_here(main) -> int:
    with pytest.raises(SystemExit) as info:
        run_worker(main)
    return info.value.code


def raiser(err: Exception):
    def main() -> None:
        raise err

    return main


def test_run_worker_exit_codes_and_lines(worker_env, capsys, monkeypatch):
    assert run_worker_here(lambda: None) == 0
    assert not (worker_env / "error.json").exists()

    assert run_worker_here(raiser(ConfigError("data.seq_len=0: must be >= 2"))) == 2
    assert capsys.readouterr().err == "shardwise: error: rank 1: data.seq_len=0: must be >= 2\n"
    record = json.loads((worker_env / "error.json").read_text())
    assert record["message"] == "data.seq_len=0: must be >= 2" and record["exit_code"] == 2
    assert not record["peer_closed"]

    monkeypatch.setattr(launch_mod, "_collective_timeout_s", lambda: 3.0)  # no group here
    timeout = RuntimeError("[../gloo/unbound_buffer.cc:78] Timed out waiting 3000ms for recv")
    assert run_worker_here(raiser(timeout)) == 1
    line = capsys.readouterr().err
    assert line.startswith("shardwise: error: rank 1: ") and "timed out after 3 s" in line
    assert line.count("\n") == 1

    closed = RuntimeError("[../gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:1. Bye")
    assert run_worker_here(raiser(closed)) == 1
    assert "another rank closed its connection" in capsys.readouterr().err
    assert json.loads((worker_env / "error.json").read_text())["peer_closed"]


def test_run_worker_writes_the_traceback_of_an_unexpected_error(worker_env, capsys, monkeypatch):
    assert run_worker_here(raiser(ValueError("bad value"))) == 1
    path = worker_env / "rank1.traceback"
    assert capsys.readouterr().err == (
        f"shardwise: error: rank 1: ValueError: bad value (traceback in {path})\n"
    )
    text = path.read_text()
    assert text.startswith("Traceback") and "in main" in text and "ValueError: bad value" in text

    monkeypatch.setenv("SHARDWISE_DEBUG", "1")
    assert run_worker_here(raiser(ValueError("bad value"))) == 1
    assert capsys.readouterr().err.startswith("Traceback")


def test_under_shardwise_launcher_the_rank_leaves_the_printing_to_it(
    worker_env, capsys, monkeypatch
):
    monkeypatch.setenv("SHARDWISE_ERROR_DIR", str(worker_env))
    assert run_worker_here(raiser(ConfigError("data.seq_len=0: must be >= 2"))) == 2
    assert capsys.readouterr().err == ""
    record = json.loads((worker_env / "error.json").read_text())
    assert record["message"] == "data.seq_len=0: must be >= 2" and record["exit_code"] == 2


def test_init_worker_outside_a_launch(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LaunchError, match="RANK is not set; start this program with"):
        init_worker(timeout_s=5)


# --------------------------------------------------------------------------- real jobs


def test_two_ranks_all_reduce(capfd):
    seconds, error = run_job("allreduce_ok")
    assert error is None
    assert "allreduce ok: sum=3 world_size=2" in capfd.readouterr().out
    assert not child_pids()
    print(f"2-rank job: {seconds:.1f} s")


def test_rank_exiting_abruptly_stops_the_job():
    seconds, error = run_job("rank1_fails", "exit")
    assert error is not None, seconds  # a hang would meet the deadline instead
    lines = str(error).splitlines()
    assert lines[0] == "rank 1 exited with code 3 without an error message (see its output)"
    # Rank 0 was in the all_reduce: it either saw the closed connection first or the agent
    # stopped it first (a race between two processes; either ends the job with no orphan).
    assert "another rank closed its connection" in lines[-1] or lines[-1] == (
        "rank 0 was still running; the launcher stopped it"
    )
    assert not child_pids()


@pytest.mark.parametrize("nproc, phase", [(2, "backward"), (4, "optimizer")])
def test_a_rank_killed_in_any_phase_ends_the_job_naming_it(tmp_path, nproc, phase):
    """SIGKILL of rank 1 inside a training step's backward or optimizer step: the job ends
    (the deadline would fail it otherwise), the summary names rank 1 first, and no rank is
    left. (The script also kills in forward, which from the launcher's side is
    test_rank_exiting_abruptly_stops_the_job's case: a rank gone before a collective; a
    kill inside a save is the resume test's; CI time goes to these.)"""
    seconds, error = run_job("killed_in_phase", phase, "1", str(tmp_path), nproc=nproc)
    assert error is not None, seconds
    assert str(error).splitlines()[0] == KILLED_RANK_1
    assert not child_pids()


KILLED_RANK_1 = "rank 1 was killed by signal SIGKILL without an error message (see its output)"


def test_resume_after_a_rank_killed_in_a_save_gives_the_uninterrupted_losses(tmp_path):
    """Rank 1 dies while writing step 2's checkpoint: the job ends naming it, step 1's
    checkpoint is the newest intact one, and resuming from it on 2 ranks trains steps 2 and
    3 with the losses of an uninterrupted run (the single-process reference: the two ranks'
    rows as one global batch, fp32, 1e-5)."""
    _, error = run_job("killed_in_phase", "save", "1", str(tmp_path))
    assert error is not None and str(error).splitlines()[0] == KILLED_RANK_1
    assert not child_pids()
    _, error = run_job("killed_in_phase", "resume", "-1", str(tmp_path))
    assert error is None, error
    killed = json.loads((tmp_path / "losses_save.json").read_text())
    resumed = json.loads((tmp_path / "losses_resume.json").read_text())
    assert sorted(killed) == ["1", "2"] and sorted(resumed) == ["2", "3"]

    cfg = run_config(world_size=2)
    reference = initialize(build_gpt(cfg.model, 16, seed=1), None, cfg)
    rows = [rank_batch(rank) for rank in (0, 1)]
    batch = tuple(torch.cat(part) for part in zip(*rows, strict=True))
    for step in range(1, STEPS + 1):
        expected = reference.train_step(batch)
        for run in (killed, resumed):
            if str(step) in run:
                assert run[str(step)] == pytest.approx(expected, rel=1e-5), (step, run)


def test_a_frozen_rank_is_named_and_the_job_ends(tmp_path):
    """Rank 1 of 4 freezes (SIGSTOP) as its first gradient arrives, under a 5 s collective
    timeout: the other three time out, the launcher stops everything (SIGKILL after its 5 s
    grace: a frozen rank does not act on SIGTERM), and the summary names rank 1 first as the
    one behind. Measured here: the job ends ~10 s after the freeze (~45 s with torch's fixed
    30 s grace, `_grace_before_kill`)."""
    seconds, error = run_job("killed_in_phase", "stop", "1", str(tmp_path), nproc=4)
    assert error is not None, seconds
    lines = str(error).splitlines()
    assert lines[0] == (
        "rank 1 is behind: it never joined the collective rank(s) 0, 2, 3 timed out in; the "
        "launcher stopped it"
    )
    assert lines[1].startswith("ranks 0, 2, 3 exited with code 1: collective all_reduce ")
    assert not child_pids()
    print(f"frozen rank: job ended after {seconds:.1f} s")


def test_the_agent_waits_the_launchers_grace_before_sigkill(monkeypatch):
    """torch closes the ranks after a failure with a fixed 30 s grace; inside a launch it is
    capped at the launcher's (and a `shardwise run` without --shutdown-timeout keeps torch's)."""
    from torch.distributed.elastic.multiprocessing.api import PContext, SubprocessContext

    waits = []
    monkeypatch.setattr(
        SubprocessContext, "_close", lambda self, death_sig, timeout: waits.append(timeout)
    )
    context = SubprocessContext.__new__(SubprocessContext)
    context._tail_logs, context.filtered_stdout, context.filtered_stderr = [], None, None
    with launch_mod._grace_before_kill(5):
        context.close()  # the call the agent makes when a rank fails
        context.close(timeout=2)
    with launch_mod._grace_before_kill(None):
        context.close()
    assert waits == [5, 2, 30]
    assert PContext.close.__module__ == PContext.__module__  # torch's close is back


def test_collective_timeout_names_the_rank_and_the_collective():
    seconds, error = run_job("rank1_fails", "sleep", "3")
    assert error is not None and seconds > 3, seconds  # the 3 s timeout elapsed first
    lines = str(error).splitlines()
    assert lines[0] == (  # rank 1 slept 30 s: the one rank 0 waited for, named first
        "rank 1 is behind: it never joined the collective rank(s) 0 timed out in; the "
        "launcher stopped it"
    )
    assert lines[1].startswith("rank 0 exited with code 1: ")
    assert "timed out after 3 s: another rank never joined it" in lines[1]
    assert "collective all_reduce on " in lines[1]  # comm's name of the pending collective
    assert not child_pids()


def test_shardwise_error_on_a_rank_reaches_the_launch_error():
    _, error = run_job("rank1_fails", "config")
    assert error is not None
    assert str(error).splitlines()[0] == (
        "rank 1 exited with code 2: parallel.tp=3 does not divide n_heads=8; use 1, 2, 4 or 8"
    )


def test_run_torchrun_reports_a_crash_with_its_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", REPO)
    script = str(Path(REPO, *SCRIPTS.split("."), "rank1_fails.py"))
    argv = ["--nproc-per-node=2", "--log-dir", str(tmp_path), "--", script, "crash"]
    env_before, sigterm_before = dict(os.environ), signal.getsignal(signal.SIGTERM)
    with deadline(JOB_DEADLINE_S), pytest.raises(LaunchError) as info:
        run_torchrun(argv)
    first = str(info.value).splitlines()[0]
    assert first.startswith("rank 1 ") and "ValueError: bad value in user code" in first
    traceback_file = Path(first.split("(traceback in ")[1].rstrip(")"))
    assert traceback_file.parent == tmp_path and "ValueError" in traceback_file.read_text()
    assert dict(os.environ) == env_before  # the agent's writes are undone
    assert signal.getsignal(signal.SIGTERM) is sigterm_before


def test_shardwise_run_joins_the_group_for_a_script_that_never_does(monkeypatch, tmp_path):
    """``--nproc`` as ``shardwise train`` spells it; `sw.initialize` joins the launcher's
    group, so both ranks train together (same mean losses) instead of alone."""
    monkeypatch.setenv("PYTHONPATH", REPO)
    script = str(Path(REPO, *SCRIPTS.split("."), "api_without_init.py"))
    run_torchrun(["--nproc", "2", "--log-dir", str(tmp_path / "logs"), "--", script, str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["losses"] == ranks[1]["losses"]


def test_an_abort_after_every_rank_finished_is_not_a_failure(monkeypatch, tmp_path):
    """gloo's teardown aborts a rank now and then after the final barrier: a rank past it
    says so (``finished``), and the launcher reports success ([Note: how a rank's failure
    reaches the user]); before, the run failed with "rank 0 was killed by signal SIGABRT"."""
    monkeypatch.setenv("PYTHONPATH", REPO)
    script = str(Path(REPO, *SCRIPTS.split("."), "abort_after_the_end.py"))
    assert run_torchrun(["--nproc", "2", "--", script, str(tmp_path)]) == 0
    assert all((tmp_path / f"rank{r}.json").is_file() for r in range(2))


def test_only_a_rank_past_the_final_barrier_makes_a_failure_teardown():
    finished = failure(-signal.SIGABRT, "finished", exit_code=0, finished=True)
    assert launch_mod._finished({0: finished, 1: failure(-signal.SIGTERM)})
    assert not launch_mod._finished({0: failure(-signal.SIGABRT), 1: failure(-signal.SIGTERM)})
    assert not launch_mod._finished({0: failure(2, "config is wrong", exit_code=2)})


def _alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_until(condition, what: str, limit_s: float = 120.0) -> None:
    """Poll `condition` (events, not a fixed sleep); `limit_s` only stops a broken run."""
    end = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < end, f"{what}: not after {limit_s} s"
        time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_ranks_die_with_a_killed_launcher(tmp_path):
    """SIGKILL of `shardwise run` (no chance to stop anyone): its ranks get SIGTERM from the
    kernel (PR_SET_PDEATHSIG) instead of running on as orphans."""
    script = Path(REPO) / "tests" / "distributed" / "scripts" / "wait_forever.py"
    cmd = [sys.executable, "-c", "from shardwise.cli import main; main()", "run", "--nproc", "2"]
    env = {**os.environ, "PYTHONPATH": REPO}
    launcher = subprocess.Popen([*cmd, "--", str(script), str(tmp_path)], env=env)
    try:
        pid_files = [tmp_path / f"rank{rank}.pid" for rank in (0, 1)]
        _wait_until(lambda: all(f.is_file() and f.read_text() for f in pid_files), "ranks up")
        ranks = [int(f.read_text()) for f in pid_files]
        assert all(_alive(pid) for pid in ranks)
        launcher.kill()
        launcher.wait()
        started = time.monotonic()
        _wait_until(lambda: not any(_alive(pid) for pid in ranks), "ranks gone")
        print(f"ranks gone {time.monotonic() - started:.1f} s after the launcher's SIGKILL")
    finally:
        launcher.kill()
