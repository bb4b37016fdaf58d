"""``fastmbv1 bench step``: the training step alone, per model, width, layout, autocast and
compile setting, timed by ``fastmbv1.timing.measure_step`` (the primitive runs size with),
and how far it is from the limit: its model FLOPs utilisation (MFU) against this machine's
matmul peak in the step's dtype, measured in the same run, and its roofline (each layer's
lower bound and its time alone, ``fastmbv1.measure.roofline``)."""

from __future__ import annotations

import argparse
import itertools
import sys

from fastmbv1.errors import UserError
from fastmbv1.measure.inputs import step_trace
from fastmbv1.measure.results import Table
from fastmbv1.measure.roofline import format_layers, step_roofline
from fastmbv1.models import MODELS
from fastmbv1.peak import cache_file, measure_peaks, step_dtype
from fastmbv1.plan import make_config
from fastmbv1.tables import Column
from fastmbv1.timing import measure_step

ON_OFF = {"on": True, "off": False}


def bench_step(args: argparse.Namespace, device) -> Table:
    both = ["off", "on"] if device.type == "cuda" else ["off"]
    if device.type != "cuda" and "on" in (args.cuda_graphs or ()):
        raise UserError("--cuda-graphs on needs a CUDA GPU")
    grid = itertools.product(
        args.models or sorted(MODELS),
        args.widths,
        args.channels_last,
        args.amp,
        args.compile or both,
        args.cuda_graphs or both,
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
                "cuda_graphs": ON_OFF[graphs],
                "batch_size": args.batch_size,
                "device": device.type,
            }
        )
        for model, width, cl, amp, comp, graphs in grid
        # The fp16 grad scaler's host state is not captured (fastmbv1.plan.graphs_problem).
        if not (amp == "fp16" and graphs == "on")
    ]
    dtypes = list(dict.fromkeys(step_dtype(c.amp) for c in configs))

    def rows():
        print(
            f"measuring this machine's peaks first: a matmul in {', '.join(dtypes)}, a copy "
            "between buffers far larger than its caches",
            file=sys.stderr,
            flush=True,
        )
        peaks = measure_peaks(device, dtypes)
        print(
            f"peaks: {', '.join(f'{k} {v / 1e9:,.1f}' for k, v in peaks['flops'].items())} "
            f"GFLOP/s, {peaks['bandwidth'] / 1e9:,.1f} GB/s copying "
            f"{peaks['buffer_bytes'] / 2**20:,.0f} MiB (the highest so far are cached in "
            f"{cache_file()})",
            file=sys.stderr,
            flush=True,
        )
        for c in configs:
            label = (
                c.model,
                f"{c.width:g}",
                c.amp,
                "compiled" * c.compile,
                "graphs" * c.cuda_graphs,
            )
            row = measure_step(
                c,
                device,
                steps=args.steps,
                warmup=args.warmup,
                trace=step_trace(args, device, *label),
            )
            peak = peaks["flops"][step_dtype(c.amp)]
            roof = step_roofline(c, device, peak, peaks["bandwidth"], args.steps, args.warmup)
            achieved = roof["flops_per_image"] * c.batch_size / row["step_s"]
            yield {
                **row,
                "flops_per_image": roof["flops_per_image"],
                "achieved_flops_per_s": achieved,
                "peak_dtype": step_dtype(c.amp),
                "peak_flops_per_s": peak,
                "bandwidth_bytes_per_s": peaks["bandwidth"],
                "mfu": achieved / peak,
                "bound_s": roof["bound_s"],
                "over_bound": row["step_s"] / roof["bound_s"],
                "layers_s": roof["layers_s"],
                "layers": roof["layers"],
            }

    columns = [
        Column("model", "model", 16),
        Column("width", "width", 5, ".2f"),
        Column("batch", "batch_size", 5, "d"),
        Column("ch.last", "channels_last", 7),
        Column("amp", "amp", 4),
        Column("compile", "compile", 7),
        Column("graphs", "cuda_graphs", 6),
        Column("step s", "step_s", 8, ".4f"),
        Column("images/s", "images_per_s", 10, ",.0f"),
        Column("compile s", "compile_s", 9, ".1f"),
        Column("MFLOP/img", "flops_per_image", 9, ",.1f", scale=1e-6),
        Column("GFLOP/s", "achieved_flops_per_s", 9, ",.1f", scale=1e-9),
        Column("peak GFLOP/s", "peak_flops_per_s", 12, ",.1f", scale=1e-9),
        Column("MFU", "mfu", 6, ".1%"),
        Column("bound s", "bound_s", 8, ".4f"),
        Column("x bound", "over_bound", 7, ".1f"),
    ]
    return Table(columns, rows(), details=format_layers)
