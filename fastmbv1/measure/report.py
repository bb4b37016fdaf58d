"""Time-to-accuracy report: test accuracy against wall-clock seconds for training runs.

Reads each run folder's ``metrics.jsonl`` (and ``summary.json`` when the run finished),
draws one line per run into ``report.png`` and writes the table as ``report.md``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from fastmbv1.errors import BudgetTooShort, UserError
from fastmbv1.measure.plots import figure, save
from fastmbv1.metrics import THRESHOLDS
from fastmbv1.plan import make_config
from fastmbv1.tables import Column, markdown_table
from fastmbv1.train import train


def read_run(run_dir: str | Path) -> dict:
    """A run folder's name, per-epoch records and summary (None while the run is unfinished)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl, not a training run folder")
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{run_dir}: unreadable run files ({e})") from None
    if not records:
        raise UserError(f"{metrics} holds no epochs yet")
    return {"run": run_dir.name, "records": records, "summary": summary}


def summarize(run: dict) -> dict:
    """One table row; times to accuracy are the wall seconds of the first evaluation there."""
    evals = [r for r in run["records"] if r.get("test_acc") is not None]
    last, summary = run["records"][-1], run["summary"] or {}
    row = {
        "run": run["run"],
        "device": summary.get("device"),
        "final_acc": summary.get("final_test_acc", evals[-1]["test_acc"] if evals else None),
        "epochs": summary.get("epochs_done", last["epoch"]),
        "train_s": summary.get("train_s", last["train_s_total"]),
        "wall_s": summary.get("wall_s", last["wall_s"]),
    }
    for t in THRESHOLDS:
        row[f"tta_{t}"] = next((r["wall_s"] for r in evals if r["test_acc"] >= t), None)
    return row


def markdown(rows: list[dict]) -> str:
    columns = [
        Column("run", "run"),
        Column("device", "device"),
        Column("final acc %", "final_acc", spec=".2f"),
        Column("epochs", "epochs", spec="d"),
        Column("train s", "train_s", spec=".1f"),
        Column("wall s", "wall_s", spec=".1f"),
        *(Column(f"{t} % at s", f"tta_{t}", spec=".1f") for t in THRESHOLDS),
    ]
    return (
        "Time to accuracy: wall-clock seconds from the start of the run (data loading,\n"
        "compile and evaluations included) to its first evaluation at or above the threshold.\n"
        "\n" + markdown_table(columns, rows) + "\n"
    )


def plot(runs: list[dict], path: Path) -> None:
    fig = figure(8, 5)
    ax = fig.add_subplot()
    for run in runs:
        evals = [r for r in run["records"] if r.get("test_acc") is not None]
        ax.plot(
            [r["wall_s"] for r in evals],
            [r["test_acc"] for r in evals],
            marker="o",
            markersize=3,
            label=run["run"],
        )
    ax.set_xlabel("wall-clock seconds since the run started")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("CIFAR-10 test accuracy against time")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def report(run_dirs: list[str | Path], out: str | Path) -> list[dict]:
    """Write ``report.png`` and ``report.md`` for ``run_dirs`` into ``out``; the table rows.

    Every folder is read before anything is written, so a wrong one leaves no half report.
    """
    runs = [read_run(d) for d in run_dirs]
    if not runs:
        raise UserError("no run folders to report on")
    rows = [summarize(r) for r in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / "report.png")
    (out / "report.md").write_text(markdown(rows))
    return rows


def launch(
    presets: list[str],
    *,
    budget: float | None,
    runs_dir: str | Path,
    overrides: dict,
    config_file: str | None = None,
) -> tuple[list[Path], list[str]]:
    """Train one run per preset into ``runs_dir/<preset>-<budget>s`` (replacing an older one);
    the folders trained, and one line for each preset refused.

    ``overrides`` and ``config_file`` apply on top of each preset, as flags and ``--config``
    do for ``fastmbv1 train``; every config is checked before the first run starts. A run
    whose budget the plan finds too short for its final evaluation on this machine is
    refused only at its own start (``fastmbv1.errors.BudgetTooShort``), when the speed is
    measured: the presets after it still train, so one refusal costs none of the others.
    """
    configs = []
    for preset in presets:
        fields = {**overrides, "preset": preset}
        if budget is not None:
            fields["budget"] = budget
        cfg = make_config(fields, config_file)
        configs.append(replace(cfg, out=str(Path(runs_dir) / f"{cfg.preset}-{cfg.budget:g}s")))
    trained, refused = [], []
    for cfg in configs:
        try:
            trained.append(train(cfg, overwrite=True).out)
        except BudgetTooShort as e:
            refused.append(f"{cfg.preset}: {e}")
    return trained, refused
