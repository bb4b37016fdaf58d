"""``fastmbv1 tune``: let Optuna search training recipes for the shortest time to an accuracy.

Each trial is one real ``train`` run (its own ``OUT/trial-NNNN``) with ``budget`` = the trial
budget, ``target_acc`` = the target (it stops there) and an evaluation every epoch; its score
and pruning are in ``objective``, the searched fields in ``space``. The study lives in an
Optuna storage (``study``); ``--trials N`` counts finished (complete or pruned) trials of the
study, so running the same command again after an interruption runs only the rest. The
reports (``report``) are written when it ends.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fastmbv1.config import make_config
from fastmbv1.errors import UserError

try:
    import optuna
except ImportError:  # fastmbv1 runs without the [tune] extra; only this command needs it
    raise UserError("fastmbv1 tune needs Optuna: pip install 'fastmbv1[tune]'") from None
from optuna.trial import TrialState

from fastmbv1.tune.objective import Objective, median_pruner
from fastmbv1.tune.report import write_reports
from fastmbv1.tune.space import check_space, default_space, read_space
from fastmbv1.tune.study import fail_orphans, open_study


def tune(
    *,
    target_acc: float,
    trial_budget: float,
    trials: int,
    space_file: str | None = None,
    study_name: str = "fastmbv1",
    storage: str | None = None,
    out: str = "runs/tune",
    data: str | None = None,
    preset: str | None = None,
    seed: int = 0,
) -> optuna.Study:
    """Run the study until it holds ``trials`` finished trials; write the reports to ``out``."""
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    if not (math.isfinite(trial_budget) and trial_budget > 0):
        raise UserError(f"--trial-budget must be > 0 seconds, got {trial_budget}")
    if not 0 < target_acc <= 100:
        raise UserError(f"--target-acc is a percentage in (0, 100], got {target_acc}")

    space = read_space(space_file) if space_file else default_space("auto")
    if preset is not None:
        if "preset" in space.params:
            raise UserError("--preset conflicts with the [preset] search in the space file")
        space.fixed["preset"] = preset
    settings = {
        **space.fixed,
        "data": data,
        "budget": trial_budget,
        "target_acc": target_acc,
        "eval_every": 1,
        "seed": seed,
    }
    where = f"space file {space_file}" if space_file else "default space"
    try:
        make_config(settings)
    except UserError as e:
        raise UserError(f"{where}: [fixed]: {e}") from None
    check_space(space, settings, None, where)

    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {root} cannot be created ({e.strerror})") from None
    storage = storage or f"sqlite:///{(root / 'tune.db').as_posix()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(study_name, storage, target_acc, trial_budget, median_pruner())
    for n in fail_orphans(study):
        print(f"trial {n} was interrupted (its process is gone): marked failed", flush=True)

    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished_states))
    # Reseeded by the trials already there, so a restart does not redraw the first ones; a
    # third of the trials (at most Optuna's usual 10) explore at random before TPE steers.
    study.sampler = optuna.samplers.TPESampler(
        seed=seed + len(study.trials), n_startup_trials=min(10, max(2, trials // 3))
    )
    if done < trials:
        print(f"study {study_name!r}: {done} of {trials} trials finished, running the rest")
        study.optimize(
            Objective(space, settings, None, root, target_acc, trial_budget),
            n_trials=trials - done,
            # Other workers on the same storage also count towards --trials.
            callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished_states)],
        )
    else:
        print(f"study {study_name!r} already holds {done} finished trials (asked for {trials})")
    write_reports(study, root, target_acc)
    return study


def run(args: argparse.Namespace) -> int:
    tune(
        target_acc=args.target_acc,
        trial_budget=args.trial_budget,
        trials=args.trials,
        space_file=args.space,
        study_name=args.study,
        storage=args.storage,
        out=args.out,
        data=args.data,
        preset=args.preset,
        seed=args.seed,
    )
    return 0
