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

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from shardwise.checkpoint import load_checkpoint, save_checkpoint
from shardwise.checkpoint.convert import read_full_tensors
from shardwise.errors import CheckpointError
from shardwise.run_plan import resolve
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
    "sp2-ulysses": (2, {"parallel": {"sp": 2}, "attention": {"sequence_parallel": "ulysses"}}),
    "sp4-hybrid": (
        4,
        {"parallel": {"sp": 4}, "attention": {"sequence_parallel": "hybrid", "ulysses_degree": 2}},
    ),
    "tp8-2.5d": (
        8,
        {"parallel": {"tp": 8, "tp_mode": "2.5d", "tp_depth": 2}, "train": {"micro_batch": 4}},
    ),
    "tp8-3d": (8, {"parallel": {"tp": 8, "tp_mode": "3d"}, "train": {"micro_batch": 4}}),
    "pp2-tp2": (4, {"parallel": {"pp": 2, "tp": 2}, "pipeline": {"schedule": "1f1b"}}),
    "pp2-dp2-zero2": (
        4,
        {"parallel": {"pp": 2}, "pipeline": {"schedule": "zb_h1"}, "zero": {"stage": 2}},
    ),
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
