"""Bad input through the CLI: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from shardwise.cli import main
from shardwise.config import Config
from tests.cli_runs import logged_losses, run_cli, settings_args
from tests.parity import NO_CORE_MODEL

TINY = [
    "--set",
    "model.n_layers=1",
    "--set",
    "model.d_model=32",
    "--set",
    "model.n_heads=2",
    "--set",
    "data.seq_len=16",
    "--set",
    "data.max_bytes=20000",
    "--set",
    "train.steps=3",
    "--set",
    "log.progress=false",
]


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("shardwise: error:")]
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in err


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_SETS = {
    "unknown-key": (["--set", "train.stepz=3"], "did you mean 'train.steps'"),
    "unknown-section": (["--set", "trian.steps=3"], "did you mean 'train'"),
    "wrong-type": (["--set", "train.steps=abc"], "train.steps='abc'"),
    "bad-choice": (["--set", "precision.dtype=fp8"], "'auto', 'fp32', 'bf16' or 'fp16'"),
    "out-of-range": (["--set", "train.steps=0"], "greater than or equal to 1"),
    "malformed-set": (["--set", "trainsteps"], "not of the form section.key=value"),
    "degrees-vs-world": (
        ["--nproc", "2", "--set", "parallel.dp_shard=3"],
        "do not match world size 2",
    ),
    "2d-not-square": (
        ["--nproc", "2", "--set", "parallel.tp=2", "--set", "parallel.tp_mode=2d"],
        "parallel.tp=2 does not fit tp_mode='2d', which needs tp = a square q^2",
    ),
    "pp-zero-bubble-with-zero-3": (
        ["--nproc", "2", "--set", "parallel.pp=2", "--set", "zero.stage=3"]
        + ["--set", "pipeline.schedule=zb_h1"],
        "pipeline.schedule='zb_h1' computes weight gradients in a pass of their own",
    ),
    "pp-more-stages-than-blocks": (
        ["--nproc", "4", "--set", "parallel.pp=4", "--set", "model.n_layers=2"],
        "4 pipeline stages need at least 4 blocks",
    ),
    "tp-not-dividing-heads": (
        ["--nproc", "3", "--set", "parallel.tp=3", *TINY],
        "model.n_heads=2 does not split over parallel.tp=3 (tp_mode='1d' needs a multiple "
        "of 3); tp degrees that fit: 2",
    ),
    "batch-not-divisible": (
        ["--nproc", "2", "--set", "train.micro_batch=4", "--set", "train.global_batch=10"],
        "not divisible by micro_batch x dp = 4 x 2 = 8",
    ),
    "missing-data-file": (
        ["--set", "data.source=file", "--set", "data.path=/no/such.txt"],
        "does not exist",
    ),
    "nproc-zero": (["--nproc", "0"], "--nproc 0 must be at least 1"),
    "missing-config": (["--config", "/no/such.toml"], "does not exist"),
    "resume-nothing": (["--resume", "/no/such/run"], "no finished checkpoint"),
    "unknown-model": (["--set", "model.name=gtp"], "did you mean 'gpt'"),
    "bad-heads": (["--set", "model.n_heads=5"], "does not divide d_model"),
    "offload-disk-without-path": (
        ["--nproc", "2", "--set", "offload.optimizer=disk"],
        "offload.optimizer='disk' needs offload.disk_path",
    ),
    "offload-auto-without-budget": (
        ["--nproc", "2", "--set", "offload.policy=auto"],
        "offload.policy='auto' places chunks within offload.device_budget_mb; set it",
    ),
    "hf-tp-not-dividing-heads": (
        ["--nproc", "3", "--set", "model.name=hf", "--set", "model.hf_config=gpt2-tiny"]
        + ["--set", "data.seq_len=64", "--set", "parallel.tp=3"],
        "n_head=4 does not split over parallel.tp=3",
    ),
    "offload-disk-path-missing": (
        ["--nproc", "2", "--set", "offload.optimizer=disk", "--set", "offload.disk_path=/no/dir"],
        "offload.disk_path='/no/dir' does not exist",
    ),
    "betas-not-below-one": (
        ["--set", "optim.betas=[1.5, 0.9]"],
        "optim.betas.0=1.5: input should be less than 1",
    ),
    "lr-infinite": (["--set", "optim.lr=inf"], "optim.lr=inf: input should be a finite number"),
    "vocab-below-bytes": (
        ["--set", "model.vocab_size=10"],
        "model.vocab_size=10 is smaller than the byte tokenizer's 256 token ids",
    ),
    "tp-sp-without-tp": (
        ["--set", "parallel.tp_sequence_parallel=true"],
        "splits the sequence over the tensor-parallel ranks, but parallel.tp=1",
    ),
    "tp-fits-only-one": (
        ["--nproc", "2", "--set", "parallel.tp=2", "--set", "model.n_heads=3"]
        + ["--set", "model.d_model=48"],
        "tp degrees that fit: none above 1",
    ),
    "too-many-ranks": (
        ["--nproc", "100000"],
        "--nproc 100000 is more ranks than this machine runs usefully",
    ),
    "port-out-of-range": (["--master-port", "99999"], "--master-port 99999 is not a port"),
    "sp-length-not-splitting": (
        ["--nproc", "2", "--set", "parallel.sp=2", "--set", "data.seq_len=15"],
        "a sequence of 15 tokens does not split into 2 x sp = 4 equal chunks",
    ),
    "ulysses-heads": (
        ["--nproc", "2", "--set", "parallel.sp=2", "--set", "attention.sequence_parallel=ulysses"]
        + ["--set", "model.n_heads=3", "--set", "model.d_model=48"],
        "model.n_heads=3 does not split over 2 Ulysses ranks",
    ),
    "sparse-block-vs-length": (
        ["--set", "attention.kind=sparse", "--set", "data.seq_len=96"],
        "data.seq_len=96 is not a multiple of attention.block=64",
    ),
    "sparse-unknown-layout": (
        ["--set", "attention.kind=sparse", "--set", "attention.layout=starry"],
        "unknown attention layout 'starry'; known: bigbird",
    ),
    "onebit-freeze-at-the-end": (
        ["--set", "optim.name=onebit_adam", "--set", "optim.freeze_step=3", *TINY],
        "optim.freeze_step=3 leaves no compressed step in train.steps=3",
    ),
    "onebit-with-zero-3": (
        ["--set", "optim.name=onebit_adam", "--set", "zero.stage=3"],
        "optim.name='onebit_adam' does not combine with this setting yet; set zero.stage=0",
    ),
    "interleaved-micro-batches": (
        ["--set", "parallel.pp=2", "--set", "pipeline.schedule=interleaved_1f1b"]
        + ["--set", "pipeline.chunks=2", "--set", "train.global_batch=6"]
        + ["--set", "train.micro_batch=2"],
        "interleaved_1f1b needs micro_batches divisible by ranks (got m=3, p=2)",
    ),
    "zero-bubble-with-chunks": (
        ["--set", "parallel.pp=2", "--set", "offload.policy=static"]
        + ["--set", "pipeline.schedule=zb_h1"],
        "pipeline.schedule='zb_h1' computes weight gradients in a pass of their own, after "
        "offload.policy='static' has released the chunks",
    ),
    "init-from-missing": (
        ["--set", "model.init_from=/no/such.safetensors"],
        "model.init_from='/no/such.safetensors': no safetensors file there",
    ),
    "checkpoint-every-negative": (
        ["--set", "checkpoint.every=-1"],
        "checkpoint.every=-1: input should be greater than or equal to 0",
    ),
    "disk-cap-below-adam-states": (
        ["--nproc", "2", "--set", "offload.optimizer=disk", "--set", "offload.disk_path=/tmp"]
        + ["--set", "offload.disk_max_bytes=1000"],
        "offload.disk_max_bytes=1000 is below the 6",
    ),
    "async-save-with-disk-tier": (
        ["--set", "offload.optimizer=disk", "--set", "offload.disk_path=/tmp"]
        + ["--set", "checkpoint.async_save=true"],
        "checkpoint.async_save copies each rank's state into host memory, and this run",
    ),
    "pack-documents-sparse": (
        ["--set", "data.pack_documents=true", "--set", "attention.kind=sparse"],
        "data.pack_documents=true does not combine with this setting yet; set "
        "attention.kind='dense'",
    ),
    "pack-documents-hf": (
        ["--set", "data.pack_documents=true", "--set", "model.name=hf"]
        + ["--set", f"model.hf_config={NO_CORE_MODEL}", "--set", "data.seq_len=64"],
        "forward must take each token's document; declare ModelSpec(documents=",
    ),
    "micro-batch-zero": (
        ["--set", "train.micro_batch=0"],
        "train.micro_batch=0: input should be greater than or equal to 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SETS), ids=list(BAD_SETS))
def test_bad_input_is_one_line(case, capsys, tmp_path, no_ranks_started):
    argv, pattern = BAD_SETS[case]
    code, err = run_cli(["train", "--out", str(tmp_path), *argv], capsys)
    assert_one_line_error(code, err, pattern)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"\xff\xfe\x00garbage", "is not text (UTF-8)"),
        (None, "is a directory, not a TOML file"),
    ],
    ids=["random-bytes", "directory"],
)
def test_unreadable_config_file(content, pattern, capsys, tmp_path, no_ranks_started):
    path = tmp_path
    if content is not None:
        path = tmp_path / "random.toml"
        path.write_bytes(content)
    code, err = run_cli(["train", "--config", str(path)], capsys)
    assert_one_line_error(code, err, pattern)


@pytest.mark.parametrize(
    ("out", "pattern"),
    [
        (lambda d: write(d, "a-file", "x"), "is a file, not a directory"),
        (lambda d: write(d, "config.toml", "") and str(d), "is not empty (another run's outputs?)"),
        (lambda d: "/proc/shardwise-out", "cannot create it"),
    ],
    ids=["a-file", "not-empty", "not-creatable"],
)
def test_output_directory_problems(out, pattern, capsys, tmp_path, no_ranks_started):
    code, err = run_cli(["train", "--out", out(tmp_path), *TINY], capsys)
    assert_one_line_error(code, err, pattern)


def test_version_bare_command_and_help_texts(capsys):
    from shardwise import __version__

    for argv in (["--version"], [], ["bench", "--help"], ["run", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert f"shardwise {__version__}" in printed and "{train,plan,bench,convert,run}" in printed
    assert "benchmarks: capacity, checkpoint, dp," in printed  # bench --help lists them
    assert "usage: shardwise run [torchrun options] -- SCRIPT" in printed


def test_default_ranks_follow_the_machine(monkeypatch, capsys):
    """Without --nproc: 2 ranks, or 1 where the machine runs one usefully (one GPU), so the
    bare `shardwise train` of the README works there instead of refusing its own default."""
    from shardwise.accelerator import Accelerator

    def world_of_plan() -> int:
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", "--json", "--no-time", *TINY])
        assert exit_info.value.code == 0
        return json.loads(capsys.readouterr().out.splitlines()[-1])["layout"]["world_size"]

    assert world_of_plan() == 2
    monkeypatch.setattr(Accelerator, "useful_ranks", lambda self: (1, "one per GPU"))
    assert world_of_plan() == 1


def test_run_with_no_ranks_is_one_line(capsys, tmp_path):
    script = write(tmp_path, "script.py", "print('hi')")
    code, err = run_cli(["run", "--nproc-per-node", "0", "--", script], capsys)
    assert_one_line_error(code, err, "--nproc-per-node 0 must be at least 1")


def test_non_finite_loss_before_any_update_points_at_the_initial_weights(capsys, tmp_path):
    argv = ["train", "--nproc", "1", "--out", str(tmp_path), *TINY]
    code, err = run_cli([*argv, "--set", "model.init_std=1e30"], capsys)
    assert_one_line_error(code, err, "at step 1, before any update: check the initial weights")


def test_invalid_toml(capsys, tmp_path, no_ranks_started):
    path = write(tmp_path, "bad.toml", "[train\nsteps = 3\n")
    code, err = run_cli(["train", "--config", path], capsys)
    assert_one_line_error(code, err, "is not valid TOML")


def test_bad_jsonl_line(capsys, tmp_path, no_ranks_started):
    path = write(tmp_path, "data.jsonl", '{"text": "ok"}\n{not json\n')
    argv = ["train", "--set", "data.source=file", "--set", f"data.path={path}"]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "line 2")


def test_corpus_too_small(capsys, tmp_path, no_ranks_started):
    path = write(tmp_path, "tiny.txt", "hello world")
    argv = ["train", "--set", "data.source=file", "--set", f"data.path={path}"]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "one global batch needs")


def test_port_in_use(capsys, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code, err = run_cli(
            ["train", "--out", str(tmp_path), "--master-port", str(port), *TINY], capsys
        )
    assert_one_line_error(code, err, f"port {port} is already in use")


def test_non_finite_loss_single_process(capsys, tmp_path):
    argv = [
        "train",
        "--nproc",
        "1",
        "--out",
        str(tmp_path),
        *TINY,
        "--set",
        "optim.lr=1e30",
        "--set",
        "optim.grad_clip=0",
        "--set",
        "optim.warmup_steps=0",
    ]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "training diverged")


def _console(argv: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-c", "from shardwise.cli import main; main()", *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_non_finite_loss_on_two_ranks_through_the_launcher(tmp_path):
    """The real path: torchrun machinery, a rank raises, the parent prints one line."""
    argv = [
        "train",
        "--nproc",
        "2",
        "--out",
        str(tmp_path),
        *TINY,
        "--set",
        "optim.lr=1e30",
        "--set",
        "optim.grad_clip=0",
        "--set",
        "optim.warmup_steps=0",
    ]
    proc = _console(argv, tmp_path)
    assert proc.returncode != 0
    assert "training diverged" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_train_then_resume_through_the_launcher(tmp_path, capsys):
    """The launcher path end to end on two ranks (tp=2 with sequence parallelism): a resume
    from step 2 as tp=1 and dp=2 (dp_shard, concrete in config.toml, derived again) repeats
    steps 3-4 (to fp32 rounding) once the micro-batch splits config.toml's global batch;
    before that, the micro-batch that does not is refused before launch. Exact resume is checked
    per layout in its pool (train_then_resume), resharding in tests/checkpoint/."""
    run = tmp_path / "run"
    layout = ["parallel.tp=2", "parallel.tp_sequence_parallel=true"]
    settings = ["train.steps=4", "checkpoint.every=2", "precision.dtype=fp32", *layout]
    argv = ["train", "--nproc", "2", "--out", str(run), *TINY]
    code, err = run_cli([*argv, *settings_args(settings)], capsys)
    assert code == 0, err
    for name in ("metrics.jsonl", "loss.png", "config.toml", "checkpoints/latest"):
        assert (run / name).is_file(), name
    full = logged_losses(run)
    step2 = str(run / "checkpoints" / "step_00000002")
    data_parallel = ["train", "--nproc", "2", "--resume", step2]
    data_parallel += settings_args(["parallel.tp=1", "parallel.tp_sequence_parallel=false"])
    code, err = run_cli(data_parallel, capsys)
    resolved = Config.from_file(run / "config.toml")  # written out: the same batch resumes
    assert (resolved.parallel.dp_shard, resolved.train.global_batch) == (1, 8)
    assert_one_line_error(code, err, "global_batch=8 is not divisible by micro_batch x dp = 8 x 2")
    code, err = run_cli([*data_parallel, "--set", "train.micro_batch=4"], capsys)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert logged_losses(run) == pytest.approx(full, rel=1e-5)


def test_metrics_go_to_tensorboard_too_and_a_resume_replaces_the_steps_after_it(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from shardwise.metrics import METRIC_KEYS, read_metrics

    out = tmp_path / "run"
    board = ["--set", "log.tensorboard=true", "--set", "checkpoint.every=2"]
    argv = ["train", "--nproc", "1", "--out", str(out), *TINY, *board]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    resume = ["--resume", str(out / "checkpoints" / "step_00000002"), "--set", "train.steps=4"]
    code, err = run_cli(["train", "--nproc", "1", *resume], capsys)
    assert code == 0, err
    code, err = run_cli(["train", "--nproc", "1", "--resume", str(out)], capsys)
    assert_one_line_error(code, err, "nothing is left to train; raise train.steps")
    other_model = ["--set", "model.d_model=48", "--set", "train.steps=5"]
    code, err = run_cli(["train", "--nproc", "1", "--resume", str(out), *other_model], capsys)
    assert_one_line_error(code, err, "does not fit this model: it holds 'embed.weight' of shape")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in METRIC_KEYS[1:]:
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3, 4], key
        expected = [float(r[key]) for r in records]
        assert [s.value for s in scalars] == pytest.approx(expected, rel=1e-6), key


def test_tensorboard_missing_is_one_line(monkeypatch, capsys, no_ranks_started):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "tensorboard" else find_spec(name, *args),
    )
    code, err = run_cli(["train", "--nproc", "2", *TINY, "--set", "log.tensorboard=true"], capsys)
    assert_one_line_error(code, err, "log.tensorboard=true needs the tensorboard package")


def test_fp16_run_that_only_skips_steps_ends_with_one_line_and_no_checkpoint(capsys, tmp_path):
    """Every step overflows (the loss scale is pinned at 1e38): each record shows the skip,
    and the third in a row ends the run before any checkpoint is written."""
    fp16 = ["precision.dtype=fp16", "precision.initial_scale=1e38", "precision.min_scale=1e38"]
    settings = [*fp16, "precision.max_skipped_in_a_row=3", "train.steps=5"]
    argv = ["train", "--nproc", "1", "--out", str(tmp_path), *TINY, *settings_args(settings)]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "fp16: 3 optimizer steps in a row skipped")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["skipped"], r["loss_scale"]) for r in records] == [(1, 1e38), (2, 1e38), (3, 1e38)]
    assert not list((tmp_path / "checkpoints").glob("step_*"))
