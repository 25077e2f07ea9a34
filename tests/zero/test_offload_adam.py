"""`OffloadedAdamW`: states on the host or on disk, streamed in chunks, bit-identical to
torch.optim.AdamW(fused=True); checkpoints in torch's layout whatever the tier."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shardwise.engine import initialize
from shardwise.errors import ConfigError
from shardwise.run_plan import resolve
from shardwise.zero.offload.adam import OffloadedAdamW
from shardwise.zero.offload.disk import DiskTier

STEPS = 5
HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), nn.LayerNorm(8))


def _groups(model: nn.Module) -> list[dict]:
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    dtype = next(model.parameters()).dtype
    for step in steps:
        for group in optimizer.param_groups:  # a decaying lr, read from the groups each step
            group["lr"] = HYPER["lr"] / (1 + step)
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(4, 16, generator=gen).to(dtype)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def _reference(steps: range = range(STEPS)) -> nn.Module:
    model = _model()
    _train(model, torch.optim.AdamW(_groups(model), **HYPER, fused=True), steps)
    return model


def _assert_same_weights(got: nn.Module, want: nn.Module) -> None:
    for (name, a), b in zip(got.named_parameters(), want.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_bit_identical_to_fused_adamw_in_small_chunks(tmp_path, tier):
    model = _model()
    with DiskTier(tmp_path) as disk:
        optimizer = OffloadedAdamW(
            _groups(model),
            **HYPER,
            tier=tier,
            disk=disk if tier == "disk" else None,
            chunk_bytes=8 * 40,  # each weight alone; the vectors in [32, 8] and [8, 8]
        )
        assert [c.numel for c in optimizer.chunks] == [512, 256, 40, 16]
        _train(model, optimizer, range(STEPS))
        states = optimizer.tier_bytes()
    _assert_same_weights(model, _reference())
    total = 8 * sum(p.numel() for p in model.parameters())
    assert states == ({"host": total, "disk": 0} if tier == "host" else {"host": 0, "disk": total})


def test_checkpoint_moves_between_tiers_and_into_torch(tmp_path):
    model = _model()
    with DiskTier(tmp_path) as disk:
        optimizer = OffloadedAdamW(
            _groups(model), **HYPER, tier="disk", disk=disk, chunk_bytes=8 * 40
        )
        _train(model, optimizer, range(3))
        saved = optimizer.state_dict()
    # The same checkpoint resumes on the host tier and in torch's own AdamW alike.
    on_host = OffloadedAdamW(_groups(model), **HYPER, tier="host")
    on_host.load_state_dict(copy.deepcopy(saved))
    resumed = _model()
    resumed.load_state_dict(model.state_dict())
    torch_adam = torch.optim.AdamW(_groups(resumed), **HYPER, fused=True)
    torch_adam.load_state_dict(copy.deepcopy(saved))
    _train(model, on_host, range(3, STEPS))
    _train(resumed, torch_adam, range(3, STEPS))
    _assert_same_weights(model, _reference())
    # torch's AdamW loads the groups without its `fused` flag and continues with its foreach
    # kernel: the same update up to rounding.
    for a, b in zip(resumed.parameters(), _reference().parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_checkpoints_stream_the_states_a_chunk_at_a_time(tmp_path):
    """`saved_states` and `load_states` (what a checkpoint uses) hold at most the chunk in use
    and the one read ahead, never every chunk as `state_dict` does."""
    model = _model()
    with DiskTier(tmp_path) as disk:
        optimizer = OffloadedAdamW(
            _groups(model), **HYPER, tier="disk", disk=disk, chunk_bytes=8 * 40
        )
        _train(model, optimizer, range(3))
        resident = []
        saved, states = optimizer.saved_states()
        copies = {}
        for index, state in states:
            resident.append(optimizer.tier_bytes()["host"])
            copies[index] = {k: v.clone() for k, v in state.items()}
        assert copies.keys() == optimizer.state_dict()["state"].keys()

        def elements(index: int) -> dict:
            resident.append(optimizer.tier_bytes()["host"])
            return copies[index]

        scalars = {i: {"step": state["step"]} for i, state in copies.items()}
        optimizer.load_states({**saved, "state": scalars}, elements)
        two_largest = 8 * (512 + 256)
        total = 8 * sum(p.numel() for p in model.parameters())
        assert len(resident) == 2 * len(copies) and max(resident) <= two_largest < total


def test_bf16_parameters_resume_exactly_with_their_fp32_masters():
    """The master copies are part of the checkpoint: rebuilt from bf16 parameters, a resumed
    run would lose the bits bf16 rounds away and drift from the uninterrupted one."""
    uninterrupted = _model().to(torch.bfloat16)
    _train(
        uninterrupted, OffloadedAdamW(_groups(uninterrupted), **HYPER, tier="host"), range(STEPS)
    )
    model = _model().to(torch.bfloat16)
    optimizer = OffloadedAdamW(_groups(model), **HYPER, tier="host")
    _train(model, optimizer, range(3))
    saved = copy.deepcopy(optimizer.state_dict())
    assert all(state["master"].dtype == torch.float32 for state in saved["state"].values())
    resumed = _model().to(torch.bfloat16)
    resumed.load_state_dict(model.state_dict())
    optimizer = OffloadedAdamW(_groups(resumed), **HYPER, tier="host")
    optimizer.load_state_dict(saved)
    _train(resumed, optimizer, range(3, STEPS))
    _assert_same_weights(resumed, uninterrupted)


def test_bad_tier_settings_are_clear_errors():
    params = list(_model().parameters())
    with pytest.raises(ConfigError, match="'gpu' is not one of host, disk"):
        OffloadedAdamW(params, **HYPER, tier="gpu")
    with pytest.raises(ConfigError, match="need offload.disk_path"):
        OffloadedAdamW(params, **HYPER, tier="disk")


# --------------------------------------------------------------------------- through the engine


def _engine_run(cfg) -> tuple[list[float], dict, dict]:
    from tests.parity import build_model, global_batches

    engine = initialize(build_model(cfg), None, cfg)
    losses = [engine.train_step(batch) for batch in global_batches(cfg)]
    return losses, engine.full_state_dict(), engine.memory_report()


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_engine_with_offloaded_states_equals_the_run_without(tmp_path, tier):
    from tests.parity import make_config

    plain = make_config(micro_batch=2, global_batch=4)
    offloaded = plain.replace(
        offload={"optimizer": tier, "disk_path": str(tmp_path), "chunk_mb": 1}
    )
    want_losses, want_state, _ = _engine_run(plain)
    losses, state, report = _engine_run(offloaded)
    assert losses == want_losses
    for name, tensor in want_state.items():
        assert torch.equal(state[name], tensor), name
    moved = report[f"offloaded_{tier}"]
    assert moved > 0 and report["optimizer_states"] < moved / 100  # only step counters stay


def test_two_ranks_zero2_with_states_on_disk_match_single_process(pool2, tmp_path):
    from tests.parity import assert_parity, engine_run, make_config, reference_run

    cfg = make_config(micro_batch=2, global_batch=4, zero_stage=2).replace(
        offload={"optimizer": "disk", "disk_path": str(tmp_path)}
    )
    want = reference_run(cfg)
    for got in pool2.run(engine_run, cfg):
        assert_parity(got, want, rtol=1e-5)


def test_two_ranks_zero2_with_states_on_disk_resume_exactly(pool2, tmp_path):
    from tests.parity import train_then_resume

    disk = {"optimizer": "disk", "disk_path": str(tmp_path)}
    for full, resumed in pool2.run(train_then_resume, str(tmp_path), 2, offload=disk):
        assert resumed == full[2:]


# -- delayed parameter update ([Note: delayed parameter update]) --------------------------------


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_delayed_update_equals_the_one_step_stale_reference(tmp_path, tier):
    """Each step computes with the weights from before the previous step's update; the
    final weights (full_state_dict waits for the last update) are the reference's."""
    from tests.parity import assert_parity, make_config, reference_run

    delayed = {"optimizer": tier, "delayed_update": 1, "disk_path": str(tmp_path)}
    cfg = make_config(micro_batch=2, global_batch=4).replace(offload=delayed)
    want = reference_run(cfg)
    losses, state, report = _engine_run(cfg)
    assert_parity((losses, state), want, rtol=1e-5)
    # the host's copies of parameters and gradients: 16 bytes per element, not 8
    predicted = resolve(cfg, 1).model_state_bytes()["optimizer_states"]
    held = report["optimizer_states"] + report["offloaded_host"] + report["offloaded_disk"]
    assert held == pytest.approx(predicted, rel=0.01)
    on_time = reference_run(cfg.replace(offload={"delayed_update": 0}))
    assert want[0][0] == on_time[0][0] and want[0][1] != on_time[0][1]  # stale from step 2


def test_two_ranks_zero2_delayed_update_matches_the_reference(pool2, tmp_path):
    """Delayed from step 3: steps 1-2 update in place (and all-gather the shards)."""
    from tests.parity import assert_parity, engine_run, make_config, reference_run

    cfg = make_config(micro_batch=2, global_batch=4, zero_stage=2).replace(
        offload={"optimizer": "host", "delayed_update": 3}
    )
    want = reference_run(cfg)
    for got in pool2.run(engine_run, cfg):
        assert_parity(got, want, rtol=1e-5)


def _zero3_delayed_run(cfg) -> tuple[list[float], dict, dict]:
    from tests.parity import build_model, train_rows

    engine = initialize(build_model(cfg), None, cfg)
    losses, state = train_rows(engine, cfg)
    return losses, state, engine.memory_report()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_two_ranks_zero3_delayed_update_matches_the_reference(pool2, dtype):
    """ZeRO-3's units: each rank's shards updated on the host in the background from step 2,
    written into the shards before the next update (chunks gathered from them before are
    dropped); the final weights wait for the last update. The host's copies are what the
    plan predicts, category by category: its masters are the master weights of bf16 shards,
    and in fp32 count with Adam's states, beside the gradients' copies."""
    from tests.parity import BF16_RTOL, assert_parity, engine_run, make_config, reference_run

    cfg = make_config(micro_batch=2, global_batch=4, zero_stage=3, dtype=dtype).replace(
        offload={"optimizer": "host", "delayed_update": 2}
    )
    fp32 = cfg.replace(precision={"dtype": "fp32"})
    want = reference_run(fp32)
    on_time = reference_run(fp32.replace(offload={"delayed_update": 0}))
    assert want[0][:2] == on_time[0][:2] and want[0][2] != on_time[0][2]  # stale from step 3
    predicted = resolve(cfg, 2).model_state_bytes()
    stage2 = [losses for losses, _ in pool2.run(engine_run, cfg.replace(zero={"stage": 2}))]
    for rank, (losses, state, report) in enumerate(pool2.run(_zero3_delayed_run, cfg)):
        if dtype == "fp32":
            assert_parity((losses, state), want, rtol=1e-5)
        else:  # the update reads the fp32 reduced gradients (bf16 ones differ by ~2e-5)
            torch.testing.assert_close(
                torch.tensor(losses), torch.tensor(want[0]), rtol=BF16_RTOL, atol=0
            )
            assert losses == stage2[rank], "the flat store's delayed bf16 run, bit for bit"
        assert report["master_params"] == pytest.approx(predicted["master_params"], rel=0.01)
        held = report["optimizer_states"] + report["offloaded_host"]
        assert held == pytest.approx(predicted["optimizer_states"], rel=0.01)


def test_zero3_delayed_update_through_the_launcher(tmp_path, capsys):
    """`shardwise train` at zero.stage=3 on two ranks, the host's update delayed from step 2,
    logs the losses of the same delayed run on one rank (fp32, 1e-5)."""
    from tests.cli_runs import TINY_RUN, logged_losses, run_cli, settings_args, train_on_two_ranks

    settings = [*TINY_RUN, "train.steps=5", "train.global_batch=4", "offload.optimizer=host"]
    settings += ["offload.delayed_update=2"]
    shows = "adam states: host, updated in the background from step 2"
    two = train_on_two_ranks(tmp_path / "two", [*settings, "zero.stage=3"], capsys, shows)
    argv = ["train", "--nproc", "1", "--out", str(tmp_path / "one"), *settings_args(settings)]
    code, printed = run_cli(argv, capsys)
    assert code == 0, printed
    one = logged_losses(tmp_path / "one")
    assert len(two) == 5
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)


def test_two_ranks_delayed_update_resumes_exactly(pool2, tmp_path):
    """A save waits for the update in flight (in the uninterrupted run too), so the run
    resumed from it continues as the one that saved it."""
    from tests.parity import train_then_resume

    delayed = {"optimizer": "host", "delayed_update": 1}
    for stage in (1, 3):
        out = tmp_path / f"stage{stage}"
        out.mkdir()
        for full, resumed in pool2.run(train_then_resume, str(out), stage, offload=delayed):
            assert resumed == full[2:]


def test_masters_of_a_delayed_run_are_not_kept_by_a_run_that_updates_in_place():
    """Loaded where the update writes the parameters themselves, a delayed run's masters
    would go stale, be saved again, and mislead a later delayed run."""
    delayed_model, model = _model(), _model()
    delayed = OffloadedAdamW(_groups(delayed_model), **HYPER, delayed_from=1)
    for _ in range(2):
        delayed_model(torch.ones(4, 16)).square().mean().backward()
        delayed.finish_step()
        delayed.step()
    delayed.finish_step()
    assert all("master" in delayed.state[p] for p in delayed_model.parameters())
    in_place = OffloadedAdamW(_groups(model), **HYPER)
    in_place.load_state_dict(delayed.state_dict())
    assert not any("master" in in_place.state[p] for p in model.parameters())


def test_a_failed_delayed_update_surfaces_at_the_next_step(tmp_path):
    from tests.parity import build_model, global_batches, make_config

    cfg = make_config(micro_batch=2, global_batch=4).replace(
        offload={"optimizer": "host", "delayed_update": 1}
    )
    engine = initialize(build_model(cfg), None, cfg)
    batches = global_batches(cfg)
    engine.train_step(batches[0])

    def fail(*args):
        raise OSError("disk full")

    engine.optimizer._update = fail  # the next update, in the background, fails
    engine.train_step(batches[1])
    with pytest.raises(OSError, match="disk full"):
        engine.train_step(batches[2])


def test_engine_offload_errors_are_clear(tmp_path):
    from tests.parity import build_model, make_config

    cfg = make_config(micro_batch=2, global_batch=2)
    with pytest.raises(ConfigError, match="needs offload.disk_path"):
        initialize(build_model(cfg), None, cfg.replace(offload={"optimizer": "disk"}))
    missing = cfg.replace(offload={"optimizer": "disk", "disk_path": str(tmp_path / "no")})
    with pytest.raises(ConfigError, match="does not exist"):
        initialize(build_model(cfg), None, missing)
    with pytest.raises(ConfigError, match="brings its own AdamW"):
        initialize(build_model(cfg), lambda g: None, cfg.replace(offload={"optimizer": "host"}))
    moving = {"optimizer": "host", "delayed_update": 1, "policy": "static"}  # chunks that move
    for offload in ({"delayed_update": 1}, {"delayed_update": 1, "policy": "static"}, moving):
        with pytest.raises(ConfigError, match="delayed_update overlaps the host's Adam step"):
            initialize(build_model(cfg), None, cfg.replace(offload=offload))
    late = {"optimizer": "host", "delayed_update": cfg.train.steps + 1}
    with pytest.raises(ConfigError, match="starts after the last step"):
        initialize(build_model(cfg), None, cfg.replace(offload=late))
