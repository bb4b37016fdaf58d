"""One trial: one real ``train`` run of a drawn recipe, its score, and its pruning reports.

``--objective time`` (the default), minimised, in seconds:

* a trial that reaches the target scores the training seconds (``train_s_total``, evaluation
  and start-up excluded) at the end of the first epoch whose test accuracy reached it, capped
  at the trial budget (only a first step slower than the whole budget overshoots it);
* a trial that never does scores ``budget * (1 + points_short / MISS_POINTS)``: always more
  than any trial that reached it, and the closer it came, the better it ranks.

Pruning compares trials on the same clock as the objective: at the end of each epoch a trial
reports ``-best test accuracy so far`` (lower is better, like the objective, and it can only
fall) at steps of ``budget / GRID`` training seconds, and ``MedianPruner`` prunes it when it is
worse than the median of the complete trials at that step. Epoch numbers would not do: an
epoch of width 1.0 at batch 128 takes many times longer than one of width 0.25 at batch 512.
A complete trial fills its remaining steps with its final accuracy, so that trials which hit
the target early still count in the median of later steps. To prune, the reporter returns
True to ``train``, which ends the run as usual (``final.pt``, ``summary.json``); the trial
is then told pruned.

``--objective accuracy`` scores a trial of fixed epochs by the points its final accuracy
falls short of 100 %, so that the machine's speed that minute does not enter the score:
on a shared machine the same recipe has run at 2,400 images/s one day and 900 the next.
Its trials evaluate once, after the last epoch, and are never pruned: under OneCycle the
accuracy before the learning rate anneals ranks recipes poorly. In the first accuracy study
(bench/results/tune-acc-w025x5-pruned-amd-epyc-2-cores) the median pruner cut 15 of 20
trials, among them one a step from the default recipe (56.99 % after 2 of 5 epochs, 53.39 %
after 3) whose seed reaches 77.58 % at the end; the best trial it let finish scored 75.55 %.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from fastmbv1.errors import BudgetTooShort, Diverged, Interrupted, UserError
from fastmbv1.plan import make_config
from fastmbv1.train import train
from fastmbv1.tune.space import Space
from fastmbv1.tune.study import worker_id

# Pruning steps per trial budget: fine enough to stop a trial early, coarse enough that
# trials with different epoch lengths still report the same steps.
GRID = 20
# A trial that misses the target costs one more budget per this many points it fell short.
MISS_POINTS = 10.0


def median_pruner() -> optuna.pruners.MedianPruner:
    """Prunes a trial behind the median of the complete ones, never in the first quarter of
    its budget (early accuracy says little), and only once two trials have completed."""
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=GRID // 4)


def score(reached_s: float | None, best_acc: float, target: float, budget: float) -> float:
    """The objective: seconds to the target, or a miss ranked by how far it fell short."""
    if reached_s is not None:
        return min(reached_s, budget)
    return budget * (1 + (target - best_acc) / MISS_POINTS)


class Reporter:
    """``on_epoch`` for one trial: notes when it reached the target, reports, maybe prunes."""

    def __init__(self, trial: optuna.Trial, target: float, budget: float):
        self.trial, self.target, self.step_s = trial, target, budget / GRID
        self.best = 0.0  # no evaluation yet scores as 0 %
        self.reached_s: float | None = None
        self.step = 0  # last grid step reported
        self.pruned = False

    def report_until(self, step: int) -> None:
        for s in range(self.step + 1, min(step, GRID) + 1):
            self.trial.report(-self.best, s)
        self.step = max(self.step, step)

    def __call__(self, record: dict) -> bool:
        """Report the epoch; True (prune: ``train`` stops the run) when it is behind."""
        acc = record["test_acc"]
        if acc is None:
            return False
        step = math.ceil(record["train_s_total"] / self.step_s)
        # The steps this epoch ran through only knew the accuracy from before it.
        self.report_until(step - 1)
        self.best = max(self.best, acc)
        if self.reached_s is None and acc >= self.target:
            self.reached_s = record["train_s_total"]
        self.report_until(step)
        self.pruned = self.reached_s is None and self.trial.should_prune()
        return self.pruned


class EpochReporter:
    """``on_epoch`` for a trial of the accuracy objective: keeps the last evaluation's accuracy
    and the epochs it took; never ends the run early."""

    def __init__(self) -> None:
        self.acc = self.best = 0.0
        self.reached_s: float | None = None  # the time objective's; shown as empty
        self.pruned = False
        self.done = 0  # whole epochs trained by the last evaluation

    def __call__(self, record: dict) -> bool:
        if record["test_acc"] is not None:
            self.acc = record["test_acc"]
            self.best = max(self.best, self.acc)
            # An epoch the budget cut is evaluated too, but it is not the recipe's score.
            self.done = record["epoch"] if record["complete"] else record["epoch"] - 1
        return False


@dataclass
class Objective:
    """Train the trial's recipe in ``root/trial-NNNN`` and return its score."""

    space: Space
    settings: dict[str, Any]  # the config fields every trial shares
    config_file: str | None
    root: Path
    target: float | None  # the time objective's target accuracy
    budget: float
    epochs: int | None = None  # the accuracy objective's fixed epochs; None: time objective

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_id())
        values = self.space.draw(trial)
        run_dir = self.root / f"trial-{trial.number:04d}"
        if (run_dir / "config.json").exists():
            raise UserError(f"{run_dir} holds a run of another study; use one --out per study")
        cfg = make_config({**self.settings, **values, "out": str(run_dir)}, self.config_file)
        trial.set_user_attr(
            "config", {k: v for k, v in cfg.to_dict().items() if k != "out" and v is not None}
        )
        print(f"\ntrial {trial.number}: {json.dumps(values)}", flush=True)
        if self.epochs is None:
            reporter = Reporter(trial, self.target, self.budget)
        else:
            reporter = EpochReporter()
        try:
            # A pruned run ends like any other (final.pt, summary.json), stopped by on_epoch.
            train(cfg, on_epoch=reporter)
        except Diverged as e:
            # A recipe that blows up is a bad recipe, not a broken study: score what it reached.
            print(f"trial {trial.number} diverged: {e}", flush=True)
        except BudgetTooShort as e:
            # Timed slow (a slow setting, or a busy minute): a failed trial, not a broken study.
            print(f"trial {trial.number}: {e}", flush=True)
            return math.nan  # Optuna records the trial as failed
        except Interrupted:
            raise Interrupted(
                f"trial {trial.number} interrupted; run the same fastmbv1 tune command again "
                "to continue the study"
            ) from None
        trial.set_user_attr("best_acc", reporter.best)
        trial.set_user_attr("reached_s", reporter.reached_s)
        if reporter.pruned:
            raise optuna.TrialPruned(f"pruned at {reporter.best:.2f} %")
        if self.epochs is not None:
            if reporter.done < self.epochs:  # cut short by --trial-budget: not comparable
                print(f"trial {trial.number}: the trial budget ended it early", flush=True)
                return math.nan  # Optuna records the trial as failed
            return 100.0 - reporter.acc  # the final (saved) model's shortfall
        reporter.report_until(GRID)
        return score(reporter.reached_s, reporter.best, self.target, self.budget)
