from __future__ import annotations

import re
from pathlib import Path

import pytest

from shardwise.config import Config, config_reference, resolve_batch
from shardwise.errors import ConfigError


def test_toml_then_overrides_with_typed_coercion(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nsteps = 10\nmicro_batch = 2\n[optim]\nlr = 0.5\n")
    cfg = Config.from_file(path, ["train.steps=20", "optim.betas=[0.8, 0.9]", "log.progress=false"])
    assert cfg.train.steps == 20 and cfg.train.micro_batch == 2
    assert cfg.optim.lr == 0.5 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.log.progress is False


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = Config.from_file(None, ["train.steps=7", "precision.dtype=bf16"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert Config.from_file(path) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "did you mean 'optim.lr'"),
        ("optimm.lr=1", "did you mean 'optim'"),
        ("optim.lr=fast", "optim.lr='fast'"),
        ("train.micro_batch=0", "greater than or equal to 1"),
        ("train.micro_batch", "not of the form"),
        ("train.steps.x=1", "train.steps={'x': 1}: input should be a valid integer"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.from_file(None, [override])


def test_batch_resolution():
    train = Config.from_file(None, ["train.micro_batch=2", "train.global_batch=16"]).train
    assert resolve_batch(train, 2) == 4
    with pytest.raises(ConfigError, match="not divisible"):
        resolve_batch(train, 3)


def test_config_reference_doc_is_current():
    doc = Path(__file__).parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_reference(), "regenerate docs/config.md (see its header)"
