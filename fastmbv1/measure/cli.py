"""``fastmbv1 bench WHAT``: the measurements as a table (or ``--json``), saved, drawn.

``--save`` writes ``<results>/<what>-<machine>.json`` (default ``bench/results/``) holding
the command, the machine, the versions and the results. It is off by default, so that a
quick run never replaces a committed result set. ``--plot FILE`` draws the results (beside
the JSON too with ``--save``); ``fastmbv1 bench plot`` redraws a saved file. The measuring
and plotting modules are imported only when a subcommand runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from fastmbv1.config import PRESETS
from fastmbv1.errors import UserError
from fastmbv1.tables import Column, print_rows

RESULTS_DIR = "bench/results"
ON_OFF = {"on": True, "off": False}
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
# Below this share of an epoch spent waiting for batches, data loading no longer limits.
DATA_BOUND_SHARE = 0.05
# Steps a --trace records: enough to see the step's pattern, few enough to open quickly.
TRACE_STEPS = 5


@dataclass
class Table:
    columns: list[Column]
    rows: Iterable[dict]  # measured lazily: each row prints as soon as it exists
    footer: Callable[[list[dict]], str] | None = None


def parse_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=int,...``, e.g. ``torchvision:num_workers=2``."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise UserError(f"pipeline option {item!r} in {spec!r} is not key=integer")
        options[key] = int(value)
    return name, options


def pipeline_specs(args: argparse.Namespace, device) -> list[tuple[str, dict, str | None]]:
    """(name, options, why it cannot run here or None) for ``--pipelines`` or the default:
    every pipeline, plus torchvision with one worker per core."""
    from pipelines import MODULES, unavailable

    specs = args.pipelines or [*MODULES, f"torchvision:num_workers={os.cpu_count()}"]
    parsed = [parse_spec(s) for s in specs]
    for name, opts in parsed:
        if name == "torchvision":
            opts.setdefault("num_workers", 0)  # its default, said in the table
    return [(name, opts, unavailable(name, device)) for name, opts in parsed]


def preset_config(name: str, device):
    """Preset ``name`` as ``fastmbv1 train`` would run it on ``device`` (a width that a run
    would fit to its budget at its narrowest)."""
    from fastmbv1.config import make_config, resolve
    from fastmbv1.fit import narrowest

    return narrowest(resolve(make_config({"preset": name, "device": device.type}), device)[0])


def data_for(args: argparse.Namespace):
    from fastmbv1.measure.timings import load_data

    return load_data(args.data, args.images, args.synthetic)


def bench_loaders(args: argparse.Namespace, device) -> Table:
    from fastmbv1.measure.timings import measure_loader

    specs = pipeline_specs(args, device)
    batch_sizes = args.batch_sizes or sorted(
        {preset_config(p, device).batch_size for p in PRESETS}, reverse=True
    )
    data = data_for(args)

    def rows():
        for name, options, reason in specs:
            if reason:
                yield {"pipeline": name, **options, "note": f"skipped: {reason}"}
                continue
            for batch_size in batch_sizes:
                yield measure_loader(
                    name,
                    data.train_images,
                    data.train_labels,
                    batch_size=batch_size,
                    device=device,
                    epochs=args.epochs,
                    **options,
                )

    columns = [
        Column("pipeline", "pipeline", 11),
        Column("workers", "num_workers", 7, "d"),
        Column("batch", "batch_size", 5, "d"),
        Column("images", "images", 7, "d"),
        Column("seconds", "seconds", 8, ".2f"),
        Column("images/s", "images_per_s", 10, ",.0f"),
        Column("note", "note"),
    ]
    return Table(columns, rows())


def step_trace(args: argparse.Namespace, device, *label: str):
    """A StepTrace into ``--trace``'s folder, one subfolder per measured row; None without."""
    if not getattr(args, "trace", None):
        return None
    from fastmbv1.profile import StepTrace

    return StepTrace(Path(args.trace) / "-".join(filter(None, label)), device, TRACE_STEPS)


def bench_step(args: argparse.Namespace, device) -> Table:
    from fastmbv1.config import make_config
    from fastmbv1.measure.timings import measure_step
    from fastmbv1.models import MODELS

    compiles = args.compile or (["off", "on"] if device.type == "cuda" else ["off"])
    grid = itertools.product(
        args.models or sorted(MODELS), args.widths, args.channels_last, args.amp, compiles
    )
    # Every config is checked before the first measurement.
    configs = [
        make_config(
            {
                "model": model,
                "width": width,
                "channels_last": ON_OFF[cl],
                "amp": amp,
                "compile": ON_OFF[comp],
                "batch_size": args.batch_size,
                "device": device.type,
            }
        )
        for model, width, cl, amp, comp in grid
    ]
    rows = (
        measure_step(
            c,
            device,
            steps=args.steps,
            warmup=args.warmup,
            trace=step_trace(args, device, c.model, f"{c.width:g}", c.amp, "compiled" * c.compile),
        )
        for c in configs
    )
    columns = [
        Column("model", "model", 16),
        Column("width", "width", 5, ".2f"),
        Column("batch", "batch_size", 5, "d"),
        Column("ch.last", "channels_last", 7),
        Column("amp", "amp", 4),
        Column("compile", "compile", 7),
        Column("step s", "step_s", 8, ".4f"),
        Column("images/s", "images_per_s", 10, ",.0f"),
        Column("compile s", "compile_s", 9, ".1f"),
    ]
    return Table(columns, rows)


def bench_epoch(args: argparse.Namespace, device) -> Table:
    from fastmbv1.measure.timings import profile_epoch

    cfg = preset_config(args.preset, device)
    specs = pipeline_specs(args, device)
    for _, options, _ in specs:
        if set(options) - {"num_workers"}:
            raise UserError(f"an epoch profile takes only num_workers as an option, not {options}")
    data = data_for(args)

    def rows():
        for name, options, reason in specs:
            if reason:
                yield {"pipeline": name, **options, "note": f"skipped: {reason}"}
            else:
                run = replace(cfg, pipeline=name, **options)
                trace = step_trace(args, device, cfg.preset, name, *map(str, options.values()))
                yield profile_epoch(run, data.train_images, data.train_labels, device, trace)

    def verdict(rows: list[dict]) -> str:
        fed = [
            r["pipeline"] + (f" ({r['num_workers']} workers)" if "num_workers" in r else "")
            for r in rows
            if r.get("data_share", 1.0) < DATA_BOUND_SHARE
        ]
        limit = f"{DATA_BOUND_SHARE:.0%} of the epoch"
        if not fed:
            return f"the model waits for data more than {limit} with every pipeline"
        return f"the model waits for data less than {limit} with: " + ", ".join(fed)

    columns = [
        Column("preset", "preset", 8),
        Column("pipeline", "pipeline", 11),
        Column("workers", "num_workers", 7, "d"),
        Column("batch", "batch_size", 5, "d"),
        Column("images", "images", 7, "d"),
        Column("epoch s", "epoch_s", 8, ".2f"),
        Column("wait s", "data_wait_s", 8, ".2f"),
        Column("compute s", "compute_s", 9, ".2f"),
        Column("data", "data_share", 5, ".0%"),
        Column("images/s", "images_per_s", 10, ",.0f"),
        Column("note", "note"),
    ]
    return Table(columns, rows(), verdict)


def bench_budget(args: argparse.Namespace, device) -> Table:
    from fastmbv1.measure.timings import original_budget, project_budget

    budgets = tuple(args.budget)
    configs = [preset_config(p, device) for p in args.presets]
    data = data_for(args)

    def rows():
        for cfg in configs:
            yield project_budget(cfg, data, device, budgets)
        yield from original_budget(budgets)

    columns = [
        Column("run", "run", 24),
        Column("device", "device", 8),
        Column("pipeline", "pipeline", 11),
        Column("batch", "batch_size", 5, "d"),
        Column("s/epoch", "s_per_epoch", 8, ".1f"),
        Column("eval s", "eval_s", 6, ".1f"),
        Column("setup s", "setup_s", 7, ".1f"),
        Column("epochs", "epochs", 6, "d"),
        Column("total s", "epochs_s", 8, ",.0f"),
        *(Column(f"in {b:g} s", f"epochs_in_{b:g}s", 8, "d") for b in budgets),
    ]
    return Table(columns, rows())


BENCHES: dict[str, Callable[[argparse.Namespace, object], Table]] = {
    "loaders": bench_loaders,
    "step": bench_step,
    "epoch": bench_epoch,
    "budget": bench_budget,
}


def document(command: str, device, rows: list[dict]) -> dict:
    """What a saved result file holds: the command, where it ran, with what, and the rows."""
    from fastmbv1.machine import device_name, versions

    return {
        "command": command,
        "machine": device_name(device),
        "device": str(device),
        "versions": versions(),
        "results": rows,
    }


def write_document(doc: dict, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"{path}: cannot be written ({e.strerror})") from None
    return path


def result_path(results_dir: str | Path, what: str, machine: str) -> Path:
    return (
        Path(results_dir) / f"{what}-{re.sub(r'[^a-z0-9]+', '-', machine.lower()).strip('-')}.json"
    )


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
        from fastmbv1.measure.plots import check_picture_path

        check_picture_path(args.plot)  # before measuring: a picture must not cost a rerun
    from fastmbv1.machine import device_name, pick_device, versions

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
        from fastmbv1.measure.plots import PLOTS, save

        fig = PLOTS[args.bench](doc)
        for picture in pictures:
            save(fig, picture)
            print(f"saved {picture}", file=sys.stderr)
    return 0


def print_traces(rows: list[dict], device) -> None:
    from fastmbv1.profile import format_top_ops

    for row in rows:
        if "trace" in row:
            print(f"\n{row['trace']}: operators by their own time")
            print(format_top_ops(row["top_ops"], device))


def run_plot(args: argparse.Namespace) -> int:
    """Draw saved result files; all are read and drawn before the first picture is written."""
    from fastmbv1.measure.plots import PLOTS, check_picture_path, read_result, save

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
    from fastmbv1.measure.plots import agg_canvas
    from fastmbv1.measure.report import launch, markdown, read_run, report

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
        "AMP and compile settings given.",
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
