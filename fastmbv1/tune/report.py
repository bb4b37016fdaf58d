"""What a study leaves in ``--out``: the trial table (markdown, CSV), best.toml and plots."""

from __future__ import annotations

import csv
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from fastmbv1.errors import one_line


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
