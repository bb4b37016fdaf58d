"""``fastmbv1 bench budget``: how many epochs of each preset fit into a time budget, with
the original project's Tesla T4 runs in the same terms."""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from fastmbv1.config import TrainConfig
from fastmbv1.data import recipe_pipeline
from fastmbv1.evaluate import evaluate
from fastmbv1.measure.epoch import profile_epoch
from fastmbv1.measure.inputs import TEST_IMAGES, TRAIN_IMAGES, data_for, preset_config
from fastmbv1.measure.results import Table
from fastmbv1.step import build_run
from fastmbv1.tables import Column
from fastmbv1.timing import timed
from fastmbv1.train import EVAL_SHARE
from pipelines.cifar10 import CIFAR10

# The original project's runs on one Tesla T4 (../shared/reference/facts.md).
ORIGINAL_T4 = (
    {"run": "original baseline", "batch_size": 100, "epochs": 100, "train_s": 3485.0},
    {"run": "original CustomMobileNet", "batch_size": 500, "epochs": 105, "train_s": 3545.0},
)


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


def bench_budget(args: argparse.Namespace, device) -> Table:
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
