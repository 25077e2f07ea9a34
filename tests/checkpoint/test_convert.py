"""`shardwise convert`: a sharded checkpoint consolidated into safetensors, or into a Hugging
Face directory that transformers' `from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from shardwise.checkpoint import save_checkpoint
from shardwise.checkpoint.convert import convert, read_full_tensors
from shardwise.config import Config
from shardwise.engine import initialize
from shardwise.errors import ConfigError
from tests.cli_runs import run_cli
from tests.parity import build_model, global_batches, make_config

SEQ = 16


def train_hf_zero3(out: str) -> None:
    """On both ranks: GPT-2 (tiny) at ZeRO-3 for 2 steps; a checkpoint of two shards."""
    from shardwise.run_plan import resolve
    from shardwise.trainer import train

    settings = [
        "model.name=hf",
        "model.hf_config=gpt2-tiny",
        f"data.seq_len={SEQ}",
        "data.max_bytes=20000",
        "zero.stage=3",
        "precision.dtype=fp32",
        "train.micro_batch=1",
        "train.steps=2",
        "log.progress=false",
    ]
    cfg = Config.from_file(None, settings)
    if dist.get_rank() == 0:
        (Path(out) / "config.toml").parent.mkdir(parents=True, exist_ok=True)
        (Path(out) / "config.toml").write_text(cfg.to_toml())
    train(resolve(cfg, dist.get_world_size()), Path(out))


@pytest.fixture(scope="module")
def hf_run(pool2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf-run")
    pool2.run(train_hf_zero3, str(out))
    return out


def _masters(run: Path) -> dict[str, torch.Tensor]:
    return {name: t for (kind, name), t in read_full_tensors(run).items() if kind == "master"}


def test_hf_export_loads_with_from_pretrained(hf_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    dest = tmp_path / "hf"
    code, err = run_cli(["convert", str(hf_run), str(dest), "--to", "hf"], capsys)
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(dest)
    loaded = dict(model.named_parameters())
    masters = _masters(hf_run)
    assert masters and set(masters) <= set(loaded)
    for name, tensor in masters.items():
        assert torch.equal(loaded[name].detach(), tensor), name
    assert model.lm_head.weight is model.transformer.wte.weight  # tied again on load


def test_safetensors_export_holds_every_full_tensor(hf_run, tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors.torch", reason="safetensors not installed")
    dest = tmp_path / "model.safetensors"
    argv = ["convert", str(hf_run / "checkpoints"), str(dest), "--to", "safetensors"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    exported = safetensors.load_file(dest)
    masters = _masters(hf_run)
    assert set(masters) <= set(exported)
    assert all(torch.equal(exported[name], tensor) for name, tensor in masters.items())


def test_hf_export_of_a_native_model_is_one_line(tmp_path, capsys):
    cfg = make_config(micro_batch=1, global_batch=1)
    engine = initialize(build_model(cfg), None, cfg)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 0, engine, {"data": {}}, 1, engine.plan.layout())
    (run / "config.toml").write_text(cfg.to_toml())
    code, err = run_cli(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"], capsys)
    assert code == 2 and "use --to safetensors" in err and len(err.strip().splitlines()) == 1


HF_SETTINGS = [
    "model.name=hf",
    "model.hf_config=gpt2-tiny",
    f"data.seq_len={SEQ}",
    "precision.dtype=fp32",
]


def test_a_run_starts_from_an_exported_hf_directory(hf_run, tmp_path, capsys):
    from shardwise.run_plan import resolve
    from shardwise.trainer import build_engine

    dest = tmp_path / "hf"
    assert run_cli(["convert", str(hf_run), str(dest), "--to", "hf"], capsys)[0] == 0
    cfg = Config.from_file(None, [*HF_SETTINGS, f"model.init_from={dest}"])
    engine, _ = build_engine(resolve(cfg, 1))
    state = engine.full_state_dict()
    for name, tensor in _masters(hf_run).items():
        assert torch.equal(state[name], tensor), name


def sharded_start(cfg: Config) -> dict[str, torch.Tensor]:
    """On both ranks: a ZeRO-3 engine built shard by shard from `cfg.model.init_from`."""
    from shardwise.run_plan import resolve
    from shardwise.trainer import build_engine

    engine, _ = build_engine(resolve(cfg, dist.get_world_size()))
    assert engine.plan.sharding.params
    return engine.full_state_dict()


def test_a_zero3_run_starts_from_safetensors_shard_by_shard(pool2, tmp_path, capsys):
    cfg = make_config(micro_batch=1, global_batch=2)
    engine = initialize(build_model(cfg), None, cfg)
    engine.train_step(global_batches(cfg, 1)[0])
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 1, engine, {"data": {}}, 1, engine.plan.layout())
    weights = tmp_path / "model.safetensors"
    assert run_cli(["convert", str(run), str(weights), "--to", "safetensors"], capsys)[0] == 0
    sharded = cfg.replace(zero={"stage": 3}, model={"init_from": str(weights)})
    want = engine.full_state_dict()
    for state in pool2.run(sharded_start, sharded):
        assert set(state) == set(want)
        assert all(torch.equal(state[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("where", "message"),
    [("missing", "no safetensors file there"), ("other", "does not fit the model: missing")],
)
def test_bad_init_from_is_one_line(tmp_path, where, message):
    from shardwise.run_plan import resolve
    from shardwise.trainer import build_engine

    path = tmp_path / "nothing"
    if where == "other":
        engine = initialize(build_model(make_config()), None, make_config())
        run = tmp_path / "run"
        save_checkpoint(run / "checkpoints", 0, engine, {"data": {}}, 1, engine.plan.layout())
        path = tmp_path / "gpt.safetensors"
        convert(run, path, "safetensors", None)
    cfg = Config.from_file(None, [*HF_SETTINGS, f"model.init_from={path}"])
    with pytest.raises(ConfigError, match=message):
        build_engine(resolve(cfg, 1))
