"""`shardwise convert`: a sharded checkpoint consolidated into safetensors, or into a Hugging
Face directory that transformers' `from_pretrained` loads; ``model.init_from`` back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from shardwise.checkpoint import save_checkpoint
from shardwise.checkpoint.convert import read_full_tensors
from shardwise.config import Config
from shardwise.engine import initialize
from shardwise.errors import ConfigError
from shardwise.run_plan import resolve
from shardwise.trainer import build_engine
from tests.cli_runs import run_cli
from tests.parity import build_model, global_batches, make_config

HF_SETTINGS = [
    "model.name=hf",
    "model.hf_config=gpt2-tiny",
    "data.seq_len=16",
    "precision.dtype=fp32",
]


def save_run(engine, cfg: Config, run: Path) -> None:
    """A run directory as `shardwise train` leaves it: config.toml and a checkpoint."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.toml").write_text(cfg.to_toml())
    save_checkpoint(run / "checkpoints", 1, engine, {"data": {}}, 1, engine.plan.layout())


def train_zero3(cfg: Config, run: str) -> None:
    """On both ranks: one step at ZeRO-3; a checkpoint of two shards."""
    engine = initialize(build_model(cfg), None, cfg)
    rows = global_batches(cfg, 1)[0]
    rank = dist.get_rank()
    engine.train_step((rows[0][rank : rank + 1], rows[1][rank : rank + 1]))
    save_run(engine, cfg, Path(run))


@pytest.fixture(scope="module")
def zero3_run(pool2, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("zero3-run")
    pool2.run(train_zero3, make_config(micro_batch=1, global_batch=2, zero_stage=3), str(run))
    return run


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> Path:
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    run = tmp_path_factory.mktemp("hf-run")
    cfg = Config.from_file(None, [*HF_SETTINGS, "train.micro_batch=1"])
    engine, _ = build_engine(resolve(cfg, 1))
    engine.train_step(global_batches(make_config(micro_batch=1, global_batch=1), 1)[0])
    save_run(engine, cfg, run)
    return run


def _masters(run: Path) -> dict[str, torch.Tensor]:
    return {name: t for (kind, name), t in read_full_tensors(run).items() if kind == "master"}


def test_safetensors_export_of_zero3_shards_holds_every_full_tensor(zero3_run, tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors.torch", reason="safetensors not installed")
    dest = tmp_path / "model.safetensors"
    argv = ["convert", str(zero3_run / "checkpoints"), str(dest), "--to", "safetensors"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    exported = safetensors.load_file(dest)
    masters = _masters(zero3_run)
    assert masters and set(masters) <= set(exported)
    assert all(torch.equal(exported[name], tensor) for name, tensor in masters.items())


def test_hf_export_loads_with_from_pretrained(hf_run, tmp_path, capsys):
    import transformers

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

    imported = Config.from_file(None, [*HF_SETTINGS, f"model.init_from={dest}"])
    state = build_engine(resolve(imported, 1))[0].full_state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in masters.items())


def sharded_start(cfg: Config) -> dict[str, torch.Tensor]:
    """On both ranks: a ZeRO-3 engine built shard by shard from `cfg.model.init_from`."""
    engine, _ = build_engine(resolve(cfg, dist.get_world_size()))
    assert engine.plan.sharding.params
    return engine.full_state_dict()


def export(run: Path, dest: Path, capsys) -> None:
    assert run_cli(["convert", str(run), str(dest), "--to", "safetensors"], capsys)[0] == 0


def test_a_zero3_run_starts_from_exported_weights_shard_by_shard(
    zero3_run, pool2, tmp_path, capsys
):
    weights = tmp_path / "model.safetensors"
    export(zero3_run, weights, capsys)
    cfg = make_config(zero_stage=3).replace(model={"init_from": str(weights)})
    masters = _masters(zero3_run)
    for state in pool2.run(sharded_start, cfg):
        assert all(torch.equal(state[name], tensor) for name, tensor in masters.items())


def test_hf_export_of_a_rope_gpt_is_one_line(zero3_run, tmp_path, capsys):
    code, err = run_cli(["convert", str(zero3_run), str(tmp_path / "hf"), "--to", "hf"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "needs model.positions='learned' and model.mlp='gelu'" in err


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_native_gpt_exports_as_gpt2_with_the_same_logits(tie, tmp_path, capsys):
    """A GPT with learned positions and a GELU MLP is a GPT-2 without biases: after a step,
    transformers' GPT2LMHeadModel from the export computes our logits (fp32)."""
    import transformers

    cfg = make_config(micro_batch=1, global_batch=1).replace(
        model={"positions": "learned", "tie_embeddings": tie}
    )
    engine = initialize(build_model(cfg), None, cfg)
    engine.train_step(global_batches(cfg, 1)[0])
    run, dest = tmp_path / "run", tmp_path / "gpt2"
    save_run(engine, cfg, run)
    code, err = run_cli(["convert", str(run), str(dest), "--to", "hf"], capsys)
    assert code == 0, err
    gpt2 = transformers.GPT2LMHeadModel.from_pretrained(dest).eval()
    assert (gpt2.lm_head.weight is gpt2.transformer.wte.weight) == tie
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len))
    with torch.no_grad():
        ours = engine.model.eval()(tokens)
        theirs = gpt2(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("where", "message"),
    [("missing", "no safetensors file there"), ("other", "does not fit the model: it holds no")],
)
def test_bad_init_from_is_one_line(zero3_run, tmp_path, capsys, where, message):
    path = tmp_path / "nothing"
    if where == "other":  # a native GPT's weights for GPT-2
        path = tmp_path / "gpt.safetensors"
        export(zero3_run, path, capsys)
    cfg = Config.from_file(None, [*HF_SETTINGS, f"model.init_from={path}"])
    with pytest.raises(ConfigError, match=message):
        build_engine(resolve(cfg, 1))
