"""``fastmbv1 tune``: let Optuna search training recipes for the shortest time to an accuracy.

Each trial is one real ``train`` run (its own ``OUT/trial-NNNN``) with ``budget`` = the trial
budget, ``target_acc`` = the target (it stops there) and an evaluation every epoch.

Objective (minimised), in seconds:

* a trial that reaches the target scores the training seconds (``train_s_total``, evaluation
  and start-up excluded) at the end of the first epoch whose test accuracy reached it, capped
  at the trial budget (only a first step slower than the whole budget overshoots it);
* a trial that never does scores ``budget * (1 + points_short / MISS_POINTS)``: always more
  than any trial that reached it, and the closer it came, the better it ranks.

Pruning compares trials on the same clock as the objective: at the end of each epoch a trial
reports ``-best test accuracy so far`` (lower is better, like the objective, and it can only
fall) at steps of ``budget / GRID`` training seconds, and ``MedianPruner`` stops it when it is
worse than the median of the complete trials at that step. Epoch numbers would not do: an
epoch of width 1.0 at batch 128 takes many times longer than one of width 0.25 at batch 512.
A complete trial fills its remaining steps with its final accuracy, so that trials which hit
the target early still count in the median of later steps.

The study lives in an Optuna storage (SQLite under ``--out`` by default; any SQLAlchemy URL,
e.g. PostgreSQL for many workers). ``--trials N`` counts finished (complete or pruned) trials
of the study, so running the same command again after an interruption runs only the rest.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastmbv1.config import TrainConfig, load_toml, make_config
from fastmbv1.errors import Diverged, Interrupted, UserError, one_line

if TYPE_CHECKING:
    import optuna

# Pruning steps per trial budget: fine enough to stop a trial early, coarse enough that
# trials with different epoch lengths still report the same steps.
GRID = 20
# A trial that misses the target costs one more budget per this many points it fell short.
MISS_POINTS = 10.0
# Liveness of trials run on other machines (PostgreSQL workers): a trial whose worker has not
# written a heartbeat for GRACE_S seconds is marked failed.
HEARTBEAT_S = 30
GRACE_S = 120
# Fields the tuner sets itself; a search space may not.
TUNER_FIELDS = ("out", "data", "budget", "target_acc", "eval_every", "seed")
FIELD_TYPES = {f.name: f.type.split(" | ")[0] for f in fields(TrainConfig)}
PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


@dataclass(frozen=True)
class Param:
    """One searched field: a float or int range (optionally log-scaled or stepped), or choices."""

    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> tuple:
        return self.choices or (self.low, self.high)


@dataclass
class Space:
    params: dict[str, Param]
    fixed: dict[str, Any] = field(default_factory=dict)


def default_space() -> Space:
    from fastmbv1.machine import pick_device
    from pipelines import available

    usable = tuple(n for n, why in available(pick_device("auto")).items() if why is None)
    return Space(
        {
            "batch_size": Param("categorical", choices=(128, 256, 512)),
            "lr": Param("float", 0.02, 1.0, log=True),
            "warmup": Param("float", 0.05, 0.4),
            "momentum": Param("float", 0.8, 0.95),
            "weight_decay": Param("float", 1e-5, 1e-3, log=True),
            "label_smoothing": Param("float", 0.0, 0.2),
            "width": Param("categorical", choices=(0.25, 0.5, 0.75, 1.0)),
            "epochs": Param("int", 3, 30),
            "mixup": Param("categorical", choices=(0.0, 0.2)),
            "pipeline": Param("categorical", choices=usable),
        }
    )


def read_space(path: str | Path) -> Space:
    """A search space from TOML: one table per searched field, plus ``[fixed]`` values.

    ``[lr] type = "float"  low = 0.01  high = 1.0  log = true``;
    ``[epochs] type = "int"  low = 3  high = 20`` (``step`` optional);
    ``[batch_size] type = "categorical"  choices = [128, 256]``;
    ``[fixed] preset = "cpu"  width = 0.25``.
    """
    path = Path(path)
    data = load_toml(path, "space file")

    def bad(what: str) -> UserError:
        return UserError(f"space file {path}: {what}")

    fixed = data.pop("fixed", {})
    if not isinstance(fixed, dict):
        raise bad("[fixed] must be a table of field = value")
    for name in (*fixed, *data):
        if name not in FIELD_TYPES:
            raise bad(f"unknown field {name!r} (not a training config field)")
        if name in TUNER_FIELDS:
            raise bad(f"{name} is set by fastmbv1 tune itself, not by the space")
    params = {}
    for name, spec in data.items():
        if name in fixed:
            raise bad(f"{name} is both searched and in [fixed]")
        if not isinstance(spec, dict):
            raise bad(f"{name} must be a table ([{name}] type = ...)")
        kind = spec.get("type")
        if kind not in PARAM_KEYS:
            raise bad(f"[{name}] type must be float, int or categorical, got {kind!r}")
        extra = sorted(set(spec) - PARAM_KEYS[kind])
        if extra:
            raise bad(f"[{name}] unknown key(s) for type {kind}: {', '.join(extra)}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise bad(f"[{name}] choices must be a non-empty list")
            params[name] = Param(kind, choices=tuple(choices))
            continue
        if FIELD_TYPES[name] != kind:
            raise bad(f"[{name}] is a {FIELD_TYPES[name]} field; type {kind} cannot search it")
        number = int if kind == "int" else (int, float)
        low, high, log, step = (spec.get(k) for k in ("low", "high", "log", "step"))
        for key, value in (("low", low), ("high", high), ("step", step)):
            if (value is not None or key != "step") and (
                not isinstance(value, number) or isinstance(value, bool)
            ):
                raise bad(f"[{name}] {key} must be a {kind} number, got {value!r}")
        if not isinstance(log, (bool, type(None))):
            raise bad(f"[{name}] log must be true or false, got {log!r}")
        if not low < high:
            raise bad(f"[{name}] needs low < high, got {low} and {high}")
        if log and (low <= 0 or step is not None):
            raise bad(f"[{name}] log = true needs low > 0 and no step")
        if step is not None and step <= 0:
            raise bad(f"[{name}] step must be > 0, got {step}")
        params[name] = Param(kind, low, high, bool(log), step)
    return Space(params, fixed)


def check_space(space: Space, base: dict[str, Any], where: str) -> None:
    """Build a config from every range end and choice, so a bad value fails before any trial."""

    def build(overrides: dict[str, Any], what: str) -> None:
        try:
            make_config(overrides)
        except UserError as e:
            raise UserError(f"{where}: {what}: {e}") from None

    build(base, "[fixed]")
    for name, param in space.params.items():
        for value in param.extremes():
            build({**base, name: value}, f"{name} = {value!r}")


class Reporter:
    """``on_epoch`` for one trial: notes when it reached the target, reports, maybe prunes."""

    def __init__(self, trial: optuna.Trial, target: float, budget: float):
        self.trial, self.target, self.step_s = trial, target, budget / GRID
        self.best = 0.0  # no evaluation yet scores as 0 %
        self.reached_s: float | None = None
        self.step = 0  # last grid step reported

    def report_until(self, step: int) -> None:
        for s in range(self.step + 1, min(step, GRID) + 1):
            self.trial.report(-self.best, s)
        self.step = max(self.step, step)

    def __call__(self, record: dict) -> None:
        import optuna

        acc = record["test_acc"]
        if acc is None:
            return
        step = math.ceil(record["train_s_total"] / self.step_s)
        # The steps this epoch ran through only knew the accuracy from before it.
        self.report_until(step - 1)
        self.best = max(self.best, acc)
        if self.reached_s is None and acc >= self.target:
            self.reached_s = record["train_s_total"]
        self.report_until(step)
        if self.reached_s is None and self.trial.should_prune():
            raise optuna.TrialPruned(
                f"{self.best:.2f} % after {record['train_s_total']:.1f} s of training"
            )


def score(reached_s: float | None, best_acc: float, target: float, budget: float) -> float:
    """The objective: seconds to the target, or a miss ranked by how far it fell short."""
    if reached_s is not None:
        return min(reached_s, budget)
    return budget * (1 + (target - best_acc) / MISS_POINTS)


def worker_id() -> dict[str, Any]:
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

    Trials of live workers, or of other machines, are left to the heartbeat (GRACE_S).
    """
    from optuna.trial import TrialState

    me = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") == me and not alive(worker.get("pid", 0)):
            study.tell(t.number, state=TrialState.FAIL)
            failed.append(t.number)
    return failed


def open_study(name: str, storage: str, target_acc: float, trial_budget: float) -> optuna.Study:
    import optuna
    import sqlalchemy.exc

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
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=GRID // 4),
            load_if_exists=True,
        )
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise UserError(f"--storage {storage}: {one_line(e)}") from None
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise UserError(f"study {name!r} in {storage} is not a fastmbv1 tune study")
    goal = {"target_acc": target_acc, "trial_budget": trial_budget}
    stored = study.user_attrs.get("fastmbv1")
    if stored is None:
        study.set_user_attr("fastmbv1", goal)
    elif stored != goal:
        # Objective values of different targets or budgets cannot be compared.
        raise UserError(
            f"study {name!r} was created with --target-acc {stored['target_acc']} "
            f"--trial-budget {stored['trial_budget']}; use another --study for other values"
        )
    return study


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
    try:
        import optuna
    except ImportError:
        raise UserError("fastmbv1 tune needs Optuna: pip install 'fastmbv1[tune]'") from None
    from optuna.trial import TrialState

    from fastmbv1.train import train

    space = read_space(space_file) if space_file else default_space()
    if preset is not None:
        if "preset" in space.params:
            raise UserError("--preset conflicts with the [preset] search in the space file")
        space.fixed["preset"] = preset
    base = {
        **space.fixed,
        "data": data,
        "budget": trial_budget,
        "target_acc": target_acc,
        "eval_every": 1,
        "seed": seed,
    }
    check_space(space, base, f"space file {space_file}" if space_file else "default space")

    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {root} cannot be created ({e.strerror})") from None
    storage = storage or f"sqlite:///{(root / 'tune.db').as_posix()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(study_name, storage, target_acc, trial_budget)
    for n in fail_orphans(study):
        print(f"trial {n} was interrupted (its process is gone): marked failed", flush=True)

    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished_states))
    # Reseeded by the trials already there, so a restart does not redraw the first ones; a
    # third of the trials (at most Optuna's usual 10) explore at random before TPE steers.
    study.sampler = optuna.samplers.TPESampler(
        seed=seed + len(study.trials), n_startup_trials=min(10, max(2, trials // 3))
    )

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_id())
        values = {name: p.suggest(trial, name) for name, p in space.params.items()}
        run_dir = root / f"trial-{trial.number:04d}"
        if (run_dir / "config.json").exists():
            raise UserError(f"{run_dir} holds a run of another study; use one --out per study")
        cfg = make_config({**base, **values, "out": str(run_dir)})
        trial.set_user_attr(
            "config", {k: v for k, v in cfg.to_dict().items() if k != "out" and v is not None}
        )
        print(f"\ntrial {trial.number}: {json.dumps(values)}", flush=True)
        reporter = Reporter(trial, target_acc, trial_budget)
        try:
            result = train(cfg, on_epoch=reporter)
            reporter.best = max(reporter.best, result.summary["final_test_acc"])
        except Diverged as e:
            # A recipe that blows up is a bad recipe, not a broken study: score what it reached.
            print(f"trial {trial.number} diverged: {e}", flush=True)
        except Interrupted:
            raise Interrupted(
                f"trial {trial.number} interrupted; run the same fastmbv1 tune command again "
                "to continue the study"
            ) from None
        reporter.report_until(GRID)
        trial.set_user_attr("best_acc", reporter.best)
        trial.set_user_attr("reached_s", reporter.reached_s)
        return score(reporter.reached_s, reporter.best, target_acc, trial_budget)

    if done < trials:
        print(f"study {study_name!r}: {done} of {trials} trials finished, running the rest")
        study.optimize(
            objective,
            n_trials=trials - done,
            # Other workers on the same storage also count towards --trials.
            callbacks=[optuna.study.MaxTrialsCallback(trials, states=finished_states)],
        )
    else:
        print(f"study {study_name!r} already holds {done} finished trials (asked for {trials})")
    write_reports(study, root, target_acc)
    return study


def trial_rows(study: optuna.Study) -> tuple[list[str], list[list[str]]]:
    names = sorted({p for t in study.trials for p in t.params})
    header = ["trial", "state", "value", "best acc %", "reached at s", *names]

    def fmt(v: Any) -> str:
        if v is None:
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [
        [
            str(t.number),
            t.state.name.lower(),
            fmt(t.value),
            fmt(t.user_attrs.get("best_acc")),
            fmt(t.user_attrs.get("reached_s")),
            *(fmt(t.params.get(n)) for n in names),
        ]
        for t in study.trials
    ]
    return header, rows


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # Python's int and float reprs (inf and nan too) are valid TOML
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are TOML basic-string escapes
    raise TypeError(f"no TOML form for {value!r}")


def write_best(study: optuna.Study, path: Path, target_acc: float) -> optuna.trial.FrozenTrial:
    best = study.best_trial
    reached = best.user_attrs.get("reached_s")
    how = (
        f"reached {target_acc} % after {reached:.1f} s of training"
        if reached is not None
        else f"best {best.user_attrs.get('best_acc', 0):.2f} % (missed {target_acc} %)"
    )
    lines = [
        f"# fastmbv1 tune: study {study.study_name!r}, trial {best.number}: {how}",
        "# fastmbv1 train --config this-file",
        *(f"{k} = {toml_value(v)}" for k, v in best.user_attrs["config"].items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return best


def write_plots(study: optuna.Study, root: Path) -> list[str]:
    """Optimisation history and parameter importances as PNG; notes for what was skipped."""
    from optuna.trial import TrialState

    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
        from optuna.visualization.matplotlib import (
            plot_optimization_history,
            plot_param_importances,
        )
    except ImportError:
        return ["no plots: pip install matplotlib"]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = any(len({repr(t.params.get(p)) for t in complete}) > 1 for p in study.best_params)
    plots = {"history.png": plot_optimization_history}
    notes = []
    if len(complete) >= 2 and varied:
        plots["importances.png"] = plot_param_importances
    else:
        notes.append("no importances.png: it needs 2 complete trials with differing parameters")
    with warnings.catch_warnings():
        # Optuna flags its matplotlib plots as experimental, and small studies as small.
        warnings.simplefilter("ignore")
        for name, plot in plots.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as e:
                notes.append(f"no {name}: {one_line(e)}")
                continue
            ax.figure.savefig(root / name, dpi=120, bbox_inches="tight")
            plt.close(ax.figure)
    return notes


def write_reports(study: optuna.Study, root: Path, target_acc: float) -> None:
    from optuna.trial import TrialState

    header, rows = trial_rows(study)
    table = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    (root / "trials.md").write_text("\n".join(table) + "\n")
    with open(root / "trials.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    print("\n" + "\n".join(table))
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        print("no complete trial yet: no best.toml or plots", file=sys.stderr)
        return
    best = write_best(study, root / "best.toml", target_acc)
    for note in write_plots(study, root):
        print(note, file=sys.stderr)
    print(
        f"best: trial {best.number}, value {best.value:.4g}; recipe in {root / 'best.toml'}; "
        f"tables and plots in {root}"
    )


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
