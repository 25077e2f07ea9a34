"""The resolved plan of a run: every decision the config implies, made once, before launch.

`resolve(config, world_size)` validates the config against the world size and the model's
spec and returns a frozen `RunPlan`: the parallel degrees, the tensor-parallel plan, what is
sharded over which axis, where chunks and optimizer states live, the precision, activation
checkpointing, how the config's optimizer section applies and the schedule. Every check lives
here and raises a one-line `ConfigError`; the launcher resolves in the parent process and
hands each worker the plan itself, so nothing is parsed or validated twice. The engine and the
parameter stores read the plan's policies, never ``zero.stage`` or ``offload.policy``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
from torch import nn

from shardwise.accelerator import get_accelerator
from shardwise.attention.core import SparseAttention, sparse_attention
from shardwise.config import Config, OffloadConfig, resolve_batch
from shardwise.data.tokenizer import ByteTokenizer
from shardwise.distributed.dims import ParallelDims
from shardwise.errors import ConfigError
from shardwise.models import MODELS, ModelSpec, spec_of
from shardwise.pipeline.schedules import Schedule
from shardwise.pipeline.schedules import build_schedule as build_pipeline_schedule
from shardwise.pipeline.stage import stage_blocks
from shardwise.precision import MixedPrecisionPolicy, policy_from_config
from shardwise.sequence_parallel import contiguous_positions, hybrid_positions
from shardwise.tensor_parallel import Plan
from shardwise.zero.offload.adam import check_offload

OPTIM_SCHEDULE_KEYS = ("warmup_steps", "min_lr_ratio", "decay")


@dataclass(frozen=True)
class Sharding:
    """What ZeRO shards over the ``dp_shard`` axis (ZeRO, Rajbhandari et al. 2020, sec. 5)."""

    stage: int
    """The ZeRO stage the flags come from (0-3), for display and checkpoint layouts."""
    optimizer: bool
    """Optimizer states and master weights: each rank updates 1/N of every bucket."""
    grads: bool
    """Gradients reduce-scattered: each rank keeps the reduced gradient of its slice."""
    params: bool
    """Parameters gathered for compute and released after (stage 3)."""
    reshard_after_forward: bool
    """Stage 3: release gathered parameters after forward, gather again for backward."""
    prefetch: bool
    """Stage 3: gather the next unit while the current one computes."""


@dataclass(frozen=True)
class OptimizerUse:
    """How the config's ``optim`` section applies to the optimizer."""

    builtin: bool
    """The optimizer is AdamW built from ``optim`` (no factory was given)."""
    lr_schedule: bool
    """Warm-up + cosine decay on the optimizer's learning rate."""
    grad_clip: float
    """Global gradient-norm clip; 0 = none."""
    decay_groups: bool
    """Parameters split into weight-decay groups (matrices) and none (biases, norms,
    embeddings) with ``optim.weight_decay``."""
    onebit_freeze: int | None = None
    """1-bit Adam's freeze step (``optim.name = 'onebit_adam'``); None: AdamW."""
    compressed_momentum: bool = False
    """1-bit Adam compresses each rank's momentum, as its paper does (zero.stage 0: every rank
    holds the whole momentum), not the gradient (stages 1-2, where a rank holds the momentum
    of its slice only) ([Note: compressed momentum] in optim/onebit.py)."""


@dataclass(frozen=True)
class RunPlan:
    """Everything a rank needs to know about the run, resolved and checked."""

    config: Config
    """The validated config (sections read as they are: model, data, train, logging)."""
    dims: ParallelDims
    """Parallel degrees for this world size."""
    micro_batches: int
    """Micro-batches per optimizer step (gradient accumulation)."""
    sharding: Sharding
    offload: OffloadConfig
    """Tiers and budgets: Adam states (``optimizer``) and parameter chunks (``policy``)."""
    precision: MixedPrecisionPolicy
    optimizer: OptimizerUse
    tp_plan: Plan | None
    """The model's tensor-parallel plan, when ``parallel.tp`` > 1."""
    trainable_params: int
    """Trainable parameter elements of the whole (unsplit) model."""
    pipeline: Schedule | None = None
    """The pipeline schedule, when ``parallel.pp`` > 1."""
    pipeline_split: tuple[range, ...] = ()
    """The model's blocks of each pipeline stage (``pipeline.partition``)."""
    attention: SparseAttention | None = None
    """Block-sparse attention replacing the model's attention cores (``attention.kind``)."""
    sequence_parallel: str | None = None
    """Ring, Ulysses or hybrid attention over the sp ranks, when ``parallel.sp`` > 1."""

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
        return self.config.train.micro_batch * self.dims.dp * self.micro_batches

    @property
    def chunks(self) -> bool:
        """Parameters live in chunks (the chunk store): placed in tiers, or ZeRO-3's units."""
        return self.tiered or self.sharding.params

    @property
    def tiered(self) -> bool:
        """Parameter chunks are placed on device, host and disk under budgets (Gemini:
        ``offload.policy`` static or auto)."""
        return self.offload.policy != "none"

    @property
    def static_placement(self) -> bool:
        """The chunks' placement is fixed fractions (``offload.param_device_fraction``), not
        measured in a warm-up."""
        return self.offload.policy == "static"

    def layout(self) -> dict:
        """What fixes the shapes of each rank's saved state (checkpoints compare it)."""
        chunks = None
        if self.tiered:
            keys = ("chunk_min_mb", "chunk_search_range_mb", "chunk_search_step_mb")
            chunks = {key: getattr(self.offload, key) for key in keys}
        stages = None
        if self.pipeline is not None:
            pipe = self.config.pipeline
            stages = {"chunks": pipe.chunks, "partition": pipe.partition}
        return {
            **vars(self.dims),
            "zero_stage": self.sharding.stage,
            "optimizer": self.config.optim.name,
            "chunks": chunks,
            "pipeline": stages,
        }

    def resolved_config(self) -> Config:
        """The config with what resolving it chose written in (the run's config.toml): the
        dtype ``auto`` picked, dp_shard's degree, the global batch, 1-bit Adam's freeze step.
        It resolves the same anywhere: a resume on a machine of another kind keeps the dtype."""
        chosen: dict[str, dict] = {
            "parallel": {"dp_shard": self.dims.dp_shard},
            "precision": {"dtype": _dtype(self.precision.param_dtype)},
            "train": {"global_batch": self.global_batch},
        }
        if self.optimizer.onebit_freeze is not None:
            chosen["optim"] = {"freeze_step": self.optimizer.onebit_freeze}
        return self.config.replace(**chosen)

    def model_state_bytes(self) -> dict[str, float]:
        """Predicted model-state bytes per rank: parameters, gradients, fp32 master weights and
        Adam's two moments (ZeRO paper, sec. 5: with Ψ elements and N shards, each category
        divided by N where it is sharded; tensor and pipeline parallelism divide Ψ by tp x pp,
        2.5D by tp / depth);
        1-bit Adam's error buffers count as optimizer states. Gradients reduced in another
        dtype than the parameters' (``precision.reduce_dtype = "fp32"`` under bf16) keep a
        buffer of each where they are whole; sharded, only the reduced slice stays."""
        # balanced stages; 2.5D keeps one copy of its q x q blocks per depth layer
        psi = self.trainable_params * self.dims.tp_depth / self.dims.tp / self.dims.pp
        shards = self.dims.dp_shard
        param_bytes = torch.finfo(self.precision.param_dtype).bits // 8
        reduce_bytes = torch.finfo(self.precision.reduce_dtype).bits // 8
        if self.sharding.grads:
            grads = reduce_bytes * psi / shards
        else:
            separate = self.precision.reduce_dtype != self.precision.param_dtype
            grads = (param_bytes + (reduce_bytes if separate else 0)) * psi

        def per_rank(numel: float, sharded: bool) -> float:
            return numel / shards if sharded else numel

        master = 4 * psi if self.precision.needs_master_weights else 0
        states = per_rank(8 * psi, self.sharding.optimizer)
        if self.offload.delayed_update:  # the host's own gradients and parameters (the chunk
            # store's host masters of bf16 / fp16 homes are the master weights already)
            copies = 1 if self.chunks and master else 2
            states += per_rank(4 * copies * psi, self.sharding.optimizer)
        if self.optimizer.onebit_freeze:  # + the frozen steps' denominators
            states += per_rank(4 * psi, self.sharding.optimizer) + self._onebit_error_bytes(psi)
            if self.config.optim.name == "zero_one_adam":  # + the synchronised parameters
                states += 4 * psi
        return {
            "params": per_rank(param_bytes * psi, self.sharding.params),
            "grads": grads,
            "master_params": per_rank(master, self.sharding.optimizer),
            "optimizer_states": states,
        }

    def _onebit_error_bytes(self, psi: float) -> float:
        """1-bit Adam's error buffers, fp32: the worker's of every element it compresses (the
        whole gradient, or with replicas of ZeRO-2 shards its slice), and when every rank
        needs the whole average the server's of its part of that (docs/onebit_adam.md); under
        fp16 twice that, for the copy an overflowed step restores."""
        dims = self.dims
        replicas = dims.dp_replicate * dims.sp
        copies = 2 if self.precision.needs_loss_scaling else 1
        if self._onebit_over_replicas:
            worker = 4 * psi / dims.dp_shard
            return copies * (worker + worker / replicas)
        ranks = dims.dp_shard if self.sharding.grads else dims.dp_shard * replicas
        owns_slices = self.sharding.optimizer and ranks == dims.dp_shard
        return copies * (4 * psi + (0 if owns_slices else 4 * psi / ranks))

    def _schedule_row(self) -> str:
        row = f"{self.micro_batches} micro-batch(es) per step"
        if self.pipeline is not None:
            pipe = self.pipeline
            row += f", pipeline {pipe.name} over pp={pipe.ranks}, {pipe.stages} stages"
            blocks = " | ".join(
                f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"
                for r in self.pipeline_split
            )
            row += f" (blocks {blocks}; by {self.config.pipeline.partition})"
        return row

    def table(self) -> str:
        """The plan as a few aligned lines for the user (``shardwise train`` prints it)."""
        dims = self.dims
        axes = "  ".join(f"{name}={getattr(dims, name)}" for name in _AXES)
        tp = f" ({dims.tp_mode})" if dims.tp > 1 else ""
        shard = self.sharding
        what = [name for name in ("optimizer", "grads", "params") if getattr(shard, name)]
        sharded = f"{', '.join(what)} over dp_shard={dims.dp_shard}" if what else "nothing"
        if self.tiered:
            sharded += f"; parameters in chunks ({self.offload.policy})"
        tiers = f"adam states: {self.offload.optimizer}"
        if self.offload.delayed_update:
            tiers += f", updated in the background from step {self.offload.delayed_update}"
        if self.tiered:
            budget = self.offload.device_budget_mb
            tiers += f"; chunks: device budget {budget:g} MiB" if budget else "; chunks: static"
        states = self.model_state_bytes()
        total = sum(states.values())
        detail = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in states.items())
        rows = [
            ("axes", axes + tp),
            ("sharded", sharded),
            ("tiers", tiers),
            (
                "precision",
                f"{_dtype(self.precision.param_dtype)} params, "
                f"{_dtype(self.precision.reduce_dtype)} reduction",
            ),
            ("schedule", self._schedule_row()),
            *([("attention", self.attention.describe())] if self.attention else []),
            *(
                [("sequence", f"{self.sequence_parallel} attention over sp={dims.sp}")]
                if self.sequence_parallel
                else []
            ),
            *(
                [("documents", "packed; attention within each document")]
                if self.config.data.pack_documents
                else []
            ),
            *([("optimizer", self._onebit_row())] if self.optimizer.onebit_freeze else []),
            ("model states", f"{total / 2**20:.1f} MiB per rank predicted ({detail})"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)

    @property
    def _onebit_over_replicas(self) -> bool:
        """1-bit Adam compresses the replicas' average of ZeRO-2 slices, not the reduction
        itself ([Note: 1-bit Adam over replicas] in distributed/reducer.py)."""
        return self.sharding.grads and self.dims.dp_replicate * self.dims.sp > 1

    def _onebit_row(self) -> str:
        optim = self.config.optim
        if optim.name == "zero_one_adam":
            return (
                f"0/1 Adam: until step {self.optimizer.onebit_freeze} the variance updated at "
                f"gaps doubling every {optim.variance_gap_doubles_after} updates, gradients "
                f"at 1 bit + 1 scale per {optim.compression_chunk} elements between; then "
                f"local steps, synchronised compressed every 1 to {optim.sync_interval_max}"
            )
        refresh = optim.variance_refresh
        return (
            f"1-bit Adam: AdamW for {self.optimizer.onebit_freeze} steps, then "
            f"{'momenta' if self.optimizer.compressed_momentum else 'gradients'} at 1 "
            f"bit + 1 scale per {optim.compression_chunk} elements"
            + (" between replicas (exact within dp_shard)" if self._onebit_over_replicas else "")
            + (f", variance refreshed every {refresh} steps" if refresh else "")
        )


_AXES = ("dp_replicate", "dp_shard", "pp", "sp", "tp")


def _dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def meta_model(config: Config) -> nn.Module:
    """The registered ``model.name`` built on the meta device: shapes, no memory."""
    return MODELS.get(config.model.name)(
        config.model, config.data.seq_len, device="meta", seed=config.train.seed
    )


def resolve(
    config: Config,
    world_size: int,
    *,
    model: nn.Module | None = None,
    spec: ModelSpec | None = None,
    tp_plan: Plan | None = None,
    optimizer_given: bool = False,
) -> RunPlan:
    """Check `config` for `world_size` ranks and resolve it into a `RunPlan`.

        `model` is the model to train (its spec is `spec`, declared or discovered); without it the
        registered ``model.name`` is built on the meta device to read its spec. `optimizer_given`:
        the caller brings its own optimizer factory ([Note: a given optimizer]); `tp_plan` replaces
    the spec's tensor-parallel plan."""
    dims = ParallelDims.from_config(config.parallel, world_size)
    micro_batches = resolve_batch(config.train, dims.dp)
    registered = model is None  # the trainer's model, fed by the byte tokenizer
    if registered:
        model = meta_model(config)
    spec = spec_of(model, spec)
    if registered:
        _check_vocabulary(config, model, spec)
    precision = policy_from_config(config.precision, get_accelerator())
    _check_offload(config, optimizer_given)
    _check_log(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    onebit_freeze = _onebit_freeze(config, dims, optimizer_given, trainable)
    pipeline, pipeline_split = _pipeline(config, dims, micro_batches, model, spec, precision)
    attention = _attention(config, dims, model, spec)
    sequence_parallel = _sequence_parallel(config, dims, model, spec)
    _check_documents(config, dims, model, spec)
    plan = RunPlan(
        config=config,
        dims=dims,
        micro_batches=micro_batches,
        sharding=_sharding(config, dims),
        offload=config.offload,
        precision=precision,
        optimizer=_optimizer_use(config, optimizer_given, onebit_freeze),
        tp_plan=tp_plan if tp_plan is not None or dims.tp == 1 else _tp_plan(config, dims, spec),
        trainable_params=trainable,
        pipeline=pipeline,
        pipeline_split=pipeline_split,
        attention=attention,
        sequence_parallel=sequence_parallel,
    )
    _check_disk_tier(plan)
    return plan


def _check_documents(config: Config, dims: ParallelDims, model: nn.Module, spec: ModelSpec) -> None:
    """Packed documents need a model whose forward takes them, and attention that masks by
    them."""
    if not config.data.pack_documents:
        return
    limits = {
        "attention.kind='dense'": config.attention.kind != "dense",
        "parallel.pp=1": dims.pp > 1,
    }
    _refuse_combinations("data.pack_documents=true", limits)
    if spec.documents is None:
        raise ConfigError(
            f"data.pack_documents=true masks attention by document: {type(model).__name__}'s "
            "forward must take each token's document; declare ModelSpec(documents=<its keyword>)"
        )


def _check_vocabulary(config: Config, model: nn.Module, spec: ModelSpec) -> None:
    """The training data's token ids (bytes) must index the model's embedding."""
    if spec.embedding is None:
        return
    rows = model.get_submodule(spec.embedding).weight.shape[0]
    if rows < ByteTokenizer.vocab_size:
        source = "model.vocab_size" if config.model.name == "gpt" else "the model's vocab_size"
        raise ConfigError(
            f"{source}={rows} is smaller than the byte tokenizer's {ByteTokenizer.vocab_size} "
            f"token ids; use at least {ByteTokenizer.vocab_size}"
        )


def _check_log(config: Config) -> None:
    if config.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "log.tensorboard=true needs the tensorboard package: "
            "pip install 'shardwise[tensorboard]'"
        )


def _refuse_combinations(feature: str, limits: dict[str, bool]) -> None:
    """One line for the first setting (`limits`: the fix -> whether it is needed) that
    `feature` does not combine with yet."""
    for fix, hit in limits.items():
        if hit:
            raise ConfigError(f"{feature} does not combine with this setting yet; set {fix}")


def _check_attention_cores(model: nn.Module, spec: ModelSpec, feature: str) -> None:
    """`feature` replaces the model's attention cores: they exist and apply no dropout (the
    replacements have none)."""
    cores = spec.attention_cores(model, feature)
    if any(getattr(model.get_submodule(name), "dropout", 0.0) for name in cores):
        raise ConfigError(f"{feature} has no dropout on attention weights; set model.dropout=0")


def _sequence_parallel(
    config: Config, dims: ParallelDims, model: nn.Module, spec: ModelSpec
) -> str | None:
    """The attention kind over the sp ranks, checked before any process starts."""
    if dims.sp == 1:
        return None
    kind = config.attention.sequence_parallel
    limits = {
        "parallel.tp_sequence_parallel=false": config.parallel.tp_sequence_parallel,
        "attention.kind='dense'": config.attention.kind != "dense",
    }
    _refuse_combinations(f"parallel.sp={dims.sp}", limits)
    if spec.positions is None:
        raise ConfigError(
            f"parallel.sp={dims.sp} gives each rank a part of every sequence: "
            f"{type(model).__name__}'s forward must take the tokens' positions; declare "
            "ModelSpec(positions=<its keyword>)"
        )
    _check_attention_cores(model, spec, f"parallel.sp={dims.sp}")
    ulysses = {"ring": 1, "ulysses": dims.sp, "hybrid": config.attention.ulysses_degree}[kind]
    if dims.sp % ulysses:
        raise ConfigError(
            f"attention.ulysses_degree={ulysses} does not divide parallel.sp={dims.sp}"
        )
    # the sequence splits (zig-zag ring parts, each over the Ulysses ranks), or one line
    if kind == "ulysses":
        contiguous_positions(config.data.seq_len, 0, dims.sp)
    else:
        hybrid_positions(config.data.seq_len, 0, dims.sp // ulysses, 0, ulysses)
    # every tp layout splits the heads over its last axis: tp ways in 1D, q otherwise
    head_ways = dims.tp_shape[-1]
    if ulysses > 1 and spec.heads is not None and (spec.heads // head_ways) % ulysses:
        heads = f"model.n_heads={spec.heads}" + (
            f" over {head_ways} tensor-parallel ways" if head_ways > 1 else ""
        )
        raise ConfigError(
            f"{heads} does not split over {ulysses} Ulysses ranks: use "
            "Ulysses degrees that divide the heads, attention.sequence_parallel='hybrid' with "
            "a smaller attention.ulysses_degree, or 'ring'"
        )
    return kind


def _pipeline(
    config: Config,
    dims: ParallelDims,
    micro_batches: int,
    model: nn.Module,
    spec: ModelSpec,
    precision: MixedPrecisionPolicy,
) -> tuple[Schedule | None, tuple[range, ...]]:
    """The pipeline schedule (built checked: deadlock-free, every channel in order) and the
    blocks of each of its stages, after checking that the model splits into its stages and
    that the rest of the config combines with it."""
    if dims.pp == 1:
        return None, ()
    pipe = config.pipeline
    if spec.pipeline is None:
        raise ConfigError(
            f"parallel.pp={dims.pp} needs to know how {type(model).__name__}'s forward splits "
            "into stages: declare ModelSpec(pipeline=PipelineCalls(...)) for it"
        )
    if pipe.schedule in ("zb_h1", "zbv") and config.train.activation_checkpointing != "none":
        raise ConfigError(
            f"pipeline.schedule={pipe.schedule!r} splits each backward into an input pass and "
            "a weight pass, and activation checkpointing would recompute every block for each; "
            "set train.activation_checkpointing='none' or pipeline.schedule='1f1b'"
        )
    if pipe.schedule in ("zb_h1", "zbv") and config.zero.stage == 3:
        raise ConfigError(
            f"pipeline.schedule={pipe.schedule!r} computes weight gradients in a pass of their "
            "own, after zero.stage=3 has released the parameters those passes read (layer "
            "norms); set zero.stage to 0, 1 or 2, or pipeline.schedule='1f1b'"
        )
    if pipe.schedule in ("zb_h1", "zbv") and config.offload.policy != "none":
        raise ConfigError(
            f"pipeline.schedule={pipe.schedule!r} computes weight gradients in a pass of their "
            f"own, after offload.policy={config.offload.policy!r} has released the chunks "
            "those passes read and write; set pipeline.schedule='1f1b' or offload.policy='none'"
        )
    schedule = build_pipeline_schedule(pipe.schedule, dims.pp, micro_batches, pipe.chunks)
    # whole sequences also under sequence parallelism: the costs are compared, not predicted
    micro_batch = (config.train.micro_batch, config.data.seq_len)
    split = stage_blocks(spec, model, schedule, pipe.partition, micro_batch, precision.param_dtype)
    return schedule, tuple(split)


def _attention(
    config: Config, dims: ParallelDims, model: nn.Module, spec: ModelSpec
) -> SparseAttention | None:
    """Block-sparse attention, checked against the model's attention cores."""
    cfg = config.attention
    if cfg.kind == "dense":
        return None
    _check_attention_cores(model, spec, "attention.kind='sparse'")
    if cfg.per_head and dims.tp > 1:
        raise ConfigError(
            f"attention.per_head=true with parallel.tp={dims.tp}: each rank holds a slice of the "
            "heads; use one layout for every head (attention.per_head=false)"
        )
    return sparse_attention(cfg, config.data.seq_len)


def _sharding(config: Config, dims: ParallelDims) -> Sharding:
    """ZeRO's stage as flags; with one shard there is nothing to shard. Chunks at stage 0
    over several ranks are ZeRO-3's (Gemini's default): stage 0 has no chunk layout."""
    stage = config.zero.stage
    if stage == 0 and config.offload.policy != "none":
        stage = 3
    shards = dims.dp_shard > 1
    return Sharding(
        stage=stage,
        optimizer=shards and stage >= 1,
        grads=shards and stage >= 2,
        params=shards and stage == 3,
        reshard_after_forward=config.zero.reshard_after_forward,
        prefetch=config.zero.prefetch,
    )


def _check_offload(config: Config, optimizer_given: bool) -> None:
    offload = config.offload
    check_offload(offload)
    if offload.optimizer != "device" and optimizer_given:
        raise ConfigError(
            f"offload.optimizer={offload.optimizer!r} brings its own AdamW; pass "
            "optimizer_factory=None or keep offload.optimizer='device'"
        )
    policy = offload.policy
    if offload.delayed_update and (offload.optimizer == "device" or policy != "none"):
        raise ConfigError(
            "offload.delayed_update overlaps the host's Adam step (offload.optimizer='host' or "
            "'disk') with the next step's compute on parameters that stay on the device; it "
            "needs one of those and offload.policy='none'"
        )
    if offload.delayed_update > config.train.steps:
        raise ConfigError(
            f"offload.delayed_update={offload.delayed_update} starts after the last step "
            f"(train.steps={config.train.steps}); lower it, or 0 for no delayed update"
        )
    if policy == "auto" and offload.device_budget_mb is None:
        raise ConfigError(
            "offload.policy='auto' places chunks within offload.device_budget_mb; set it "
            "(MiB of device memory for parameter and gradient chunks and activations)"
        )


def _check_disk_tier(plan: RunPlan) -> None:
    """Adam's states on disk (``offload.optimizer='disk'``) must fit under the per-rank cap:
    their predicted bytes are a lower bound (a rewrite also keeps the old version a while).
    An asynchronous save would copy what is on disk into host memory."""
    offload = plan.offload
    on_disk = offload.optimizer == "disk" or (plan.tiered and offload.disk_path is not None)
    if on_disk and plan.config.checkpoint.async_save:
        raise ConfigError(
            "checkpoint.async_save copies each rank's state into host memory, and this run "
            "keeps states on disk (offload.optimizer='disk' or parameter chunks under "
            "offload.disk_path) to spare that memory; save synchronously "
            "(checkpoint.async_save=false)"
        )
    cap = offload.disk_max_bytes
    if offload.optimizer != "disk" or cap is None:
        return
    need = math.ceil(plan.model_state_bytes()["optimizer_states"])
    if need > cap:
        raise ConfigError(
            f"offload.disk_max_bytes={cap} is below the {need} bytes Adam's states take on "
            f"disk per rank; raise it (to {2 * need} for room to rewrite) or leave it unset"
        )


# [Note: a given optimizer] A caller who passes an optimizer factory gets that optimizer as
# built: the config's learning-rate schedule, clipping and weight-decay groups apply only
# where the config sets them explicitly (``optim.warmup_steps`` / ``min_lr_ratio``,
# ``optim.grad_clip``, ``optim.weight_decay``), not from their defaults. Without a factory the
# engine builds AdamW from the whole ``optim`` section, defaults included.


def _optimizer_use(
    config: Config, optimizer_given: bool, onebit_freeze: int | None
) -> OptimizerUse:
    optim = config.optim
    explicit = optim.model_fields_set if optimizer_given else set(type(optim).model_fields)
    return OptimizerUse(
        builtin=not optimizer_given,
        lr_schedule=any(key in explicit for key in OPTIM_SCHEDULE_KEYS),
        grad_clip=optim.grad_clip if "grad_clip" in explicit else 0.0,
        decay_groups="weight_decay" in explicit,
        onebit_freeze=onebit_freeze,
        compressed_momentum=onebit_freeze is not None
        and optim.name == "onebit_adam"
        and config.zero.stage == 0,
    )


def _onebit_freeze(
    config: Config, dims: ParallelDims, optimizer_given: bool, trainable: int
) -> int | None:
    """1-bit or 0/1 Adam's freeze step, after checking what it combines with
    (docs/onebit_adam.md)."""
    optim, steps = config.optim, config.train.steps
    if optim.name not in ("onebit_adam", "zero_one_adam"):
        return None
    feature = f"optim.name={optim.name!r}"
    if optimizer_given:
        raise ConfigError(f"{feature} builds its own optimizer; pass optimizer_factory=None")
    limits = {
        "zero.stage=0, 1 or 2 (stage 3 shards the parameters the exchange reads)": (
            config.zero.stage == 3
        ),
        "offload.policy='none'": config.offload.policy != "none",
        "offload.optimizer='device'": config.offload.optimizer != "device",
        "parallel.pp=1": dims.pp > 1,
    }
    if optim.name == "zero_one_adam":  # local steps leave each rank its own parameters
        limits = {
            "zero.stage=0 (local steps give each rank its own parameters, which sharded "
            "states cannot follow)": config.zero.stage != 0,
            **limits,
            "parallel.tp=1": dims.tp > 1,
            "parallel.sp=1": dims.sp > 1,
            "precision.dtype='bf16' or 'fp32' (fp16's skipped steps would need every "
            "rank's agreement during local steps)": config.precision.dtype == "fp16",
        }
        if "variance_refresh" in optim.model_fields_set:
            raise ConfigError(
                "optim.variance_refresh is 1-bit Adam's; 0/1 Adam updates the variance at "
                "doubling gaps (optim.variance_gap_doubles_after) until optim.freeze_step"
            )
    _refuse_combinations(feature, limits)
    freeze = optim.freeze_step if optim.freeze_step is not None else max(1, steps // 5)
    if freeze >= steps:
        raise ConfigError(
            f"optim.freeze_step={freeze} leaves no compressed step in train.steps={steps}: "
            f"{feature} compresses only after the freeze; use a freeze_step below train.steps"
        )
    per_rank = trainable // (dims.tp * dims.dp_replicate * dims.dp_shard * dims.sp)
    if optim.compression_chunk > per_rank:
        raise ConfigError(
            f"optim.compression_chunk={optim.compression_chunk} is larger than a rank's slice "
            f"of the gradients ({per_rank} elements): use a chunk of at most {per_rank}"
        )
    return freeze


def _tp_plan(config: Config, dims: ParallelDims, spec: ModelSpec) -> Plan:
    if spec.tp_plan is None:
        raise ConfigError(
            f"parallel.tp={dims.tp}: the model has no tensor-parallel plan; declare one in "
            "its ModelSpec (tp_plan=) or pass tp_plan= to initialize()"
        )
    return spec.tp_plan(dims, config.train.micro_batch, config.parallel.tp_sequence_parallel)
