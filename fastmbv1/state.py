"""What a training checkpoint holds, as one dataclass, and the generators' states.

A checkpoint is a plain dict of tensors, numbers and strings (``torch.load(...,
weights_only=True)`` reads it). ``RunState.capture`` takes the state without a host
synchronisation (tensors are cloned where they live), so the trainer can take one at every
epoch's start for exact resume; only ``to_dict`` (when a checkpoint is written) moves it to
the host.
"""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch


def rng_state() -> dict:
    """Every global generator's state, as tensors and plain numbers (weights_only-safe)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_host(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


@dataclass
class Totals:
    """What a run has done so far; kept across resumes, and reported as is in summary.json."""

    epochs_done: int = 0
    steps: int = 0
    wall_s: float = 0.0  # of the budget, this run's earlier sessions included
    train_s: float = 0.0
    eval_s: float = 0.0
    compile_s: float = 0.0
    fp16_skipped_steps: int = 0
    compute_s: float = 0.0  # of train_s, augmenting and stepping (MLPerf's compute time)
    model_flops: float = 0.0  # conv and linear FLOPs of the images trained (fastmbv1.flops)
    # The budget drove the schedule: a resumed run goes on by time from its first step, where
    # a fresh clock's step count would send the LR back up (a fitted run plans more epochs
    # than fit, so it is time-driven nearly throughout).
    time_driven: bool = False
    # The schedule's progress when wall_s was taken (BudgetClock.resume_point): where a resumed
    # run's time takes it on from (None in checkpoints written before it was kept).
    progress: float | None = None

    def add(self, epoch, flops_per_image: float = 0.0) -> None:
        """Count one more epoch (a ``fastmbv1.train.Epoch``) of ``flops_per_image`` each."""
        self.epochs_done += 1
        self.steps += epoch.steps
        self.train_s += epoch.train_s
        self.compile_s += epoch.compile_s
        self.fp16_skipped_steps += epoch.skipped_steps
        self.compute_s += epoch.compute_s
        self.model_flops += epoch.images * flops_per_image


@dataclass
class RunState:
    """A run after ``totals.epochs_done`` epochs: enough to continue it exactly.

    ``model_record`` is the trained weights' saved-model record (``fastmbv1.load`` reads a
    checkpoint too); ``ema`` the weights' average (``WeightAverage.state_dict``) when the run
    keeps one, which is then what ``fastmbv1.load`` gives; ``metrics`` the epochs' records.
    """

    config: dict
    model_record: dict
    optimizer: dict
    scaler: dict
    rng: dict
    totals: Totals
    metrics: list[dict] = field(default_factory=list)
    ema: dict | None = None

    @classmethod
    def capture(cls, run, totals: Totals, metrics: list[dict]) -> RunState:
        """``run``'s state now (a ``fastmbv1.step.Run``), cloned on its device, no host sync."""
        state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        return cls(
            config=run.cfg.to_dict(),
            model_record={**run.info, "state_dict": state, "meta": {}},
            optimizer=copy.deepcopy(run.optimizer.state_dict()),
            scaler=run.scaler.state_dict(),
            rng=rng_state(),
            totals=replace(totals),
            metrics=list(metrics),
            ema=run.ema.state_dict() if run.ema is not None else None,
        )

    def to_dict(self) -> dict:
        """The checkpoint's contents, moved to the host (the only copy that waits for a GPU).

        ``epoch`` (epochs done) names the checkpoint: ``checkpoint-<epoch>.pt``.
        """
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(totals=asdict(self.totals), epoch=self.totals.epochs_done)
        return _to_host(d)

    @classmethod
    def from_dict(cls, d: dict) -> RunState:
        names = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in d.items() if k in names})
        state.totals = Totals(**state.totals)
        return state

    def restore(self, run) -> None:
        """Put the optimiser, scaler, weights' average and generators back as they were."""
        run.optimizer.load_state_dict(self.optimizer)
        run.scaler.load_state_dict(self.scaler)
        if run.ema is not None:
            run.ema.load_state_dict(self.ema)
        set_rng_state(self.rng)
