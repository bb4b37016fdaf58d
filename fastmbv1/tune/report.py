"""What a study leaves in ``--out``: the trial table (markdown, CSV), best.toml and plots."""

from __future__ import annotations

import csv
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from fastmbv1.errors import one_line
from fastmbv1.tables import Column, markdown_table, render_table


def trial_table(study: optuna.Study) -> tuple[list[Column], list[dict]]:
    """One row per trial: its state, score, best accuracy, when it reached the target, params."""
    distributions = {n: d for t in study.trials for n, d in t.distributions.items()}
    columns = [
        Column("trial", "trial", spec="d"),
        Column("state", "state"),
        Column("value", "value", spec=".4g"),
        Column("best acc %", "best_acc", spec=".2f"),
        Column("reached at s", "reached_s", spec=".1f"),
        *(
            Column(n, n, spec=".4g" if isinstance(d, FloatDistribution) else "")
            for n, d in sorted(distributions.items())
        ),
    ]
    rows = [
        {
            "trial": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            "best_acc": t.user_attrs.get("best_acc"),
            "reached_s": t.user_attrs.get("reached_s"),
            **t.params,
        }
        for t in study.trials
    ]
    return columns, rows


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # Python's int and float reprs (inf and nan too) are valid TOML
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are TOML basic-string escapes
    raise TypeError(f"no TOML form for {value!r}")


def write_best(study: optuna.Study, path: Path) -> optuna.trial.FrozenTrial:
    best = study.best_trial
    goal = study.user_attrs["fastmbv1"]
    reached = best.user_attrs.get("reached_s")
    if "epochs" in goal:  # the accuracy objective
        how = f"{100.0 - best.value:.2f} % after {goal['epochs']} epochs"
    elif reached is not None:
        how = f"reached {goal['target_acc']} % after {reached:.1f} s of training"
    else:
        how = f"best {best.user_attrs.get('best_acc', 0):.2f} % (missed {goal['target_acc']} %)"
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


def write_reports(study: optuna.Study, root: Path) -> None:
    columns, rows = trial_table(study)
    (root / "trials.md").write_text(markdown_table(columns, rows) + "\n")
    with open(root / "trials.csv", "w", newline="") as f:  # full precision, for analysis
        writer = csv.DictWriter(f, [c.key for c in columns])
        writer.writeheader()
        writer.writerows(rows)
    print("\n" + render_table(columns, rows))
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        print("no complete trial yet: no best.toml or plots", file=sys.stderr)
        return
    best = write_best(study, root / "best.toml")
    for note in write_plots(study, root):
        print(note, file=sys.stderr)
    print(
        f"best: trial {best.number}, value {best.value:.4g}; recipe in {root / 'best.toml'}; "
        f"tables and plots in {root}"
    )
