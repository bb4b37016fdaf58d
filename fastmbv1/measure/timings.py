"""Timings behind ``fastmbv1 bench``: loaders, the training step, an epoch, the budget.

Each function is given what it measures (arrays, a resolved ``TrainConfig``, a device) and
returns one JSON-able dict; the command line and ``bench/gpu/check.py`` only arrange them.
On CUDA every timer stops after ``torch.cuda.synchronize``, so it sees work done, not queued.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.profiler import record_function

from fastmbv1.augment import augment_batch
from fastmbv1.config import TrainConfig
from fastmbv1.data import pipeline_options, recipe_pipeline
from fastmbv1.errors import UserError
from fastmbv1.evaluate import batch_dtype, evaluate
from fastmbv1.machine import sync
from fastmbv1.profile import StepTrace
from fastmbv1.step import build_run, train_step
from fastmbv1.train import EVAL_SHARE
from pipelines import build_pipeline
from pipelines.cifar10 import CIFAR10, load_cifar10

# CIFAR-10's sizes: measurements on part of the data are scaled to a full epoch with these.
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000

# The original project's runs on one Tesla T4 (../shared/reference/facts.md).
ORIGINAL_T4 = (
    {"run": "original baseline", "batch_size": 100, "epochs": 100, "train_s": 3485.0},
    {"run": "original CustomMobileNet", "batch_size": 500, "epochs": 105, "train_s": 3545.0},
)


def load_data(data: str | None, images: int | None = None, synthetic: bool = False) -> CIFAR10:
    """CIFAR-10 (or random images of its shape), cut to the first ``images`` of each split."""
    if not synthetic:
        c = load_cifar10(data)
        return CIFAR10(
            c.train_images[:images],
            c.train_labels[:images],
            c.test_images[:images],
            c.test_labels[:images],
            c.source,
        )
    rng = np.random.default_rng(0)
    n_train, n_test = (min(images or n, n) for n in (TRAIN_IMAGES, TEST_IMAGES))
    return CIFAR10(
        rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n_train),
        rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n_test),
        source=None,
    )


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
    count = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for x, _y in pipeline:
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
        **options,
    }


def random_batch(cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch shaped, typed and laid out as the pipelines deliver one for ``cfg``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.rand(cfg.batch_size, 3, 32, 32, generator=gen)
    x = x.to(device, batch_dtype(cfg.amp)).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (cfg.batch_size,), generator=gen).to(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Seconds for ``repeats`` calls of ``fn``, until the device has finished them."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return time.perf_counter() - start


def describe(cfg: TrainConfig, device: torch.device) -> dict:
    return {
        "model": cfg.model,
        "width": cfg.width,
        "batch_size": cfg.batch_size,
        "channels_last": cfg.channels_last,
        "amp": cfg.amp,
        "compile": cfg.compile,
        "device": str(device),
    }


def traced(trace: StepTrace | None, fn: Callable[[], object]) -> dict:
    """Run ``fn`` under ``trace`` (if any): the trace's path and top operators, for a row."""
    if trace is None:
        return {}
    trace.start()
    fn()
    path = trace.stop()
    return {"trace": str(path), "top_ops": trace.top_ops()}


def measure_step(
    cfg: TrainConfig,
    device: torch.device,
    *,
    steps: int = 20,
    warmup: int = 3,
    trace: StepTrace | None = None,
) -> dict:
    """Images/s of the training step alone, on one batch already on the device.

    ``first_step_s`` includes compiling when ``cfg.compile``; ``compile_s`` is what it took
    beyond a steady step. With ``trace``, ``trace.steps`` more steps are recorded after the
    timed ones.
    """
    run = build_run(cfg, device)
    x, y = random_batch(cfg, device)
    first = timed(lambda: train_step(run, x, y, y, 1.0), device)
    timed(lambda: train_step(run, x, y, y, 1.0), device, warmup)  # allocator, cuDNN, lazy init
    step_s = timed(lambda: train_step(run, x, y, y, 1.0), device, steps) / steps
    recorded = traced(trace, lambda: [train_step(run, x, y, y, 1.0) for _ in range(trace.steps)])
    return {
        **describe(cfg, device),
        "steps": steps,
        "step_s": step_s,
        "images_per_s": cfg.batch_size / step_s,
        "first_step_s": first,
        "compile_s": first - step_s if cfg.compile else None,
        **recorded,
    }


def profile_epoch(
    cfg: TrainConfig,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    trace: StepTrace | None = None,
) -> dict:
    """One training epoch of ``cfg`` split into waiting for batches and computing on them.

    ``setup_s`` (pipeline, model, compile and two warm-up steps on a random batch) stays
    out of the epoch. Synchronising after each batch and each step makes the split honest
    on CUDA, at the price of any overlap between the two, so ``epoch_s`` is an upper bound.
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


def measure_eval(
    cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, device: torch.device
) -> float:
    """Seconds of one evaluation pass over ``images``, after a warm-up batch (compile)."""
    pipe = recipe_pipeline(cfg, images, labels, device, train=False, batch_size=cfg.eval_batch_size)
    model = build_run(cfg, device).model_for_eval
    evaluate(model, [next(iter(pipe))], device, cfg.amp, cfg.channels_last)
    return timed(lambda: evaluate(model, pipe, device, cfg.amp, cfg.channels_last), device)


def epochs_in(budget: float, epoch_s: float, setup_s: float = 0.0) -> int:
    return max(0, math.floor((budget - setup_s) / epoch_s))


def project_budget(
    cfg: TrainConfig, data: CIFAR10, device: torch.device, budgets: tuple[float, ...] = (3600.0,)
) -> dict:
    """How many epochs of ``cfg`` (with its evaluations and the final one) fit into each budget.

    One epoch is profiled at the preset's batch size and pipeline and one evaluation timed;
    measured on part of the data (``--images``), both are scaled to CIFAR-10's full sizes.
    Evaluations come every ``eval_every`` epochs, or by default take ``EVAL_SHARE`` of the
    time; ``epochs`` is None for a preset that fits its epochs to the budget.
    """
    prof = profile_epoch(cfg, data.train_images, data.train_labels, device)
    full_epoch = TRAIN_IMAGES // cfg.batch_size * cfg.batch_size
    epoch_s = prof["epoch_s"] * full_epoch / prof["images"]
    test = data.test_images[:TEST_IMAGES]
    eval_s = measure_eval(cfg, test, data.test_labels[:TEST_IMAGES], device)
    eval_s *= TEST_IMAGES / len(test)
    every = cfg.eval_every
    per_epoch = epoch_s + eval_s / every if every else epoch_s * (1 + EVAL_SHARE)
    setup_s = prof["setup_s"] + eval_s  # and the final evaluation
    return {
        "run": cfg.preset,
        "pipeline": cfg.pipeline,
        "batch_size": cfg.batch_size,
        "device": str(device),
        "images_measured": prof["images"],
        "setup_s": prof["setup_s"],
        "epoch_s": epoch_s,
        "eval_s": eval_s,
        "s_per_epoch": per_epoch,
        "epochs": cfg.epochs,
        "epochs_s": setup_s + cfg.epochs * per_epoch if cfg.epochs else None,
        **{f"epochs_in_{b:g}s": epochs_in(b, per_epoch, setup_s) for b in budgets},
    }


def original_budget(budgets: tuple[float, ...] = (3600.0,)) -> list[dict]:
    """The original project's T4 runs in the same terms: its total time over its epochs."""
    rows = []
    for r in ORIGINAL_T4:
        per_epoch = r["train_s"] / r["epochs"]
        fits = {f"epochs_in_{b:g}s": epochs_in(b, per_epoch) for b in budgets}
        rows.append(
            {
                **r,
                "device": "Tesla T4",
                "pipeline": "torchvision",
                "s_per_epoch": per_epoch,
                "epochs_s": r["train_s"],
                **fits,
            }
        )
    return rows
