"""Sequence parallelism through the engine: each sp rank trains on its part of every
sequence (ring: zig-zag chunks; Ulysses: a contiguous slice) and the whole model's losses and
weights equal the single-process run (fp32, losses 1e-5 for 5 steps): sp=2 for each kind,
sp=2 x dp=2 with ZeRO-3, sp=2 x tp=2 (1D and 2D), sp with parameter chunks (offload.policy=auto);
`shardwise train --set parallel.sp=2` with resume; bad settings are one-line errors before
launch."""

from __future__ import annotations

import math
import re
from functools import partial

import pytest
import torch.distributed as dist

from shardwise.distributed.dims import ParallelDims
from shardwise.engine import initialize
from shardwise.errors import ConfigError
from shardwise.models.gpt import build_gpt
from shardwise.run_plan import resolve
from tests.cli_runs import TINY_RUN, train_on_two_ranks
from tests.parity import (
    NO_CORE_MODEL,
    SEQ,
    assert_parity,
    build_model,
    global_batches,
    make_config,
    reference_run,
)
from tests.tensor_parallel.test_gpt_parity import tp_engine_run

SP_PARAM_RTOL = 2e-4
"""Parameters after 5 Adam steps, tensor-wise. Attention of a part of the sequence sums its
softmax in another order (ring: block by block, online; Ulysses: the same keys in another
layout) and gradients are averaged over dp x sp ranks: losses still agree to ~1e-7, but Adam
turns last-bit differences of near-zero gradient elements into whole-step differences (as
for tensor parallelism). Measured: up to 5.1e-5 (a layer-norm bias, which starts at zero)."""


def sp_config(kind: str, micro_batch: int, global_batch: int, **parallel):
    cfg = make_config(micro_batch=micro_batch, global_batch=global_batch)
    return cfg.replace(parallel=parallel, attention={"sequence_parallel": kind})


def sp_engine_run(cfg) -> tuple[list[float], dict]:
    """On every rank: the rows of this rank's dp index, whole sequences (the engine cuts
    this rank's part). With parameter chunks, the model is built on the meta device and
    filled chunk by chunk, as `shardwise train` builds it, and some chunk must have left the
    device."""
    dims = ParallelDims.from_config(cfg.parallel, dist.get_world_size())
    mesh = dims.build_mesh("cpu")
    if cfg.offload.policy == "none":
        engine = initialize(build_model(cfg), None, cfg, mesh=mesh)
    else:
        model = build_gpt(cfg.model, SEQ, device="meta")
        fill = partial(model.init_parameter, seed=cfg.train.seed)
        engine = initialize(model, None, cfg, mesh=mesh, param_init=fill)
    dp_rank, losses = dims.dp_rank(mesh), []
    for inputs, targets in global_batches(cfg):
        rows = inputs.shape[0] // dims.dp
        part = slice(dp_rank * rows, (dp_rank + 1) * rows)
        losses.append(engine.train_step((inputs[part], targets[part])))
    if engine.plan.tiered:
        assert engine.memory_report()["chunks_host"] > 0, "no chunk left the device"
    return losses, {k: v.float() for k, v in engine.full_state_dict().items()}


@pytest.mark.parametrize("kind", ["ring", "ulysses"])
def test_two_ranks_match_single_process(pool2, kind):
    cfg = sp_config(kind, micro_batch=2, global_batch=4, sp=2)
    want = reference_run(cfg)
    for got in pool2.run(sp_engine_run, cfg):
        assert_parity(got, want, rtol=1e-5, param_rtol=SP_PARAM_RTOL)


@pytest.mark.parametrize("kind", ["ring", "ulysses"])
def test_recomputed_blocks_match_single_process(pool2, kind):
    """Activation checkpointing: a block's recomputation runs its ring or Ulysses exchange
    again, in the same order on every rank."""
    cfg = sp_config(kind, micro_batch=2, global_batch=4, sp=2).replace(
        train={"activation_checkpointing": "full"}
    )
    want = reference_run(cfg)
    for got in pool2.run(sp_engine_run, cfg):
        assert_parity(got, want, rtol=1e-5, param_rtol=SP_PARAM_RTOL)


@pytest.mark.parametrize("kind", ["ring", "ulysses"])
def test_sp2_times_dp2_with_zero3_matches_single_process(pool4, kind):
    cfg = sp_config(kind, micro_batch=1, global_batch=4, sp=2).replace(zero={"stage": 3})
    want = reference_run(cfg)
    for got in pool4.run(sp_engine_run, cfg):
        assert_parity(got, want, rtol=1e-5, param_rtol=SP_PARAM_RTOL)


@pytest.mark.parametrize("kind", ["ring", "ulysses"])
def test_sp2_times_tp2_matches_single_process(pool4, kind):
    """The heads split over tp first; each tp rank's heads attend over its sp group (the
    ranks of its tp index). Shards against the reference's split by the same plan."""
    cfg = sp_config(kind, micro_batch=2, global_batch=2, sp=2, tp=2)
    pool4.run(tp_engine_run, cfg, 4)


def test_sp2_times_2d_tp4_matches_single_process(pool8):
    """2D tensor parallelism splits the batch and the hidden width over a 2 x 2 grid and the
    heads over its columns (2 per rank), which Ulysses splits again over sp. Ring passed the
    same test by hand (2026-12-04); 2.5D and 3D need 16 ranks, as many as that would cost."""
    cfg = sp_config("ulysses", micro_batch=2, global_batch=2, sp=2, tp=4, tp_mode="2d")
    pool8.run(tp_engine_run, cfg, 8)


AUTO = {"policy": "auto", "device_budget_mb": 0.2, "chunk_search_range_mb": 0}
"""Parameter chunks placed from a traced step, under a budget that moves some of them."""
STATIC = {"policy": "static", "param_device_fraction": 0.0, "chunk_search_range_mb": 0}
"""Every parameter chunk streamed from host memory."""


@pytest.mark.parametrize(
    ("kind", "world", "stage", "offload"),
    [("ulysses", 2, 0, STATIC), ("ring", 4, 2, AUTO)],
    ids=["ulysses-static", "ring-dp2-zero2-auto"],
)
def test_parameter_chunks_match_single_process(request, kind, world, stage, offload):
    """sp with parameter chunks (``offload.policy``) moving between the device and host
    memory, at dp=1 and at dp=2 with ZeRO-2 (full chunks on every rank, updated shard by
    shard); gradients reduced over dp x sp as without."""
    batch = {"micro_batch": 2} if world == 2 else {"micro_batch": 1}
    cfg = sp_config(kind, **batch, global_batch=4, sp=2)
    cfg = cfg.replace(offload=offload, zero={"stage": stage})
    want = reference_run(cfg.replace(offload={"policy": "none"}))
    for got in request.getfixturevalue(f"pool{world}").run(sp_engine_run, cfg):
        assert_parity(got, want, rtol=1e-5, param_rtol=SP_PARAM_RTOL)


@pytest.mark.parametrize(("kind", "world"), [("ring", 2), ("hybrid", 4)])
def test_packed_documents_match_single_process(request, kind, world):
    """``data.pack_documents``: the documents of the whole sequence reach every rank's
    attention (ring; the hybrid's Ulysses groups and rings), which masks as the reference's
    dense attention."""
    cfg = sp_config(kind, micro_batch=2, global_batch=2 * (4 // world), sp=world)
    cfg = cfg.replace(data={"pack_documents": True})
    want = reference_run(cfg)
    for got in request.getfixturevalue(f"pool{world}").run(sp_engine_run, cfg):
        assert_parity(got, want, rtol=1e-5, param_rtol=SP_PARAM_RTOL)


def test_hybrid_two_by_two_matches_single_process(pool4):
    """sp = 4 as ring 2 x Ulysses 2 (the sp axis split into sub-axes inside the engine)."""
    cfg = sp_config("hybrid", micro_batch=2, global_batch=2, sp=4)
    want = reference_run(cfg)
    for got in pool4.run(sp_engine_run, cfg):
        assert_parity(got, want, rtol=1e-5, param_rtol=SP_PARAM_RTOL)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"data": {"seq_len": 18}}, "18 tokens does not split into 2 x sp = 4 equal chunks"),
        (
            {"attention": {"sequence_parallel": "ulysses"}, "model": {"n_heads": 2, "d_model": 32}},
            None,
        ),
        (
            {"attention": {"sequence_parallel": "ulysses"}, "model": {"n_heads": 1, "d_model": 32}},
            "model.n_heads=1 does not split over 2 Ulysses ranks",
        ),
        ({"attention": {"sequence_parallel": "rings"}}, "attention.sequence_parallel='rings'"),
        (
            {"attention": {"sequence_parallel": "hybrid", "ulysses_degree": 3}},
            "attention.ulysses_degree=3 does not divide parallel.sp=2",
        ),
        (
            {"parallel": {"sp": 2, "tp": 2, "tp_sequence_parallel": True}},
            "set parallel.tp_sequence_parallel=false",
        ),
        (
            {"parallel": {"sp": 2, "tp": 2}, "attention": {"sequence_parallel": "ulysses"}}
            | {"model": {"n_heads": 2, "d_model": 32}},
            "model.n_heads=2 over 2 tensor-parallel ways does not split over 2 Ulysses ranks",
        ),
        (
            {"parallel": {"sp": 2, "tp": 4, "tp_mode": "2d"}}
            | {"attention": {"sequence_parallel": "ulysses"}, "model": {"n_heads": 2}},
            "model.n_heads=2 over 2 tensor-parallel ways does not split over 2 Ulysses ranks",
        ),
        ({"attention": {"kind": "sparse", "block": 2}}, "set attention.kind='dense'"),
        ({"model": {"dropout": 0.1}}, "no dropout on attention weights"),
        (
            {"model": {"name": "hf", "hf_config": str(NO_CORE_MODEL)}},
            "forward must take the tokens' positions",
        ),
    ],
    ids=[
        "zigzag",
        "ulysses-ok",
        "ulysses-heads",
        "kind",
        "hybrid-degree",
        "tp-megatron-sp",
        "ulysses-heads-after-tp",
        "ulysses-heads-after-2d-tp",
        "sparse",
        "dropout",
        "hf",
    ],
)
def test_bad_settings_are_one_line_errors(sections, message):
    cfg = make_config(micro_batch=2, global_batch=4).replace(parallel={"sp": 2})
    world = max(4, 2 * sections.get("parallel", {}).get("tp", 1))
    build = lambda: resolve(cfg.replace(**sections), world)  # noqa: E731
    if message is None:
        assert build().sequence_parallel == "ulysses"
        return
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        build()
    assert "\n" not in str(info.value)


def test_trains_through_the_launcher(tmp_path, capsys):
    """The launcher path, with packed documents; resuming an sp=2 checkpoint (into sp=2 and
    other layouts, bitwise) is in the resharding matrix (tests/checkpoint/test_reshard.py)."""
    settings = [*TINY_RUN, "train.steps=3", "parallel.sp=2", "attention.sequence_parallel=ring"]
    settings.append("data.pack_documents=true")
    shows = "packed; attention within each document"
    losses = train_on_two_ranks(tmp_path / "run", settings, capsys, shows)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
