"""``fastmbv1 bench epoch``: one real training epoch per pipeline, split into waiting for
the next batch and computing on it: does the model wait for data?

Each pipeline's accelerator utilisation (AU), as MLPerf Storage defines it: compute time
over epoch time. Below MLPerf's floor of 90 % the epoch is input-bound. The ``resident`` row
feeds the epoch's batches already on the device and not augmented: the upper bound that
any pipeline can reach, against which each verdict says how much slower its epoch is.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from torch.profiler import record_function

from fastmbv1.augment import augment_batch
from fastmbv1.config import TrainConfig
from fastmbv1.data import pipeline_options, recipe_pipeline
from fastmbv1.errors import UserError
from fastmbv1.evaluate import batch_dtype, evaluate
from fastmbv1.machine import sync
from fastmbv1.measure.inputs import data_for, pipeline_specs, preset_config, step_trace
from fastmbv1.measure.results import Table
from fastmbv1.profile import StepTrace
from fastmbv1.step import build_run, train_step
from fastmbv1.tables import Column
from fastmbv1.timing import ComputeTimer, describe, random_batch, timed, traced

# MLPerf Storage's floor: an epoch whose accelerator utilisation is below it is input-bound.
AU_FLOOR = 0.90
RESIDENT = "resident"


class ResidentBatches:
    """The epoch's batches, made before it starts and kept on the device; no augmentation,
    no shuffling: a pipeline that costs the epoch nothing (``bench epoch``'s upper bound)."""

    def __init__(self, cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, device):
        n = len(images) // cfg.batch_size * cfg.batch_size
        # (N, H, W, C) uint8 seen as (N, C, H, W) is already laid out channels_last.
        x = torch.from_numpy(images[:n]).to(device).permute(0, 3, 1, 2)
        x = x.to(batch_dtype(cfg.amp)).div_(255)
        y = torch.from_numpy(np.asarray(labels[:n])).to(device, torch.int64)
        self.batches = list(zip(x.split(cfg.batch_size), y.split(cfg.batch_size), strict=True))
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def profile_epoch(
    cfg: TrainConfig,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    trace: StepTrace | None = None,
) -> dict:
    """One training epoch of ``cfg`` split into waiting for batches and computing on them.

    ``setup_s`` (pipeline, model, compile, two warm-up steps and an evaluation on a random
    batch) stays out of the epoch. ``compute_s`` is the time from each batch's arrival to
    the end of its step, regularised (cutout, mixup) as the trainer does; on CUDA it is
    timed with CUDA events, so the step gains no host synchronisation and overlaps the
    pipeline as in training. ``au`` is ``compute_s / epoch_s``; ``data_wait_s`` is the
    host's time blocked on the next batch (on CUDA the pipeline's own kernels are queued,
    not waited for, so AU says more). With ``trace``, the epoch's first ``trace.steps``
    steps and an evaluation of the last batch are recorded after it.
    """
    start = time.perf_counter()
    if cfg.pipeline == RESIDENT:
        pipe = ResidentBatches(cfg, images, labels, device)
    else:
        pipe = recipe_pipeline(cfg, images, labels, device, train=True, batch_size=cfg.batch_size)
    if len(pipe) == 0:
        raise UserError(f"batch size {cfg.batch_size} is larger than the {len(images)} images")
    run = build_run(cfg, device)
    x, y = random_batch(cfg, device)
    timed(lambda: train_step(run, x, y, y, 1.0), device, 2)
    # The evaluation the trace records (of a training batch) compiles here, not in the trace.
    evaluate(run.model_for_eval, [(x, y)], device, cfg.amp, cfg.channels_last)
    setup_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(cfg.seed)

    wait, seen, compute = 0.0, 0, ComputeTimer(device)
    batches = iter(pipe)
    start = time.perf_counter()
    for _ in range(len(pipe)):
        t = time.perf_counter()
        with record_function("data wait"):
            x, y = next(batches)
        wait += time.perf_counter() - t
        compute.start()
        with record_function("augment"):
            batch = augment_batch(x, y, cfg, gen)
        train_step(run, *batch)
        compute.stop()
        seen += len(y)
    sync(device)
    epoch_s = time.perf_counter() - start
    au = compute.seconds() / epoch_s

    def steps_and_an_evaluation() -> None:
        batches = iter(pipe)
        for _ in range(min(trace.steps, len(pipe))):
            with record_function("data wait"):
                x, y = next(batches)
            with record_function("augment"):
                batch = augment_batch(x, y, cfg, gen)
            train_step(run, *batch)
        with record_function("evaluation"):
            evaluate(run.model_for_eval, [(x, y)], device, cfg.amp, cfg.channels_last)

    recorded = traced(trace, steps_and_an_evaluation)
    return {
        "preset": cfg.preset,
        "pipeline": cfg.pipeline,
        **pipeline_options(cfg),
        **describe(cfg, device),
        "images": seen,
        "steps": len(pipe),
        "setup_s": setup_s,
        "epoch_s": epoch_s,
        "data_wait_s": wait,
        "compute_s": compute.seconds(),
        "data_share": wait / epoch_s,
        "au": au,
        "bound": "compute" if au >= AU_FLOOR else "input",
        "images_per_s": seen / epoch_s,
        **recorded,
    }


def bench_epoch(args: argparse.Namespace, device) -> Table:
    cfg = preset_config(args.preset, device)
    specs = pipeline_specs(args, device, extra=RESIDENT)
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
        Column("AU", "au", 4, ".0%"),
        Column("bound", "bound", 7),
        Column("images/s", "images_per_s", 10, ",.0f"),
        Column("note", "note"),
    ]
    return Table(columns, rows(), verdicts)


def verdicts(rows: list[dict]) -> str:
    """One line per measured pipeline: input-bound or compute-bound, and by how much."""
    resident = next((r for r in rows if r.get("pipeline") == RESIDENT and "au" in r), None)
    lines = []
    for r in rows:
        if "au" not in r:
            continue
        name = r["pipeline"] + (f" ({r['num_workers']} workers)" if "num_workers" in r else "")
        points = abs(r["au"] - AU_FLOOR) * 100  # percentage points
        if r["bound"] == "input":
            line = (
                f"{name}: input-bound, AU {r['au']:.0%}, {points:.1f} points under MLPerf's "
                f"{AU_FLOOR:.0%} floor: the model idles {1 - r['au']:.0%} of the epoch"
            )
        else:
            line = (
                f"{name}: compute-bound, AU {r['au']:.0%}, {points:.1f} points over MLPerf's "
                f"{AU_FLOOR:.0%} floor"
            )
        if resident is not None and r is not resident:
            line += f"; its epoch takes {r['epoch_s'] / resident['epoch_s']:.2f}x the resident one"
        elif r is resident:
            line += " (batches already on the device: the upper bound)"
        lines.append(line)
    return "\n".join(lines) or "no pipeline was measured"
