"""Typed run configuration: loaded from TOML, overridden by ``--set a.b=c``, validated once.

Every field has a docstring with its unit; ``shardwise train --help-config`` prints them.
Inside the library the validated models are trusted; all checks that need the world size
(parallel degrees, batch divisibility) live in `resolve_batch` and
`shardwise.distributed.dims.ParallelDims`, and run before any process group exists.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
import tomllib
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from shardwise.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False
    )


class ModelConfig(_Section):
    name: str = "gpt"
    """Registered model name (see `shardwise.models.MODELS`): gpt (the reference decoder) or hf
    (a Hugging Face causal LM built from `hf_config`)."""
    hf_config: str | None = None
    """name = "hf": a built-in tiny config (gpt2-tiny, llama-tiny) or the path of a Hugging
    Face config.json (or a directory holding one); the model is built from it, no download."""
    preset: str = "tiny"
    """Size preset of the model: tiny, mini, small, medium, large, xl."""
    init_from: str | None = None
    """Start from these weights instead of a random init: a safetensors file, or a directory
    holding model.safetensors (a Hugging Face model directory, `shardwise convert` output);
    names as in the model (a tied weight under any of its names)."""
    n_layers: int | None = Field(None, ge=1)
    """Transformer blocks; overrides the preset."""
    d_model: int | None = Field(None, ge=1)
    """Hidden size in elements; overrides the preset."""
    n_heads: int | None = Field(None, ge=1)
    """Attention heads; must divide d_model; overrides the preset."""
    d_ff: int | None = Field(None, ge=1)
    """MLP hidden size in elements; default 4*d_model (GELU) or 8/3*d_model (SwiGLU)."""
    vocab_size: int = Field(256, ge=2)
    """Vocabulary size in tokens (256 for the byte-level tokenizer)."""
    positions: Literal["rope", "learned"] = "rope"
    """Position encoding: rotary (rope) or a learned table (learned)."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """MLP flavour."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability (0 keeps runs bit-reproducible across layouts)."""
    init_std: float = Field(0.02, gt=0.0)
    """Standard deviation of the normal weight init."""


class DataConfig(_Section):
    source: Literal["embedded", "file"] = "embedded"
    """embedded: Python standard library source text (no download); file: `path`."""
    path: str | None = None
    """Local .txt or .jsonl file (or a directory of them) when source = "file"."""
    format: Literal["auto", "text", "jsonl"] = "auto"
    """File format; auto picks by extension."""
    jsonl_field: str = "text"
    """Field holding the text in each JSON line."""
    seq_len: int = Field(128, ge=2)
    """Tokens per training sequence."""
    max_bytes: int = Field(8_000_000, ge=1)
    """Upper bound on corpus bytes read into memory."""
    pack_documents: bool = False
    """Sequences pack several documents (a file of the corpus, a JSON line), each started by
    token 0 (the NUL byte), and attention stays inside documents: a token sees the earlier
    tokens of its own document only (Megatron's reset_attention_mask); positions run on.
    Dense, ring, Ulysses and hybrid attention."""


class ParallelConfig(_Section):
    dp_replicate: int = Field(1, ge=1)
    """Data-parallel replicas (replicated model states, across nodes)."""
    dp_shard: int = Field(-1, ge=-1)
    """Data-parallel shard degree; -1 = whatever the other degrees leave of the world size."""
    pp: int = Field(1, ge=1)
    """Pipeline stages."""
    tp: int = Field(1, ge=1)
    """Tensor-parallel degree."""
    sp: int = Field(1, ge=1)
    """Sequence-parallel degree (ring attention / Ulysses)."""
    tp_mode: Literal["1d", "2d", "2.5d", "3d"] = "1d"
    """Tensor-parallel layout."""
    tp_depth: int = Field(1, ge=1)
    """Depth d of the 2.5D layout."""
    tp_sequence_parallel: bool = False
    """1d only: Megatron sequence parallelism — layer norms and residual adds run on sequence
    shards (reduce-scatter / all-gather instead of all-reduce); seq_len must divide by tp."""


class PipelineConfig(_Section):
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv"] = "1f1b"
    """Pipeline schedule (parallel.pp > 1); micro-batches are the step's
    (train.global_batch / (dp x train.micro_batch))."""
    chunks: int = Field(1, ge=1)
    """Stages per pipeline rank (virtual stages: interleaved_1f1b, zbv)."""
    partition: Literal["layers", "params", "flops", "time", "memory"] = "layers"
    """Split the blocks into stages of equal block count, of equal parameter count, of equal
    FLOPs counted on the meta device, of equal time measured on the device before launch, or
    of equal peak activations (measured bytes times the micro-batches the schedule holds);
    the last three count the embedding and the head too (docs/pipeline.md)."""


class AttentionConfig(_Section):
    kind: Literal["dense", "sparse"] = "dense"
    """dense: torch's scaled_dot_product_attention; sparse: block-sparse attention computing
    only the blocks `layout` keeps (docs/attention.md)."""
    layout: str = "bigbird"
    """Block layout (kind = sparse): dense, sliding_window, bslongformer, bigbird, fixed,
    variable."""
    block: int = Field(64, ge=1)
    """Tokens per block; data.seq_len must be a multiple of it."""
    window: int = Field(3, ge=1)
    """Sliding-window width in blocks (sliding_window, bslongformer, bigbird); the local
    window of fixed."""
    global_blocks: int = Field(1, ge=0)
    """Global blocks (the first ones; fixed: the last ones of every window)."""
    random_blocks: int = Field(2, ge=0)
    """Random key blocks per query block (bigbird, variable)."""
    windows: tuple[PositiveInt, ...] = Field((4,), min_length=1)
    """Local window sizes in blocks, the last repeated (variable)."""
    per_head: bool = False
    """Draw random blocks per head (else every head shares one layout)."""
    seed: int = 0
    """Seed of the random blocks (every rank draws the same layout)."""
    sequence_parallel: Literal["ring", "ulysses", "hybrid"] = "ring"
    """How attention runs over the parallel.sp ranks (sp > 1): ring (each rank holds two
    zig-zag chunks of the sequence; key/value blocks travel around; data.seq_len a multiple
    of 2 x sp), ulysses (all-to-all to whole sequences of heads/sp heads; sp divides the
    heads) or hybrid (Ulysses within groups of attention.ulysses_degree ranks, ring across
    them: sp may exceed the heads). docs/sequence_parallel.md."""
    ulysses_degree: int = Field(2, ge=1)
    """Hybrid only: ranks of each Ulysses group (it divides parallel.sp and the heads)."""


class ZeroConfig(_Section):
    stage: int = Field(0, ge=0, le=3)
    """ZeRO stage: 0 = replicated (DP), 1 = shard optimizer states, 2 = + gradients,
    3 = + parameters (a chunk per block, gathered around its use; docs/zero.md)."""
    reshard_after_forward: bool = True
    """Stage 3: free gathered parameters after forward (gather again for backward). Under
    offload.policy the device budget decides instead: a gathered chunk stays until its room
    is needed."""
    prefetch: bool = True
    """Stage 3 and offload.policy: bring in the next module's parameters (gather them, or
    read their chunk back) while the current one computes."""


class OffloadConfig(_Section):
    optimizer: Literal["device", "host", "disk"] = "device"
    """Where Adam's states live: with the parameters, in host memory (ZeRO-Offload's CPU
    Adam), or on disk under disk_path, streamed through host memory chunk by chunk
    (ZeRO-Infinity)."""
    delayed_update: int = Field(0, ge=0)
    """optimizer = host or disk, k > 0: from optimizer step k on, step t's Adam update runs
    on the host in the background while step t+1's forward and backward compute (ZeRO-Offload's
    delayed parameter update), so each step computes with the parameters from before the
    previous step's update; costs a host copy of the parameters and gradients the rank updates
    (docs/offload.md). offload.policy none only (any zero.stage). 0: off."""
    chunk_mb: int = Field(64, ge=1)
    """Adam states streamed per chunk, in MiB (about 3 chunks are in host memory at once)."""
    disk_path: str | None = None
    """Existing writable directory for the disk tier: Adam states (optimizer = "disk") and
    parameter chunks beyond host_budget_mb (a private run directory is made in it and removed
    on exit; stale ones of crashed runs are removed at start)."""
    disk_max_bytes: int | None = Field(None, ge=0)
    """Cap on the disk tier's files, in bytes; a write past it fails with a clear error."""
    disk_workers: int = Field(2, ge=1)
    """IO threads of the disk tier."""
    direct_io: bool = True
    """Read and write the disk tier with O_DIRECT where the file system takes it (through one
    4 MiB page-aligned buffer per IO thread), so the page cache holds none of its bytes; false,
    or a file system without it (the log says so): buffered IO."""
    policy: Literal["none", "static", "auto"] = "none"
    """Parameters in chunks that move between device, host and disk (Gemini; over several
    data-parallel ranks each keeps 1/N of every chunk): none = off; static = the last
    param_device_fraction of the chunks stay on the device, the others stream through it;
    auto = placed from a traced warm-up step within device_budget_mb."""
    device_budget_mb: float | None = Field(None, gt=0)
    """Device memory in MiB: auto = parameter chunks and activations (required); static =
    parameter chunks only (default: the pinned chunks plus one module's chunks). Gradients and
    device-resident Adam states are outside it."""
    host_budget_mb: float | None = Field(None, gt=0)
    """Host memory for parameter chunks in MiB; chunks beyond it go to disk_path (default: no
    limit)."""
    param_device_fraction: float = Field(1.0, ge=0.0, le=1.0)
    """static: fraction of the parameter chunks, the last in execution order, that never leave
    the device."""
    chunk_min_mb: float = Field(0.0, ge=0.0)
    """Smallest parameter chunk in MiB; the chunk-size search starts at the larger of this and
    the largest parameter."""
    chunk_search_range_mb: float = Field(32.0, ge=0.0)
    """How far above its start the chunk-size search may go, in MiB: larger chunks may waste
    less padding but raise the minimum device budget."""
    chunk_search_step_mb: float = Field(1.0, gt=0.0)
    """Step of the chunk-size search in MiB."""


class PrecisionConfig(_Section):
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Parameter and compute dtype; auto asks the accelerator (bf16 where fast, else fp32)."""
    reduce_dtype: Literal["fp32", "param"] = "fp32"
    """Dtype gradients are reduced in: fp32, or the parameter dtype."""
    initial_scale: float = Field(2.0**16, gt=0)
    """fp16 only: initial loss scale."""
    growth_interval: int = Field(1000, ge=1)
    """fp16 only: clean steps before the loss scale doubles."""
    hysteresis: int = Field(2, ge=1)
    """fp16 only: the h-th overflow (not necessarily consecutive) halves the loss scale."""
    min_scale: float = Field(1.0, gt=0)
    """fp16 only: the loss scale never goes below this."""
    max_skipped_in_a_row: int = Field(20, ge=0)
    """fp16 only: this many optimizer steps skipped in a row (gradients overflow at every
    scale tried) end the run with an error; 0: never."""


class OptimConfig(_Section):
    name: Literal["adamw", "onebit_adam", "zero_one_adam"] = "adamw"
    """Optimizer: AdamW; 1-bit Adam (AdamW until freeze_step, then the variance frozen and
    momenta, or under ZeRO 1-2 gradients, exchanged at one bit per element); or 0/1 Adam
    (the variance updated at doubling gaps until freeze_step, compressed gradients between,
    then local steps with compressed synchronisations). docs/onebit_adam.md."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.95,
    )
    """Adam betas, each in [0, 1)."""
    eps: float = Field(1e-8, gt=0)
    """Adam epsilon."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay for matrices (biases, norms and embeddings get none)."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warm-up, in optimizer steps."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The decay ends at lr * min_lr_ratio (1: constant after the warm-up)."""
    decay: Literal["cosine", "linear"] = "cosine"
    """Shape of the decay from lr to lr * min_lr_ratio over the steps after the warm-up."""
    grad_clip: float = Field(1.0, ge=0)
    """Global gradient-norm clip; 0 disables."""
    freeze_step: int | None = Field(None, ge=1)
    """1-bit Adam: exact AdamW steps before the variance freezes; 0/1 Adam: the last step
    that may update the variance, local steps after it. Default 20% of train.steps."""
    compression_chunk: int = Field(64, ge=1)
    """1-bit and 0/1 Adam: elements per fp32 scale of what travels compressed."""
    variance_refresh: int = Field(10, ge=0)
    """1-bit Adam: after the freeze, every this many steps one step runs on exact gradients
    and refreshes the variance; 0: frozen for good (the paper's 1-bit Adam)."""
    update_bound: float = Field(1.0, ge=0)
    """1-bit and 0/1 Adam: from the first step with a frozen variance, each element's step
    m_hat / (sqrt(v_hat) + eps) is clamped to +-this (units of lr; 1 = a steady gradient's
    Adam step); 0: unbounded."""
    variance_gap_doubles_after: int = Field(16, ge=1)
    """0/1 Adam: the variance is updated at every step first; the gap between two updates
    doubles after every this many updates (the paper's kappa)."""
    sync_interval_doubles_after: int = Field(32, ge=1)
    """0/1 Adam: after the freeze the ranks synchronise after every local step first; the
    interval doubles after every this many steps, up to sync_interval_max."""
    sync_interval_max: int = Field(8, ge=1)
    """0/1 Adam: the most local steps between two synchronisations (the paper's H)."""


class TrainingConfig(_Section):
    steps: int = Field(300, ge=1)
    """Optimizer steps."""
    micro_batch: int = Field(8, ge=1)
    """Sequences per rank per forward/backward."""
    global_batch: int | None = Field(None, ge=1)
    """Sequences per optimizer step over all data-parallel ranks; default micro_batch * dp."""
    seed: int = 1234
    """Seed of model init and data order."""
    activation_checkpointing: Literal["none", "full", "every_n"] = "none"
    """Recompute block activations in backward: none, every block, or every n-th block."""
    checkpoint_every_n: int = Field(2, ge=1)
    """n for activation_checkpointing = every_n."""


class DistributedConfig(_Section):
    timeout_s: float = Field(300.0, gt=0)
    """Seconds a collective may wait before every rank aborts with a message."""
    bucket_mb: float = Field(25.0, gt=0)
    """Gradient bucket size in MiB (one collective per bucket)."""
    check_collectives: bool = False
    """Debug: before every collective the ranks of its group compare op, shape and dtype (one
    small all-gather each); a mismatch is one error naming both call sites instead of a hang
    or mixed data. Slow: for hunting a bug."""
    emulate_gbps: float | None = Field(None, gt=0)
    """Emulate a slow link: every collective also waits its wire bytes at this many Gbit/s
    (for measuring bandwidth-bound behaviour on one machine; None: off)."""


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0)
    """Save every this many steps; 0 = only at the end."""
    keep: int = Field(2, ge=1)
    """Most recent checkpoints kept."""
    async_save: bool = False
    """Write checkpoints in the background: a save copies the state into host memory (one
    more copy of each rank's state until written) and training goes on while a thread
    writes and commits it; the next save and the end of the run wait for it. Refused where
    states live on disk (offload.optimizer = "disk", parameter chunks under disk_path)."""


class LogConfig(_Section):
    every: int = Field(10, ge=1)
    """Steps between progress-line refreshes (metrics.jsonl gets every step)."""
    progress: bool = True
    """Show the progress bar."""
    tensorboard: bool = False
    """Also write every step's metrics as TensorBoard scalars to <out>/tensorboard (needs the
    tensorboard package: pip install 'shardwise[tensorboard]')."""


class Config(_Section):
    """The whole run. Sections mirror the TOML tables."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    parallel: ParallelConfig = ParallelConfig()
    pipeline: PipelineConfig = PipelineConfig()
    attention: AttentionConfig = AttentionConfig()
    zero: ZeroConfig = ZeroConfig()
    offload: OffloadConfig = OffloadConfig()
    precision: PrecisionConfig = PrecisionConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainingConfig = TrainingConfig()
    distributed: DistributedConfig = DistributedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Validate a nested dict; errors become one-line `ConfigError`s."""
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(_describe(err)) from None

    @classmethod
    def from_file(
        cls,
        path: str | Path | None = None,
        overrides: list[str] = (),
        settings: dict[str, dict[str, Any]] | None = None,
    ) -> Config:
        """Load TOML (or start from defaults when `path` is None), lay `settings` (sections of
        keys, e.g. translated from a DeepSpeed config) over it, then apply overrides."""
        raw: dict[str, Any] = {}
        if path is not None:
            file = Path(path)
            if file.is_dir():
                raise ConfigError(f"config file {str(file)!r} is a directory, not a TOML file")
            if not file.is_file():
                raise ConfigError(f"config file {str(file)!r} does not exist")
            try:
                raw = tomllib.loads(file.read_text())
            except UnicodeDecodeError:
                raise ConfigError(f"config file {str(file)!r} is not text (UTF-8)") from None
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"config file {str(file)!r} is not valid TOML: {err}") from None
        for section, keys in (settings or {}).items():
            raw.setdefault(section, {}).update(keys)
        for item in overrides:
            _apply_override(raw, item)
        return cls.from_dict(raw)

    def to_toml(self) -> str:
        """The resolved config as TOML (unset optional fields are left out)."""
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some fields of some sections changed: ``cfg.replace(train={"steps": 5})``."""
        raw = self.model_dump(exclude_unset=True)  # what was set stays set, nothing more
        for name, fields in sections.items():
            raw.setdefault(name, {}).update(fields)
        return Config.from_dict(raw)


def resolve_batch(train: TrainingConfig, dp_degree: int) -> int:
    """Micro-batches accumulated per optimizer step, checked against the global batch."""
    per_step = train.micro_batch * dp_degree
    global_batch = train.global_batch or per_step
    if global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={global_batch} is not divisible by micro_batch x dp = "
            f"{train.micro_batch} x {dp_degree} = {per_step}; use a multiple of {per_step}, "
            "or a smaller train.micro_batch"
        )
    return global_batch // per_step


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r} is not of the form section.key=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
    node[leaf] = _parse_value(text.strip())


def _parse_value(text: str) -> Any:
    """A TOML literal (``3``, ``1e-3``, ``true``, ``[0.9, 0.95]``, ``"x"``) or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return _unknown_key(first["loc"])
    value = first.get("input")
    return f"{where}={value!r}: {first['msg'].lower()}"


def _unknown_key(loc: tuple) -> str:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        model = model.model_fields[part].annotation
    valid = list(model.model_fields)
    name = ".".join(str(p) for p in loc)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    hint = f"did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
    return f"unknown config key {name!r}; {hint or 'valid keys: ' + ', '.join(valid)}"


def config_reference() -> str:
    """Markdown table of every config key with its default and docstring (docs/config.md)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `shardwise.config.config_reference()`; a test keeps it in sync.",
        "Set keys in a TOML file (`[section]` tables) or with `--set section.key=value`.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for section, field in Config.model_fields.items():
        for name, info in field.annotation.model_fields.items():
            default = "unset" if info.default is None else f"`{info.default!r}`"
            meaning = " ".join(info.description.split())  # one table row per key
            lines.append(f"| `{section}.{name}` | {default} | {meaning} |")
    return "\n".join(lines) + "\n"
