"""``fastmbv1 bench WHAT``: the measurements as a table (or ``--json``), saved, drawn.

``--save`` writes ``<results>/<what>-<machine>.json`` (default ``bench/results/``) holding
the command, the machine, the versions and the results. It is off by default, so that a
quick run never replaces a committed result set. ``--plot FILE`` draws the results (beside
the JSON too with ``--save``); ``fastmbv1 bench plot`` redraws a saved file. Each bench's
table is built by the module that measures it (``loaders``, ``step``, ``epoch``,
``budget``, ``roofline``); ``flags`` defines each subcommand's flags; this module is the
command line around them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from fastmbv1.errors import UserError
from fastmbv1.machine import device_name, pick_device, versions
from fastmbv1.measure.budget import bench_budget
from fastmbv1.measure.epoch import bench_epoch
from fastmbv1.measure.flags import (
    add_budget,
    add_epoch,
    add_loaders,
    add_peak,
    add_plot,
    add_report,
    add_roofline,
    add_step,
)
from fastmbv1.measure.loaders import bench_loaders
from fastmbv1.measure.plots import PLOTS, agg_canvas, check_picture_path, read_result, save
from fastmbv1.measure.report import launch, markdown, read_run, report
from fastmbv1.measure.results import Table, document, result_path, write_document
from fastmbv1.measure.roofline import bench_peak, bench_roofline
from fastmbv1.measure.step import bench_step
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
  fastmbv1 bench roofline --gpu h100                      each preset's floor on an H100 (a model)
  fastmbv1 bench plot bench/results/loaders-*.json        redraw a saved result
"""
BENCHES: dict[str, Callable[[argparse.Namespace, object], Table]] = {
    "loaders": bench_loaders,
    "step": bench_step,
    "epoch": bench_epoch,
    "budget": bench_budget,
    "roofline": bench_roofline,
    "peak": bench_peak,
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
    plot = getattr(args, "plot", None)  # roofline and peak draw nothing
    if plot:
        check_picture_path(plot)  # before measuring: a picture must not cost a rerun
    device = pick_device(getattr(args, "device", "cpu"))  # roofline models a card, here
    table = BENCHES[args.bench](args, device)
    if args.json:
        rows = list(table.rows)
    else:
        v = versions()
        print(f"{device_name(device)} ({device}); torch {v['torch']}, DALI {v['dali'] or '-'}")
        rows = print_rows(table.columns, table.rows)
        if table.footer:
            print(table.footer(rows))
        for text in map(table.details or (lambda row: None), rows):
            if text:
                print(text)
        print_traces(rows, device)
    doc = document(shlex.join(sys.argv), device, rows)
    if args.json:
        print(json.dumps(doc, indent=2))
    pictures = [Path(plot)] if plot else []
    if args.save:
        where = table.saved_as or doc["machine"]
        path = write_document(doc, result_path(args.results, args.bench, where))
        print(f"saved {path}", file=sys.stderr)
        if plot:  # the picture goes beside the saved file too
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
    run_dirs, refused = list(args.runs), []
    if args.launch:
        overrides = {k: getattr(args, k) for k in ("data", "device") if getattr(args, k)}
        trained, refused = launch(
            args.presets,
            budget=args.budget,
            runs_dir=args.runs_dir,
            overrides=overrides,
            config_file=args.config,
        )
        run_dirs += trained
    elif not run_dirs:
        raise UserError("name run folders to report on, or --launch to train some first")
    if run_dirs:
        rows = report(run_dirs, args.out)
        print(json.dumps(rows, indent=2) if args.json else markdown(rows), end="")
        print(f"wrote {Path(args.out) / 'report.png'} and report.md", file=sys.stderr)
    if refused:  # after the report, so the runs that did train are in it
        raise UserError("not trained: " + "; ".join(refused))
    return 0


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
    add_roofline(sub)
    add_peak(sub)
    add_report(sub)
    add_plot(sub)
