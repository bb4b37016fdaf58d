"""``fastmbv1 bench WHAT``: the measurements as a table (or ``--json``), saved, drawn.

``--save`` writes ``<results>/<what>-<machine>.json`` (default ``bench/results/``) holding
the command, the machine, the versions and the results. It is off by default, so that a
quick run never replaces a committed result set. ``--plot FILE`` draws the results (beside
the JSON too with ``--save``); ``fastmbv1 bench plot`` redraws a saved file. Each bench's
table is built by the module that measures it (``loaders``, ``step``, ``epoch``,
``budget``); this module is the command line around them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from fastmbv1.config import PRESETS
from fastmbv1.errors import UserError
from fastmbv1.machine import device_name, pick_device, versions
from fastmbv1.measure.budget import bench_budget
from fastmbv1.measure.epoch import bench_epoch
from fastmbv1.measure.loaders import bench_loaders
from fastmbv1.measure.plots import PLOTS, agg_canvas, check_picture_path, read_result, save
from fastmbv1.measure.report import launch, markdown, read_run, report
from fastmbv1.measure.results import RESULTS_DIR, Table, document, result_path, write_document
from fastmbv1.measure.step import ON_OFF, bench_step
from fastmbv1.profile import format_top_ops
from fastmbv1.tables import print_rows

DESCRIPTION = """\
Measure where training time goes on this machine. Each measuring WHAT prints a
table, row by row as it measures (--json: JSON instead); --save keeps the
results in bench/results/, --plot draws them. See bench/results/README.md.
"""
EXAMPLES = """\
examples:
  fastmbv1 bench loaders --synthetic --images 5000        a quick look, no data set needed
  fastmbv1 bench step --device cuda --plot step.png       the step on the GPU, as a chart
  fastmbv1 bench epoch --preset cpu --data PATH --save    keep the result in bench/results/
  fastmbv1 bench plot bench/results/loaders-*.json        redraw a saved result
"""
BENCHES: dict[str, Callable[[argparse.Namespace, object], Table]] = {
    "loaders": bench_loaders,
    "step": bench_step,
    "epoch": bench_epoch,
    "budget": bench_budget,
}


def check_numbers(args: argparse.Namespace) -> None:
    for name in ("images", "epochs", "steps", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "warmup", 0) < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("batch_sizes", "widths", "budget"):
        values = getattr(args, name, None)
        values = values if isinstance(values, list) else [values]
        if any(v is not None and not v > 0 for v in values):
            raise UserError(f"--{name.replace('_', '-')} values must be > 0, got {values}")


def run(args: argparse.Namespace) -> int:
    check_numbers(args)
    if args.bench == "report":
        return run_report(args)
    if args.bench == "plot":
        return run_plot(args)
    if args.plot:
        check_picture_path(args.plot)  # before measuring: a picture must not cost a rerun
    device = pick_device(args.device)
    table = BENCHES[args.bench](args, device)
    if args.json:
        rows = list(table.rows)
    else:
        v = versions()
        print(f"{device_name(device)} ({device}); torch {v['torch']}, DALI {v['dali'] or '-'}")
        rows = print_rows(table.columns, table.rows)
        if table.footer:
            print(table.footer(rows))
        print_traces(rows, device)
    doc = document(shlex.join(sys.argv), device, rows)
    if args.json:
        print(json.dumps(doc, indent=2))
    pictures = [Path(args.plot)] if args.plot else []
    if args.save:
        path = write_document(doc, result_path(args.results, args.bench, doc["machine"]))
        print(f"saved {path}", file=sys.stderr)
        if args.plot:  # the picture goes beside the saved file too
            pictures.append(path.with_suffix(".png"))
    if pictures:
        fig = PLOTS[args.bench](doc)
        for picture in pictures:
            save(fig, picture)
            print(f"saved {picture}", file=sys.stderr)
    return 0


def print_traces(rows: list[dict], device) -> None:
    for row in rows:
        if "trace" in row:
            print(f"\n{row['trace']}: operators by their own time")
            print(format_top_ops(row["top_ops"], device))


def run_plot(args: argparse.Namespace) -> int:
    """Draw saved result files; all are read and drawn before the first picture is written."""
    if args.out and len(args.files) > 1:
        raise UserError("--out names one picture: give it one result file")
    pictures = []
    for file in args.files:
        what, doc = read_result(file)
        path = check_picture_path(args.out or Path(file).with_suffix(".png"))
        pictures.append((PLOTS[what](doc), path))
    for fig, path in pictures:
        save(fig, path)
        print(f"saved {path}", file=sys.stderr)
    return 0


def run_report(args: argparse.Namespace) -> int:
    agg_canvas()  # matplotlib is there, before any training starts
    for run_dir in args.runs:
        read_run(run_dir)  # a wrong folder fails before any training starts
    run_dirs = list(args.runs)
    if args.launch:
        overrides = {k: getattr(args, k) for k in ("data", "device") if getattr(args, k)}
        run_dirs += launch(
            args.presets,
            budget=args.budget,
            runs_dir=args.runs_dir,
            overrides=overrides,
            config_file=args.config,
        )
    elif not run_dirs:
        raise UserError("name run folders to report on, or --launch to train some first")
    rows = report(run_dirs, args.out)
    print(json.dumps(rows, indent=2) if args.json else markdown(rows), end="")
    print(f"wrote {Path(args.out) / 'report.png'} and report.md", file=sys.stderr)
    return 0


def measurement_flags(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cuda", "cpu"),
        help="where to measure; auto takes the GPU when there is one (default: auto)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result document (what --save writes) as JSON instead of the table",
    )
    p.add_argument(
        "--save",
        action="store_true",
        help="also write RESULTS/<what>-<machine>.json (and the --plot picture beside it, "
        "as .png); off by default, so that a quick run replaces no committed result",
    )
    p.add_argument(
        "--results",
        default=RESULTS_DIR,
        metavar="DIR",
        help="where --save writes (default: %(default)s)",
    )
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="draw the results as a chart into FILE (.png, .svg, .pdf; needs matplotlib)",
    )
    if data:
        p.add_argument(
            "--data",
            metavar="PATH",
            help="CIFAR-10 archive or folder (default: $FASTMBV1_DATA, the cache, a download)",
        )
        p.add_argument(
            "--images",
            type=int,
            metavar="N",
            help="use only the first N images of each split, for quick runs (default: all)",
        )
        p.add_argument(
            "--synthetic",
            action="store_true",
            help="random images of CIFAR-10's shape instead of the data set (no download)",
        )


PIPELINES_HELP = (
    "pipelines to measure, with integer options (default: every pipeline, and "
    "torchvision with one worker per core)"
)


def trace_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trace",
        metavar="DIR",
        help="also record a few steps with torch.profiler: one trace per row in DIR (open it "
        "in Perfetto, chrome://tracing or TensorBoard), top operators printed",
    )


def command(sub, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description)


def add_loaders(sub) -> None:
    p = command(
        sub,
        "loaders",
        "images/s each data pipeline delivers, full epochs",
        "Time full training epochs of each data pipeline alone (no model) at each batch "
        "size. Every batch is consumed on the device, so lazy and asynchronous pipelines "
        "are timed for the work they really do.",
    )
    measurement_flags(p)
    p.add_argument("--pipelines", nargs="+", metavar="NAME[:key=int,...]", help=PIPELINES_HELP)
    p.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        metavar="B",
        help="batch sizes to measure (default: the presets' batch sizes)",
    )
    p.add_argument(
        "--epochs", type=int, default=1, metavar="N", help="epochs per measurement (default: 1)"
    )


def add_step(sub) -> None:
    p = command(
        sub,
        "step",
        "images/s of the training step alone, data on the device",
        "Time the training step alone (forward, backward, optimiser step) on one batch "
        "already on the device, for every combination of the models, widths, channels_last, "
        "AMP, compile and CUDA graph settings given.",
    )
    measurement_flags(p, data=False)
    p.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        help="models to time (default: every registered model)",
    )
    p.add_argument(
        "--widths",
        nargs="+",
        type=float,
        default=[1.0, 0.5],
        metavar="W",
        help="width multipliers (default: 1.0 0.5)",
    )
    p.add_argument(
        "--channels-last",
        nargs="+",
        choices=ON_OFF,
        default=["on", "off"],
        help="channels_last memory format on, off or both (default: on off)",
    )
    p.add_argument(
        "--amp",
        nargs="+",
        choices=("off", "bf16", "fp16"),
        default=["off", "bf16"],
        help="autocast dtypes (default: off bf16)",
    )
    p.add_argument(
        "--compile",
        nargs="+",
        choices=ON_OFF,
        help="torch.compile on, off or both (default: off on; only off on the CPU, where "
        "compiling takes minutes)",
    )
    p.add_argument(
        "--cuda-graphs",
        nargs="+",
        choices=ON_OFF,
        help="the step captured as a CUDA graph, op by op, or both (default: off on, except "
        "with fp16; only off on the CPU)",
    )
    p.add_argument(
        "--batch-size", type=int, default=512, metavar="B", help="images per step (default: 512)"
    )
    p.add_argument(
        "--steps", type=int, default=20, metavar="N", help="timed steps per setting (default: 20)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        metavar="N",
        help="untimed steps after the first, before timing (default: 3)",
    )
    trace_flag(p)


def add_epoch(sub) -> None:
    p = command(
        sub,
        "epoch",
        "one epoch per pipeline split into data wait and compute",
        "Train one real epoch of a preset with each pipeline and split its time into "
        "waiting for the next batch and computing on it: does the model wait for data?",
    )
    measurement_flags(p)
    p.add_argument(
        "--preset",
        default="auto",
        choices=["auto", *PRESETS],
        help="model and recipe, as fastmbv1 train runs it on this device (default: auto, "
        "which is fast on a CUDA GPU and cpu otherwise)",
    )
    p.add_argument("--pipelines", nargs="+", metavar="NAME[:num_workers=N]", help=PIPELINES_HELP)
    trace_flag(p)


def add_budget(sub) -> None:
    p = command(
        sub,
        "budget",
        "epochs of each preset that fit into a time budget",
        "Time one epoch and one evaluation of each preset (scaled to the full 50,000 / "
        "10,000 images when --images is given) and count the epochs that fit into each "
        "budget; the original project's Tesla T4 runs follow in the same terms.",
    )
    measurement_flags(p)
    p.add_argument(
        "--presets",
        nargs="+",
        choices=list(PRESETS),
        default=list(PRESETS),
        metavar="PRESET",
        help=f"presets to time: {', '.join(PRESETS)} (default: all)",
    )
    p.add_argument(
        "--budget",
        nargs="+",
        type=float,
        default=[3600.0],
        metavar="S",
        help="budgets in seconds (default: 3600)",
    )


def add_report(sub) -> None:
    p = command(
        sub,
        "report",
        "plot and tabulate test accuracy against wall-clock time",
        "Draw test accuracy against wall-clock seconds for fastmbv1 train run folders "
        "(finished or still running) into report.png, and write their time to each accuracy "
        "into report.md (also printed). --launch trains one run per preset first.",
    )
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="folders of fastmbv1 train runs")
    p.add_argument(
        "--out",
        default=RESULTS_DIR,
        metavar="DIR",
        help="where report.png and report.md go (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--launch", action="store_true", help="first train one run per --presets")
    p.add_argument(
        "--presets",
        nargs="+",
        choices=["auto", *PRESETS],
        default=["auto"],
        metavar="PRESET",
        help=f"presets --launch trains: auto, {', '.join(PRESETS)} (default: auto)",
    )
    p.add_argument(
        "--budget", type=float, metavar="S", help="budget of launched runs (default: the preset's)"
    )
    p.add_argument("--config", metavar="FILE", help="TOML applied on top of each launched preset")
    p.add_argument(
        "--runs-dir",
        default="runs",
        metavar="DIR",
        help="launched runs go to DIR/<preset>-<budget>s (default: %(default)s)",
    )
    p.add_argument(
        "--data", metavar="PATH", help="CIFAR-10 for launched runs (default: as train finds it)"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        help="device of launched runs (default: auto)",
    )


def add_plot(sub) -> None:
    p = command(
        sub,
        "plot",
        "draw the chart of saved result files again, without measuring",
        "Draw each result file written by --save (or --json) as --plot would have drawn "
        "it when it was measured.",
    )
    p.add_argument("files", nargs="+", metavar="RESULT", help="result files (JSON)")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="the picture, for one result file (default: beside each file, as .png)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommands, on the ``fastmbv1 bench`` parser."""
    parser.description = DESCRIPTION
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(
        dest="bench", required=True, metavar="WHAT", parser_class=type(parser)
    )
    add_loaders(sub)
    add_step(sub)
    add_epoch(sub)
    add_budget(sub)
    add_report(sub)
    add_plot(sub)
