"""Sizing a run to its budget: how many epochs this machine's measured speed buys.

Used when ``--epochs`` is not given (the ``cpu`` preset's default). The same CPU kind has
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


def fit_epochs(
    cfg: TrainConfig, device: torch.device, world: World, start: float, steps: int, n_test: int
) -> tuple[TrainConfig, str]:
    """``cfg`` with ``epochs`` set to what fits into what is left of the budget, and why.

    ``start``: when the run's clock started (``time.perf_counter``); ``steps``: training steps
    per epoch; ``n_test``: test images (the final evaluation must fit too).
    """
    from fastmbv1.measure.timings import measure_step

    per_rank = replace(cfg, batch_size=split_batch(cfg.batch_size, world))
    speed = measure_step(per_rank, device, steps=TIMED_STEPS, warmup=1)["images_per_s"]
    (slowest,) = world.max_over_ranks(-speed)  # every rank plans the same steps
    speed = -slowest * world.size
    final_eval = n_test * EVAL_COST * (2 if cfg.tta else 1) / speed
    epoch_s = steps * cfg.batch_size / speed * (1 + EPOCH_OVERHEAD)
    left_s = cfg.budget - (time.perf_counter() - start)
    fits = (left_s - final_eval - SAVE_RESERVE_S) / epoch_s
    epochs = max(1, round(fits))
    why = (
        f"{epochs}: measured {speed:,.0f} images/s on a random batch; the {left_s:.0f} s left "
        f"of --budget {cfg.budget:g} fit about {fits:.1f} epochs at width {cfg.width:g}"
    )
    return replace(cfg, epochs=epochs), why
