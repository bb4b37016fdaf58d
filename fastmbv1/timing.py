"""Timing the training step: the primitive that sizes a run (``fastmbv1.plan``) and that the
bench (``fastmbv1.measure``) reports. On CUDA every timer stops after the device has
finished, so it sees work done, not work queued."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from fastmbv1.config import TrainConfig
from fastmbv1.evaluate import batch_dtype
from fastmbv1.machine import sync
from fastmbv1.profile import StepTrace
from fastmbv1.step import build_run, train_step


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
    """The settings that decide a step's speed, for a result row."""
    return {
        "model": cfg.model,
        "width": cfg.width,
        "batch_size": cfg.batch_size,
        "channels_last": cfg.channels_last,
        "amp": cfg.amp,
        "compile": cfg.compile,
        "cuda_graphs": cfg.cuda_graphs,
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
