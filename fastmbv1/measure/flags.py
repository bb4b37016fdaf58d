"""The flags of each ``fastmbv1 bench`` subcommand: one ``add_WHAT`` per parser, with the
flags they share (``measurement_flags``). ``fastmbv1.measure.cli`` puts them together and
runs what they ask for."""

from __future__ import annotations

import argparse
import textwrap

from fastmbv1.config import PRESETS
from fastmbv1.measure.gpus import GPUS
from fastmbv1.measure.results import RESULTS_DIR
from fastmbv1.measure.step import ON_OFF
from fastmbv1.peak import DTYPES


def measurement_flags(
    p: argparse.ArgumentParser, data: bool = True, device: bool = True, plot: bool = True
) -> None:
    if device:
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
    if plot:
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


def presets_flag(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument(
        "--presets",
        nargs="+",
        choices=list(PRESETS),
        default=list(PRESETS),
        metavar="PRESET",
        help=f"presets to {verb}: {', '.join(PRESETS)} (default: all)",
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
        "images/s of the training step alone, its MFU and its roofline",
        "Time the training step alone (forward, backward, optimiser step) on one batch "
        "already on the device, for every combination of the models, widths, channels_last, "
        "AMP, compile and CUDA graph settings given. Each gets its model FLOPs per image, achieved "
        "FLOP/s, MFU against this machine's matmul peak in the step's dtype (measured first, "
        "and cached for fastmbv1 train), its lower bound (the sum of each layer's max(FLOPs "
        "/ peak, bytes / bandwidth)) and each layer timed alone against its bound; --plot "
        "draws the images/s and the roofline.",
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
        "one epoch per pipeline: data wait, compute, AU and a verdict",
        "Train one real epoch of a preset with each pipeline and split its time into "
        "waiting for the next batch and computing on it: does the model wait for data? "
        "AU (accelerator utilisation, MLPerf's) is compute time over epoch time; under "
        "MLPerf's 90 %% floor a pipeline is input-bound.",
    )
    measurement_flags(p)
    p.add_argument(
        "--preset",
        default="auto",
        choices=["auto", *PRESETS],
        help="model and recipe, as fastmbv1 train runs it on this device (default: auto, "
        "which is fast on a CUDA GPU and cpu otherwise)",
    )
    p.add_argument(
        "--pipelines",
        nargs="+",
        metavar="NAME[:num_workers=N]",
        help="pipelines to measure, and resident: the epoch's batches already on the device, "
        "not augmented, the upper bound (default: every pipeline, torchvision with one worker "
        "per core, and resident)",
    )
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
    presets_flag(p, "time")
    p.add_argument(
        "--budget",
        nargs="+",
        type=float,
        default=[3600.0],
        metavar="S",
        help="budgets in seconds (default: 3600)",
    )


SPEC_FORM = """\
--spec FILE is TOML, for example:
  name = "NVIDIA H100 SXM"
  bandwidth = 3.35e12        # bytes/s of device memory
  launch_latency = 5e-6      # s per kernel launch (default: 5e-6)
  [peak_flops]               # dense FLOP/s by dtype: fp32 (required), tf32, bf16, fp16
  fp32 = 67e12
  bf16 = 989.5e12
"""


def add_roofline(sub) -> None:
    p = command(
        sub,
        "roofline",
        "each preset's step and epoch floor on a named GPU: a model, not a measurement",
        "Predict the lower bound of a training step and of an epoch of each preset on a GPU "
        "from its published peaks: per layer max(FLOPs / peak, bytes / bandwidth), summed, "
        "against the kernels per step times the launch latency. Nothing is measured: every "
        "figure is a model, for the first lent GPU to check (bench/gpu/check.sh).",
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # the epilog's TOML as written
    p.description = textwrap.fill(p.description, 79)
    p.epilog = SPEC_FORM
    card = p.add_mutually_exclusive_group(required=True)
    card.add_argument(
        "--gpu", choices=sorted(GPUS), help="a card by name, at its datasheet's peaks"
    )
    card.add_argument("--spec", metavar="FILE", help="a card described in a TOML file (below)")
    presets_flag(p, "predict")
    measurement_flags(p, data=False, device=False, plot=False)


def add_peak(sub) -> None:
    p = command(
        sub,
        "peak",
        "this machine's matmul FLOP/s and memory bandwidth, measured and cached",
        "Measure this machine's roofs: a square matmul in each dtype and a copy between two "
        "1 GiB buffers. The highest figures measured are cached; fastmbv1 train divides by "
        "them for the MFU it reports, and never measures them itself.",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(DTYPES),
        default=["fp32", "bf16"],
        help="matmul dtypes (default: fp32 bf16)",
    )
    measurement_flags(p, data=False, plot=False)


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
