"""Tensor-parallel plans of the reference GPT, in its own module names, for every layout.

`gpt_tp_plan` is the GPT spec's plan builder: it checks that the model's shapes split over
the degrees (one line naming the valid tp degrees otherwise) before any process group exists,
then returns the layout's plan. The styles come from `shardwise.tensor_parallel`, which knows
no model.
"""

from __future__ import annotations

from functools import partial

from shardwise.distributed.dims import ParallelDims, fitting_tp_degrees
from shardwise.errors import ConfigError
from shardwise.models.gpt import GPT, GPTConfig
from shardwise.models.spec import ModelSpec, PipelineCalls
from shardwise.tensor_parallel.one_d import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallelNorm,
    SequenceSlice,
    VocabParallel,
    vocab_parallel_loss,
)
from shardwise.tensor_parallel.plan import Plan
from shardwise.tensor_parallel.summa import (
    SUMMA_MODES,
    Embedding2p5D,
    LayerNorm2p5D,
    Linear2p5D,
    loss_summa,
)
from shardwise.tensor_parallel.three_d import Embedding3D, LayerNorm3D, Linear3D, loss_3d


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


def gpt_plan_summa(cfg: GPTConfig, mode: str) -> Plan:
    """The reference GPT on a 2D (``mode="2d"``) or 2.5D (``"2.5d"``) grid: every linear,
    the tied embedding/head and every norm split ([Note: summa layout])."""
    if mode not in SUMMA_MODES:
        raise ConfigError(f"gpt_plan_summa builds tp_mode '2d' or '2.5d', not {mode!r}")
    if cfg.positions == "learned":
        raise ConfigError(
            f"model.positions='learned' is not split for tp_mode={mode!r}; use positions='rope'"
        )
    layers = {
        "embed": Embedding2p5D(),
        "blocks.*.norm1": LayerNorm2p5D(),
        "blocks.*.attn.qkv": Linear2p5D(fused=3),
        "blocks.*.attn.proj": Linear2p5D(),
        "blocks.*.norm2": LayerNorm2p5D(),
        "blocks.*.mlp.up": Linear2p5D(),
        "blocks.*.mlp.down": Linear2p5D(),
        "norm_f": LayerNorm2p5D(),
        "head": Linear2p5D(),
    }
    if cfg.mlp == "swiglu":
        layers["blocks.*.mlp.gate"] = Linear2p5D()
    return Plan(mode=mode, layers=layers, loss=loss_summa)


def gpt_plan_3d(cfg: GPTConfig) -> Plan:
    """The GPT on the cube: the residual stream, norms and embedding in layout P; qkv,
    mlp.up/gate and head P -> S; attention on local heads in S; attn.proj and mlp.down
    S -> P. The shapes must split as `gpt_split_factors_3d` says, the micro-batch into q^2
    blocks."""
    if cfg.positions == "learned":
        raise ConfigError(
            "tp_mode='3d' does not split a learned position table; use model.positions='rope'"
        )
    layers = {
        "embed": Embedding3D(),
        "blocks.*.norm1": LayerNorm3D(),
        "blocks.*.attn.qkv": Linear3D("P", fused=3),
        "blocks.*.attn.proj": Linear3D("S"),
        "blocks.*.norm2": LayerNorm3D(),
        "blocks.*.mlp.up": Linear3D("P"),
        "blocks.*.mlp.down": Linear3D("S"),
        "norm_f": LayerNorm3D(),
        "head": Linear3D("P"),
    }
    if cfg.mlp == "swiglu":
        layers["blocks.*.mlp.gate"] = Linear3D("P")
    return Plan(mode="3d", layers=layers, loss=loss_3d)


def gpt_split_factors_3d(q: int) -> dict[str, int]:
    """What each GPT dimension must be divisible by on a q^3 cube: heads split over one axis;
    d_model, d_ff and vocab_size are a weight's output dim, split over two (its out axis and
    tp_dep). The micro-batch must divide by q^2 as well (`take_batch_block`)."""
    return {"n_heads": q, "d_model": q * q, "d_ff": q * q, "vocab_size": q * q}


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
    choices = fitting_tp_degrees(dims, lambda other: not _fits(cfg, other, micro_batch, sp))
    raise ConfigError(
        f"{setting}={value} does not split over parallel.tp={dims.tp} "
        f"(tp_mode={dims.tp_mode!r} needs a multiple of {divisor}); "
        f"tp degrees that fit: {choices}"
    )


def gpt_tp_plan(
    gpt: GPTConfig, dims: ParallelDims, micro_batch: int, sequence_parallel: bool
) -> Plan:
    """The reference GPT's plan for the layout of `dims`, after checking it fits."""
    check_gpt_fits(gpt, dims, micro_batch, sequence_parallel)
    if dims.tp_mode == "1d":
        return gpt_plan_1d(gpt, sequence_parallel)
    if dims.tp_mode == "3d":
        return gpt_plan_3d(gpt)
    return gpt_plan_summa(gpt, dims.tp_mode)


def gpt_spec(model: GPT) -> ModelSpec:
    """The reference GPT's structure ([Note: names] in gpt.py) and its plans."""
    return ModelSpec(
        blocks="blocks",
        embedding="embed",
        head="head",
        attention="blocks.*.attn.core",
        heads=model.cfg.n_heads,
        positions="positions",
        documents="documents",
        max_seq_len=model.cfg.seq_len,
        tp_plan=partial(gpt_tp_plan, model.cfg),
        pipeline=PipelineCalls(
            embed=GPT.embed_tokens,
            finish=GPT.finish,
            first=("embed", "pos_embed", "drop"),
            last=("norm_f", "head"),
            hidden_size=model.cfg.d_model,
        ),
    )
