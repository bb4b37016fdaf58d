"""``fastmbv1 tune``: let Optuna search training recipes for the shortest time to an accuracy.

Each trial is one real ``train`` run (its own ``OUT/trial-NNNN``) with ``budget`` = the trial
budget, ``target_acc`` = the target (it stops there) and an evaluation every epoch (after
the last for the accuracy objective); its score and pruning are in ``objective``, the
searched fields in ``space``. The study lives in an
Optuna storage (``study``); ``--trials N`` counts finished (complete or pruned) trials of the
study, so running the same command again after an interruption runs only the rest. The
reports (``report``) are written when it ends.

A trial's config, lowest layer first: the preset, ``--config FILE``, the space's ``[fixed]``,
the flags (the same as ``fastmbv1 train``'s), the tuner's budget and evaluation, the values
drawn for the trial. A flag for a searched field would be silently replaced, so it is an
error; ``--config`` is a starting recipe, like a preset, which the search may vary.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fastmbv1.config import dash
from fastmbv1.errors import UserError
from fastmbv1.plan import make_config

try:
    import optuna
except ImportError:  # fastmbv1 runs without the [tune] extra; only this command needs it
    raise UserError("fastmbv1 tune needs Optuna: pip install 'fastmbv1[tune]'") from None
from optuna.trial import TrialState

from fastmbv1.tune.objective import Objective, median_pruner
from fastmbv1.tune.report import write_reports
from fastmbv1.tune.space import Space, check_space, default_space, read_space
from fastmbv1.tune.study import GRACE_S, PerTrialSeed, fail_orphans, open_study

# Config fields a trial takes from the tuner, so their flags are refused, with the reason.
REFUSED_FLAGS = {
    "budget": "each trial's budget is --trial-budget",
    "eval_every": "the tuner sets when trials evaluate: every epoch for the time objective, "
    "after the last for the accuracy objective",
}


def tune(
    overrides: dict[str, Any],
    *,
    trial_budget: float,
    trials: int,
    space_file: str | None = None,
    config_file: str | None = None,
    study_name: str = "fastmbv1",
    storage: str | None = None,
    out: str = "runs/tune",
    objective: str = "time",
    heartbeat_grace: int = GRACE_S,
) -> optuna.Study:
    """Run the study until it holds ``trials`` finished trials; write the reports to ``out``.

    ``overrides`` are config fields fixed for every trial, as ``fastmbv1 train``'s flags give
    them; their ``target_acc`` (or ``config_file``'s) is the study's target, their ``seed``
    also seeds the sampler. ``objective``: "time" to the target, or "accuracy" after the
    fixed ``epochs`` (see ``fastmbv1.tune.objective``). ``heartbeat_grace``: seconds without
    a heartbeat after which another worker's trial counts as dead.
    """
    for name, why in REFUSED_FLAGS.items():
        if name in overrides:
            raise UserError(f"--{dash(name)}: {why}")
    space = read_space(space_file) if space_file else Space({})
    settings = {**space.fixed, **overrides, "budget": trial_budget, "eval_every": 1}
    base = make_config(settings, config_file)
    accuracy = objective == "accuracy"
    if accuracy and base.epochs is None:
        raise UserError("--objective accuracy scores trials of fixed epochs: give --epochs N")
    if accuracy and base.target_acc is not None:
        raise UserError("--objective accuracy trains every trial for its epochs: no --target-acc")
    if not accuracy and base.target_acc is None:
        raise UserError("fastmbv1 tune needs --target-acc: it searches for the fastest way there")
    if not space_file:
        space = default_space(base.device)
        if accuracy:  # at fixed epochs the widest network always wins: search neither
            kept = {n: d for n, d in space.params.items() if n not in ("epochs", "width")}
            space = Space(kept, space.fixed)
    if accuracy and "epochs" in space.params:
        raise UserError("--objective accuracy: the space must not search epochs")
    if accuracy:  # scored on the final model only, and never pruned (see objective.py)
        settings["eval_every"] = base.epochs
    where = f"space file {space_file}" if space_file else "default space"
    for name, value in overrides.items():
        if name in space.params:
            raise UserError(f"--{dash(name)} {value} conflicts with the {where}, which searches it")
    check_space(space, settings, config_file, where)

    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {root} cannot be created ({e.strerror})") from None
    storage = storage or f"sqlite:///{(root / 'tune.db').as_posix()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if accuracy:
        # "scored" marks the rules, so that a study from before them (every epoch evaluated,
        # trials pruned on it) is refused instead of mixing two kinds of score.
        goal = {
            "objective": "accuracy",
            "epochs": base.epochs,
            "trial_budget": trial_budget,
            "scored": "last epoch",
        }
        pruner = optuna.pruners.NopPruner()
    else:
        goal = {"target_acc": base.target_acc, "trial_budget": trial_budget}
        pruner = median_pruner()
    study = open_study(study_name, storage, goal, pruner, heartbeat_grace)
    for n in fail_orphans(study):
        print(f"trial {n} was interrupted (its process is gone): marked failed", flush=True)

    # A fresh study first runs the recipe it starts from, so its table says what the search
    # gained over it, measured the same way on the same machine.
    if not study.get_trials(deepcopy=False):
        start = {name: getattr(base, name) for name in space.params}
        bad = space.outside(start)
        if bad is None:
            # Workers that start a study together may each run it once: skip_if_exists only
            # narrows that window.
            study.enqueue_trial(start, skip_if_exists=True)
            print("trial 0 is the recipe the study starts from: its values of the searched fields")
        else:
            print(f"trial 0 is a draw: the starting recipe's {bad} ({start[bad]}, None is "
                  "auto) is not in the space")  # fmt: skip
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished_states))
    # A third of the trials (at most Optuna's usual 10) explore at random before TPE steers.
    study.sampler = PerTrialSeed(base.seed, n_startup_trials=min(10, max(2, trials // 3)))
    if done < trials:
        print(f"study {study_name!r}: {done} of {trials} trials finished, running the rest")
        study.optimize(
            Objective(
                space,
                settings,
                config_file,
                root,
                base.target_acc,
                trial_budget,
                epochs=base.epochs if accuracy else None,
            ),  # fmt: skip
            n_trials=trials - done,
            # Other workers on the same storage also count towards --trials.
            callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished_states)],
        )
    else:
        print(f"study {study_name!r} already holds {done} finished trials (asked for {trials})")
    write_reports(study, root)
    return study


def run(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """``fastmbv1 tune``; ``overrides`` are the training flags given."""
    tune(
        overrides,
        trial_budget=args.trial_budget,
        trials=args.trials,
        space_file=args.space,
        config_file=args.config,
        study_name=args.study,
        storage=args.storage,
        out=args.out,
        objective=args.objective,
        heartbeat_grace=args.heartbeat_grace or GRACE_S,
    )
    return 0
