"""Crash safety and damaged checkpoints: a save killed at any moment leaves the previous
checkpoint loadable and `latest` correct; a truncated, corrupted or missing file and a
checkpoint of another model are one-line errors naming the file and tensor."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from shardwise.checkpoint import AsyncSaver, check_model_fits, load_checkpoint, save_checkpoint
from shardwise.checkpoint.convert import read_full_tensors
from shardwise.checkpoint.shards import FragmentWriter, _read_index
from shardwise.engine import initialize
from shardwise.errors import CheckpointError
from tests.cli_runs import logged_losses
from tests.parity import TINY, build_model, global_batches, make_config

ROOT = Path(__file__).resolve().parents[2]


def test_saves_killed_at_random_moments_leave_a_loadable_checkpoint(tmp_path):
    kills = 20
    proc = subprocess.run(
        [sys.executable, "-m", "tests.checkpoint.crash_writer", str(tmp_path), str(kills), "7"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # a safety net against a hang, far above the ~10 s it takes
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["kills"] == report["loaded"] == report["latest_complete"] == kills, report
    assert report["killed_mid_save"] >= 1, "the writer only saves: kills land inside saves"
    assert not list(tmp_path.glob(".step_*.tmp"))[1:], "a save removes older partial ones"


def _engine(**model):
    cfg = make_config(micro_batch=1, global_batch=1).replace(model={**TINY, **model})
    return initialize(build_model(cfg), None, cfg)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    engine = _engine()
    engine.train_step(global_batches(engine.plan.config, 1)[0])
    layout = engine.plan.layout()
    return save_checkpoint(tmp_path / "ckpt", 1, engine, {"data": {}}, keep=1, layout=layout)


def _load(checkpoint: Path, **model) -> None:
    engine = _engine(**model)
    load_checkpoint(checkpoint, engine, engine.plan.layout())


def test_truncated_shard_file_is_named(checkpoint):
    shards = checkpoint / "shards_rank0.bin"
    shards.write_bytes(shards.read_bytes()[: shards.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="shards_rank0.bin' is unreadable"):
        _load(checkpoint)


def test_a_flipped_byte_fails_the_checksum_naming_file_and_tensor(checkpoint):
    shards = checkpoint / "shards_rank0.bin"
    fragment = next(f for f in _read_index(shards) if f["kind"] == "optim.exp_avg")
    data = bytearray(shards.read_bytes())
    data[fragment["values"][0] + 1] ^= 0x40
    shards.write_bytes(bytes(data))
    name = fragment["name"]
    with pytest.raises(CheckpointError, match=f"rank0.bin': optim.exp_avg tensor '{name}' is dam"):
        _load(checkpoint)


@pytest.mark.parametrize("name", ["states_rank0.pt", "rank0.pt"])
def test_damaged_torch_files_are_named(checkpoint, name):
    path = checkpoint / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{name}' is (unreadable|damaged)"):
        _load(checkpoint)


@pytest.mark.parametrize("name", ["engine.pt", "trainer.json", "manifest.json"])
def test_damaged_small_files_are_named(checkpoint, name):
    (checkpoint / name).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=f"{name}' is (unreadable|damaged)"):
        _load(checkpoint)


def test_a_checkpoint_of_the_old_format_is_one_line(checkpoint):
    manifest = checkpoint / "manifest.json"
    old = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "format"}
    manifest.write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="has format 1, this shardwise reads format 2"):
        _load(checkpoint)


def test_another_model_names_the_tensor(checkpoint):
    with pytest.raises(CheckpointError, match="tensor '.*' has shape .* this model's"):
        _load(checkpoint, d_model=64)


def test_another_model_is_found_before_launch_from_the_indexes(checkpoint):
    check_model_fits(checkpoint, _engine().model)  # the same model fits
    with pytest.raises(
        CheckpointError,
        match=r"does not fit this model: it holds 'embed.weight' "
        r"of shape \[256, 32\], the model's \[256, 64\] \(and \d+ more\)",
    ):
        check_model_fits(checkpoint, _engine(d_model=64).model)
    with pytest.raises(
        CheckpointError, match="it holds 'blocks.1.attn.proj.weight', which the model has not"
    ):
        check_model_fits(checkpoint, _engine(n_layers=1).model)


def test_asynchronous_save_holds_the_state_of_its_step(tmp_path, monkeypatch):
    """The background writer is held until the next step has changed every master: what it
    writes is still the saved step's state, bitwise as a synchronous save of that step."""
    engine = _engine()
    batches = global_batches(engine.plan.config, 2)
    engine.train_step(batches[0])
    layout = engine.plan.layout()
    sync = save_checkpoint(tmp_path / "sync", 1, engine, {"data": {}}, keep=1, layout=layout)
    stepped = threading.Event()
    add = FragmentWriter.add
    monkeypatch.setattr(
        FragmentWriter, "add", lambda *args: (stepped.wait(), add(*args))[1]
    )  # fmt: skip
    saver = AsyncSaver()
    background = save_checkpoint(tmp_path / "async", 1, engine, {"data": {}}, 1, layout, saver)
    engine.train_step(batches[1])  # changes every master while the writer waits
    stepped.set()
    saver.wait()
    saved, written = read_full_tensors(sync), read_full_tensors(background)
    assert saved.keys() == written.keys()
    assert all(torch.equal(saved[key], written[key]) for key in saved)
    masters = {key: t for key, t in written.items() if key[0] == "master"}
    live = dict(engine.model.named_parameters())
    assert all(not torch.equal(live[name].detach(), t) for (_, name), t in masters.items())


def test_a_failed_background_save_is_raised_by_the_next_wait(tmp_path, monkeypatch):
    engine = _engine()
    engine.train_step(global_batches(engine.plan.config, 1)[0])

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FragmentWriter, "add", full_disk)
    saver = AsyncSaver()
    save_checkpoint(tmp_path / "ckpt", 1, engine, {"data": {}}, 1, engine.plan.layout(), saver)
    with pytest.raises(CheckpointError, match="background checkpoint save failed: OSError"):
        saver.wait()
    assert not (tmp_path / "ckpt" / "latest").exists()
    saver.wait()  # reported once


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A one-rank run with checkpoints at steps 2 and 4 (step 4 `latest`)."""
    from shardwise.cli import main

    run = tmp_path_factory.mktemp("run") / "run"
    settings = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "data.seq_len=16"]
    settings += ["data.max_bytes=20000", "train.steps=4", "checkpoint.every=2"]
    settings += ["log.progress=false", "precision.dtype=fp32"]
    argv = ["train", "--nproc", "1", "--out", str(run)]
    with pytest.raises(SystemExit) as code:
        main([*argv, *(arg for item in settings for arg in ("--set", item))])
    assert code.value.code == 0
    return run


DAMAGES = {
    "flipped-bytes": lambda path: _flip(path),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "deleted": lambda path: path.unlink(),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for index in range(len(data) // 2, len(data) // 2 + 64):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["shards_rank0.bin", "states_rank0.pt", "engine.pt", "rank0.pt"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_gives_way_to_the_older_one(
    two_checkpoints, tmp_path, name, damage
):
    """Each file kind flipped, truncated or deleted in the newest checkpoint: the older one
    is chosen, and why is said; naming the damaged step directly is the error."""
    import shutil

    from shardwise.checkpoint import intact_checkpoint

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    newest = run / "checkpoints" / "step_00000004"
    DAMAGES[damage](newest / name)
    chosen, skipped = intact_checkpoint(run)
    assert chosen == run / "checkpoints" / "step_00000002"
    assert len(skipped) == 1 and skipped[0].startswith("step_00000004 is damaged")
    assert name in skipped[0]
    with pytest.raises(CheckpointError, match="step_00000004"):
        intact_checkpoint(newest)


def test_resume_passes_over_a_damaged_newest_checkpoint(two_checkpoints, tmp_path, capsys):
    """Through the CLI: one warning line, and steps 3-4 trained again from step 2."""
    import shutil

    from tests.cli_runs import run_cli

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    _flip(run / "checkpoints" / "step_00000004" / "shards_rank0.bin")
    code, err = run_cli(["train", "--nproc", "1", "--resume", str(run)], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("shardwise: warning")]
    assert len(warnings) == 1 and "step_00000004 is damaged" in warnings[0], err
    assert "resuming from" in warnings[0] and "step_00000002" in warnings[0]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert logged_losses(run) == logged_losses(two_checkpoints)
