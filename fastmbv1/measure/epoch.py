"""``fastmbv1 bench epoch``: one real training epoch per pipeline, split into waiting for
the next batch and computing on it: does the model wait for data?"""

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
from fastmbv1.evaluate import evaluate
from fastmbv1.machine import sync
from fastmbv1.measure.inputs import data_for, pipeline_specs, preset_config, step_trace
from fastmbv1.measure.results import Table
from fastmbv1.profile import StepTrace
from fastmbv1.step import build_run, train_step
from fastmbv1.tables import Column
from fastmbv1.timing import describe, random_batch, timed, traced

# Below this share of an epoch spent waiting for batches, data loading no longer limits.
DATA_BOUND_SHARE = 0.05


def profile_epoch(
    cfg: TrainConfig,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    trace: StepTrace | None = None,
) -> dict:
    """One training epoch of ``cfg`` split into waiting for batches and computing on them.

    ``setup_s`` (pipeline, model, compile, two warm-up steps and an evaluation on a random
    batch) stays out of the epoch. Synchronising after each batch and each step makes the
    split honest on CUDA, at the price of any overlap between the two, so ``epoch_s`` is an
    upper bound.
    Batches are regularised (cutout, mixup) as the trainer does, as part of the compute.
    With ``trace``, the epoch's first ``trace.steps`` steps and an evaluation of the last
    batch are recorded after it.
    """
    start = time.perf_counter()
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

    wait = compute = 0.0
    seen = 0
    batches = iter(pipe)
    start = time.perf_counter()
    for _ in range(len(pipe)):
        t = time.perf_counter()
        with record_function("data wait"):
            x, y = next(batches)
            sync(device)
        t_data = time.perf_counter()
        with record_function("augment"):
            batch = augment_batch(x, y, cfg, gen)
        train_step(run, *batch)
        sync(device)
        wait += t_data - t
        compute += time.perf_counter() - t_data
        seen += len(y)
    epoch_s = time.perf_counter() - start

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
        "compute_s": compute,
        "data_share": wait / epoch_s,
        "images_per_s": seen / epoch_s,
        **recorded,
    }


def bench_epoch(args: argparse.Namespace, device) -> Table:
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
