"""Where a study lives: an Optuna storage shared by its workers, and trials whose worker died.

SQLite under ``--out`` by default; any SQLAlchemy URL (e.g. PostgreSQL) lets workers on many
machines share one study.
"""

from __future__ import annotations

import os
import socket
import warnings
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from fastmbv1.errors import UserError, one_line

# Liveness of trials run on other machines (PostgreSQL workers): a trial whose worker has not
# written a heartbeat for GRACE_S seconds is marked failed.
HEARTBEAT_S = 30
GRACE_S = 120


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

    Optuna's heartbeat fails a trial only once its last heartbeat is GRACE_S old (it cannot
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


def open_study(
    name: str,
    storage: str,
    goal: dict[str, Any],
    pruner: optuna.pruners.BasePruner,
) -> optuna.Study:
    """Create the study ``name`` in ``storage``, or load it if it exists with the same
    ``goal`` (its objective's settings: target and budget, or epochs and budget)."""
    try:
        with warnings.catch_warnings():
            # Heartbeats are flagged experimental; they are what frees other workers' dead trials.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(
                storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
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
        raise UserError(
            f"study {name!r} was created with {describe(stored)}; use another --study for "
            "other values"
        )
    return study


def describe(goal: dict[str, Any]) -> str:
    """A study's goal as the flags that set it."""
    objective = goal.get("objective", "time")
    what = (
        f"--epochs {goal['epochs']}" if "epochs" in goal else f"--target-acc {goal['target_acc']}"
    )
    return f"--objective {objective} {what} --trial-budget {goal['trial_budget']}"
