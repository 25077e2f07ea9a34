"""The public API as the README shows it."""

from __future__ import annotations

import torch

import shardwise as sw


def test_readme_library_example_runs():
    from shardwise.models.gpt import build_gpt

    cfg = sw.Config.from_file(None, ["train.micro_batch=4", "precision.dtype=fp32"])
    model = build_gpt(cfg.model, cfg.data.seq_len, seed=cfg.train.seed)
    engine = sw.initialize(model, None, cfg)
    assert isinstance(engine, sw.Engine)
    inputs = torch.randint(0, 256, (4, cfg.data.seq_len))
    first = engine.train_step((inputs, inputs.roll(-1, dims=1)))
    second = engine.train_step((inputs, inputs.roll(-1, dims=1)))
    assert second < first
    assert sw.__version__ and sw.ParallelDims
