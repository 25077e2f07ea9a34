"""``shardwise train | plan | run | bench | convert``.

Every user error (`ShardwiseError`) is printed as one line, ``shardwise: error: ...``, with exit
code 2 and no traceback; ``SHARDWISE_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from shardwise.errors import ConfigError, ShardwiseError

DEFAULT_NPROC = 2
"""Ranks when --nproc is not given, or fewer where the machine runs fewer usefully (one GPU)."""
NPROC_HELP = f"{{}} (default: {DEFAULT_NPROC}, or 1 on a machine with one GPU)"


def _config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set``, as train and plan take them."""
    p.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    _set_argument(p, "override a config value, e.g. --set train.steps=50 (repeatable)")


def _set_argument(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (no arguments: tiny GPT on the embedded corpus)"
    )
    _config_arguments(p)
    p.add_argument(
        "--deepspeed-config",
        type=Path,
        metavar="JSON",
        help="a DeepSpeed config file, translated onto the config (under --set; docs/deepspeed.md)",
    )
    p.add_argument("--nproc", type=int, help=NPROC_HELP.format("processes (ranks) to start"))
    p.add_argument("--out", type=Path, help="output directory (default: runs/train-<time>)")
    p.add_argument("--resume", type=Path, help="continue a run from its directory or checkpoint")
    p.add_argument(
        "--force", action="store_true", help="write into a --out directory that is not empty"
    )
    p.add_argument(
        "--oversubscribe",
        action="store_true",
        help="start more ranks than the machine runs usefully (one per GPU; 4 per CPU core)",
    )
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free one)")


def _resolve_config(args: argparse.Namespace):
    from shardwise.config import Config

    config_file, overrides = args.config, args.overrides
    if args.resume is not None and config_file is None:
        config_file = _saved_config(args.resume)
        # its dp_shard filled the saved run's world: derived again for this one's (unless set)
        overrides = ["parallel.dp_shard=-1", *overrides]
    if args.deepspeed_config is None:
        return Config.from_file(config_file, overrides)
    from shardwise.compat.deepspeed import config_from_deepspeed

    cfg, warning = config_from_deepspeed(args.deepspeed_config, args.nproc, config_file, overrides)
    if warning is not None:
        print(f"shardwise: warning: {warning}", file=sys.stderr)
    return cfg


def _saved_config(resume: Path) -> Path:
    for directory in (resume, *resume.parents[:2]):
        if (directory / "config.toml").is_file():
            return directory / "config.toml"
    raise ConfigError(f"--resume {str(resume)!r}: no config.toml found there; pass --config")


def _run_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if args.resume is not None:
        return _saved_config(args.resume).parent
    return Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")


def _check_nproc(args: argparse.Namespace) -> tuple[int, str]:
    """Fills in --nproc's default; returns the ranks this machine runs usefully, and why."""
    from shardwise.accelerator import get_accelerator

    useful, why = get_accelerator().useful_ranks()
    if args.nproc is None:
        args.nproc = max(1, min(DEFAULT_NPROC, useful))
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc} must be at least 1")
    return useful, why


def _check_launch_options(args: argparse.Namespace) -> None:
    useful, why = _check_nproc(args)
    if args.nproc > useful and not args.oversubscribe:
        raise ConfigError(
            f"--nproc {args.nproc} is more ranks than this machine runs usefully ({useful}: "
            f"{why}); use fewer, or pass --oversubscribe"
        )
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        raise ConfigError(f"--master-port {args.master_port} is not a port (1-65535)")


def _output_dir(out: Path, reuse: bool, what: str = "--out") -> Path:
    """`out` (the argument `what`), created; one that holds anything is refused unless `reuse`
    (resuming into it, or --force): a run's outputs are not overwritten by accident."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {str(out)!r} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not reuse:
        resume = "continue that run with --resume, or " if what == "--out" else ""
        raise ConfigError(
            f"{what} {str(out)!r} is not empty (another run's outputs?); {resume}pass --force "
            "to write into it"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{what} {str(out)!r}: cannot create it ({err.strerror})") from None
    return out


def _intact(checkpoint: Path) -> Path:
    """The checkpoint to start from, read whole: a damaged newest one gives way to an older
    one, with a warning."""
    from shardwise.checkpoint import intact_checkpoint

    found, skipped = intact_checkpoint(checkpoint)
    for reason in skipped:
        print(f"shardwise: warning: {reason}; resuming from {found}", file=sys.stderr)
    return found


def _checkpoint_step(checkpoint: Path, nproc: int, plan) -> int:
    """The step of the checkpoint at `checkpoint`, after checking that `plan`'s model and
    layout on `nproc` ranks can load it."""
    from shardwise.checkpoint import check_model_fits, check_resumable
    from shardwise.run_plan import meta_model

    step = check_resumable(checkpoint, nproc, plan.layout(), plan.global_batch)["step"]
    check_model_fits(checkpoint, meta_model(plan.config))
    return step


def _check_data(plan) -> None:
    """Read the data once here: a missing file or a too-small corpus fails before launch."""
    from shardwise.data import build_data

    build_data(plan.config.data, plan.global_batch, 0, plan.dims.dp, 0)


def _start_ranks(plan, out: Path, args: argparse.Namespace, reshard: bool = False) -> None:
    """Write the run's config.toml and plan into `out`, and run the trainer on --nproc ranks
    (in this process for one): training, or with `reshard` only loading --resume's checkpoint
    and saving it in the plan's layout."""
    from shardwise.trainer import save_plan

    (out / "config.toml").write_text(plan.resolved_config().to_toml())
    save_plan(plan, out / "plan.pkl")
    print(f"shardwise {args.command}: {args.nproc} rank(s), outputs in {out}", file=sys.stderr)
    print(plan.table(), file=sys.stderr)
    if args.nproc == 1:
        from shardwise.trainer import reshard as reshard_run
        from shardwise.trainer import train

        if reshard:
            reshard_run(plan, out, args.resume)
        else:
            train(plan, out, args.resume)
        return
    from shardwise.distributed.launch import launch

    worker_args = ["--plan", str(out / "plan.pkl"), "--out", str(out)]
    if args.resume is not None:
        worker_args += ["--resume", str(args.resume)]
    if reshard:
        worker_args.append("--reshard")
    launch("shardwise.trainer", worker_args, args.nproc, master_port=args.master_port)


def cmd_train(args: argparse.Namespace) -> int:
    from shardwise.checkpoint.convert import init_from_index
    from shardwise.run_plan import meta_model, resolve

    _check_launch_options(args)
    if args.resume is not None:
        args.resume = _intact(args.resume)
    cfg = _resolve_config(args)
    plan = resolve(cfg, args.nproc)
    if cfg.model.init_from is not None:
        init_from_index(Path(cfg.model.init_from), meta_model(cfg))
    if args.resume is not None:
        step = _checkpoint_step(args.resume, args.nproc, plan)
        if step >= cfg.train.steps:
            raise ConfigError(
                f"--resume {str(args.resume)!r}: the checkpoint is at step {step} and "
                f"train.steps={cfg.train.steps}, nothing is left to train; raise train.steps "
                "(--set train.steps=N) to train on"
            )
    _check_data(plan)
    out = _output_dir(_run_dir(args), reuse=args.resume is not None or args.force)
    _start_ranks(plan, out, args)
    _print_summary(out)
    return 0


def _print_summary(out: Path) -> None:
    from shardwise.metrics import read_metrics

    records = read_metrics(out / "metrics.jsonl")
    if records:
        first, last = records[0], records[-1]
        print(  # the result on stdout; progress and plan went to stderr
            f"done: step {last['step']}, loss {first['loss']:.3f} -> {last['loss']:.3f}; "
            f"metrics.jsonl, loss.png, config.toml and checkpoints/ in {out}"
        )


RUN_USAGE = """usage: shardwise run [torchrun options] -- SCRIPT [script arguments]

Runs SCRIPT on every rank through torchrun (torch.distributed.run): every torchrun option
works, and --nproc N means --nproc-per-node N, as in `shardwise train`. `--` ends the
launcher's options. torchrun's own options follow.
"""


def cmd_run(argv: list[str]) -> int:
    from shardwise.distributed.launch import run_torchrun

    if argv[:1] in (["-h"], ["--help"]):
        print(RUN_USAGE)
    return run_torchrun(argv)


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="predict per-rank memory, communication and step time before launching"
    )
    _config_arguments(p)
    p.add_argument("--nproc", type=int, help=NPROC_HELP.format("ranks the run would use"))
    p.add_argument("--json", action="store_true", help="print the prediction as one JSON line")
    p.add_argument(
        "--no-time", action="store_true", help="skip the step-time prediction (no speed probes)"
    )
    p.add_argument(
        "--auto",
        action="store_true",
        help="rank every layout of --nproc ranks that fits --memory-cap by predicted step time",
    )
    p.add_argument("--memory-cap", metavar="SIZE", help="per-rank memory for --auto, e.g. 8GiB")
    p.add_argument("--top", type=int, default=5, help="--auto: layouts to print")


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from shardwise.config import Config
    from shardwise.planner import machine_speeds, predict
    from shardwise.run_plan import resolve

    _check_nproc(args)
    cfg = Config.from_file(args.config, args.overrides)
    cache = _speeds_cache()
    if args.auto:
        from shardwise.planner.auto import choose_layouts

        if args.memory_cap is None:
            raise ConfigError("--auto needs --memory-cap SIZE (per-rank memory, e.g. 8GiB)")
        if args.top < 1:
            raise ConfigError(f"--top {args.top} must be at least 1")
        speeds = machine_speeds(cache)
        cap = parse_size(args.memory_cap, "--memory-cap")
        chosen = choose_layouts(cfg, args.nproc, cap, speeds)
        speeds.save(cache)
        if args.json:
            print(json.dumps([{"set": c.settings, **c.prediction.as_json()} for c in chosen]))
            return 0
        print(
            f"{len(chosen)} layout(s) of {args.nproc} ranks fit {args.memory_cap}; fastest first:"
        )
        for place, candidate in enumerate(chosen[: args.top], 1):
            step, peak = candidate.prediction.time.step, candidate.peak / 2**20
            print(f"{place}. {step:.4f} s/step, peak {peak:,.1f} MiB per rank")
            print("   " + " ".join(f"--set {line}" for line in candidate.settings))
        return 0
    speeds = None if args.no_time else machine_speeds(cache)
    prediction = predict(resolve(cfg, args.nproc), speeds)
    if speeds is not None:
        speeds.save(cache)
    pipeline = prediction.plan.pipeline
    if args.json:
        out = prediction.as_json()
        if pipeline is not None:
            out["pipeline"] = _pipeline_summary(pipeline)
        print(json.dumps(out))
        return 0
    print(prediction.plan.table())
    rows = prediction.rows()
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"  {name:<{width}}  {value}" for name, value in rows))
    if pipeline is not None:
        summary = _pipeline_summary(pipeline)
        print(
            f"  pipeline timeline at unit cost ('.' idle; bubble {summary['bubble']:.3f} by "
            f"its formula, micro-batches held at once per rank {summary['in_flight']}):"
        )
        print("\n".join(f"    {row}" for row in summary["timeline"]))
    return 0


def _pipeline_summary(schedule) -> dict:
    """What `shardwise plan` shows of a pipeline schedule: each rank's actions in a run where
    every action takes one unit (F3 = forward of micro-batch 3, B, or zero-bubble's I and W;
    s<k> = stage k where a rank holds several), the formula's idle fraction, and the
    micro-batches each rank holds at once."""
    from shardwise.pipeline.schedules import theoretical_bubble

    return {
        "schedule": schedule.name,
        "timeline": schedule.timeline().splitlines(),
        "bubble": theoretical_bubble(
            schedule.name, schedule.ranks, schedule.micro_batches, schedule.chunks
        ),
        "in_flight": schedule.in_flight_peak(),
    }


SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str, what: str) -> float:
    """``"8GiB"`` -> bytes; one-line error for anything else."""
    number = text.rstrip("BbKkMmGgIi ")
    unit = text[len(number) :].strip().upper()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in SIZE_UNITS or value <= 0:
        raise ConfigError(
            f"{what} {text!r} is not a size: give a positive number and a unit, e.g. 8GiB, "
            "512MiB, 2GB"
        )
    return value * SIZE_UNITS[unit]


def _speeds_cache() -> Path:
    """Where the machine's measured speeds are kept (one file per host)."""
    import socket

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "shardwise" / f"speeds-{socket.gethostname()}.json"


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    from shardwise.bench import available_benchmarks

    try:
        names = ", ".join(available_benchmarks())
    except ShardwiseError as err:  # an install without the source checkout's benchmarks/
        names = str(err)
    p = sub.add_parser(
        "bench",
        help="run benchmark NAME against its peers; last line is JSON",
        epilog=f"benchmarks: {names}",
    )
    p.add_argument("name", metavar="NAME", help="benchmark (a file of benchmarks/), e.g. dp")
    p.add_argument("--quick", action="store_true", help="a short run (fewer steps)")
    p.add_argument("--json", action="store_true", help="print only the JSON result line")


def cmd_bench(args: argparse.Namespace) -> int:
    from shardwise.bench import run_benchmark

    run_benchmark(args.name, quick=args.quick, json_only=args.json)
    return 0


def _convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="a checkpoint (any layout) to one file, safetensors, a Hugging Face dir or a layout",
    )
    p.add_argument("source", type=Path, metavar="SRC", help="run, checkpoints or step directory")
    p.add_argument("dest", type=Path, metavar="DST", help="a .safetensors file, or a directory")
    p.add_argument(
        "--to",
        required=True,
        metavar="single|safetensors|hf|layout:CONFIG",
        help="single: one resumable file; layout:CONFIG: saved by CONFIG's layout on --nproc ranks",
    )
    p.add_argument("--config", type=Path, default=None, help="the run's config.toml (hf)")
    _set_argument(p, "layout: override a value of CONFIG, e.g. --set parallel.tp=2 (repeatable)")
    p.add_argument("--nproc", type=int, help=NPROC_HELP.format("layout: ranks of the layout"))
    p.add_argument("--force", action="store_true", help="write into a DST that is not empty")
    p.add_argument("--oversubscribe", action="store_true", help="as for `shardwise train`")
    p.add_argument("--master-port", type=int, help="layout: rendezvous port (default: a free one)")


def cmd_convert(args: argparse.Namespace) -> int:
    from shardwise.checkpoint.convert import convert

    if args.to.startswith("layout:"):
        return _convert_to_layout(args, Path(args.to.removeprefix("layout:")))
    if args.overrides:
        raise ConfigError(f"--set applies to --to layout:CONFIG, not --to {args.to}")
    if args.to == "single":
        _output_dir(args.dest, reuse=args.force, what="DST")
    written = convert(args.source, args.dest, args.to, args.config)
    print(f"shardwise convert: wrote {written}", file=sys.stderr)
    return 0


def _convert_to_layout(args: argparse.Namespace, config_file: Path) -> int:
    """Load SRC on the ranks of CONFIG's layout and save it at once into DST, a run directory
    that ``shardwise train --resume DST`` continues."""
    from shardwise.config import Config
    from shardwise.run_plan import resolve

    _check_launch_options(args)
    if not config_file.is_file():
        raise ConfigError(f"--to layout:{config_file}: no such config file")
    args.resume = _intact(args.source)
    plan = resolve(Config.from_file(config_file, args.overrides), args.nproc)
    step = _checkpoint_step(args.resume, args.nproc, plan)
    _check_data(plan)
    out = _output_dir(args.dest, reuse=args.force, what="DST")
    _start_ranks(plan, out, args, reshard=True)
    print(f"shardwise convert: wrote {out / 'checkpoints' / f'step_{step:08d}'}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from shardwise import __version__

    parser = argparse.ArgumentParser(prog="shardwise", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"shardwise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _plan_parser(sub)
    _bench_parser(sub)
    _convert_parser(sub)
    sub.add_parser(
        "run",
        help="launch a script on N ranks via torchrun: shardwise run [torchrun args] -- script.py",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv:
            build_parser().print_help()
            code = 0
        elif argv[:1] == ["run"]:
            code = cmd_run(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            commands = {
                "bench": cmd_bench,
                "convert": cmd_convert,
                "plan": cmd_plan,
                "train": cmd_train,
            }
            code = commands[args.command](args)
    except ShardwiseError as err:
        if os.environ.get("SHARDWISE_DEBUG"):
            raise
        print(f"shardwise: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("shardwise: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
