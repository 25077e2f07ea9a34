"""DeepSpeed JSON configs, accepted as they are: ``shardwise train --deepspeed-config ds.json``.

[Note: DeepSpeed configs] The file is translated into shardwise config keys, laid over the
TOML config and under ``--set`` (a run can still be changed from the command line); the run
writes the resolved config to its config.toml, so the translation is always visible. Every
key of the file is one of three kinds:

- *mapped*: a shardwise key means the same (docs/deepspeed.md has the table);
- *ignored*, named in one warning line: it tunes speed, memory layout or logging only, so
  the run trains the same without it (``overlap_comm``, bucket and buffer counts,
  ``pin_memory``, monitors);
- *refused*: shardwise cannot do what it asks (a static loss scale, LAMB, ZeRO++
  quantisation, DeepSpeed's pipeline engine, ...) or it is no DeepSpeed key. All refused
  keys are named in one error line before anything runs. A refused feature switched off
  (``"amp": {"enabled": false}``, ``"sparse_gradients": false``) is no refusal.

``"auto"`` (the Hugging Face integration's "fill in from the trainer") keeps shardwise's
value. A key the file leaves out keeps shardwise's value too, except inside an ``optimizer``
or ``scheduler`` section: its ``type`` names one DeepSpeed class, whose defaults then hold
for the keys the section leaves out (as they would under DeepSpeed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardwise.config import Config
from shardwise.distributed.dims import ParallelDims
from shardwise.errors import ConfigError

AUTO = "auto"
MIB = 2**20
DEVICES = {"none": None, "cpu": "host", "nvme": "disk"}
"""DeepSpeed's offload devices -> shardwise's tiers (None: not offloaded)."""
OPTIMIZERS = {
    "adam": "adamw", "adamw": "adamw", "onebitadam": "onebit_adam", "zerooneadam": "zero_one_adam",
}  # fmt: skip
"""DeepSpeed optimizer types (case-insensitive, as DeepSpeed reads them) -> `optim.name`.
DeepSpeed's Adam is AdamW unless ``adam_w_mode`` is false."""
OPTIMIZER_DEFAULTS = {
    "adamw": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    "onebit_adam": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                    "freeze_step": 100000},
    "zero_one_adam": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                      "var_freeze_step": 100000, "var_update_scaler": 16,
                      "local_step_scaler": 32678, "local_step_clipper": 16},
}  # fmt: skip
"""DeepSpeed's defaults of each optimizer's params (torch's Adam signature)."""
OPTIMIZER_KEYS = {
    "var_freeze_step": "freeze_step",
    "var_update_scaler": "variance_gap_doubles_after",
    "local_step_scaler": "sync_interval_doubles_after",
    "local_step_clipper": "sync_interval_max",
}
"""DeepSpeed's names of 0/1 Adam's params -> `optim` keys (the others are the same)."""
SCHEDULERS = {
    "WarmupLR": ({"warmup_min_lr": 0, "warmup_num_steps": 1000, "warmup_type": "log"},
                 {"min_lr_ratio": 1.0}),
    "WarmupDecayLR": ({"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000,
                       "warmup_type": "log"},
                      {"decay": "linear", "min_lr_ratio": 0.0}),
    "WarmupCosineLR": ({"warmup_min_ratio": 0, "warmup_num_steps": 1000, "cos_min_ratio": 1e-4,
                        "warmup_type": "log"},
                       {"decay": "cosine"}),
}  # fmt: skip
"""DeepSpeed scheduler -> (its defaults, the shardwise decay it is)."""

TOP_TUNING = {
    "wall_clock_breakdown", "memory_breakdown", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "tensorboard", "wandb", "csv_monitor", "comet",
    "comms_logger", "flops_profiler", "aio", "activation_checkpointing", "dump_state",
    "prescale_gradients", "gradient_predivide_factor", "dataloader_drop_last", "checkpoint",
    "autotuning",
}  # fmt: skip
"""Top-level keys that change speed, memory layout or logging only. activation_checkpointing
configures the checkpointing API that DeepSpeed model code calls; shardwise's is
`train.activation_checkpointing`."""
ZERO_TUNING = {
    "overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions",
    "allgather_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "stage3_param_persistence_threshold", "sub_group_size", "round_robin_gradients",
    "stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save",
    "elastic_checkpoint", "load_from_fp32_weights", "ignore_unused_parameters",
    "memory_efficient_linear", "use_multi_rank_bucket_allreduce", "aio",
}  # fmt: skip
OFFLOAD_TUNING = {
    "pin_memory", "buffer_count", "buffer_size", "fast_init", "pipeline_read", "pipeline_write",
}  # fmt: skip
FP16_TUNING = {"auto_cast"}
OPTIMIZER_TUNING = {"torch_adam", "cuda_aware", "comm_backend_name"}


@dataclass
class DeepSpeedConfig:
    """A DeepSpeed config translated: shardwise `settings` (sections of keys), the batch keys
    (resolved against the data-parallel degree by `config_settings`), and the keys ignored."""

    path: Path
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    micro_batch: int | None = None
    accumulation: int | None = None
    train_batch: int | None = None

    def set(self, key: str, value: Any) -> None:
        """Set shardwise's ``section.name`` unless `value` is ``"auto"``."""
        if value == AUTO:
            return
        section, name = key.split(".")
        self.settings.setdefault(section, {})[name] = value

    def config_settings(self, dp: int, default_micro_batch: int) -> dict[str, dict[str, Any]]:
        """The settings with `train.micro_batch` / `train.global_batch` from DeepSpeed's
        three batch keys at `dp` data-parallel ranks (any two fix the third, as in DeepSpeed)."""
        settings = {section: dict(keys) for section, keys in self.settings.items()}
        batch = self._batch(dp, default_micro_batch)
        if batch:
            settings.setdefault("train", {}).update(batch)
        return settings

    def warning(self) -> str | None:
        """One line naming the ignored keys and what runs differently, or None."""
        parts = list(self.notes)
        if self.ignored:
            parts.append(
                "ignored (speed, memory layout or logging only): " + ", ".join(self.ignored)
            )
        return f"deepspeed config {self.path}: " + "; ".join(parts) if parts else None

    def _batch(self, dp: int, default_micro_batch: int) -> dict[str, int]:
        micro, accumulation, total = self.micro_batch, self.accumulation, self.train_batch
        if total is None:
            if micro is None and accumulation is None:
                return {}
            micro = micro or default_micro_batch
            return {"micro_batch": micro, "global_batch": micro * (accumulation or 1) * dp}
        if micro is None:
            micro = total // ((accumulation or 1) * dp)
        elif accumulation is None:
            accumulation = total // (micro * dp)
        if not micro or total != micro * (accumulation or 1) * dp:
            given = [
                f"{name}={value}"
                for name, value in (
                    ("train_micro_batch_size_per_gpu", self.micro_batch),
                    ("gradient_accumulation_steps", self.accumulation),
                )
                if value is not None
            ]
            raise ConfigError(
                f"deepspeed config {self.path}: train_batch_size={total} is not "
                f"micro batch x accumulation steps x dp ({', '.join([*given, f'dp={dp}'])}; "
                "dp = ranks / (tp x pp x sp))"
            )
        return {"micro_batch": micro, "global_batch": total}


def config_from_deepspeed(
    path: str | Path,
    world_size: int,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> tuple[Config, str | None]:
    """The run's `Config`: the TOML `config_file` (or the defaults), the DeepSpeed file at
    `path` over it, `overrides` (``"section.key=value"``) over both; and the warning line
    naming the ignored keys, if any. `world_size` fixes the batch keys' data-parallel degree.
    ``shardwise train --deepspeed-config`` calls this; so can a script before
    ``shardwise.initialize(model, None, config)``."""
    base = Config.from_file(config_file, list(overrides))
    ds = read_deepspeed_config(path)
    dp = ParallelDims.from_config(base.parallel, world_size).dp
    settings = ds.config_settings(dp, base.train.micro_batch)
    try:
        return Config.from_file(config_file, list(overrides), settings), ds.warning()
    except ConfigError as err:  # the file and overrides passed above: the translation is at fault
        raise ConfigError(f"{err} (from deepspeed config {path})") from None


def read_deepspeed_config(path: str | Path) -> DeepSpeedConfig:
    """Read and translate a DeepSpeed JSON file; every refused key in one `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed config {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text(), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"deepspeed config {path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"deepspeed config {path}: expected a JSON object at the top")
    ds = DeepSpeedConfig(path)
    _translate(ds, raw)
    if ds.refused:
        raise ConfigError(
            f"deepspeed config {path}: not supported: {'; '.join(ds.refused)} "
            "(docs/deepspeed.md lists what maps)"
        )
    return ds


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"key {repeated[0]!r} appears twice")
    return dict(pairs)


def _translate(ds: DeepSpeedConfig, raw: dict[str, Any]) -> None:
    fp16, bf16 = _enabled(raw.get("fp16")), _enabled(raw.get("bf16"))
    param_dtype = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    if fp16 and bf16:
        ds.refused.append("fp16.enabled and bf16.enabled both true (pick one)")
    top: dict[str, Callable[[Any], None]] = {
        "train_batch_size": lambda v: _batch_key(ds, "train_batch", v),
        "train_micro_batch_size_per_gpu": lambda v: _batch_key(ds, "micro_batch", v),
        "gradient_accumulation_steps": lambda v: _batch_key(ds, "accumulation", v),
        "gradient_clipping": lambda v: ds.set("optim.grad_clip", v),
        "steps_per_print": lambda v: ds.set("log.every", v),
        "fp16": lambda v: _fp16(ds, v),
        "bf16": lambda v: _walk(ds, "bf16", v, {"enabled": lambda on: _precision(ds, on, "bf16")}),
        "zero_optimization": lambda v: _zero(ds, v, param_dtype),
        "optimizer": lambda v: _optimizer(ds, v),
        "scheduler": lambda v: _scheduler(ds, v),
        "communication_data_type": lambda v: _communication_dtype(ds, v, param_dtype),
    }
    # the scheduler's warmup_max_lr overrides the optimizer's lr (DeepSpeed sets the rate
    # from it), whichever comes first in the file
    ordered = sorted(raw.items(), key=lambda item: item[0] == "scheduler")
    _walk(ds, "", dict(ordered), top, TOP_TUNING)


def _walk(
    ds: DeepSpeedConfig,
    prefix: str,
    section: Any,
    handlers: dict[str, Callable[[Any], None]],
    tuning: set[str] = frozenset(),
) -> None:
    """Hand every key of `section` to its handler; `tuning` keys are noted as ignored, the
    rest refused unless switched off."""
    if not isinstance(section, dict):
        ds.refused.append(f"{prefix}={section!r} (expected a JSON object)")
        return
    for key, value in section.items():
        name = f"{prefix}.{key}" if prefix else key
        if key in handlers:
            handlers[key](value)
        elif key in tuning:
            ds.ignored.append(name)
        elif not _switched_off(value):
            ds.refused.append(f"{name} (no shardwise equivalent)")


def _read_below(value: Any) -> None:
    """Handler of a key its section's function reads itself."""


def _switched_off(value: Any) -> bool:
    return (
        value is False
        or value is None
        or (isinstance(value, dict) and value.get("enabled") is False)
    )


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and section.get("enabled") is True


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _times(value: Any, factor: float) -> Any:
    """`value` x `factor` if it is a number; else `value`, for the config to name."""
    return value * factor if _number(value) else value


def _nonzero(value: Any) -> Any:
    """Whether a number is nonzero; any other value as it is, for the config to name."""
    return value != 0 if _number(value) else value


def _refuse_unless(ds: DeepSpeedConfig, ok: bool, why: str) -> None:
    if not ok:
        ds.refused.append(why)


def _batch_key(ds: DeepSpeedConfig, attr: str, value: Any) -> None:
    if value == AUTO:
        return
    if not _number(value) or value < 1 or value != int(value):
        ds.refused.append(f"batch size {value!r} (expected a positive integer)")
        return
    setattr(ds, attr, int(value))


def _precision(ds: DeepSpeedConfig, enabled: Any, dtype: str) -> None:
    if enabled is True:
        ds.set("precision.dtype", dtype)


def _fp16(ds: DeepSpeedConfig, section: Any) -> None:
    handlers = {
        "enabled": lambda v: _precision(ds, v, "fp16"),
        "loss_scale": lambda v: _refuse_unless(
            ds, v in (0, AUTO), f"fp16.loss_scale={v!r} (a static loss scale; shardwise "
            "scales dynamically, as loss_scale=0 does)",
        ),
        "initial_scale_power": lambda v: ds.set(
            "precision.initial_scale", 2.0**v if _number(v) else v
        ),
        "loss_scale_window": lambda v: ds.set("precision.growth_interval", v),
        "hysteresis": lambda v: ds.set("precision.hysteresis", v),
        "min_loss_scale": lambda v: ds.set("precision.min_scale", v),
        "consecutive_hysteresis": lambda v: _refuse_unless(
            ds, v in (False, AUTO), "fp16.consecutive_hysteresis=true (shardwise counts "
            "overflows whether consecutive or not)",
        ),
    }  # fmt: skip
    _walk(ds, "fp16", section, handlers, FP16_TUNING)


def _zero(ds: DeepSpeedConfig, section: Any, param_dtype: str) -> None:
    handlers = {
        "stage": lambda v: ds.set("zero.stage", v),
        # DeepSpeed's bucket counts elements; shardwise reduces gradients in fp32
        "reduce_bucket_size": lambda v: ds.set("distributed.bucket_mb", _times(v, 4 / MIB)),
        "stage3_prefetch_bucket_size": lambda v: ds.set("zero.prefetch", _nonzero(v)),
        "offload_optimizer": lambda v: _offload_optimizer(ds, v),
        "offload_param": lambda v: _offload_param(ds, v, param_dtype),
    }
    _walk(ds, "zero_optimization", section, handlers, ZERO_TUNING)
    if isinstance(section, dict) and ds.settings.get("offload", {}).get("policy"):
        stage = section.get("stage", 0)
        _refuse_unless(
            ds, stage in (3, AUTO), f"zero_optimization.offload_param with stage {stage!r} "
            "(DeepSpeed offloads parameters at stage 3 only)",
        )  # fmt: skip


def _offload_tier(ds: DeepSpeedConfig, prefix: str, section: Any) -> str | None:
    """Walk an offload section; its tier ("host", "disk" or None), the disk path set."""
    handlers = {
        "device": _read_below,
        "nvme_path": _read_below,
        "max_in_cpu": _read_below,
        "ratio": lambda v: _refuse_unless(
            ds, v in (1, AUTO), f"{prefix}.ratio={v!r} (partial offload)"
        ),
    }
    _walk(ds, prefix, section, handlers, OFFLOAD_TUNING)
    if not isinstance(section, dict):
        return None
    device = section.get("device", "none")
    if device not in DEVICES:
        ds.refused.append(f"{prefix}.device={device!r} (one of none, cpu, nvme)")
        return None
    tier = DEVICES[device]
    if tier == "disk":
        path = section.get("nvme_path")
        known = ds.settings.get("offload", {}).get("disk_path", path)
        if path is None:
            ds.refused.append(f"{prefix}.device='nvme' without nvme_path")
        elif known != path:
            ds.refused.append(
                f"{prefix}.nvme_path={path!r} differs from {known!r} (shardwise has one disk tier)"
            )
        else:
            ds.set("offload.disk_path", path)
    return tier


def _offload_optimizer(ds: DeepSpeedConfig, section: Any) -> None:
    tier = _offload_tier(ds, "zero_optimization.offload_optimizer", section)
    if tier is not None:
        ds.set("offload.optimizer", tier)


def _offload_param(ds: DeepSpeedConfig, section: Any, param_dtype: str) -> None:
    """Parameters offloaded = every parameter chunk streams through the device from host
    memory (and, with nvme, from disk beyond ``max_in_cpu`` elements)."""
    tier = _offload_tier(ds, "zero_optimization.offload_param", section)
    if tier is None:
        return
    ds.set("offload.policy", "static")
    ds.set("offload.param_device_fraction", 0.0)
    if tier == "disk":
        elements = section.get("max_in_cpu", 1e9)  # DeepSpeed's default
        size = 4 if param_dtype == "fp32" else 2
        ds.set("offload.host_budget_mb", _times(elements, size / MIB))


def _optimizer(ds: DeepSpeedConfig, section: Any) -> None:
    _walk(ds, "optimizer", section, {"type": _read_below, "params": _read_below})
    if not isinstance(section, dict):
        return
    kind = section.get("type")
    name = OPTIMIZERS.get(str(kind).lower())
    if name is None:
        supported = "Adam, AdamW, OneBitAdam, ZeroOneAdam"
        ds.refused.append(f"optimizer.type={kind!r} (supported: {supported})")
        return
    ds.set("optim.name", name)
    if name == "onebit_adam":
        ds.set("optim.variance_refresh", 0)  # DeepSpeed's variance stays frozen
    params = section.get("params", {})
    if not isinstance(params, dict):
        ds.refused.append(f"optimizer.params={params!r} (expected a JSON object)")
        return
    ours = {key: OPTIMIZER_KEYS.get(key, key) for key in OPTIMIZER_DEFAULTS[name]}
    handlers = {key: (lambda v, to=to: ds.set(f"optim.{to}", v)) for key, to in ours.items()}
    handlers["adam_w_mode"] = lambda v: _refuse_unless(
        ds, v in (True, AUTO), "optimizer.params.adam_w_mode=false (Adam with L2 decay)"
    )
    handlers["bias_correction"] = lambda v: _refuse_unless(
        ds, v in (True, AUTO), "optimizer.params.bias_correction=false"
    )
    _walk(
        ds, "optimizer.params", {**OPTIMIZER_DEFAULTS[name], **params}, handlers, OPTIMIZER_TUNING
    )


def _scheduler(ds: DeepSpeedConfig, section: Any) -> None:
    _walk(ds, "scheduler", section, {"type": _read_below, "params": _read_below})
    if not isinstance(section, dict):
        return
    kind = section.get("type")
    if kind not in SCHEDULERS:
        ds.refused.append(f"scheduler.type={kind!r} (supported: {', '.join(SCHEDULERS)})")
        return
    defaults, shape = SCHEDULERS[kind]
    for key, value in shape.items():
        ds.set(f"optim.{key}", value)
    params = section.get("params", {})
    if not isinstance(params, dict):
        ds.refused.append(f"scheduler.params={params!r} (expected a JSON object)")
        return
    prefix = "scheduler.params"
    handlers = {
        "warmup_min_lr": lambda v: _refuse_unless(
            ds, v in (0, AUTO), f"{prefix}.warmup_min_lr={v!r} (warm-up starts from 0)"
        ),
        "warmup_min_ratio": lambda v: _refuse_unless(
            ds, v in (0, AUTO), f"{prefix}.warmup_min_ratio={v!r} (warm-up starts from 0)"
        ),
        "warmup_max_lr": lambda v: ds.set("optim.lr", v),
        "warmup_num_steps": lambda v: ds.set("optim.warmup_steps", v),
        "warmup_type": lambda v: _warmup_type(ds, v),
        "total_num_steps": lambda v: ds.set("train.steps", v),
        "cos_min_ratio": lambda v: ds.set("optim.min_lr_ratio", v),
        "last_batch_iteration": lambda v: _refuse_unless(
            ds, v in (-1, AUTO), f"{prefix}.last_batch_iteration={v!r} (resume with --resume)"
        ),
    }
    _walk(ds, prefix, {**defaults, **params}, handlers)
    if kind != "WarmupLR" and "total_num_steps" not in params:
        ds.refused.append(f"scheduler {kind} without params.total_num_steps")


def _warmup_type(ds: DeepSpeedConfig, value: Any) -> None:
    if value == "log":
        ds.notes.append(
            "scheduler.params.warmup_type='log' (DeepSpeed's default) warms up linearly here"
        )
    else:
        _refuse_unless(ds, value in ("linear", AUTO), f"scheduler.params.warmup_type={value!r}")


def _communication_dtype(ds: DeepSpeedConfig, value: Any, param_dtype: str) -> None:
    names = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16",
             "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}  # fmt: skip
    dtype = names.get(str(value).lower())
    if value in (None, AUTO):
        return
    if dtype == "fp32":
        ds.set("precision.reduce_dtype", "fp32")
    elif dtype == param_dtype:
        ds.set("precision.reduce_dtype", "param")
    else:
        ds.refused.append(
            f"communication_data_type={value!r} (gradients reduce in fp32 or the parameter "
            f"dtype, {param_dtype} here)"
        )
