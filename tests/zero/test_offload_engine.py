"""Parameters in chunks through the engine (``offload.policy``, zero/module_hooks.py), one process.

Parity is bit-exact against plain torch (tests/parity.py `reference_run`): the forward and
backward read the same values from chunk payloads, the global norm is computed as
clip_grad_norm_ does, and the chunk-wise fused AdamW update is element-wise. Against the engine
without offload (whose norm is summed over flat buckets, in another order) parameters agree to
~4e-7 relative.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from shardwise.checkpoint import load_checkpoint, save_checkpoint
from shardwise.engine import initialize
from shardwise.errors import ConfigError
from shardwise.metrics import TIER_KEYS
from shardwise.zero.chunks.chunk import ChunkState, Tier
from shardwise.zero.chunks.manager import ChunkManager
from shardwise.zero.chunks.packing import build_chunks, chunk_sites, held_chunks
from shardwise.zero.chunks.tracer import MemoryTracer
from shardwise.zero.module_hooks import ModuleHooks
from shardwise.zero.store import memory_tiers
from tests.cli_runs import logged_losses, run_cli, settings_args
from tests.parity import BF16_RTOL, build_model, global_batches, make_config, reference_run

MIB = 2**20
SMALLEST_CHUNKS = {"chunk_search_range_mb": 0}
"""Chunks as small as the largest parameter (the embedding, 32 KiB): six of them."""
BUDGET_MB = 0.175
"""Below the 192 KiB of parameter chunks (384 KiB with the gradient chunks), above the 0.1723
MiB the warm-up step needs (see
`test_budget_below_what_the_warm_up_measured_names_a_minimum_that_works`)."""


def config(**offload):
    """Two micro-batches of one sequence per step (gradients accumulate in ``param.grad``)."""
    return make_config(micro_batch=1, global_batch=2).replace(
        offload={**SMALLEST_CHUNKS, **offload}
    )


def run(cfg, steps: int | None = None):
    engine = initialize(build_model(cfg), None, cfg)
    losses = [engine.train_step(batch) for batch in global_batches(cfg)[:steps]]
    return engine, losses, engine.full_state_dict()


@pytest.fixture(scope="module")
def reference():
    return reference_run(config())


@pytest.fixture(scope="module")
def without_offload():
    _, losses, state = run(config())
    return losses, state


PLACEMENTS = {
    "static-third": {"policy": "static", "param_device_fraction": 0.34},
    "auto": {"policy": "auto", "device_budget_mb": BUDGET_MB},
    "auto-disk-adam-on-disk": {
        "policy": "auto",
        "device_budget_mb": BUDGET_MB,
        "host_budget_mb": 0.05,
        "optimizer": "disk",
    },
}


@pytest.mark.parametrize("offload", list(PLACEMENTS.values()), ids=list(PLACEMENTS))
def test_any_placement_equals_the_run_without_offload(
    offload, reference, without_offload, tmp_path
):
    engine, losses, state = run(config(**offload, disk_path=str(tmp_path)))
    want_losses, want_state = reference
    for name, tensor in want_state.items():
        assert torch.equal(state[name], tensor), name  # bit-exact against plain torch
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-7, atol=0)
    plain_losses, plain_state = without_offload
    assert losses[0] == plain_losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-6, atol=0)
    for name, tensor in plain_state.items():
        error = torch.linalg.vector_norm(state[name] - tensor) / torch.linalg.vector_norm(tensor)
        assert error <= 1e-6, f"{name}: {error:.1e}"

    report = engine.memory_report()
    chunk_bytes = sum(c.nbytes for c in engine.store.chunks)
    assert len(engine.store.chunks) == 6
    assert report["chunks_device"] + report["chunks_host"] + report["chunks_disk"] == chunk_bytes
    assert report["chunks_host"] + report["chunks_disk"] > 0, "nothing streamed"
    if offload.get("optimizer") == "disk":
        assert report["chunks_disk"] > 0 and report["offloaded_disk"] > 0


@pytest.mark.parametrize("policy", ["static", "auto"])
def test_activation_checkpointing_recomputes_through_the_chunks(policy, reference):
    """Recomputation accesses chunks inside backward and torch stops it early, before the
    block's last forward hook: every access is still released, the step still bit-exact."""
    offload = {"policy": policy, "device_budget_mb": BUDGET_MB if policy == "auto" else None}
    cfg = config(**offload).replace(train={"activation_checkpointing": "full"})
    engine, losses, state = run(cfg)
    want_losses, want_state = reference
    assert all(torch.equal(state[name], tensor) for name, tensor in want_state.items())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-7, atol=0)
    assert all(c.state is not ChunkState.COMPUTE for c in engine.store.chunks)


def test_frozen_parameters_stay_out_of_the_chunks():
    cfg = config(policy="auto", device_budget_mb=0.19)
    engine = initialize(build_model(cfg, freeze=True), None, cfg)
    frozen = engine.model.blocks[0].mlp.up.weight
    assert id(frozen) not in {id(p) for p in engine.store.names().values()}
    losses = [engine.train_step(batch) for batch in global_batches(cfg)]
    want_losses, want_state = reference_run(cfg, freeze=True)
    state = engine.full_state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in want_state.items())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-7, atol=0)


def test_device_high_water_mark_stays_within_the_budget():
    budget = int(BUDGET_MB * MIB)
    engine = initialize(
        build_model(config()), None, config(policy="auto", device_budget_mb=BUDGET_MB)
    )
    chunks, manager = engine.store.chunks, engine.store.manager
    assert sum(c.nbytes for c in chunks) > budget
    batches = global_batches(engine.plan.config)
    engine.train_step(batches[0])  # the warm-up, LRU within the whole budget
    assert manager.device_peak_bytes <= budget
    manager.device_peak_bytes = 0
    with MemoryTracer(engine.model, chunks, engine.device) as tracer:
        for batch in batches[1:3]:
            engine.train_step(batch)
    assert manager.device_peak_bytes <= budget
    moments = tracer.trace().moments
    assert max(m.model_bytes + m.non_model_bytes for m in moments) <= budget
    assert max(m.model_bytes for m in moments) < sum(c.nbytes for c in chunks)
    assert engine.store.hooks.prefetched > 0
    assert held_chunks(engine.model, chunks) == {0}, "the embedding, tied to the head"


def test_prefetch_can_be_turned_off():
    """``zero.prefetch=false`` holds under offload.policy too: every chunk is brought in when
    a module needs it, and training is the same."""
    cfg = config(policy="auto", device_budget_mb=BUDGET_MB)
    engine, losses, _ = run(cfg)
    assert engine.store.hooks.prefetched > 0
    engine, unprefetched, _ = run(cfg.replace(zero={"prefetch": False}))
    assert engine.store.hooks.prefetched == 0
    assert unprefetched == losses


def test_gradients_live_in_gradient_chunks_until_the_update(tmp_path):
    """After both micro-batches' backward no ``param.grad`` is left: the gradients sit in
    gradient chunks (the same layout as the parameter chunks), some evicted to host or disk,
    and the device high-water mark of parameter and gradient chunks stays within the budget.
    The norm taken from the hooks equals clip_grad_norm_'s of the plain run bit for bit."""
    cfg = config(
        policy="auto", device_budget_mb=BUDGET_MB, host_budget_mb=0.2, disk_path=str(tmp_path)
    )
    engine = initialize(build_model(cfg), None, cfg)
    chunked, manager = engine.store, engine.store.manager
    first, second = global_batches(cfg)[:2]
    engine.train_step(first)  # the warm-up
    plain = build_model(cfg)
    for micro_in, micro_tgt in zip(first[0].chunk(2), first[1].chunk(2), strict=True):
        loss = torch.nn.functional.cross_entropy(plain(micro_in).flatten(0, 1), micro_tgt.flatten())
        (loss / 2).backward()
    want = torch.nn.utils.clip_grad_norm_(list(plain.parameters()), cfg.optim.grad_clip)
    assert engine.last_grad_norm == want.item()
    assert not any(v for k, v in engine.memory_report().items() if k.startswith("grad_chunks"))
    manager.device_peak_bytes = 0
    inputs, targets = second
    for micro_in, micro_tgt in zip(inputs.chunk(2), targets.chunk(2), strict=True):
        engine.backward(engine.loss_fn(engine.forward(micro_in), micro_tgt))
    assert all(p.grad is None for p in engine.params)
    report = engine.memory_report()
    grad_bytes = [report[f"grad_chunks_{tier}"] for tier in ("device", "host", "disk")]
    assert sum(grad_bytes) == sum(c.nbytes for c in chunked.chunks)
    assert grad_bytes[1] + grad_bytes[2] > 0, "no gradient chunk was evicted"
    assert [(g.numel, [s.offset for s in g.slots]) for g in chunked.grads.chunks] == [
        (c.numel, [s.offset for s in c.slots]) for c in chunked.chunks
    ]
    assert engine.step()
    assert manager.device_peak_bytes <= int(BUDGET_MB * MIB)
    assert all(c.state is ChunkState.FREE for c in chunked.grads.chunks)


def test_budget_below_what_the_warm_up_measured_names_a_minimum_that_works():
    cfg = config(policy="auto", device_budget_mb=0.1)
    engine = initialize(build_model(cfg), None, cfg)
    with pytest.raises(ConfigError, match=r"below the minimum ([\d.]+) MiB .* warm-up") as err:
        engine.train_step(global_batches(cfg)[0])
    minimum = float(err.value.args[0].split("minimum ")[1].split(" MiB")[0])
    cfg = config(policy="auto", device_budget_mb=minimum)
    _, losses, _ = run(cfg, steps=2)
    assert len(losses) == 2


def test_budget_below_one_module_and_its_held_chunks_is_refused_at_start():
    cfg = config(policy="static", param_device_fraction=0.5, device_budget_mb=0.01)
    with pytest.raises(ConfigError) as err:
        initialize(build_model(cfg), None, cfg)
    message = err.value.args[0]
    assert "offload.device_budget_mb=0.01 is below the minimum 0.1875 MiB (196608 bytes)" in (
        message
    )
    assert "chunks [3, 4, 5] are pinned; chunks [0] are held through backward" in message
    assert "one gradient chunk (32768 bytes)" in message
    initialize(build_model(cfg), None, cfg.replace(offload={"device_budget_mb": 0.1875}))


def test_unsupported_settings_are_clear_errors(tmp_path):
    auto = config(policy="auto", device_budget_mb=1)
    with pytest.raises(ConfigError, match="needs offload.device_budget_mb|set it"):
        initialize(build_model(auto), None, config(policy="auto"))
    no_disk = config(policy="auto", device_budget_mb=BUDGET_MB, host_budget_mb=0.01)
    with pytest.raises(ConfigError, match="set offload.disk_path"):
        initialize(build_model(no_disk), None, no_disk)


@pytest.mark.parametrize("optimizer", ["host", "device"])
def test_bf16_keeps_fp32_masters_beside_the_optimizer_states(optimizer):
    """host: the host optimizer's own master copies; device: one per chunk on the device
    ([Note: master copies on the device] in zero/chunks/store.py)."""
    plain = make_config(micro_batch=1, global_batch=2, dtype="bf16")
    _, want, _ = run(plain)
    cfg = plain.replace(offload={**SMALLEST_CHUNKS, "policy": "static", "optimizer": optimizer})
    engine, losses, _ = run(cfg)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), rtol=BF16_RTOL, atol=0)
    # gradients in chunks of the reduce dtype (fp32 by default), as the flat store's buckets
    assert {chunk.dtype for chunk in engine.store.grads.chunks} == {torch.float32}
    report = engine.memory_report()
    if optimizer == "host":  # one per parameter
        assert report["master_params"] == 4 * sum(p.numel() for p in engine.params)
    else:  # one per chunk, padding included: twice its bf16 bytes
        chunks = sum(report[f"chunks_{tier}"] for tier in ("device", "host", "disk"))
        assert report["master_params"] == 2 * chunks
        # what is stepped (and saved) is fp32, finer than bf16; the parameters are it rounded
        state = engine.full_state_dict()
        owned = list(engine.store.owned())
        masters = torch.cat([piece.tensor.reshape(-1) for piece in owned])
        assert masters.dtype == torch.float32
        assert not torch.equal(masters, masters.bfloat16().float())
        for piece in owned:
            param = state[piece.info.name].reshape(-1)[piece.info.start : piece.info.end]
            assert torch.equal(param, piece.tensor.reshape(-1).bfloat16())


@pytest.mark.parametrize("optimizer", ["host", "device"])
def test_fp16_unscales_the_gradient_chunks(optimizer):
    plain = make_config(micro_batch=1, global_batch=2, dtype="fp16")
    _, want, _ = run(plain)
    cfg = plain.replace(offload={**SMALLEST_CHUNKS, "policy": "auto", "optimizer": optimizer})
    engine, losses, _ = run(cfg.replace(offload={"device_budget_mb": BUDGET_MB}))
    assert engine.scaler is not None
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), rtol=1e-3, atol=0)


@pytest.mark.parametrize(("dtype", "optimizer"), [("fp32", "disk"), ("bf16", "device")])
def test_checkpoint_round_trip_resumes_exactly(tmp_path, dtype, optimizer):
    """Adam's states on disk; or bf16 parameters with fp32 masters on the device, which the
    checkpoint holds (a resume from the rounded parameters would drift)."""
    cfg = config(policy="auto", device_budget_mb=BUDGET_MB, optimizer=optimizer).replace(
        offload={"disk_path": str(tmp_path), "host_budget_mb": 0.05},
        precision={"dtype": dtype},
    )
    batches = global_batches(cfg)
    _, want_losses, want_state = run(cfg)
    first = initialize(build_model(cfg), None, cfg)
    losses = [first.train_step(batch) for batch in batches[:2]]
    layout = first.plan.layout()
    save_checkpoint(tmp_path / "ckpt", 2, first, {"data": {}}, keep=1, layout=layout)
    second = initialize(build_model(cfg), None, cfg)
    load_checkpoint(tmp_path / "ckpt", second, layout)
    losses += [second.train_step(batch) for batch in batches[2:]]
    assert losses == want_losses
    state = second.full_state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in want_state.items())


def test_train_and_resume_through_the_cli(tmp_path, capsys, caplog):
    tiny = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "data.seq_len=16"]
    settings = [
        *tiny,
        "data.max_bytes=20000",
        "train.steps=4",
        "checkpoint.every=2",
        "log.progress=false",
        "precision.dtype=fp32",  # whatever the machine's default: tiny and fast everywhere
        "offload.policy=auto",
        "offload.device_budget_mb=0.42",
        "offload.host_budget_mb=0.05",
        "offload.chunk_search_range_mb=0",
        f"offload.disk_path={tmp_path}",
    ]
    caplog.set_level("INFO", logger="shardwise")
    out = tmp_path / "run"
    code, printed = run_cli(
        ["train", "--nproc", "1", "--out", str(out), *settings_args(settings)], capsys
    )
    assert code == 0, printed
    full = logged_losses(out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(key in record for record in records for key in TIER_KEYS)
    assert (out / "memory.png").is_file()
    step2 = str(out / "checkpoints" / "step_00000002")
    code, printed = run_cli(["train", "--nproc", "1", "--resume", step2], capsys)
    assert code == 0, printed
    again = logged_losses(out)
    assert again == full and len(full) == 4
    summaries = [r.message for r in caplog.records if r.message.startswith("placement auto")]
    assert len(summaries) == 2, "the run and the resumed run each placed after a warm-up"


def test_bf16_chunks_with_masters_on_the_device_through_the_launcher(tmp_path, capsys):
    """`shardwise train` on two ranks (chunks sharded, ZeRO-3's gathers) and on one, bf16
    parameters with fp32 masters on the device: the same losses within the bf16 tolerance."""
    settings = [
        "model.n_layers=1",
        "model.d_model=32",
        "model.n_heads=2",
        "data.seq_len=16",
        "data.max_bytes=20000",
        "train.steps=3",
        "train.global_batch=4",
        "train.micro_batch=2",
        "log.progress=false",
        "precision.dtype=bf16",
        "offload.policy=static",
        "offload.optimizer=device",
        "offload.chunk_search_range_mb=0",
    ]
    losses = {}
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}"
        argv = ["train", "--nproc", str(nproc), "--out", str(out), *settings_args(settings)]
        code, printed = run_cli(argv, capsys)
        assert code == 0, printed
        losses[nproc] = logged_losses(out)
    assert len(losses[2]) == 3
    torch.testing.assert_close(
        torch.tensor(losses[2]), torch.tensor(losses[1]), rtol=BF16_RTOL, atol=0
    )


def test_memory_tiers_place_each_category():
    flat = {"params": 1, "grads": 2, "master_params": 4, "optimizer_states": 8, "buffers": 16}
    flat |= {"offloaded_host": 32, "offloaded_disk": 64}
    assert memory_tiers(flat, "device") == {"device": 31, "host": 32, "disk": 64}
    # offloaded: the optimizer's own state (step counters, host masters) is in host memory
    assert memory_tiers(flat, "disk") == {"device": 23, "host": 40, "disk": 64}
    chunked = {**flat, "chunks_device": 100, "chunks_host": 200, "chunks_disk": 400}
    chunked |= {"grad_chunks_device": 1000, "grad_chunks_host": 2000, "grad_chunks_disk": 4000}
    assert memory_tiers(chunked, "device") == {
        "device": 16 + 8 + 100 + 1000 + 2 + 4,  # buffers, Adam states, chunks, grads, masters
        "host": 32 + 200 + 2000,  # offloaded states, chunks
        "disk": 64 + 400 + 4000,
    }
    assert memory_tiers(chunked, "host") == {
        "device": 16 + 100 + 1000 + 2,
        "host": 32 + 8 + 200 + 2000 + 4,  # the host optimizer's own state and masters
        "disk": 64 + 400 + 4000,
    }


class _HalfUsed(nn.Module):
    """Owns two parameters, computes with one."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Parameter(torch.randn(8, 8))
        self.unused = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.used


def test_hooks_release_a_module_called_twice_and_one_whose_parameter_got_no_gradient():
    model = nn.ModuleDict({"shared": nn.Linear(8, 8), "half_used": _HalfUsed()})
    chunks = build_chunks(list(model.named_parameters()), (8 * 8 + 8) * 4)
    manager = ChunkManager(chunks, "cpu", device_budget=None, host_budget=None)
    for chunk in chunks:
        manager.place(chunk, Tier.DEVICE)
    hooks = ModuleHooks(chunk_sites(model, chunks), chunks, manager)
    x = torch.randn(2, 8, requires_grad=True)
    model["half_used"](model["shared"](model["shared"](x))).sum().backward()
    shared, half = chunks
    assert shared.state is ChunkState.HOLD_AFTER_BWD and shared.users == 0
    assert half.state is ChunkState.COMPUTE, "still waiting for the unused parameter"
    hooks.finish_backward()
    assert half.state is ChunkState.HOLD_AFTER_BWD and half.users == 0
    assert held_chunks(model, chunks) == frozenset()
