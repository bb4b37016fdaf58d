"""Sizing a run to its budget: how many epochs, and how wide, this machine's speed buys.

Used when ``--epochs`` is not given (the ``cpu`` preset's default), which also lets the
width follow the budget when ``--width`` is not given either. The same CPU kind has
trained the same recipe at 2,400 images/s one day and 900 the next, so no fixed epoch count
suits a fixed budget: a few training steps on a random batch time the machine as it is now,
and the epochs that fit what is left of the budget become the schedule's length. The run
stays step-driven when the estimate holds, and the budget clock anneals it on time when it
does not.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from fastmbv1.clock import SAVE_RESERVE_S
from fastmbv1.config import TrainConfig
from fastmbv1.distributed import World, split_batch

# Besides the steps, an epoch waits for data and evaluates now and then: a few percent.
EPOCH_OVERHEAD = 0.05
# An evaluation image costs about this share of a training image (forward only).
EVAL_COST = 0.4
TIMED_STEPS = 5
# Widths a run without --width chooses from, widest first. Half width runs at about 42 % of
# quarter width's images/s on the 2-core CPU but learns more per epoch. At equal time, with
# flip TTA (bench/results/ab-cpu-recipe.md): 12 epochs of it 85.66 % against 83.78 for 24 of
# quarter width; 8 of it 84.44 against about 83.3 for the 19 that take as long (between the
# 12 and 24 measured). The gap shrinks by about 0.2 points an epoch, which puts the crossover
# near 3 epochs if it goes on so; 6 keeps a margin.
WIDTHS = (0.5, 0.25)
MIN_EPOCHS = 6


def narrowest(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with an automatic width set to the narrowest choice, for a run whose epochs
    are given (nothing to weigh the width against) and for benches that time a preset."""
    return cfg if cfg.width is not None else replace(cfg, width=WIDTHS[-1])


def fit_epochs(
    cfg: TrainConfig, device: torch.device, world: World, start: float, steps: int, n_test: int
) -> tuple[TrainConfig, dict[str, str]]:
    """``cfg`` with ``epochs`` (and an automatic ``width``) set to what fits into what is left
    of the budget, and why, by field.

    ``start``: when the run's clock started (``time.perf_counter``); ``steps``: training steps
    per epoch; ``n_test``: test images (the final evaluation must fit too).
    """
    from fastmbv1.measure.timings import measure_step

    widths = WIDTHS if cfg.width is None else (cfg.width,)
    tried = []
    for width in widths:
        per_rank = replace(cfg, width=width, batch_size=split_batch(cfg.batch_size, world))
        speed = measure_step(per_rank, device, steps=TIMED_STEPS, warmup=1)["images_per_s"]
        # Every rank must choose the same width and epochs: they agree on the slowest rank's
        # speed and the time the latest one has used, and all compute the same from those.
        slowest, used = world.max_over_ranks(-speed, time.perf_counter() - start)
        speed = -slowest * world.size
        final_eval = n_test * EVAL_COST * (2 if cfg.tta else 1) / speed
        epoch_s = steps * cfg.batch_size / speed * (1 + EPOCH_OVERHEAD)
        left_s = cfg.budget - used
        fits = (left_s - final_eval - SAVE_RESERVE_S) / epoch_s
        tried.append(f"{fits:.1f} epochs at width {width:g}")
        if fits >= MIN_EPOCHS:
            break
    epochs = max(1, round(fits))
    why = {
        "epochs": f"{epochs}: measured {speed:,.0f} images/s on a random batch; the "
        f"{left_s:.0f} s left of --budget {cfg.budget:g} fit about {fits:.1f} epochs at "
        f"width {width:g}"
    }
    if cfg.width is None:
        why["width"] = (
            f"{width:g}: the widest of {', '.join(map(str, WIDTHS))} that fits {MIN_EPOCHS} "
            f"epochs, else the narrowest; the budget fits {', '.join(tried)}"
        )
    return replace(cfg, width=width, epochs=epochs), why
