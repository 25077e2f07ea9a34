"""1-bit Adam: the compression, the optimizer's formula, its exchange at 2 ranks (bytes, parity
before the freeze, exact resume after it, fp16 loss scales and overflows) and the settings it
refuses; 0/1 Adam, its second policy: the variance's schedule, local steps and their
synchronisation (formula, ranks agreeing bitwise after each, bytes, exact resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shardwise.checkpoint import check_resumable
from shardwise.config import Config
from shardwise.distributed import comm
from shardwise.distributed.comm import CommStats
from shardwise.distributed.compressed import (
    compress_,
    decompress,
    decompress_mean,
    pack_signs,
    packed_bytes,
    unpack_signs,
)
from shardwise.distributed.link import Link
from shardwise.engine import initialize
from shardwise.errors import CheckpointError, ConfigError
from shardwise.optim.onebit import OneBitAdam
from shardwise.optim.zero_one import ZeroOneAdam
from shardwise.run_plan import resolve
from tests.cli_runs import TINY_RUN, train_on_two_ranks
from tests.parity import (
    assert_parity,
    build_model,
    engine_run,
    global_batches,
    make_config,
    reference_run,
    train_then_resume,
)

ONEBIT = {"name": "onebit_adam", "compression_chunk": 64}

# -- compression ------------------------------------------------------------------------------


def _signs(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.signbit(x), -1.0, 1.0)


def test_packed_signs_round_trip():
    x = torch.randn(3, 64)
    x[0, :5] = 0.0  # +0.0 counts as positive, -0.0 as negative
    x[1, :3] = -0.0
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 8)
    assert torch.equal(unpack_signs(packed), _signs(x))
    assert pack_signs(torch.tensor([[-1.0] + [1.0] * 7])).item() == 1  # element 0 in bit 0


@pytest.mark.parametrize(
    "n, chunk",
    [(64, 16), (48, 8), (32, 32), (2 * 131072, 64), (131072 + 3 * 64, 64)],
    ids=["small", "odd-chunk", "one-chunk", "two-pieces", "short-last-piece"],
)
def test_compression_keeps_signs_and_chunk_norms(n, chunk):
    """Also across the compression loop's pieces (131072 columns of 2 rows each)."""
    x = torch.randn(2, n)
    error = x.clone()
    message = compress_(error, chunk)
    assert message.shape == (2, packed_bytes(n, chunk))
    y = decompress(message, n, chunk, torch.empty(2, n))
    assert torch.equal(_signs(y), _signs(x))
    torch.testing.assert_close(y + error, x)  # the error is exactly what was dropped
    torch.testing.assert_close(y.view(2, -1, chunk).norm(dim=-1), x.view(2, -1, chunk).norm(dim=-1))
    # the error is the part of x orthogonal to its signs: smaller than x
    assert torch.all(error.norm(dim=1) < x.norm(dim=1))
    torch.testing.assert_close(decompress_mean(message, n, chunk, torch.empty(n)), y.mean(0))


def test_error_feedback_keeps_the_accumulated_error_bounded():
    """e <- c - C(c), c = g + e: what was sent plus the error left is exactly what arrived,
    and the error stays within a few gradient norms however long it runs."""
    gen = torch.Generator().manual_seed(0)
    error = torch.zeros(1, 256)
    sent_total = torch.zeros(1, 256, dtype=torch.float64)
    grad_total = torch.zeros(1, 256, dtype=torch.float64)
    largest = 0.0
    for _ in range(500):
        grad = torch.randn(1, 256, generator=gen) * torch.linspace(0.01, 1, 256)
        error = grad + error
        sent = decompress(compress_(error, 32), 256, 32, torch.empty(1, 256))
        sent_total += sent.double()
        grad_total += grad.double()
        largest = max(largest, error.norm().item() / grad.norm().item())
    torch.testing.assert_close(sent_total + error.double(), grad_total, atol=1e-3, rtol=0)
    assert largest < 5.0


# -- the optimizer on one rank ----------------------------------------------------------------


@pytest.mark.parametrize("bound", [0.0, 0.5], ids=["unbounded", "bound-0.5"])
def test_one_rank_update_is_adamw_then_frozen_variance_adam(bound):
    cfg = Config().optim.model_copy(
        update={
            "lr": 0.1,
            "betas": (0.9, 0.99),
            "eps": 1e-6,
            "variance_refresh": 0,
            "update_bound": bound,
        }
    )
    clamped = 0
    freeze, decay = 3, 0.05
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(20, generator=gen)
    grads = [torch.randn(20, generator=gen) for _ in range(6)]
    grads[0][:4] = grads[1][:4] = grads[2][:4] = 0.0  # never a gradient in the warm-up

    ours = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.clone())
    onebit = OneBitAdam([{"params": [ours], "weight_decay": decay}], cfg, freeze)
    adamw = torch.optim.AdamW(
        [theirs], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=decay, fused=True
    )
    p, m, v = start.double(), torch.zeros(20, dtype=torch.float64), None
    for step, grad in enumerate(grads, start=1):
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        onebit.step()
        adamw.step()
        assert onebit.frozen == (step >= freeze)
        if step <= freeze:
            torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)
            v = adamw.state[theirs]["exp_avg_sq"].double()
            m = adamw.state[theirs]["exp_avg"].double()
            p = theirs.detach().double()
            continue
        # frozen variance: v and its bias correction stay at step `freeze`; masked momentum
        m = (0.9 * m + 0.1 * grad.double()) * (v > 0)
        denom = (v / (1 - 0.99**freeze)).sqrt() + 1e-6
        update = m / (1 - 0.9**step) / denom
        if bound:  # each element's step at most lr * bound after the freeze
            clamped += int((update.abs() > bound).sum())
            update = update.clamp(-bound, bound)
        p = p * (1 - 0.1 * decay) - 0.1 * update
        torch.testing.assert_close(ours.detach().double(), p, rtol=1e-6, atol=1e-7)
    # the masked momentum: only weight decay moved the elements that had no gradient
    torch.testing.assert_close(ours.detach()[:4], start[:4] * (1 - 0.1 * decay) ** 6)
    assert (clamped > 0) == (bound > 0)  # the bound was reached


def test_variance_refresh_updates_v_every_k_steps_after_the_freeze():
    cfg = Config().optim.model_copy(
        update={"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-6, "variance_refresh": 3}
    )
    param = torch.nn.Parameter(torch.ones(4))
    onebit = OneBitAdam([{"params": [param], "weight_decay": 0.0}], cfg, freeze_step=2)
    compressed, v_seen = [], []
    for step in range(1, 10):
        compressed.append(onebit.frozen)  # whether step `step` travels compressed
        param.grad = torch.full((4,), float(step))
        onebit.step()
        v_seen.append(onebit.state[param]["exp_avg_sq"][0].item())
    # steps 1-2 warm up, then every third step (5, 8) is exact
    assert compressed == [False, False, True, True, False, True, True, False, True]
    v2 = 0.01 * 1 * 0.99 + 0.01 * 4
    v5 = 0.99**3 * v2 + (1 - 0.99**3) * 25
    assert v_seen[2:4] == [pytest.approx(v2)] * 2 and v_seen[4] == pytest.approx(v5)
    assert onebit.param_groups[0]["variance_step"] == 8


def test_frozen_denominators_follow_each_refresh():
    """The frozen steps' kept denominators ([Note: frozen denominators]) give the formula's
    parameters across refreshes, elements without a warm-up gradient masked until a refresh
    gives them a variance; they exist from a frozen step until the next exact one."""
    b1, b2, lr, eps = 0.9, 0.99, 0.1, 1e-6
    cfg = Config().optim.model_copy(
        update={"lr": lr, "betas": (b1, b2), "eps": eps, "variance_refresh": 3, "update_bound": 0}
    )
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(8, generator=gen)
    param = torch.nn.Parameter(start.clone())
    onebit = OneBitAdam([{"params": [param], "weight_decay": 0.0}], cfg, freeze_step=2)
    p, m, v = (
        start.double(),
        torch.zeros(8, dtype=torch.float64),
        torch.zeros(8, dtype=torch.float64),
    )
    variance_step = 0
    for step in range(1, 12):
        grad = torch.randn(8, generator=gen)
        if step <= 2:
            grad[:2] = 0.0  # no gradient in the warm-up: masked until the refresh at step 5
        exact = not onebit.frozen
        param.grad = grad.clone()
        onebit.step()
        m = b1 * m + (1 - b1) * grad.double()
        if exact:
            weight = b2 ** (step - variance_step)
            v, variance_step = weight * v + (1 - weight) * grad.double() ** 2, step
        else:
            m = m * (v > 0)
        denom = (v / (1 - b2**variance_step)).sqrt() + eps
        p = p - lr * m / (1 - b1**step) / denom
        torch.testing.assert_close(param.detach().double(), p, rtol=1e-6, atol=1e-7)
        assert bool(onebit.denominators) == (not exact)
    assert variance_step == 11  # refreshed at 5, 8 and 11


# -- two ranks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_matches_adamw_until_the_freeze(pool2, stage):
    """All five steps are warm-up steps (freeze at 5): exact gradients, AdamW's formula."""
    cfg = make_config(micro_batch=1, global_batch=4, zero_stage=stage).replace(
        optim={**ONEBIT, "freeze_step": 5}, train={"steps": 6}
    )
    want = reference_run(cfg, freeze=True)
    for got in pool2.run(engine_run, cfg, freeze=True):
        assert_parity(got, want, rtol=1e-5)


def _compressed_step_bytes(stage: int) -> tuple[dict, dict, list[float]]:
    """One exact step, then one compressed step under a recorder: recorded wire bytes per op
    and the closed form of [Note: the compressed exchange] for the buckets."""
    cfg = make_config(micro_batch=1, global_batch=2, zero_stage=stage).replace(
        optim={**ONEBIT, "freeze_step": 1}
    )
    engine = initialize(build_model(cfg), None, cfg)
    rank, world = comm.group_rank(None), comm.group_size(None)
    losses = []
    for step, (inputs, targets) in enumerate(global_batches(cfg, steps=3)):
        with CommStats() as stats:
            losses.append(engine.train_step((inputs[rank : rank + 1], targets[rank : rank + 1])))
        if step == 1:
            recorded = {op: stats.total(op=op) for op in ("all_to_all", "all_gather")}
            recorded["all_reduce_payload"] = stats.total("payload_bytes", op="all_reduce")
            recorded["reduce_scatter"] = stats.total(op="reduce_scatter")
    slices = [b.numel // world for b in engine.store.reducer.buckets]
    message = [packed_bytes(n, 64) for n in slices]
    expected = {"all_to_all": sum((world - 1) / world * world * m for m in message)}
    if stage == 0:
        expected["all_gather"] = sum((world - 1) * m for m in message)
    memory = (sum(engine.memory_report().values()), sum(engine.plan.model_state_bytes().values()))
    return recorded, expected, losses, memory


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_compressed_step_sends_the_closed_form_bytes(pool2, stage):
    """... and the planner counts the error buffers (within the buckets' padding)."""
    for recorded, expected, losses, (measured, predicted) in pool2.run(
        _compressed_step_bytes, stage
    ):
        assert measured == pytest.approx(predicted, rel=0.03)
        assert recorded["all_to_all"] == expected["all_to_all"]
        if stage == 0:
            assert recorded["all_gather"] == expected["all_gather"]
        # no gradient travels uncompressed: only the loss and norm scalars are all-reduced
        assert recorded["all_reduce_payload"] <= 8 and recorded["reduce_scatter"] == 0
        assert all(math.isfinite(loss) for loss in losses)


def _momenta_of_a_compressed_step() -> dict:
    """Zero stage 0, one exact step, then a compressed one: what each bucket's exchange was
    given and gave back, and the momenta the step ended with."""
    cfg = make_config(micro_batch=1, global_batch=2).replace(optim={**ONEBIT, "freeze_step": 1})
    engine = initialize(build_model(cfg), None, cfg)
    rank = comm.group_rank(None)
    batches = global_batches(cfg, steps=2)
    engine.train_step(tuple(t[rank : rank + 1] for t in batches[0]))  # exact
    optimizer, groups = engine.optimizer, engine.store.shards.groups
    exchange = engine.store.reducer.compression
    launch, given, averaged, expected = exchange.launch, [], [], []

    def recording_launch(index, local, out, scaled=True):
        owned = groups[index]
        want = torch.zeros_like(local)
        for piece in owned.pieces:
            m = optimizer.state[piece.param]["exp_avg"].flatten()
            mine = want[piece.offset : piece.offset + piece.numel]
            torch.lerp(m, piece.param.grad.flatten(), 0.1, out=mine)
        expected.append(want)  # b1 m + (1 - b1) g on this rank's own gradient (b1 = 0.9)
        given.append((local.clone(), scaled))
        averaged.append(out)
        return launch(index, local, out, scaled)

    exchange.launch = recording_launch
    with CommStats() as stats:
        engine.train_step(tuple(t[rank : rank + 1] for t in batches[1]))
    momenta = [
        torch.cat([optimizer.state[p.param]["exp_avg"].flatten() for p in owned.pieces])
        for owned in groups
    ]
    return {
        "given_is_local_momentum": all(
            torch.equal(g, w) for (g, _), w in zip(given, expected, strict=True)
        ),
        "unscaled": not any(scaled for _, scaled in given),
        "given": torch.cat([g for g, _ in given]),
        "max_gap": max(
            (m - a[: m.numel()]).abs().max().item() for m, a in zip(momenta, averaged, strict=True)
        ),
        "params": torch.cat([p.detach().flatten() for p in engine.params]),
        "all_reduce_payload": stats.total("payload_bytes", op="all_reduce"),
    }


def test_stage0_averages_the_ranks_momenta_compressed(pool2):
    """[Note: compressed momentum]: the exchange averages each rank's momentum on its own
    gradient, the step ends with the average as every rank's momentum, and no gradient
    travels."""
    first, second = pool2.run(_momenta_of_a_compressed_step)
    for result in (first, second):
        assert result["given_is_local_momentum"] and result["unscaled"]
        assert result["max_gap"] < 1e-7  # the average, up to (avg - b1 m) / (1 - b1) rounding
        assert result["all_reduce_payload"] <= 8  # the loss and norm scalars
    assert not torch.equal(first["given"], second["given"])  # gradients stayed local
    assert torch.equal(first["params"], second["params"])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_resumes_exactly_after_the_freeze(pool2, tmp_path, stage):
    """fp32, freeze after step 1, checkpoint at step 2: steps 3 and 4 are bitwise the same
    (error buffers, frozen variance and step count are in the checkpoint)."""
    optim = {**ONEBIT, "freeze_step": 1}
    for full, resumed in pool2.run(train_then_resume, str(tmp_path), stage, "fp32", optim=optim):
        assert resumed == full[2:]
    checkpoint = tmp_path / "checkpoints" / "step_00000004"
    assert (checkpoint / "shards_rank1.bin").is_file()
    layout = json.loads((checkpoint / "manifest.json").read_text())["layout"]
    with pytest.raises(CheckpointError, match="error buffers\\) that only its own layout"):
        check_resumable(checkpoint, 4, layout)
    with pytest.raises(CheckpointError, match="saved with optim.name='onebit_adam'"):
        check_resumable(checkpoint, 2, {**layout, "optimizer": "adamw"})


@pytest.mark.parametrize("stage", [0, 2])
def test_resumes_exactly_with_sequence_parallelism(pool2, tmp_path, stage):
    """sp = 2: the sp ranks average gradients as data-parallel ranks do; at stage 2 they are
    the replicas of one shard, averaged compressed ([Note: 1-bit Adam over replicas])."""
    sections = {"parallel": {"sp": 2}, "attention": {"sequence_parallel": "ring"}}
    optim = {**ONEBIT, "freeze_step": 1}
    for full, resumed in pool2.run(
        train_then_resume, str(tmp_path), stage, "fp32", optim=optim, **sections
    ):
        assert resumed == full[2:] and all(math.isfinite(loss) for loss in full)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_resumes_exactly_in_half_precision(pool2, tmp_path, dtype):
    optim = {**ONEBIT, "freeze_step": 1}
    for full, resumed in pool2.run(train_then_resume, str(tmp_path), 2, dtype, optim=optim):
        assert resumed == full[2:] and all(math.isfinite(loss) for loss in full)


def _fp16_error_norm(initial_scale: float) -> float:
    """The worker errors' norm after one exact and one compressed fp16 step."""
    cfg = make_config(micro_batch=1, global_batch=2, zero_stage=1, dtype="fp16").replace(
        optim={**ONEBIT, "freeze_step": 1}, precision={"initial_scale": initial_scale}
    )
    engine = initialize(build_model(cfg), None, cfg)
    rank = comm.group_rank(None)
    for inputs, targets in global_batches(cfg, 2):
        engine.train_step((inputs[rank : rank + 1], targets[rank : rank + 1]))
    errors = engine.store.reducer.compression.worker_errors
    return torch.linalg.vector_norm(torch.cat(errors)).item()


def test_fp16_errors_are_kept_unscaled(pool2):
    """Errors in gradient units: the same whatever the loss scale (to fp16 rounding), not
    16 times larger at a 16 times larger scale."""
    low, high = pool2.run(_fp16_error_norm, 2.0**8), pool2.run(_fp16_error_norm, 2.0**12)
    for a, b in zip(low, high, strict=True):
        assert a > 0 and b == pytest.approx(a, rel=1e-2)


def _overflow_in_a_compressed_step(stage: int) -> tuple[bool, bool, bool, float, tuple]:
    cfg = make_config(micro_batch=1, global_batch=2, zero_stage=stage, dtype="fp16").replace(
        optim={**ONEBIT, "freeze_step": 1}
    )
    engine = initialize(build_model(cfg), None, cfg)
    rank = comm.group_rank(None)
    batches = [(x[rank : rank + 1], y[rank : rank + 1]) for x, y in global_batches(cfg, 3)]
    errors = engine.store.reducer.compression.errors
    engine.train_step(batches[0])  # exact
    engine.train_step(batches[1])  # compressed: errors now hold residues
    had_errors = any(e.any() for e in errors)
    before = [p.detach().clone() for p in engine.params]
    errors_before = [e.clone() for e in errors]
    loss = engine.loss_fn(engine.forward(batches[2][0]), batches[2][1])
    engine.backward(loss * (float("inf") if rank == 1 else 1.0))
    stepped = engine.step()
    unchanged = all(torch.equal(b, p) for b, p in zip(before, engine.params, strict=True))
    restored = all(torch.equal(b, e) for b, e in zip(errors_before, errors, strict=True))
    memory = (sum(engine.memory_report().values()), sum(engine.plan.model_state_bytes().values()))
    return had_errors, stepped, unchanged and restored, engine.train_step(batches[2]), memory


@pytest.mark.parametrize("stage", [0, 2])
def test_fp16_overflow_in_a_compressed_step_skips_it_and_restores_the_errors(pool2, stage):
    """The errors are those before the step (on the rank that overflowed too), and the
    planner counts the copy that restores them."""
    for had_errors, stepped, unchanged_and_restored, next_loss, memory in pool2.run(
        _overflow_in_a_compressed_step, stage
    ):
        assert had_errors and not stepped and unchanged_and_restored
        assert math.isfinite(next_loss)
        measured, predicted = memory
        assert predicted == pytest.approx(measured, rel=0.03)


# -- settings it refuses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"optim": {"freeze_step": 5}}, "optim.freeze_step=5 leaves no compressed step"),
        ({"zero": {"stage": 3}}, "set zero.stage=0, 1 or 2"),
        ({"optim": {"compression_chunk": 10**6}}, "optim.compression_chunk=1000000 is larger"),
        ({"parallel": {"pp": 2, "dp_shard": 1}}, "set parallel.pp=1"),
    ],
)
def test_unsupported_settings_are_one_line_errors(settings, message):
    cfg = make_config(micro_batch=1).replace(optim={"name": "onebit_adam"}, train={"steps": 5})
    with pytest.raises(ConfigError, match=message) as error:
        resolve(cfg.replace(**settings), 2)
    assert "\n" not in str(error.value)


def test_a_given_optimizer_is_refused():
    cfg = make_config(micro_batch=1).replace(optim={"name": "onebit_adam"})
    with pytest.raises(ConfigError, match="builds its own optimizer"):
        resolve(cfg, 1, optimizer_given=True)


def test_freeze_defaults_to_a_fifth_of_the_steps():
    cfg = make_config(micro_batch=1).replace(optim={"name": "onebit_adam"}, train={"steps": 300})
    assert resolve(cfg, 1).optimizer.onebit_freeze == 60


# -- the emulated link --------------------------------------------------------------------------


def test_emulated_link_sends_bytes_one_after_another():
    link = Link(gbps=8.0)  # 1 GB/s: 1e9 bytes take 1 s
    assert link.reserve(1e9, now=10.0) == pytest.approx(11.0)
    assert link.reserve(5e8, now=10.5) == pytest.approx(11.5)  # queued behind the first
    assert link.reserve(1e9, now=20.0) == pytest.approx(21.0)  # the link was idle
    assert Link().reserve(1e9, now=0.0) is None


def test_trains_on_two_ranks_through_the_launcher_from_a_deepspeed_config(tmp_path, capsys):
    """The launcher path (exact resume is checked in the pool above, at every stage), with
    DeepSpeed's 1-bit Adam example (docs/_pages/config-json.md; freeze_step shortened): the
    global batch of 8 takes two micro-batches of 2 on each of the 2 ranks."""
    example = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {
            "type": "OneBitAdam",
            "params": {
                "lr": 0.001,
                "betas": [0.8, 0.999],
                "eps": 1e-8,
                "weight_decay": 3e-7,
                "freeze_step": 1,
                "cuda_aware": False,
                "comm_backend_name": "nccl",
            },
        },
    }
    shows = "1-bit Adam: AdamW for 1 steps, then momenta at 1 bit"
    out = _train_from_deepspeed_config(tmp_path, capsys, example, 4, shows)
    resolved = Config.from_file(out / "config.toml")
    assert (resolved.train.global_batch, resolved.optim.variance_refresh) == (8, 0)


def _train_from_deepspeed_config(tmp_path, capsys, example: dict, steps: int, shows: str):
    """`shardwise train --nproc 2` with DeepSpeed config `example` for `steps` steps: finite
    losses, and the final checkpoint holds each rank's error buffers; the run's folder."""
    ds_config = tmp_path / "deepspeed.json"
    ds_config.write_text(json.dumps(example))
    settings = [*TINY_RUN, f"train.steps={steps}", "optim.compression_chunk=32"]
    out = tmp_path / "run"
    options = ["--deepspeed-config", str(ds_config)]
    losses = train_on_two_ranks(out, settings, capsys, shows, options)
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses)
    final = out / "checkpoints" / f"step_{steps:08d}"
    assert sorted(p.name for p in final.glob("shards*")) == ["shards_rank0.bin", "shards_rank1.bin"]
    return out


# -- 0/1 Adam -----------------------------------------------------------------------------------

ZERO_ONE = {"name": "zero_one_adam", "compression_chunk": 64}
LOCAL_STEPS = {"sync_interval_doubles_after": 1, "sync_interval_max": 4}
"""Synchronisations 1, 2, 4, 4 ... local steps apart."""


def test_zero_one_schedules_the_variance_and_the_synchronisations():
    cfg = Config().optim.model_copy(
        update={
            "variance_gap_doubles_after": 2,
            "sync_interval_doubles_after": 2,
            "sync_interval_max": 4,
        }
    )
    optimizer = ZeroOneAdam([torch.nn.Parameter(torch.ones(2))], cfg, freeze_step=12)
    # gaps 1, 1, 2, 2, 4, 4 ... up to the freeze
    assert [s for s in range(1, 30) if optimizer._exact(s)] == [1, 2, 4, 6, 10]
    due = []
    for step in range(13, 30):
        optimizer.param_groups[0]["step"] = step
        due.append(optimizer.sync_due)
    # intervals 1, 1, 2, 2, 4, 4, 4 ... (steps after the freeze: 1, 2, 4, 8, 12, 16)
    assert [13 + i for i, d in enumerate(due) if d] == [13, 14, 16, 20, 24, 28]


def test_zero_one_local_steps_and_synchronisation_follow_the_formula():
    """Two ranks emulated in one process, their synchronisation averaged exactly (the
    compressed exchange is the engine's, tested below): before the freeze both step on the
    same gradients; after it each on its own, and a synchronisation leaves both with the
    mean of their parameters and the momentum that moves the last synchronised parameters
    there at the interval's learning rates ([Note: 0/1 Adam's synchronisation])."""
    b1, b2, lr, eps, decay, freeze = 0.9, 0.99, 0.05, 1e-6, 0.1, 4
    cfg = Config().optim.model_copy(
        update={
            "lr": lr,
            "betas": (b1, b2),
            "eps": eps,
            "update_bound": 0,
            "variance_gap_doubles_after": 2,
            "sync_interval_doubles_after": 1,
            "sync_interval_max": 4,
        }
    )
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(24, generator=gen)
    params = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    optimizers = [
        ZeroOneAdam([{"params": [p], "weight_decay": decay}], cfg, freeze) for p in params
    ]
    p = [start.double()] * 2
    m = [torch.zeros(24, dtype=torch.float64)] * 2
    v = torch.zeros(24, dtype=torch.float64)
    synced, variance_step, lr_sum, shrink, syncs = None, 0, 0.0, 1.0, 0
    for step in range(1, 16):
        grads = [torch.randn(24, generator=gen) for _ in range(2)]
        for g in grads:
            g[:3] = 0.0  # never a gradient: masked after the warm-up, decay only
        if step <= freeze:  # one averaged gradient for both (the exchange's job)
            grads = [(grads[0] + grads[1]) / 2] * 2
        exact = optimizers[0]._exact(step)
        for param, optimizer, grad in zip(params, optimizers, grads, strict=True):
            param.grad = grad.clone()
            optimizer.step()
        if exact:
            weight = b2 ** (step - variance_step)
            v, variance_step = weight * v + (1 - weight) * grads[0].double() ** 2, step
        denom = (v / (1 - b2**variance_step)).sqrt() + eps
        scale = 1 / (1 - b1**step)
        for r in range(2):
            m[r] = b1 * m[r] + (1 - b1) * grads[r].double()
            if step >= optimizers[0].stale_from and not exact:
                m[r] = m[r] * (v > 0)
            p[r] = p[r] * (1 - lr * decay) - lr * scale * m[r] / denom
        if step == freeze:
            synced = p[0]
        if step > freeze:
            lr_sum, shrink = lr_sum + lr * scale, shrink * (1 - lr * decay)
        if optimizers[0].sync_due:
            averaged = {}
            for param, optimizer in zip(params, optimizers, strict=True):
                averaged[param] = (optimizer.synced[param] - param.detach()).double()
            mean = (averaged[params[0]] + averaged[params[1]]).float() / 2
            for param, optimizer in zip(params, optimizers, strict=True):
                optimizer.synchronise({param: mean.clone()})
                optimizer.synchronised()
            p = [(p[0] + p[1]) / 2] * 2
            m = [(shrink * synced - p[0]) * denom / lr_sum * (v > 0)] * 2
            synced, lr_sum, shrink, syncs = p[0], 0.0, 1.0, syncs + 1
        for r in range(2):
            torch.testing.assert_close(params[r].detach().double(), p[r], rtol=1e-5, atol=1e-6)
            state = optimizers[r].state[params[r]]
            torch.testing.assert_close(state["exp_avg"].double(), m[r], rtol=1e-4, atol=1e-6)
    assert syncs == 4  # at steps 5, 6, 8 and 12: intervals 1, 2, 4, 4 after the freeze
    torch.testing.assert_close(params[0].detach()[:3], start[:3] * (1 - lr * decay) ** 15)


def test_zero_one_synchronises_an_interval_at_a_learning_rate_of_zero():
    """A schedule that ends at lr 0 (optim.min_lr_ratio = 0): the interval moved nothing, so
    the momentum is zero, not 0 / 0; the step still counts as one to synchronise."""
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = ZeroOneAdam([param], Config().optim, freeze_step=1)
    for lr in (0.1, 0.0):
        optimizer.param_groups[0]["lr"] = lr
        param.grad = torch.full((4,), 0.5)
        optimizer.step()
    assert optimizer.unsynced and optimizer.sync_due
    optimizer.synchronise({param: (optimizer.synced[param] - param).detach()})
    optimizer.synchronised()
    assert not optimizer.unsynced
    assert torch.equal(optimizer.state[param]["exp_avg"], torch.zeros(4))
    assert torch.isfinite(param).all()


def test_zero_one_matches_adamw_while_it_updates_the_variance(pool2):
    """Steps 1-5 each update the variance (the first gap is 1 for 8 updates): exact
    gradients, AdamW's formula."""
    cfg = make_config(micro_batch=1, global_batch=4).replace(
        optim={**ZERO_ONE, "freeze_step": 5, "variance_gap_doubles_after": 8},
        train={"steps": 6},
    )
    want = reference_run(cfg, freeze=True)
    for got in pool2.run(engine_run, cfg, freeze=True):
        assert_parity(got, want, rtol=1e-5)


def _zero_one_steps() -> tuple[list, list, tuple]:
    """Steps 1 and 3 update the variance, step 2 is compressed, then local steps synchronised
    after steps 4, 5 and 7 (intervals 1, 2, 4): per step, whether the ranks' parameters are
    bitwise the same (and finite), whether it synchronised, the bytes of the step's
    collectives, and the errors' size when the step's exchange began (if it had one)."""
    cfg = make_config(micro_batch=1, global_batch=2).replace(
        optim={**ZERO_ONE, **LOCAL_STEPS, "freeze_step": 3, "variance_gap_doubles_after": 1},
        train={"steps": 8},
    )
    engine = initialize(build_model(cfg), None, cfg)
    rank, world = comm.group_rank(None), comm.group_size(None)
    exchange = engine.store.reducer.compression
    launch, errors_at_launch = exchange.launch, []

    def recording_launch(*args, **kwargs):
        errors_at_launch.append(sum(e.abs().sum().item() for e in exchange.errors))
        return launch(*args, **kwargs)

    exchange.launch = recording_launch
    steps = []
    for inputs, targets in global_batches(cfg, steps=8):
        errors_at_launch.clear()
        with CommStats() as stats:
            engine.train_step((inputs[rank : rank + 1], targets[rank : rank + 1]))
        sent = {op: stats.total(op=op) for op in ("all_to_all", "all_gather")}
        sent["all_reduce_payload"] = stats.total("payload_bytes", op="all_reduce")
        mine = torch.cat([p.detach().flatten() for p in engine.params])
        everyone = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(everyone, mine)
        same = all(torch.equal(everyone[0], other) for other in everyone)
        finite = bool(torch.isfinite(mine).all())
        errors = errors_at_launch[0] if errors_at_launch else None
        steps.append(((same, finite), engine.optimizer.sync_due, sent, errors))
    slices = [b.numel // world for b in engine.store.reducer.buckets]
    message = [packed_bytes(n, 64) for n in slices]
    closed_form = {
        "all_to_all": sum((world - 1) / world * world * m for m in message),
        "all_gather": sum((world - 1) * m for m in message),
    }
    memory = (sum(engine.memory_report().values()), sum(engine.plan.model_state_bytes().values()))
    return steps, closed_form, memory


def test_zero_one_ranks_agree_after_each_synchronisation_and_local_steps_send_nothing(pool2):
    """... a compressed step and a synchronisation send the exchange's closed form, the
    first synchronisation starts from zero errors (they held gradients until then), and
    the plan counts the kept parameters and the errors."""
    for steps, closed_form, (measured, predicted) in pool2.run(_zero_one_steps):
        assert [due for _, due, _, _ in steps] == [False] * 3 + [True, True, False, True, False]
        for step, ((same, finite), due, sent, _) in enumerate(steps, start=1):
            assert finite
            if step in (1, 3):  # exact gradients
                assert same and sent["all_reduce_payload"] > 8
                continue
            assert sent["all_reduce_payload"] <= 4  # only the loss travels uncompressed
            compressed = step == 2 or due
            assert same == compressed  # local steps: each rank on its own gradient
            want = closed_form if compressed else {"all_to_all": 0, "all_gather": 0}
            assert {op: sent[op] for op in want} == want
        errors = [e for _, _, _, e in steps]
        assert errors[:6] == [None, 0.0, None, 0.0, errors[4], None] and errors[4] > 0
        assert measured == pytest.approx(predicted, rel=0.03)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero_one_resumes_exactly_in_the_middle_of_a_local_interval(pool2, tmp_path, dtype):
    """Local steps from step 2, synchronised after steps 2, 3 and 5; the save at step 4
    synchronises first (in the uninterrupted run as well), so steps 5 and 6 are bitwise
    the same (bf16: the fp32 masters synchronise, the parameters are their copies)."""
    optim = {**ZERO_ONE, **LOCAL_STEPS, "freeze_step": 1}
    for full, resumed in pool2.run(
        train_then_resume, str(tmp_path), 0, dtype, steps=6, every=4, optim=optim
    ):
        assert len(full) == 6 and resumed == full[4:]
        assert all(math.isfinite(loss) for loss in full)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"zero": {"stage": 1}}, "set zero.stage=0 \\(local steps"),
        ({"precision": {"dtype": "fp16"}}, "set precision.dtype='bf16' or 'fp32'"),
        ({"parallel": {"tp": 2, "dp_shard": 1}}, "set parallel.tp=1"),
        ({"optim": {"variance_refresh": 5}}, "optim.variance_refresh is 1-bit Adam's"),
        ({"optim": {"freeze_step": 5}}, "optim.freeze_step=5 leaves no compressed step"),
    ],
)
def test_zero_one_unsupported_settings_are_one_line_errors(settings, message):
    cfg = make_config(micro_batch=1).replace(optim={"name": "zero_one_adam"}, train={"steps": 5})
    with pytest.raises(ConfigError, match=message) as error:
        resolve(cfg.replace(**settings), 2)
    assert "\n" not in str(error.value)


def test_zero_one_trains_on_two_ranks_through_the_launcher_from_a_deepspeed_config(
    tmp_path, capsys
):
    """DeepSpeed's ZeroOneAdam params under their names; local steps from step 3, the
    final save synchronises (its per-rank error buffers are in the checkpoint)."""
    example = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {
            "type": "ZeroOneAdam",
            "params": {
                "lr": 1e-3,
                "var_freeze_step": 2,
                "var_update_scaler": 1,
                "local_step_scaler": 1,
                "local_step_clipper": 2,
                "cuda_aware": False,
            },
        },
    }
    shows = "0/1 Adam: until step 2 the variance updated at gaps doubling every 1 updates"
    _train_from_deepspeed_config(tmp_path, capsys, example, 6, shows)
