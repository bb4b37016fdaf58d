"""Where a study lives: an Optuna storage shared by its workers, trials whose worker died,
and a sampler that gives each worker's trials their own draws.

SQLite under ``--out`` by default; any SQLAlchemy URL (e.g. PostgreSQL) lets workers on many
machines share one study.
"""

from __future__ import annotations

import os
import random
import socket
import time
import warnings
from typing import Any

import numpy as np
import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from fastmbv1.errors import UserError, one_line

# Liveness of trials run on other machines (PostgreSQL workers): a trial whose worker has not
# written a heartbeat for the grace (--heartbeat-grace, default GRACE_S seconds) is marked
# failed when a live worker starts its next trial. Workers beat a few times per grace.
HEARTBEAT_S = 30
GRACE_S = 120
BEATS_PER_GRACE = 4


def worker_id() -> dict[str, Any]:
    """Which process runs a trial, kept in its user attributes for ``fail_orphans``."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def fail_orphans(study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING by a dead process on this machine as failed, at once.

    Optuna's heartbeat fails a trial only once its last heartbeat is the grace old (it cannot
    tell a dead worker on another machine from a slow one), so a study restarted right after
    a crash would keep reporting the dead trial as running. On this machine the process is
    known to be gone. Trials of live workers, or of other machines, are left to the heartbeat.
    """
    me = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") == me and not alive(worker.get("pid", 0)):
            study.tell(t.number, state=TrialState.FAIL)
            failed.append(t.number)
    return failed


def rdb_storage(url: str, grace_s: int, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Optuna's storage at ``url``, with heartbeats a few times per ``grace_s``.

    Workers that start together on an empty database race to create Optuna's tables, and
    PostgreSQL refuses the losers' CREATE TABLE (a duplicate type name, or the table exists);
    the tables are there then, so the losers try again.
    """
    beat = max(1, min(HEARTBEAT_S, grace_s // BEATS_PER_GRACE))
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                # Heartbeats are flagged experimental; they free other workers' dead trials.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=beat, grace_period=grace_s
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt + 1 == attempts:
                raise
            time.sleep(0.5 + random.random())  # apart, or both collide again


def open_study(
    name: str,
    storage: str,
    goal: dict[str, Any],
    pruner: optuna.pruners.BasePruner,
    grace_s: int = GRACE_S,
) -> optuna.Study:
    """Create the study ``name`` in ``storage``, or load it if it exists with the same
    ``goal`` (its objective's settings: target and budget, or epochs and budget).
    ``grace_s``: how long another worker's trial may go without a heartbeat before it is
    marked failed."""
    try:
        rdb = rdb_storage(storage, grace_s)
        study = optuna.create_study(
            study_name=name,
            storage=rdb,
            direction="minimize",
            pruner=pruner,
            load_if_exists=True,
        )
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise UserError(f"--storage {storage}: {one_line(e)}") from None
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise UserError(f"study {name!r} in {storage} is not a fastmbv1 tune study")
    stored = study.user_attrs.get("fastmbv1")
    if stored is None:
        study.set_user_attr("fastmbv1", goal)
    elif stored != goal:
        # Objective values of different objectives, targets or budgets cannot be compared.
        raise UserError(f"study {name!r} was created with {describe(stored)}; use another --study")
    return study


def describe(goal: dict[str, Any]) -> str:
    """A study's goal as the flags that set it."""
    objective = goal.get("objective", "time")
    if objective == "accuracy" and "scored" not in goal:
        return (
            "an earlier fastmbv1, whose accuracy trials were evaluated every epoch and pruned "
            "(their scores do not compare with today's)"
        )
    what = (
        f"--epochs {goal['epochs']}" if "epochs" in goal else f"--target-acc {goal['target_acc']}"
    )
    return f"--objective {objective} {what} --trial-budget {goal['trial_budget']}"


class PerTrialSeed(optuna.samplers.BaseSampler):
    """TPE whose draws for trial N are seeded by the study's seed and N.

    The storage gives every trial its own number, so workers that share a study never draw
    the same values, not even two that start together (a seed of the trials counted at the
    start would be the same in both); a restarted worker draws anew for its new trials; and
    one worker's study repeats from its seed.
    """

    def __init__(self, seed: int, n_startup_trials: int):
        self.seed, self.n_startup_trials = seed, n_startup_trials
        self.by_trial: dict[int, optuna.samplers.TPESampler] = {}

    def tpe(self, trial: FrozenTrial) -> optuna.samplers.TPESampler:
        if trial.number not in self.by_trial:
            seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            self.by_trial[trial.number] = optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=self.n_startup_trials
            )
        return self.by_trial[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self.tpe(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.tpe(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.tpe(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.tpe(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.by_trial.pop(trial.number, self.tpe(trial)).after_trial(study, trial, state, values)
