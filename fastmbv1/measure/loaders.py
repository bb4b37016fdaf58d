"""``fastmbv1 bench loaders``: the images/s each data pipeline delivers alone, no model, and
the host time the caller's thread spends per batch handed over (on a GPU, where a step is
launch-bound, that time is taken from launching the step)."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fastmbv1.config import PRESETS
from fastmbv1.measure.inputs import data_for, pipeline_specs, preset_config
from fastmbv1.measure.results import Table
from fastmbv1.tables import Column
from pipelines import build_pipeline


def measure_loader(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    device: torch.device | str,
    epochs: int = 1,
    **options,
) -> dict:
    """Time ``epochs`` full training epochs of pipeline ``name`` (built outside the timing)."""
    device = torch.device(device)
    pipeline = build_pipeline(
        name, images, labels, batch_size=batch_size, train=True, device=device, seed=0, **options
    )
    total = torch.zeros((), device=device)
    count = batches = 0
    host = 0.0  # seconds the caller spent inside the pipeline, waiting for a batch
    start = time.perf_counter()
    for _ in range(epochs):
        it = iter(pipeline)
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            host += time.perf_counter() - t
            if batch is None:
                break
            x, _y = batch
            batches += 1
            if device.type == "cuda":
                # A reduction on the device makes every batch exist there, however
                # asynchronous the pipeline is; .item() below waits for the last one.
                total += x.sum(dtype=torch.float32)
            else:
                # A CPU batch is complete when handed over; reading one value shows it is.
                # A whole-batch reduction would time torch's two threads (contended by the
                # loader's own) rather than the loader.
                x[-1, -1, -1, -1].item()
            count += len(x)
    total.item()
    seconds = time.perf_counter() - start
    return {
        "pipeline": name,
        "batch_size": batch_size,
        "device": str(device),
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "host_ms_per_batch": 1000 * host / max(batches, 1),
        "chunk": getattr(pipeline, "chunk", None),  # DALI's batches per run
        **options,
    }


def bench_loaders(args: argparse.Namespace, device) -> Table:
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
        Column("chunk", "chunk", 5, "d"),
        Column("batch", "batch_size", 5, "d"),
        Column("images", "images", 7, "d"),
        Column("seconds", "seconds", 8, ".2f"),
        Column("images/s", "images_per_s", 10, ",.0f"),
        Column("host ms/batch", "host_ms_per_batch", 13, ".3f"),
        Column("note", "note"),
    ]
    return Table(columns, rows())
