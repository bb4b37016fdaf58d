"""``fastmbv1 <command>``: parse flags, call one function, turn mistakes into one-line errors."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import fields

from fastmbv1.config import PRESETS, TrainConfig, dash, field_type
from fastmbv1.errors import FastError, UserError
from fastmbv1.measure.cli import add_arguments as add_bench_arguments
from fastmbv1.measure.cli import run as run_bench

DESCRIPTION = """\
Train MobileNetV1 on CIFAR-10 against a wall-clock budget, and show where the time goes.

examples:
  fastmbv1 train                     the recipe for this machine (a GPU's, or the CPU's)
  fastmbv1 train --budget 150        the same, sized for two and a half minutes
  fastmbv1 eval --checkpoint runs/NAME/final.pt
  fastmbv1 bench epoch               data loading against compute, per pipeline
  fastmbv1 COMMAND --help            everything a command takes
"""
TRAIN_DESCRIPTION = """\
Train on CIFAR-10 until the epochs are done or --budget seconds of wall clock (loading,
compiling, evaluating and saving included) are spent; the learning rate anneals either way.
Writes config.json, metrics.jsonl, summary.json and final.pt into --out.

A preset sets the recipe; every flag below overrides one of its fields. --preset auto (the
default) takes 'fast' on a CUDA GPU and 'cpu' otherwise; defaults shown as "fast X, cpu Y"
differ between the two.
"""
TUNE_DESCRIPTION = """\
Let Optuna search training recipes for the shortest training time to --target-acc, or with
--objective accuracy for the best test accuracy after --epochs N (a score that the machine's
speed that minute does not change). Each trial is a fastmbv1 train run in OUT/trial-NNNN
with --budget = --trial-budget and an evaluation every epoch (after the last with --objective
accuracy); the trial table, best.toml and plots are written to --out.

Every fastmbv1 train flag fixes that setting for all trials, over the space's [fixed] table
and --config; a flag for a field the space searches is an error. --budget and --eval-every
are the tuner's own; --seed also seeds the sampler.
"""


DEVICES = ("auto", "cuda", "cpu")
DEVICE_HELP = "auto (a CUDA GPU if there is one), cuda or cpu (default: auto)"


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag or value in one line, exit status 2, no usage dump."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def shown_default(name: str, default) -> str:
    """A field's default as help shows it: the two presets auto picks, where they differ."""

    def shown(value) -> str:
        if isinstance(value, bool):  # before the lookup: 1.0 == True
            return "on" if value else "off"
        return "auto" if value is None else str(value)

    fast, cpu = (shown(PRESETS[p].get(name, default)) for p in ("fast", "cpu"))
    if fast == cpu:
        return "" if default is None else f" (default {fast})"
    return f" (default: fast {fast}, cpu {cpu})"


def count(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field but ``skip``; unset flags stay out of the namespace."""
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        kind = field_type(f.name)
        help = f.metadata["help"] + shown_default(f.name, f.default)
        kw = {"default": argparse.SUPPRESS, "help": help.replace("%", "%%")}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"], kw["metavar"] = kind, f.name.upper()
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        p.add_argument(f"--{dash(f.name)}", **kw)
    p.add_argument("--config", metavar="FILE", help="TOML file with config field names")


def config_overrides(args: argparse.Namespace) -> dict:
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def cmd_train(args: argparse.Namespace) -> int:
    from fastmbv1 import distributed
    from fastmbv1.config import settings
    from fastmbv1.plan import make_config, resume_config
    from fastmbv1.rundir import RESTART_NEEDS_OUT, auto_resume, may_restart
    from fastmbv1.train import train

    overrides = config_overrides(args)
    resume, overwrite = args.resume, args.overwrite
    if args.resume == "auto" or distributed.restarted():
        # The same command line again (torchrun restarts it): continue its --out if it can.
        given = settings(overrides, args.config)
        resume = auto_resume(given.get("out"), distributed.restarted())
        overwrite = overwrite or resume is None  # a failure before the first checkpoint
        cfg = resume_config(resume, given) if resume else make_config(overrides, args.config)
    elif args.resume and args.config:
        raise UserError("--config cannot be combined with --resume: the run keeps its config")
    elif args.resume:
        cfg = resume_config(args.resume, overrides)
    else:
        cfg = make_config(overrides, args.config)
        if may_restart() and cfg.out is None:
            raise UserError(RESTART_NEEDS_OUT)
    try:
        with distributed.lost_ranks(cfg.rank_timeout):
            train(cfg, resume=resume, overwrite=overwrite)
    finally:
        distributed.shutdown()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fastmbv1.evaluate import evaluate_checkpoint

    acc = evaluate_checkpoint(args.checkpoint, data=args.data, device=args.device)
    print(f"test accuracy: {acc:.2f} %")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from fastmbv1.info import run

    return run(args)


def cmd_export(args: argparse.Namespace) -> int:
    from fastmbv1.export import run

    return run(args)


def cmd_tune(args: argparse.Namespace) -> int:
    from fastmbv1.tune import run

    return run(args, config_overrides(args))


def cmd_bench(args: argparse.Namespace) -> int:
    return run_bench(args)


def cmd_prune(args: argparse.Namespace) -> int:
    from fastmbv1.prune import run

    return run(args, config_overrides(args))


def build_parser() -> Parser:
    parser = Parser(
        prog="fastmbv1", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )

    p = sub.add_parser(
        "train",
        help="train on CIFAR-10 within a time budget",
        description=TRAIN_DESCRIPTION,
        usage="fastmbv1 train [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(p)
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its checkpoint; auto: the run in --out if it holds "
        "a checkpoint, else start it afresh (what a torchrun restart does)",
    )
    p.add_argument("--overwrite", action="store_true", help="reuse an --out folder holding a run")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="print the test accuracy of a saved model (writes nothing)",
        description="Load a model as fastmbv1.load does and score it on the 10,000 test images.",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="final.pt or a checkpoint")
    p.add_argument("--data", metavar="PATH", help="CIFAR-10 archive or folder (default: cache)")
    p.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "info",
        help="parameters, MACs, file size, latency and throughput",
        description="What a model costs: parameters, multiply-accumulates per image, bytes on "
        "disk, batch-1 latency and batch throughput on --device.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="NAME", help="registered model, freshly initialised")
    which.add_argument("--checkpoint", metavar="PATH", help="a saved model or checkpoint")
    p.add_argument("--width", type=float, metavar="W", help="width multiplier (default 1.0)")
    p.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    p.add_argument("--repeats", type=int, default=20, metavar="N", help="timed passes (default 20)")
    p.add_argument(
        "--batch-size", type=int, default=512, metavar="B", help="throughput batch (default 512)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "export",
        help="write a saved model as ONNX or TorchScript",
        description="Write a saved model (normalisation and test-time flips included) as an "
        "ONNX or TorchScript file taking float (N, 3, 32, 32) RGB in [0, 1], any N.",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="final.pt or a checkpoint")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"), help="file kind")
    p.add_argument("--out", metavar="FILE", help="default: the checkpoint's name, new suffix")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "tune",
        help="search recipes for the shortest time to an accuracy (Optuna)",
        description=TUNE_DESCRIPTION,
        usage="fastmbv1 tune (--target-acc A | --objective accuracy --epochs N) "
        "--trial-budget S --trials N [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--trial-budget", type=seconds, required=True, metavar="S", help="budget of each trial"
    )
    p.add_argument(
        "--trials", type=count, required=True, metavar="N", help="finished trials the study needs"
    )
    p.add_argument("--space", metavar="FILE", help="TOML search space (default: built in)")
    p.add_argument(
        "--objective",
        choices=("time", "accuracy"),
        default="time",
        help="time: training seconds to --target-acc (default); accuracy: the test accuracy "
        "after --epochs, which the machine's speed that minute does not change",
    )
    p.add_argument("--study", default="fastmbv1", metavar="NAME", help="study name in the storage")
    p.add_argument(
        "--storage", metavar="URL", help="SQLAlchemy URL (default: sqlite:///OUT/tune.db)"
    )
    p.add_argument("--out", default="runs/tune", metavar="DIR", help="trials, best.toml, plots")
    p.add_argument(
        "--heartbeat-grace",
        type=count,
        metavar="S",
        help="mark another worker's trial failed after S seconds without its heartbeat "
        "(database storages; default 120)",
    )
    add_config_flags(p, skip=("out",))  # settings for every trial; --out is the study's folder
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("bench", help="measure loaders, the step, an epoch, the budget; report runs")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "prune",
        help="remove channels (Torch-Pruning), fine-tune, compare",
        description="Remove whole channels from a trained model (Torch-Pruning), fine-tune it "
        "with the trainer (every train flag applies; --preset defaults to auto, or to the "
        "checkpoint's if baseline or custom) and compare accuracy, parameters, MACs and "
        "latency before and after.",
        usage="fastmbv1 prune --checkpoint PATH (--ratio R | --target-macs M) [train options]",
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="final.pt or a checkpoint")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=float, metavar="R", help="fraction of channels to remove")
    how.add_argument("--target-macs", type=float, metavar="M", help="prune to <= M MACs/image")
    add_config_flags(p)  # the fine-tuning run
    p.add_argument("--overwrite", action="store_true", help="reuse an --out folder holding a run")
    p.set_defaults(func=cmd_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastError as e:
        print(f"fastmbv1 {args.command}: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print(f"fastmbv1 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
