"""``fastmbv1 bench step``: the training step alone, per model, width, layout, autocast and
compile setting, timed by ``fastmbv1.timing.measure_step`` (the primitive runs size with)."""

from __future__ import annotations

import argparse
import itertools

from fastmbv1.errors import UserError
from fastmbv1.measure.inputs import step_trace
from fastmbv1.measure.results import Table
from fastmbv1.models import MODELS
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
    rows = (
        measure_step(
            c,
            device,
            steps=args.steps,
            warmup=args.warmup,
            trace=step_trace(
                args,
                device,
                c.model,
                f"{c.width:g}",
                c.amp,
                "compiled" * c.compile,
                "graphs" * bool(c.cuda_graphs),
            ),  # fmt: skip
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
        Column("graphs", "cuda_graphs", 6),
        Column("step s", "step_s", 8, ".4f"),
        Column("images/s", "images_per_s", 10, ",.0f"),
        Column("compile s", "compile_s", 9, ".1f"),
    ]
    return Table(columns, rows)
