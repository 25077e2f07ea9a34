"""Tensor-parallel plans of the built-in models, registered by model name in `TP_PLANS`.

A plan builder checks that the model's shapes split over the degrees (one line naming the
valid tp degrees otherwise) before any process group exists, then returns the layout's plan.
"""

from __future__ import annotations

from shardwise.config import Config
from shardwise.distributed.dims import ParallelDims, valid_tp_degrees
from shardwise.errors import ConfigError
from shardwise.models.gpt import GPTConfig, gpt_config_from
from shardwise.registry import TP_PLANS
from shardwise.tensor_parallel.one_d import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallelNorm,
    SequenceSlice,
    VocabParallel,
    vocab_parallel_loss,
)
from shardwise.tensor_parallel.plan import Plan
from shardwise.tensor_parallel.summa import gpt_plan_summa
from shardwise.tensor_parallel.three_d import gpt_plan_3d, gpt_split_factors_3d

MAX_LISTED_TP = 64
"""Valid tp degrees are listed up to this many ranks in errors."""


def gpt_plan_1d(cfg: GPTConfig, sequence_parallel: bool = False) -> Plan:
    """Megatron's GPT layout: attention heads and MLP columns split, vocab-parallel embedding,
    head and loss; with `sequence_parallel` the norms and residual stream are split along the
    sequence (Megatron-SP)."""
    sp = sequence_parallel
    layers = {
        "embed": VocabParallel(sequence_parallel=sp),
        "blocks.*.attn.qkv": ColwiseParallel(fused=3, sequence_parallel=sp),
        "blocks.*.attn.proj": RowwiseParallel(sequence_parallel=sp),
        "blocks.*.mlp.up": ColwiseParallel(sequence_parallel=sp),
        "blocks.*.mlp.down": RowwiseParallel(sequence_parallel=sp),
        "head": ColwiseParallel(sequence_parallel=sp),
    }
    if cfg.mlp == "swiglu":
        layers["blocks.*.mlp.gate"] = ColwiseParallel(sequence_parallel=sp)
    if sp:
        for norm in ("blocks.*.norm1", "blocks.*.norm2", "norm_f"):
            layers[norm] = SequenceParallelNorm()
        if cfg.positions == "learned":
            layers["pos_embed"] = SequenceSlice(dim=0)
    return Plan(mode="1d", layers=layers, loss=vocab_parallel_loss)


def gpt_split_factors(cfg: GPTConfig, dims: ParallelDims) -> dict[str, int]:
    """What each GPT dimension must be divisible by in this layout, by name."""
    tp, mode = dims.tp, dims.tp_mode
    if mode == "1d":
        return {"n_heads": tp, "d_ff": tp, "vocab_size": tp}
    q = dims.tp_shape[-1]
    if mode == "3d":
        return gpt_split_factors_3d(q)
    # 2d / 2.5d: every weight is split q x q, heads and the vocabulary over tp_col.
    return {"n_heads": q, "d_ff": q, "vocab_size": q}


def _fits(cfg: GPTConfig, dims: ParallelDims, micro_batch: int, sequence_parallel: bool) -> list:
    """(setting, value, divisor) of every requirement this layout breaks."""
    sizes = {
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "d_ff": cfg.d_ff,
        "vocab_size": cfg.vocab_size,
    }
    broken = [
        (f"model.{name}", sizes[name], divisor)
        for name, divisor in gpt_split_factors(cfg, dims).items()
        if sizes[name] % divisor
    ]
    rows = dims.tp // dims.tp_shape[-1] if dims.tp_mode != "1d" else 1
    if micro_batch % rows:
        broken.append(("train.micro_batch", micro_batch, rows))
    if sequence_parallel and cfg.seq_len % dims.tp:
        broken.append(("data.seq_len", cfg.seq_len, dims.tp))
    return broken


def check_gpt_fits(cfg: GPTConfig, dims: ParallelDims, micro_batch: int, sp: bool) -> None:
    """Raise one line naming the first broken requirement and the tp degrees that work."""
    if sp and dims.tp_mode != "1d":
        raise ConfigError(
            f"parallel.tp_sequence_parallel applies to tp_mode='1d' (Megatron-SP), not "
            f"{dims.tp_mode!r}; set it to false"
        )
    if cfg.positions == "learned" and dims.tp_mode != "1d":
        raise ConfigError(
            f"model.positions='learned' is split for tp_mode='1d' only; use positions='rope' "
            f"with tp_mode={dims.tp_mode!r}"
        )
    broken = _fits(cfg, dims, micro_batch, sp)
    if not broken:
        return
    setting, value, divisor = broken[0]
    valid = []
    for tp in valid_tp_degrees(dims.tp_mode, dims.tp_depth, MAX_LISTED_TP):
        if tp == 1:
            continue
        other = ParallelDims.tensor_parallel(tp, dims.tp_mode, dims.tp_depth)
        if not _fits(cfg, other, micro_batch, sp):
            valid.append(str(tp))
    choices = ", ".join(valid) if valid else "none"
    raise ConfigError(
        f"{setting}={value} does not split over parallel.tp={dims.tp} "
        f"(tp_mode={dims.tp_mode!r} needs a multiple of {divisor}); "
        f"tp degrees that fit: {choices}"
    )


@TP_PLANS.register("gpt")
def gpt_plan(cfg: Config, dims: ParallelDims) -> Plan:
    """The reference GPT's plan for ``cfg.parallel``'s layout, after checking it fits."""
    gpt = gpt_config_from(cfg.model, cfg.data.seq_len)
    sp = cfg.parallel.tp_sequence_parallel
    check_gpt_fits(gpt, dims, cfg.train.micro_batch, sp)
    if dims.tp_mode == "1d":
        return gpt_plan_1d(gpt, sp)
    if dims.tp_mode == "3d":
        return gpt_plan_3d(gpt)
    return gpt_plan_summa(gpt, dims.tp_mode)
