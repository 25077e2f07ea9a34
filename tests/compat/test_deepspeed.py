"""DeepSpeed JSON configs through ``shardwise train --deepspeed-config``: DeepSpeed's own
documentation examples train exactly as their native twins, the translation key by key, and
everything it cannot do refused in one line."""

from __future__ import annotations

import json
import math

import pytest

from shardwise.compat.deepspeed import config_from_deepspeed, read_deepspeed_config
from shardwise.config import Config
from shardwise.errors import ConfigError
from shardwise.optim import lr_multiplier
from tests.cli_runs import TINY_RUN, logged_losses, run_cli, settings_args

RUN = [setting for setting in TINY_RUN if not setting.startswith("precision.")]
RUN += ["train.steps=3", "checkpoint.keep=1"]
"""The tiny run, its precision left to the DeepSpeed file (or set per example)."""
FP32 = ["precision.dtype=fp32"]
NVME = "NVME_PATH"
"""Stands for a temporary directory in the examples' nvme_path."""

# The examples of DeepSpeed's documentation (docs/_tutorials/zero.md, docs/_pages/
# config-json.md, and the NVMe example of the Hugging Face DeepSpeed guide), with batch keys
# for a tiny run and the scheduler's warm-up shortened to the run's length.
EXAMPLES = {
    "zero1": (
        {
            "train_batch_size": 8,
            "train_micro_batch_size_per_gpu": 2,
            "steps_per_print": 1,
            "gradient_clipping": 1.0,
            "optimizer": {
                "type": "Adam",
                "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7},
            },
            "scheduler": {
                "type": "WarmupLR",
                "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 3},
            },
            "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e8},
        },
        [
            *FP32,
            "train.micro_batch=2",
            "train.global_batch=8",
            "log.every=1",
            "optim.grad_clip=1.0",
            "optim.lr=0.001",
            "optim.betas=[0.8, 0.999]",
            "optim.eps=1e-8",
            "optim.weight_decay=3e-7",
            "optim.warmup_steps=3",
            "optim.min_lr_ratio=1.0",
            "zero.stage=1",
            f"distributed.bucket_mb={5e8 * 4 / 2**20}",
        ],
    ),
    "zero2_fp16": (
        {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 2,
            "fp16": {
                "enabled": True,
                "auto_cast": False,
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "consecutive_hysteresis": False,
                "min_loss_scale": 1,
                "fp16_master_weights_and_grads": False,
            },
            "zero_optimization": {
                "stage": 2,
                "contiguous_gradients": True,
                "overlap_comm": True,
                "reduce_scatter": True,
                "reduce_bucket_size": 5e8,
                "allgather_bucket_size": 5e8,
            },
        },
        [
            "precision.dtype=fp16",
            "precision.initial_scale=65536.0",
            "precision.growth_interval=1000",
            "precision.hysteresis=2",
            "precision.min_scale=1.0",
            "train.micro_batch=2",
            "train.global_batch=4",
            "zero.stage=2",
            f"distributed.bucket_mb={5e8 * 4 / 2**20}",
        ],
    ),
    "zero3_cpu_offload": (
        {
            "zero_optimization": {
                "stage": 3,
                "contiguous_gradients": True,
                "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9,
                "stage3_prefetch_bucket_size": 1e7,
                "stage3_param_persistence_threshold": 1e5,
                "reduce_bucket_size": 1e7,
                "sub_group_size": 1e9,
                "offload_optimizer": {"device": "cpu"},
                "offload_param": {"device": "cpu"},
            }
        },
        [
            *FP32,
            "zero.stage=3",
            "zero.prefetch=true",
            f"distributed.bucket_mb={1e7 * 4 / 2**20}",
            "offload.optimizer=host",
            "offload.policy=static",
            "offload.param_device_fraction=0.0",
        ],
    ),
    "zero3_nvme_offload": (
        {
            "zero_optimization": {
                "stage": 3,
                "offload_optimizer": {
                    "device": "nvme",
                    "nvme_path": NVME,
                    "pin_memory": True,
                    "buffer_count": 4,
                    "fast_init": False,
                },
                "offload_param": {
                    "device": "nvme",
                    "nvme_path": NVME,
                    "pin_memory": True,
                    "buffer_count": 5,
                    "buffer_size": 1e8,
                    "max_in_cpu": 1e9,
                },
                "overlap_comm": True,
                "contiguous_gradients": True,
                "sub_group_size": 1e9,
                "reduce_bucket_size": "auto",
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9,
                "stage3_gather_16bit_weights_on_model_save": True,
            },
            "aio": {"block_size": 262144, "queue_depth": 32, "thread_count": 1},
        },
        [
            *FP32,
            "zero.stage=3",
            "offload.optimizer=disk",
            f"offload.disk_path={NVME}",
            "offload.policy=static",
            "offload.param_device_fraction=0.0",
            f"offload.host_budget_mb={1e9 * 4 / 2**20}",
        ],
    ),
}


def write_example(name: str, tmp_path) -> tuple[str, list[str]]:
    """The example's JSON file (nvme paths in tmp_path) and its native settings."""
    example, native = EXAMPLES[name]
    nvme = tmp_path / "nvme"
    nvme.mkdir(exist_ok=True)
    file = tmp_path / f"{name}.json"
    file.write_text(json.dumps(example).replace(NVME, str(nvme)))
    return str(file), [setting.replace(NVME, str(nvme)) for setting in native]


def train_one_rank(out, argv: list[str], capsys) -> str:
    code, printed = run_cli(["train", "--nproc", "1", "--out", str(out), *argv], capsys)
    assert code == 0, printed
    return printed


@pytest.mark.parametrize("name", EXAMPLES)
def test_documentation_example_trains_as_its_native_twin(name, tmp_path, capsys):
    file, native = write_example(name, tmp_path)
    precision = FP32 if FP32[0] in native else []
    train_one_rank(
        tmp_path / "ds", ["--deepspeed-config", file, *settings_args(RUN + precision)], capsys
    )
    train_one_rank(tmp_path / "native", settings_args(RUN + native), capsys)
    resolved = [(tmp_path / run / "config.toml").read_text() for run in ("ds", "native")]
    assert resolved[0] == resolved[1]
    losses = logged_losses(tmp_path / "ds")
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses == logged_losses(tmp_path / "native")


def translate(tmp_path, example: dict, dp: int = 1, micro_batch: int = 8) -> dict:
    file = tmp_path / "ds.json"
    file.write_text(json.dumps(example))
    return read_deepspeed_config(file).config_settings(dp, micro_batch)


@pytest.mark.parametrize(
    ("keys", "dp", "train"),
    [
        ({"train_micro_batch_size_per_gpu": 4}, 2, {"micro_batch": 4, "global_batch": 8}),
        ({"gradient_accumulation_steps": 3}, 2, {"micro_batch": 8, "global_batch": 48}),
        ({"train_batch_size": 32}, 4, {"micro_batch": 8, "global_batch": 32}),
        (
            {"train_batch_size": 32, "gradient_accumulation_steps": 2},
            4,
            {"micro_batch": 4, "global_batch": 32},
        ),
        (
            {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2},
            4,
            {"micro_batch": 2, "global_batch": 32},
        ),
        (
            {
                "train_batch_size": 24,
                "train_micro_batch_size_per_gpu": 3,
                "gradient_accumulation_steps": 4,
            },
            2,
            {"micro_batch": 3, "global_batch": 24},
        ),
        ({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}, 2, None),
    ],
)
def test_batch_keys_fix_the_global_batch_at_the_data_parallel_degree(keys, dp, train, tmp_path):
    assert translate(tmp_path, keys, dp).get("train") == train


def test_schedulers_map_onto_warm_up_and_decay(tmp_path):
    decay = {
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"total_num_steps": 50, "warmup_num_steps": 5, "warmup_type": "linear"},
        },
        "optimizer": {"type": "Adam", "params": {"lr": 0.01}},  # warmup_max_lr wins
    }
    assert translate(tmp_path, decay) == {
        "optim": {
            "name": "adamw",
            "lr": 0.001,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 0.0,
            "decay": "linear",
            "min_lr_ratio": 0.0,
            "warmup_steps": 5,
        },
        "train": {"steps": 50},
    }
    cosine = {
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": "auto"}},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": 40, "cos_min_ratio": 0.1, "warmup_num_steps": 4},
        },
    }
    optim = translate(tmp_path, cosine)["optim"]
    assert optim == {
        "name": "adamw",
        "lr": 3e-4,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "decay": "cosine",
        "min_lr_ratio": 0.1,
        "warmup_steps": 4,
    }  # "auto" weight decay: shardwise's own stays


def test_linear_decay_reaches_the_floor_at_the_last_step():
    cfg = Config.from_dict({"optim": {"decay": "linear", "warmup_steps": 2, "min_lr_ratio": 0.0}})
    factor = lr_multiplier(cfg.optim, total_steps=10)
    assert [factor(step) for step in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])


def test_one_bit_adam_keeps_its_variance_frozen(tmp_path):
    example = {
        "optimizer": {
            "type": "OneBitAdam",
            "params": {"lr": 1e-3, "freeze_step": 400, "cuda_aware": False},
        },
        "communication_data_type": "fp32",
    }
    settings = translate(tmp_path, example)
    assert settings["optim"]["name"] == "onebit_adam"
    assert settings["optim"]["freeze_step"] == 400
    assert settings["optim"]["variance_refresh"] == 0
    assert settings["precision"] == {"reduce_dtype": "fp32"}


def test_zero_one_adam_takes_its_schedules_under_their_shardwise_names(tmp_path):
    example = {
        "optimizer": {
            "type": "ZeroOneAdam",
            "params": {"lr": 1e-3, "var_freeze_step": 100, "local_step_clipper": 4},
        },
    }
    optim = translate(tmp_path, example)["optim"]
    assert optim["name"] == "zero_one_adam"
    assert (optim["freeze_step"], optim["sync_interval_max"]) == (100, 4)
    assert optim["variance_gap_doubles_after"] == 16  # DeepSpeed's defaults
    assert optim["sync_interval_doubles_after"] == 32678
    Config.from_dict({"optim": optim})  # valid keys


def test_log_warm_up_and_ignored_keys_are_one_warning_line(tmp_path, capsys):
    """Printed first, before the plan (here refused: heads that do not divide d_model)."""
    file = tmp_path / "ds.json"
    example = {
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 0, "overlap_comm": True},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2}},
        "amp": {"enabled": False},
    }
    file.write_text(json.dumps(example))
    argv = ["train", "--nproc", "2", "--deepspeed-config", str(file), "--set", "model.n_heads=3"]
    code, printed = run_cli(argv, capsys)
    assert code == 2
    warning, error = printed.splitlines()
    assert warning == (
        f"shardwise: warning: deepspeed config {file}: scheduler.params.warmup_type='log' "
        "(DeepSpeed's default) warms up linearly here; ignored (speed, memory layout or "
        "logging only): wall_clock_breakdown, zero_optimization.overlap_comm"
    )
    assert error.startswith("shardwise: error: ") and "n_heads=3 does not divide" in error


REFUSED = {
    "static-loss-scale": (
        {"fp16": {"enabled": True, "loss_scale": 128}},
        "not supported: fp16.loss_scale=128 (a static loss scale",
    ),
    "lamb": ({"optimizer": {"type": "Lamb"}}, "optimizer.type='Lamb' (supported: Adam, AdamW"),
    "many": (
        {
            "amp": {"enabled": True},
            "pipeline": {"stages": 2},
            "zero_optimization": {"mics_shard_size": 2},
        },
        "not supported: amp (no shardwise equivalent); pipeline (no shardwise equivalent); "
        "zero_optimization.mics_shard_size (no shardwise equivalent)",
    ),
    "both-half": (
        {"fp16": {"enabled": True}, "bf16": {"enabled": True}},
        "fp16.enabled and bf16.enabled both true",
    ),
    "param-offload-stage2": (
        {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
        "offload_param with stage 2 (DeepSpeed offloads parameters at stage 3 only)",
    ),
    "two-nvme-paths": (
        {
            "zero_optimization": {
                "stage": 3,
                "offload_optimizer": {"device": "nvme", "nvme_path": "/a"},
                "offload_param": {"device": "nvme", "nvme_path": "/b"},
            }
        },
        "offload_param.nvme_path='/b' differs from '/a' (shardwise has one disk tier)",
    ),
    "adam-l2": (
        {"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}},
        "adam_w_mode=false (Adam with L2 decay)",
    ),
    "scheduler-without-total": (
        {"scheduler": {"type": "WarmupCosineLR", "params": {}}},
        "scheduler WarmupCosineLR without params.total_num_steps",
    ),
    "one-cycle": ({"scheduler": {"type": "OneCycle"}}, "scheduler.type='OneCycle'"),
    "reduce-in-bf16-with-fp16": (
        {"fp16": {"enabled": True}, "communication_data_type": "bf16"},
        "communication_data_type='bf16' (gradients reduce in fp32 or the parameter dtype, fp16",
    ),
    "batch-mismatch": (
        {
            "train_batch_size": 10,
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 2,
        },
        "train_batch_size=10 is not micro batch x accumulation steps x dp "
        "(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2, dp=2;",
    ),
    "bad-value": ({"zero_optimization": {"stage": 7}}, "zero.stage=7:"),
    "bad-batch": ({"train_batch_size": 2.5}, "batch size 2.5 (expected a positive integer)"),
    "not-an-object": ({"fp16": True}, "fp16=True (expected a JSON object)"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_cannot_run_is_one_line_before_launch(case, tmp_path, capsys, no_ranks_started):
    example, expected = REFUSED[case]
    file = tmp_path / "ds.json"
    file.write_text(json.dumps(example))
    code, printed = run_cli(["train", "--nproc", "2", "--deepspeed-config", str(file)], capsys)
    assert code == 2
    assert printed.count("\n") == 1 and printed.startswith("shardwise: error: ")
    assert expected in printed
    assert str(file) in printed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{", "is not valid JSON"),
        ('{"fp16": {}, "fp16": {}}', "key 'fp16' appears twice"),
        ("[1]", "expected a JSON object at the top"),
    ],
)
def test_unreadable_files_are_one_line(text, expected, tmp_path):
    file = tmp_path / "ds.json"
    file.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        read_deepspeed_config(file)
    with pytest.raises(ConfigError, match="does not exist"):
        read_deepspeed_config(tmp_path / "missing.json")


def test_a_script_gets_the_same_config_for_initialize(tmp_path):
    """`config_from_deepspeed` is what the CLI uses; a script hands its result to
    `shardwise.initialize` (here: the ZeRO-1 example on 2 ranks, an override on top)."""
    file, _ = write_example("zero1", tmp_path)
    cfg, warning = config_from_deepspeed(file, world_size=2, overrides=["zero.stage=2"])
    assert (cfg.zero.stage, cfg.train.micro_batch, cfg.train.global_batch) == (2, 2, 8)
    assert cfg.optim.betas == (0.8, 0.999) and "warmup_type='log'" in warning
