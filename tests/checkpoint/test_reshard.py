"""Resharding: a checkpoint saved under one layout loads under another ([Note: layout-free
checkpoints], shardwise/checkpoint/shards.py).

Each layout A trains 4 steps (fp32) with a checkpoint at step 2. For each pair (A, B) of a
covering design (every layout saves twice and loads twice), B loads A's step-2 checkpoint,
saves it again at once, and trains steps 3 and 4: the re-saved checkpoint holds bitwise the
same full tensors as A's (parameters, master weights, Adam states), and the losses are A's
own steps 3 and 4 to fp32 rounding (the data order included: every layout takes the same
global batch of 4 sequences).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from shardwise.checkpoint import load_checkpoint, save_checkpoint
from shardwise.checkpoint.convert import read_full_tensors
from shardwise.errors import CheckpointError
from shardwise.run_plan import resolve
from tests.cli_runs import run_cli
from tests.parity import make_config

OFFLOAD = {
    "policy": "auto",
    "device_budget_mb": 0.25,
    "host_budget_mb": 0.05,
    "optimizer": "disk",
    "chunk_search_range_mb": 0,
}

LAYOUTS = {
    "single": (1, {}),
    "dp2-zero0": (2, {}),
    "dp2-zero3": (2, {"zero": {"stage": 3}}),
    "dp4-zero2": (4, {"zero": {"stage": 2}}),
    "hsdp-2x2-zero3": (4, {"parallel": {"dp_replicate": 2}, "zero": {"stage": 3}}),
    "tp2-1d": (2, {"parallel": {"tp": 2}}),
    "tp4-2d": (4, {"parallel": {"tp": 4, "tp_mode": "2d"}, "train": {"micro_batch": 2}}),
    "pp2": (2, {"parallel": {"pp": 2}, "pipeline": {"schedule": "1f1b"}}),
    "sp2-ring": (2, {"parallel": {"sp": 2}, "attention": {"sequence_parallel": "ring"}}),
    "pp2-sp2-ulysses": (
        4,
        {"parallel": {"pp": 2, "sp": 2}, "attention": {"sequence_parallel": "ulysses"}},
    ),
    "sp4-hybrid": (
        4,
        {"parallel": {"sp": 4}, "attention": {"sequence_parallel": "hybrid", "ulysses_degree": 2}},
    ),
    "tp8-2.5d": (
        8,
        {"parallel": {"tp": 8, "tp_mode": "2.5d", "tp_depth": 2}, "train": {"micro_batch": 4}},
    ),
    "pp2-tp2": (4, {"parallel": {"pp": 2, "tp": 2}, "pipeline": {"schedule": "1f1b"}}),
    "pp2-dp2-zero2": (
        4,
        {"parallel": {"pp": 2}, "pipeline": {"schedule": "zb_h1"}, "zero": {"stage": 2}},
    ),
    "pp2-dp2-zero3": (4, {"parallel": {"pp": 2}, "zero": {"stage": 3}}),
    "dp2-offload-disk": (2, {"offload": OFFLOAD}),
}
NAMES = list(LAYOUTS)
PAIRS = [(a, NAMES[(i + k) % len(NAMES)]) for i, a in enumerate(NAMES) for k in (1, 3)]
"""Every layout saves twice and loads twice; every pair of different world sizes occurs."""


def layout_config(name: str, out: Path, steps: int = 4):
    _, sections = LAYOUTS[name]
    if "offload" in sections:
        disk = out / "offload"
        disk.mkdir(parents=True, exist_ok=True)
        sections = {**sections, "offload": {**sections["offload"], "disk_path": str(disk)}}
    return make_config(micro_batch=1, global_batch=4).replace(
        data={"max_bytes": 20_000},
        checkpoint={"every": 2},
        log={"progress": False},
        **{**sections, "train": {"steps": steps, **sections.get("train", {})}},
    )


def train_layout(name: str, out: str) -> list[float]:
    """On every rank of A's world: 4 steps through the trainer, checkpoint at step 2."""
    from shardwise.trainer import train

    cfg = layout_config(name, Path(out))
    return train(resolve(cfg, _world()), Path(out)).losses


def load_resave_continue(name: str, source: str, out: str) -> list[float]:
    """On every rank of B's world: load A's checkpoint, save it again at once, train on."""
    from shardwise.data import build_data
    from shardwise.trainer import build_engine

    cfg = layout_config(name, Path(out))
    plan = resolve(cfg, _world())
    torch.manual_seed(cfg.train.seed)
    engine, dp_rank = build_engine(plan)
    dp = plan.dims.dp
    data = build_data(cfg.data, 4, dp_rank, dp, cfg.train.seed)
    trainer_state = load_checkpoint(Path(source), engine, plan.layout())
    data.load_state_dict(trainer_state["data"])
    save_checkpoint(Path(out) / "resaved", 2, engine, trainer_state, keep=1, layout=plan.layout())
    return [engine.train_step(data.next_batch()) for _ in range(2)]


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def run_on(world: int, request, fn, *args) -> list:
    """`fn` on every rank of a `world`-rank pool (in this process for one rank)."""
    if world == 1:
        return [fn(*args)]
    return request.getfixturevalue(f"pool{world}").run(fn, *args)


@pytest.fixture(scope="module")
def saved(request, tmp_path_factory) -> dict[str, tuple[list[float], Path]]:
    """Each layout's 4-step losses and its step-2 checkpoint (trained on first use)."""
    cache: dict[str, tuple[list[float], Path]] = {}

    def get(name: str) -> tuple[list[float], Path]:
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            losses = run_on(LAYOUTS[name][0], request, train_layout, name, str(out))
            assert all(got == losses[0] for got in losses), "every rank logs the same losses"
            cache[name] = (losses[0], out / "checkpoints" / "step_00000002")
        return cache[name]

    return get


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_resharded_state_is_bitwise_and_training_continues(
    request, saved, tmp_path, source, target
):
    losses, checkpoint = saved(source)
    results = run_on(
        LAYOUTS[target][0], request, load_resave_continue, target, str(checkpoint), str(tmp_path)
    )
    want = read_full_tensors(checkpoint)
    got = read_full_tensors(tmp_path / "resaved")
    assert set(got) == set(want)
    different = [key for key in want if not torch.equal(got[key], want[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    for continued in results:
        assert continued == pytest.approx(losses[2:], rel=1e-5)


def test_a_missing_rank_file_names_it(saved, tmp_path):
    import shutil

    _, checkpoint = saved("dp2-zero3")
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "shards_rank1.bin").unlink()
    with pytest.raises(CheckpointError, match="shards_rank1.bin' is missing"):
        load_resave_continue("single", str(broken), str(tmp_path / "out"))


def assert_same_and_trains_on(checkpoint: Path, converted: Path, losses, out: Path) -> None:
    """`converted` holds bitwise `checkpoint`'s full tensors, and one process loading it
    trains on with the saving layout's `losses` of steps 3 and 4."""
    want, got = read_full_tensors(checkpoint), read_full_tensors(converted)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    continued = load_resave_continue("single", str(converted), str(out))
    assert continued == pytest.approx(losses[2:], rel=1e-5)


def test_consolidated_checkpoint_is_one_rank_and_training_continues(saved, tmp_path, capsys):
    """``convert --to single``: one fragment file of whole tensors, bitwise the saved state,
    which one process resumes with the source's next losses."""
    losses, checkpoint = saved("pp2-tp2")
    argv = ["convert", str(checkpoint), str(tmp_path / "single"), "--to", "single"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    single = tmp_path / "single" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in single.glob("shards_rank*")) == ["shards_rank0.bin"]
    manifest = json.loads((single / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["layout"]["tp"] == 1
    assert_same_and_trains_on(checkpoint, single, losses, tmp_path / "out")


def test_converted_to_another_layout(saved, tmp_path, capsys):
    """``convert --to layout:CONFIG``: the ranks of CONFIG's layout (here one process with
    parameter chunks streamed from host memory; more ranks start through the launcher as
    ``shardwise train``'s do) load the checkpoint and save it in their own layout, bitwise,
    and it trains on with the source's losses."""
    losses, checkpoint = saved("dp2-zero3")
    config = tmp_path / "chunks.toml"
    chunks = {"policy": "static", "param_device_fraction": 0.0, "chunk_search_range_mb": 0}
    config.write_text(layout_config("single", tmp_path).replace(offload=chunks).to_toml())
    dest = tmp_path / "chunks"
    argv = ["convert", str(checkpoint), str(dest), "--to", f"layout:{config}", "--nproc", "1"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    converted = dest / "checkpoints" / "step_00000002"
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["layout"]["chunks"] is not None
    assert_same_and_trains_on(checkpoint, converted, losses, tmp_path / "out")


@pytest.fixture
def single_checkpoint(saved) -> Path:
    """The step-2 checkpoint of the one-process layout (trained before `no_ranks_started`)."""
    return saved("single")[1]


def _edited_manifest(checkpoint: Path, into: Path, **changes) -> Path:
    import shutil

    shutil.copytree(checkpoint, into)
    manifest = json.loads((into / "manifest.json").read_text())
    (into / "manifest.json").write_text(json.dumps({**manifest, **changes}))
    return into


@pytest.mark.parametrize(
    ("to", "extra", "pattern"),
    [
        ("layout:{tmp}/none.toml", [], "no such config file"),
        ("layout:{config}", ["--set", "model.n_layers=3"], "does not fit this model: it holds"),
        ("layout:{config}", ["--set", "train.global_batch=8"], "trained with 4 samples per step"),
        ("layout:{config}", ["--nproc", "3"], "world size 3 is not divisible by"),
        ("single", ["--set", "parallel.tp=2"], "--set applies to --to layout:CONFIG"),
        ("zip", [], "--to 'zip': expected one of single, safetensors, hf, layout:CONFIG"),
        ("single", ["rank-state"], "per-rank state (1-bit Adam's error buffers)"),
        ("layout:{config}", ["not-empty"], "DST '{dest}' is not empty"),
        ("single", ["not-empty"], "DST '{dest}' is not empty"),
    ],
)
def test_bad_conversions_are_one_line(
    single_checkpoint, tmp_path, capsys, no_ranks_started, to, extra, pattern
):
    checkpoint = single_checkpoint
    config, dest = tmp_path / "tp2.toml", tmp_path / "dest"
    config.write_text(layout_config("tp2-1d", tmp_path).to_toml())
    if "rank-state" in extra:
        checkpoint = _edited_manifest(checkpoint, tmp_path / "onebit", rank_state=True)
    if "not-empty" in extra:
        dest.mkdir()
        (dest / "config.toml").write_text("")
    extra = [arg for arg in extra if arg not in ("rank-state", "not-empty")]
    to = to.format(tmp=tmp_path, config=config)
    code, err = run_cli(["convert", str(checkpoint), str(dest), "--to", to, *extra], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert pattern.format(dest=dest) in err
