"""Pipeline parallelism against the single-process reference (tests/parity.py).

Every rank of a pipeline trains on its data-parallel rank's rows; the stages together hold
the model, so the final weights are the union of every rank's (a tied embedding is held by
the first and the last stage alike, and they must agree).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from shardwise.accelerator import Accelerator
from shardwise.distributed.comm import CommStats
from shardwise.distributed.dims import ParallelDims
from shardwise.engine import Engine, initialize
from shardwise.errors import ConfigError, TrainingError
from shardwise.models import spec_of
from shardwise.pipeline import runtime
from shardwise.pipeline.costs import profile_parts
from shardwise.planner import predict
from shardwise.run_plan import meta_model, resolve
from shardwise.zero.store import FlatStore
from tests.cli_runs import logged_losses, run_cli, train_on_two_ranks
from tests.parity import (
    BF16_RTOL,
    assert_parity,
    build_model,
    global_batches,
    make_config,
    reference_run,
    train_then_resume,
)
from tests.sequence_parallel.test_model import SP_PARAM_RTOL
from tests.tensor_parallel.test_gpt_parity import tp_engine_run

FP16_RTOL = 5e-3
"""Losses of the tiny GPT in fp16 (10 mantissa bits) against fp32, over 5 steps."""
LAYERS = 8
"""Enough blocks for 8 virtual stages (pp=4 x 2 chunks)."""


def config(pp: int, schedule: str, chunks: int = 1, global_batch: int = 4, **parallel):
    return make_config(micro_batch=1, global_batch=global_batch).replace(
        model={"n_layers": LAYERS},
        parallel={"pp": pp, **parallel},
        pipeline={"schedule": schedule, "chunks": chunks},
    )


def pipeline_run(cfg) -> tuple[list[float], dict]:
    """On every rank: train this data-parallel rank's rows; losses and the whole model's
    weights (the union of every stage's)."""
    losses, merged, _ = _trained_and_merged(cfg)
    return losses, merged


def _trained_and_merged(cfg, poisoned: int | None = None) -> tuple[list[float], dict, Engine]:
    """`pipeline_run`, and the engine; see `fp16_pipeline_run` for `poisoned`. Sequence-
    parallel ranks read the same rows (the engine cuts each one's part)."""
    dims = ParallelDims.from_config(cfg.parallel, dist.get_world_size())
    mesh = dims.build_mesh("cpu")
    engine = initialize(build_model(cfg), None, cfg, mesh=mesh)
    if dist.get_rank() == poisoned:
        _poison_first_block_gradient(engine)
    held = _full_gradients_left(engine) if engine.plan.sharding.grads else None
    dp, rank = dims.dp, dims.dp_rank(mesh)
    losses = []
    for inputs, targets in global_batches(cfg):
        rows = inputs.shape[0] // dp
        part = slice(rank * rows, (rank + 1) * rows)
        losses.append(engine.train_step((inputs[part], targets[part])))
    if engine.plan.tiered:  # a stage whose chunks all fit the budget keeps them
        moved = torch.tensor(float(engine.memory_report()["chunks_host"]))
        dist.all_reduce(moved)
        assert moved > 0, "no chunk left the device on any rank"
    if held:  # no stage's gradients wait for another's backward ([Note: launch order])
        assert max(held) == 0, f"{max(held)} bytes of full-size gradients outlived a backward"
    if engine.plan.sharding.params:  # this rank keeps its shard of its stage's parameters
        whole = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        assert engine.memory_report()["params"] < 0.6 * whole
    mine = {k: v.float() for k, v in engine.full_state_dict().items()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    merged = {}
    for state in every:
        for name, tensor in state.items():
            if name in merged:  # a tied weight, or a data-parallel replica's copy
                assert torch.equal(merged[name], tensor), f"copies of {name} differ"
            merged[name] = tensor
    return losses, merged, engine


def _full_gradients_left(engine: Engine) -> list[int]:
    """Bytes of the flat store's full-size gradient buffers alive after each backward (filled
    as training goes; empty for the chunk store)."""
    store, held = engine.store, []
    if not isinstance(store, FlatStore):
        return held
    after = store.after_backward

    def counted(sync: bool) -> None:
        after(sync)
        buffers = [b.grads for b in store.reducer.buckets if b.grads is not None]
        held.append(sum(g.numel() * g.element_size() for g in buffers))

    store.after_backward = counted
    return held


CASES = {
    "gpipe": {"schedule": "gpipe"},
    "1f1b": {"schedule": "1f1b"},
    "interleaved": {"schedule": "interleaved_1f1b", "chunks": 2},
    "zb_h1": {"schedule": "zb_h1"},
    "zbv": {"schedule": "zbv", "chunks": 2},
}


def _pipeline_run_receiving_where_waited(cfg) -> tuple[list[float], dict]:
    """`pipeline_run` as on NCCL: each receive posted where the schedule waits for it."""
    original = runtime.get_accelerator
    runtime.get_accelerator = lambda: Accelerator(device_type="cpu", backend="nccl")
    try:
        return pipeline_run(cfg)
    finally:
        runtime.get_accelerator = original


def test_receives_posted_where_waited_match_single_process(pool2):
    """The runtime's other receive path ([Note: receives posted ahead]: gloo posts ahead)."""
    cfg = config(2, "1f1b")
    want = reference_run(cfg)
    for got in pool2.run(_pipeline_run_receiving_where_waited, cfg):
        assert_parity(got, want, rtol=1e-5)


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_every_schedule_matches_single_process(request, pp, case):
    cfg = config(pp, **CASES[case])
    want = reference_run(cfg)
    for got in request.getfixturevalue(f"pool{pp}").run(pipeline_run, cfg):
        assert_parity(got, want, rtol=1e-5)
        assert set(got[1]) == set(want[1]), "every parameter lives on some stage"


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_hugging_face_models_match_single_process(pool2, preset):
    """GPT-2 (tied head, learned positions) and LLaMA (rotary tables on every stage) cut
    through their specs' `PipelineCalls`, their modules untouched."""
    cfg = make_config(micro_batch=1, global_batch=4).replace(
        model={"name": "hf", "hf_config": preset},
        parallel={"pp": 2},
        pipeline={"schedule": "1f1b", "partition": "flops"},
    )
    want = reference_run(cfg)
    for got in pool2.run(pipeline_run, cfg):
        assert_parity(got, want, rtol=1e-5)
        assert set(got[1]) == set(want[1]), "every parameter lives on some stage"


def test_a_split_by_flops_matches_single_process(pool2):
    """A vocabulary of 4096 makes the tied head cost ~10 of the 8 blocks: ``partition="flops"``
    gives the last stage one block, and every rank runs the plan's split."""
    cfg = config(2, "1f1b").replace(model={"vocab_size": 4096}, pipeline={"partition": "flops"})
    assert resolve(cfg, 2).pipeline_split == (range(0, 7), range(7, 8))
    want = reference_run(cfg)
    for got in pool2.run(pipeline_run, cfg):
        assert_parity(got, want, rtol=1e-5)


def _timed_split(cfg) -> tuple[tuple[range, ...], list[float]]:
    """This rank's resolved split, and its profile of the blocks' times."""
    model = meta_model(cfg)
    spec = spec_of(model)
    blocks = [block for _, block in spec.named_blocks(model, "a test")]
    profile = profile_parts(spec, model, blocks, (1, 16), torch.float32)
    return resolve(cfg, 2).pipeline_split, [b.seconds for b in profile.blocks]


def test_a_split_by_measured_time_is_rank_zeros_everywhere_and_matches_single_process(pool2):
    """Each rank times the blocks itself (no two timings alike), and takes rank 0's."""
    cfg = config(2, "1f1b").replace(pipeline={"partition": "time"})
    (split, seconds), (other_split, other_seconds) = pool2.run(_timed_split, cfg)
    assert split == other_split and seconds == other_seconds
    want = reference_run(cfg)
    for got in pool2.run(pipeline_run, cfg):
        assert_parity(got, want, rtol=1e-5)


@pytest.mark.parametrize(
    ("stage", "schedule"),
    [
        (0, "1f1b"),
        (1, "1f1b"),
        (2, "1f1b"),
        (3, "1f1b"),
        (2, "interleaved_1f1b"),
        (3, "interleaved_1f1b"),
    ],
)
def test_two_stages_times_two_replicas_match_single_process(pool4, stage, schedule):
    """pp=2 x dp=2, replicated or with Adam's states, gradients and parameters sharded over
    dp (ZeRO 1-3; at stage 3 each stage's blocks, embedding, final norm and head are units
    of their own, gathered around their calls); the tied weight's gradient is summed whole
    over its two stages either way. At stage 2 every backward reduce-scatters the buckets of
    the stage it ran through (an interleaved rank's two stages share no bucket), so no
    full-size gradient outlives it (`_trained_and_merged` checks)."""
    cfg = config(2, schedule, global_batch=8, dp_shard=2).replace(zero={"stage": stage})
    if schedule == "interleaved_1f1b":
        cfg = cfg.replace(pipeline={"chunks": 2})
    want = reference_run(cfg)
    for got in pool4.run(pipeline_run, cfg):
        assert_parity(got, want, rtol=1e-5)


AUTO = {"policy": "auto", "device_budget_mb": 2.0, "chunk_search_range_mb": 0}
"""Parameter chunks placed from a traced step, under a budget that moves some of them (with
a hidden width of 128: at 32 the tiny model's activations outweigh its parameters)."""
STATIC = {"policy": "static", "param_device_fraction": 0.0, "chunk_search_range_mb": 0}
"""Every parameter chunk streamed from host memory."""


@pytest.mark.parametrize(
    ("world", "stage", "offload"),
    [(4, 0, AUTO), (4, 2, STATIC), (2, 0, AUTO)],
    ids=["pp2-dp2-zero3-auto", "pp2-dp2-zero2-static", "pp2-auto"],
)
def test_two_stages_with_parameter_chunks_match_single_process(request, world, stage, offload):
    """`offload.policy` per stage: each stage's chunks (sharded over dp, gathered around
    their use at ZeRO-3; whole on each rank at ZeRO-2) in execution order from a forward of
    the stage alone; the tied weight's pieces, wherever each stage's chunks put them, summed
    over the two stages."""
    cfg = config(2, "1f1b", global_batch=8, dp_shard=world // 2)
    cfg = cfg.replace(zero={"stage": stage}, offload=offload, model={"d_model": 128})
    want = reference_run(cfg)
    for got in request.getfixturevalue(f"pool{world}").run(pipeline_run, cfg):
        assert_parity(got, want, rtol=1e-5)


@pytest.mark.parametrize(
    ("kind", "schedule"), [("ring", "1f1b"), ("ulysses", "1f1b"), ("ring", "zb_h1")]
)
def test_two_stages_times_two_sequence_parallel_ranks_match_single_process(pool4, kind, schedule):
    """pp=2 x sp=2: every stage takes its rank's part of each sequence and its positions;
    the first embeds that part, the last's loss reads the same part of the targets."""
    cfg = config(2, schedule, sp=2).replace(attention={"sequence_parallel": kind})
    want = reference_run(cfg)
    for got in pool4.run(pipeline_run, cfg):
        assert_parity(got, want, rtol=1e-5, param_rtol=SP_PARAM_RTOL)


@pytest.mark.parametrize("schedule", ["1f1b", "zb_h1"])
def test_two_stages_times_two_tensor_parallel_ranks_match_single_process(pool4, schedule):
    """pp=2 x tp=2 (1D, the tied embedding vocabulary-parallel on both stages): each rank's
    shards against the reference's split by the same plan; together the ranks hold every
    parameter."""
    cfg = config(2, schedule, tp=2)
    held = pool4.run(tp_engine_run, cfg, 4)
    assert set().union(*held) == set(reference_run(cfg)[1])


def test_two_stages_times_megatron_sequence_parallel_ranks_match_single_process(pool4):
    """pp=2 x tp=2 with Megatron-SP: each rank passes its sequence block of the hidden
    states to the next stage (the receive expected whole sequences, and training failed
    after launch)."""
    cfg = config(2, "1f1b", tp=2, tp_sequence_parallel=True)
    held = pool4.run(tp_engine_run, cfg, 4)
    assert set().union(*held) == set(reference_run(cfg)[1])


def _pipeline_sends_of_one_step(cfg) -> float:
    engine = initialize(build_model(cfg), None, cfg)
    inputs, targets = global_batches(cfg, 1)[0]
    with CommStats() as stats:
        engine.train_step((inputs, targets))
    return stats.total(axis="pp", op="send")


def test_planned_stage_sends_are_this_ranks_share(pool4):
    """`shardwise plan`'s bytes sent between stages count each rank's share of the hidden
    states (here its sequence block under Megatron-SP), as the runtime sends them."""
    cfg = config(2, "1f1b", tp=2, tp_sequence_parallel=True)
    sent = pool4.run(_pipeline_sends_of_one_step, cfg)
    predicted = predict(resolve(cfg, 4)).wire["pp"]["send"]
    # the plan counts a middle stage, which sends both ways; of two stages each sends one way
    assert sent == [predicted / 2] * 4


def test_two_stages_times_a_two_dimensional_grid_match_single_process(pool8):
    """pp=2 x tp=4 in 2D (q = 2, 8 ranks): each rank passes its batch and hidden block to the
    rank of the same grid position on the next stage; parity per shard. Two blocks, as in the
    2D tests without stages: with eight, 2D alone (no stages) already differs from the
    reference by up to 3.5e-4 after five steps, beyond `TP_PARAM_RTOL` for the reasons it
    gives."""
    cfg = config(2, "1f1b", tp=4, tp_mode="2d").replace(
        model={"n_layers": 2}, train={"micro_batch": 2}
    )
    held = pool8.run(tp_engine_run, cfg, 8)
    assert set().union(*held) == set(reference_run(cfg)[1])


def test_three_d_hybrid_of_pipeline_tensor_and_zero_one_data_parallel(pool8):
    """pp=2 x tp=2 x dp=2 at zero.stage 1 (8 ranks, the tiny model): parity per shard."""
    cfg = config(2, "1f1b", global_batch=8, tp=2, dp_shard=2).replace(zero={"stage": 1})
    held = pool8.run(tp_engine_run, cfg, 8)
    assert set().union(*held) == set(reference_run(cfg)[1])


def _poison_first_block_gradient(engine: Engine) -> None:
    """The first gradient of one of this rank's blocks' weights becomes inf."""
    weight = next(p for name, p in engine.model.named_parameters() if name.startswith("blocks"))
    hits = []

    def overflow(grad: torch.Tensor) -> torch.Tensor:
        hits.append(1)
        return torch.full_like(grad, float("inf")) if len(hits) == 1 else grad

    weight.register_hook(overflow)


def fp16_pipeline_run(cfg, poisoned: int | None) -> tuple[list[float], dict, float, int]:
    """`pipeline_run` in fp16; on rank `poisoned` the first gradient of one of its blocks'
    weights is made inf (an overflow only that stage sees). Also the loss scale and the
    skipped steps."""
    losses, merged, engine = _trained_and_merged(cfg, poisoned)
    return losses, merged, engine.scaler.scale, engine.scaler.skipped_steps


def test_fp16_stages_skip_together_on_an_overflow_one_stage_sees(pool2):
    """fp16 over two stages: the overflow flag is summed over the pipeline axis, so a step
    whose gradients overflow on the first stage only is skipped on both (the tied weight's
    copies stay equal, `_trained_and_merged` checks); without overflow the losses follow the
    fp32 reference within fp16's rounding."""
    cfg = config(2, "1f1b").replace(precision={"dtype": "fp16"})
    want, _ = reference_run(config(2, "1f1b"))
    for losses, _, _, skipped in pool2.run(fp16_pipeline_run, cfg, None):
        assert skipped == 0
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), rtol=FP16_RTOL, atol=0)
    runs = pool2.run(fp16_pipeline_run, cfg, 0)
    assert [run[3] for run in runs] == [1, 1]  # step 1 skipped by both stages
    assert runs[0][2] == runs[1][2]  # one loss scale
    assert runs[0][0] == runs[1][0]


def test_bf16_stages_keep_the_tied_weight_equal(pool2):
    """bf16 parameters reduce in fp32 (another buffer than ``.grad``): the tied weight's two
    copies must sum the reduced gradients, or they drift apart (pipeline_run compares them)."""
    cfg = config(2, "1f1b").replace(precision={"dtype": "bf16"})
    want, _ = reference_run(config(2, "1f1b"))
    for losses, _ in pool2.run(pipeline_run, cfg):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), rtol=BF16_RTOL, atol=0)


def test_two_stages_resume_exactly(pool2, tmp_path):
    """bf16 (fp32 reduction): a resume from step 2 repeats steps 3 and 4 bitwise; the
    tied weight's two copies must stay equal for it (see the test above)."""
    sections = {"parallel": {"pp": 2}, "pipeline": {"schedule": "1f1b"}}
    for full, resumed in pool2.run(train_then_resume, str(tmp_path), 0, "bf16", **sections):
        assert resumed == full[2:]


@pytest.mark.parametrize(
    ("stage", "parallel"),
    [
        (2, {"pp": 2, "dp_shard": 2}),
        (0, {"pp": 2, "tp": 2}),
        (0, {"pp": 2, "tp": 2, "tp_sequence_parallel": True}),
    ],
    ids=["pp2-dp2-zero2", "pp2-tp2", "pp2-tp2-megatron-sp"],
)
def test_hybrid_stages_resume_exactly(pool4, tmp_path, stage, parallel):
    """bf16, 4 ranks: the hybrids' per-stage checkpoints (ZeRO-2 slices of the tied weight's
    own bucket; tp shards of both stages) resume steps 3 and 4 bitwise."""
    sections = {"parallel": parallel, "pipeline": {"schedule": "1f1b"}}
    for full, resumed in pool4.run(train_then_resume, str(tmp_path), stage, "bf16", **sections):
        assert resumed == full[2:]


def held_names(cfg) -> list[str]:
    engine = initialize(build_model(cfg), None, cfg)
    return sorted(name for name, _ in engine.model.named_parameters())


def whole_model_call(cfg) -> str:
    engine = initialize(build_model(cfg), None, cfg)
    inputs, _ = global_batches(cfg)[0]
    try:
        engine.forward(inputs)
    except TrainingError as err:
        return str(err)
    return "no error"


def test_calling_the_cut_model_as_a_whole_is_one_line(pool2):
    for message in pool2.run(whole_model_call, config(2, "1f1b")):
        assert "cut into pipeline stages" in message and "engine.train_step" in message


def test_each_rank_holds_only_its_stages(pool2):
    first, last = pool2.run(held_names, config(2, "1f1b"))
    assert "embed.weight" in first and "norm_f.weight" not in first
    assert "norm_f.weight" in last and "embed.weight" in last, "the tied weight on both"
    assert {n.split(".")[1] for n in first if n.startswith("blocks.")} == {"0", "1", "2", "3"}
    assert {n.split(".")[1] for n in last if n.startswith("blocks.")} == {"4", "5", "6", "7"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": {"n_layers": 2}, "parallel": {"pp": 4}}, "4 pipeline stages need at least 4"),
        (
            {"parallel": {"pp": 2}, "zero": {"stage": 3}, "pipeline": {"schedule": "zbv"}},
            "computes weight gradients in a pass of their own",
        ),
        (
            {"parallel": {"pp": 2}, "offload": {"policy": "static"}}
            | {"pipeline": {"schedule": "zb_h1"}},
            "after offload.policy='static' has released the chunks",
        ),
        ({"parallel": {"pp": 3}}, "divisible|does not divide|world"),
        (
            {"parallel": {"pp": 2}, "pipeline": {"schedule": "zb_h1"}}
            | {"train": {"activation_checkpointing": "full"}},
            "splits each backward into an input pass and a weight pass",
        ),
    ],
)
def test_bad_pipeline_configs_are_one_line_errors(overrides, message):
    cfg = make_config(micro_batch=1, global_batch=8).replace(**overrides)
    with pytest.raises(ConfigError, match=message) as info:
        resolve(cfg, 4)
    assert "\n" not in str(info.value)


def test_a_model_without_pipeline_calls_is_one_line_error():
    """Its blocks are found (the largest list of like modules), how its forward splits is
    not."""
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
    cfg = make_config(micro_batch=1, global_batch=8).replace(parallel={"pp": 2})
    with pytest.raises(ConfigError, match="declare ModelSpec\\(pipeline=PipelineCalls") as info:
        resolve(cfg, 2, model=model)
    assert "\n" not in str(info.value)


def test_unknown_schedule_is_one_line():
    with pytest.raises(ConfigError, match="pipeline.schedule") as info:
        make_config().replace(pipeline={"schedule": "zigzag"})
    assert "\n" not in str(info.value)


def test_plan_table_names_the_schedule():
    plan = resolve(config(2, "1f1b"), 2)
    assert "pipeline 1f1b over pp=2, 2 stages (blocks 0-3 | 4-7; by layers)" in plan.table()
    assert plan.pipeline.micro_batches == 4
    assert torch.float32 == plan.precision.param_dtype


def test_train_and_resume_two_stages_through_the_launcher(tmp_path, capsys):
    """`shardwise train` with parallel.pp=2: each stage saves its own parameters; a resume
    from step 2 with another schedule and split, and each stage's parameters in chunks,
    repeats steps 3-4 (to fp32 rounding)."""
    settings = [
        "model.n_layers=2",
        "model.d_model=32",
        "model.n_heads=2",
        "data.seq_len=16",
        "data.max_bytes=20000",
        "train.micro_batch=1",
        "train.global_batch=4",
        "train.steps=4",
        "checkpoint.every=2",
        "log.progress=false",
        "parallel.pp=2",
        "pipeline.schedule=gpipe",
    ]
    out = tmp_path / "run"
    full = train_on_two_ranks(out, settings, capsys, "pipeline gpipe over pp=2, 2 stages")
    checkpoint = out / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in checkpoint.glob("shards*")) == [
        "shards_rank0.bin",
        "shards_rank1.bin",
    ]
    # another schedule, another split of the blocks, parameter chunks: resharded by name
    other = ["--set", "pipeline.schedule=1f1b", "--set", "pipeline.partition=params"]
    other += ["--set", "offload.policy=auto", "--set", "offload.device_budget_mb=1"]
    code, printed = run_cli(["train", "--nproc", "2", "--resume", str(checkpoint), *other], capsys)
    assert code == 0, printed
    assert logged_losses(out) == pytest.approx(full, rel=1e-5)
    assert (out / "memory.png").exists()  # the tiers of the resumed steps only
