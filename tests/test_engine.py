"""Engine parity: data parallelism on 1, 2 and 4 ranks against the single-process reference
(tests/parity.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from shardwise.config import Config
from shardwise.engine import initialize
from shardwise.errors import ConfigError, TrainingError
from tests.parity import (
    BF16_RTOL,
    SEQ,
    assert_parity,
    build_model,
    engine_run,
    global_batches,
    make_config,
    reference_run,
)


@pytest.mark.parametrize(
    "train",
    [
        {"micro_batch": 2, "global_batch": 4},  # dp=2, no accumulation
        {"micro_batch": 1, "global_batch": 8},  # dp=2, accumulation k=4
    ],
    ids=["dp2", "dp2-accum4"],
)
def test_dp2_matches_single_process_fp32(pool2, train):
    cfg = make_config(**train)
    want = reference_run(cfg)
    for got in pool2.run(engine_run, cfg):
        assert_parity(got, want, rtol=1e-5)


def test_dp4_with_frozen_layer_and_tied_embeddings(pool4):
    cfg = make_config(micro_batch=1, global_batch=8)
    assert cfg.model.tie_embeddings
    want = reference_run(cfg, freeze=True)
    results = pool4.run(engine_run, cfg, freeze=True)
    for got in results:
        assert_parity(got, want, rtol=1e-5)
    frozen = "blocks.0.mlp.up.weight"
    torch.testing.assert_close(results[0][1][frozen], build_model(cfg).state_dict()[frozen])


def _first_step_grads_and_losses(cfg) -> tuple[torch.Tensor, list[float]]:
    """The averaged gradient of step 1 (before any optimizer update) and 5 steps' losses."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    engine = initialize(build_model(cfg), None, cfg)
    grads, losses = None, []
    for inputs, targets in global_batches(cfg):
        rows = inputs.shape[0] // world
        part = slice(rank * rows, (rank + 1) * rows)
        micro = [
            (x, y)
            for x, y in zip(
                inputs[part].chunk(engine.plan.micro_batches),
                targets[part].chunk(engine.plan.micro_batches),
                strict=True,
            )
        ]
        total = 0.0
        for x, y in micro:
            loss = engine.loss_fn(engine.forward(x), y)
            engine.backward(loss)
            total += loss.item()
        if grads is None:
            grads = torch.cat([g.clone() for g in engine.store.shards.owned_grads()])
        engine.step()
        losses.append(total / len(micro))
    return grads, losses


def test_accumulation_k4_equals_one_big_batch(pool2):
    """Gradients are compared before Adam touches them: Adam maps a 1-ulp difference in a
    near-zero gradient (another summation order) to a full-size update difference."""
    accumulated = pool2.run(
        _first_step_grads_and_losses, make_config(micro_batch=1, global_batch=8)
    )
    big_batch = pool2.run(_first_step_grads_and_losses, make_config(micro_batch=4, global_batch=8))
    for (grads, losses), (want_grads, want_losses) in zip(accumulated, big_batch, strict=True):
        error = torch.linalg.vector_norm(grads - want_grads) / torch.linalg.vector_norm(want_grads)
        assert error <= 1e-6, f"relative gradient error {error:.2e}"
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=0
        )


def test_activation_checkpointing_keeps_parity(pool2):
    cfg = make_config(micro_batch=2, global_batch=4, activation_checkpointing="full")
    want = reference_run(cfg)
    for got in pool2.run(engine_run, cfg):
        assert_parity(got, want, rtol=1e-5)


def test_single_process_engine_matches_reference():
    cfg = make_config(micro_batch=2, global_batch=4)
    engine = initialize(build_model(cfg), None, cfg)
    losses = [engine.train_step(b) for b in global_batches(cfg)]
    state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    assert_parity((losses, state), reference_run(cfg), rtol=1e-5)


def test_dp2_bf16_within_documented_tolerance(pool2):
    cfg = make_config(micro_batch=2, global_batch=4, dtype="bf16")
    want_losses, _ = reference_run(make_config(micro_batch=2, global_batch=4))
    for losses, _ in pool2.run(engine_run, cfg):
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(want_losses), rtol=BF16_RTOL, atol=0
        )


def test_fp16_with_loss_scaling_trains():
    cfg = make_config(micro_batch=2, global_batch=4, dtype="fp16")
    engine = initialize(build_model(cfg), None, cfg)
    assert engine.scaler is not None
    losses = [engine.train_step(b) for b in global_batches(cfg)]
    want_losses, _ = reference_run(make_config(micro_batch=2, global_batch=4))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=5e-2, atol=0)


def test_master_weights_are_fp32_and_params_bf16():
    cfg = make_config(micro_batch=2, global_batch=4, dtype="bf16")
    engine = initialize(build_model(cfg), None, cfg)
    assert all(p.dtype == torch.bfloat16 for p in engine.params)
    assert all(s.master.dtype == torch.float32 for s in engine.store.shards.groups)
    engine.train_step(global_batches(cfg, 1)[0])
    for owned in engine.store.shards.groups:
        torch.testing.assert_close(owned.chunk.payload.float(), owned.master, rtol=1e-2, atol=1e-3)


def test_gradients_are_views_of_the_flat_buckets():
    cfg = make_config(micro_batch=2, global_batch=4)
    engine = initialize(build_model(cfg), None, cfg)
    inputs, targets = global_batches(cfg, 1)[0]
    engine.backward(engine.loss_fn(engine.forward(inputs), targets))
    storages = {b.grads.untyped_storage().data_ptr() for b in engine.store.reducer.buckets}
    for param in engine.params:
        assert param.grad.untyped_storage().data_ptr() in storages


def test_non_finite_loss_is_a_clear_error():
    cfg = make_config(micro_batch=2, global_batch=4)
    model = build_model(cfg)
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    engine = initialize(model, None, cfg)
    with pytest.raises(TrainingError, match="loss is nan at step 1"):
        engine.train_step(global_batches(cfg, 1)[0])


def test_batch_not_divisible_by_accumulation_is_a_clear_error():
    cfg = make_config(micro_batch=2, global_batch=4)
    engine = initialize(build_model(cfg), None, cfg)
    inputs, targets = global_batches(make_config(micro_batch=3, global_batch=3), 1)[0]
    with pytest.raises(ConfigError, match="does not split"):
        engine.train_step((inputs, targets))


class KeywordGPT(torch.nn.Module):
    """A model called with keyword inputs that computes its own loss, as Hugging Face causal
    LMs do: ``model(input_ids=..., labels=...)`` -> an object with ``loss`` and ``logits``."""

    def __init__(self, gpt: torch.nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, labels=None):
        logits = self.gpt(input_ids)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return SimpleNamespace(loss=loss, logits=logits)


def test_dict_batches_train_on_the_models_own_loss():
    """A dict batch gives the model its keyword inputs and trains on ``output.loss``; a tuple
    batch on an output with ``.logits`` uses them: both equal the plain reference."""
    cfg = make_config(micro_batch=2, global_batch=4)
    want = reference_run(cfg)
    for as_dict in (True, False):
        engine = initialize(KeywordGPT(build_model(cfg)), None, cfg)
        losses = [
            engine.train_step({"input_ids": x, "labels": y} if as_dict else (x, y))
            for x, y in global_batches(cfg)
        ]
        state = {k.removeprefix("gpt."): v for k, v in engine.full_state_dict().items()}
        assert_parity((losses, state), want, rtol=1e-5)
    with pytest.raises(TrainingError, match="has no `loss`: include labels"):
        engine.train_step({"input_ids": global_batches(cfg, 1)[0][0]})


def test_a_given_optimizer_is_used_as_given():
    """No warm-up, no clipping, no weight-decay groups unless the config sets them: the
    engine's SGD steps equal plain torch SGD on the same batches."""
    cfg = Config.from_file(
        None,
        ["model.n_layers=2", "model.d_model=32", f"data.seq_len={SEQ}"]
        + ["train.micro_batch=4", "precision.dtype=fp32"],
    )
    engine = initialize(build_model(cfg), lambda groups: torch.optim.SGD(groups, lr=0.5), cfg)
    reference = build_model(cfg)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.5)
    for inputs, targets in global_batches(make_config(micro_batch=4, global_batch=4)):
        got = engine.train_step((inputs, targets))
        sgd.zero_grad()
        loss = torch.nn.functional.cross_entropy(reference(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        sgd.step()
        assert got == pytest.approx(loss.item(), rel=1e-5)
    assert engine.scheduler is None and engine.lr == 0.5
    assert engine.optimizer.param_groups[0]["weight_decay"] == 0
