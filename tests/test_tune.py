import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_batches, write_archive

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState  # noqa: E402

from fastmbv1.cli import main  # noqa: E402
from fastmbv1.plan import make_config  # noqa: E402
from fastmbv1.tune.objective import score  # noqa: E402

# Small and fast: a quarter-width network, 200 training images, a few seconds per trial.
SPACE = """
[lr]
type = "float"
low = 0.05
high = 0.5
log = true

[batch_size]
type = "categorical"
choices = [32, 64]

[fixed]
preset = "cpu"
width = 0.25
epochs = 30
eval_batch_size = 64
pipeline = "torch"
"""
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture
def inputs(tmp_path):
    data = write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    return data, space


def tune_args(tmp_path, data, space) -> list[str]:
    return [
        "tune",
        "--target-acc", "15",
        "--trial-budget", "3",
        "--trials", "3",
        "--space", str(space),
        "--data", str(data),
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip


def accuracy_args(tmp_path, data, space, epochs: int) -> list[str]:
    """``tune_args`` for the accuracy objective after ``epochs`` epochs."""
    args = tune_args(tmp_path, data, space)
    i = args.index("--target-acc")
    args[i : i + 2] = ["--objective", "accuracy", "--epochs", str(epochs)]
    return args


def exit_status(argv: list[str]) -> int:
    """What the command exits with: main's return value, or argparse's own SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def load(tmp_path) -> optuna.Study:
    storage = f"sqlite:///{(tmp_path / 'out' / 'tune.db').as_posix()}"
    return optuna.load_study(study_name="fastmbv1", storage=storage)


@pytest.fixture
def pruners(monkeypatch) -> list:
    """The pruner of every study fastmbv1 tune opens, in order."""
    import fastmbv1.tune

    real_open, opened = fastmbv1.tune.open_study, []

    def open_study(name, storage, goal, pruner, *args):
        opened.append(pruner)
        return real_open(name, storage, goal, pruner, *args)

    monkeypatch.setattr(fastmbv1.tune, "open_study", open_study)
    return opened


def test_study_writes_best_config_tables_and_plots(tmp_path, inputs, capsys, pruners):
    from fastmbv1.tune.objective import median_pruner

    assert main(tune_args(tmp_path, *inputs)) == 0
    assert vars(pruners[0]) == vars(median_pruner())  # the one the pruning test checks
    out = tmp_path / "out"
    study = load(tmp_path)
    assert len(study.get_trials(states=FINISHED)) == 3
    assert all((out / f"trial-{n:04d}" / "config.json").exists() for n in range(3))

    cfg = make_config({}, str(out / "best.toml"))
    assert cfg.lr == pytest.approx(study.best_params["lr"])
    assert cfg.batch_size == study.best_params["batch_size"]
    assert (cfg.width, cfg.target_acc, cfg.budget) == (0.25, 15.0, 3.0)
    for name in ("history.png", "importances.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "trials.md").read_text().splitlines()) == 2 + 3
    assert (out / "trials.csv").read_text().startswith("trial,state,value")
    printed = capsys.readouterr().out.splitlines()
    assert any(line.split()[:3] == ["trial", "state", "value"] for line in printed)

    # The same command again has nothing left to run; another target cannot share the study.
    assert main(tune_args(tmp_path, *inputs)) == 0
    assert len(load(tmp_path).trials) == 3
    args = tune_args(tmp_path, *inputs)
    args[args.index("--target-acc") + 1] = "20"
    assert main(args) == 2
    assert "use another --study" in capsys.readouterr().err


def test_the_accuracy_objective_scores_the_final_accuracy_of_fixed_epochs(
    tmp_path, inputs, capsys, pruners
):
    args = accuracy_args(tmp_path, *inputs, epochs=2)
    args[args.index("--trial-budget") + 1] = "60"
    args[args.index("--trials") + 1] = "2"
    assert main(args) == 0
    out, study = tmp_path / "out", load(tmp_path)
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        summary = json.loads((out / f"trial-{trial.number:04d}" / "summary.json").read_text())
        assert summary["epochs_done"] == 2 and summary["stopped_by"] == "epochs"
        assert trial.value == pytest.approx(100.0 - summary["final_test_acc"])
        # Evaluated once, at the end; never pruned on a mid-run accuracy.
        metrics = (out / f"trial-{trial.number:04d}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["test_acc"] is None for line in metrics] == [True, False]
    assert isinstance(pruners[0], optuna.pruners.NopPruner)
    best = study.best_trial
    assert f"{100 - best.value:.2f} % after 2 epochs" in (out / "best.toml").read_text()
    # A time study's flags cannot reuse the study, and the objective needs its epochs.
    assert main(tune_args(tmp_path, *inputs)) == 2
    assert "--objective accuracy --epochs 2" in capsys.readouterr().err
    i = args.index("--epochs")
    del args[i : i + 2]
    args[args.index("--out") + 1] = str(tmp_path / "other")
    space = (tmp_path / "space.toml").read_text().replace("epochs = 30\n", "")
    (tmp_path / "space.toml").write_text(space)
    assert main(args) == 2
    assert "give --epochs N" in capsys.readouterr().err


def test_an_accuracy_study_from_before_final_scoring_is_refused(tmp_path, inputs, capsys):
    # Such a study (every epoch evaluated, trials pruned on it) holds scores of another kind.
    (tmp_path / "out").mkdir()
    storage = f"sqlite:///{(tmp_path / 'out' / 'tune.db').as_posix()}"
    old = optuna.create_study(study_name="fastmbv1", storage=storage)
    old.set_user_attr("fastmbv1", {"objective": "accuracy", "epochs": 2, "trial_budget": 60.0})
    args = accuracy_args(tmp_path, *inputs, epochs=2)
    args[args.index("--trial-budget") + 1] = "60"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "an earlier fastmbv1" in err and len(err.strip().splitlines()) == 1
    assert load(tmp_path).trials == []


def test_a_fresh_study_first_runs_the_recipe_it_starts_from(tmp_path, inputs, capsys):
    data, space = inputs
    # The cpu preset trains at batch 128 and LR 0.2: inside this space, so trial 0 is them.
    space.write_text(SPACE.replace("choices = [32, 64]", "choices = [32, 128]"))
    args = tune_args(tmp_path, data, space)
    args[args.index("--trials") + 1] = "2"
    assert main(args) == 0
    first, _ = load(tmp_path).trials
    assert first.params == {"lr": 0.2, "batch_size": 128}
    assert "trial 0 is the recipe the study starts from" in capsys.readouterr().out
    # The default 128 is no choice of the first space: trial 0 is a draw, and it says why.
    args[args.index("--out") + 1] = str(tmp_path / "other")
    args[args.index("--trials") + 1] = "1"
    space.write_text(SPACE)
    assert main(args) == 0
    assert "starting recipe's batch_size (128, None is auto) is not in" in capsys.readouterr().out


@pytest.mark.parametrize(
    "distribution, value, inside",
    [
        (optuna.distributions.FloatDistribution(0.1, 0.5, step=0.1), 0.3, True),
        (optuna.distributions.FloatDistribution(0.1, 0.5, step=0.1), 0.25, False),  # off step
        (optuna.distributions.FloatDistribution(0.1, 0.5, log=True), 0.6, False),
        (optuna.distributions.IntDistribution(1, 9, step=2), 4, False),
        (optuna.distributions.CategoricalDistribution((128, 256)), 64, False),
        (optuna.distributions.FloatDistribution(0.1, 0.5), None, False),  # auto
    ],
)
def test_a_starting_value_the_space_cannot_draw_is_named(distribution, value, inside):
    from fastmbv1.tune.space import Space

    assert Space({"x": distribution}).outside({"x": value}) == (None if inside else "x")


def test_an_epoch_the_budget_cut_is_not_a_finished_epoch():
    from fastmbv1.tune.objective import EpochReporter

    reporter = EpochReporter()
    reporter({"epoch": 4, "test_acc": 60.0, "complete": True})
    reporter({"epoch": 5, "test_acc": 61.0, "complete": False})
    assert (reporter.done, reporter.acc) == (4, 61.0)  # so a 5-epoch trial fails


def test_an_accuracy_trial_its_budget_cuts_short_fails(tmp_path, inputs):
    args = accuracy_args(tmp_path, *inputs, epochs=30)
    args[args.index("--trials") + 1] = "1"
    assert main(args) == 0
    (trial,) = load(tmp_path).trials
    assert trial.state == TrialState.FAIL


def test_a_trial_its_budget_cannot_hold_fails_and_the_study_goes_on(tmp_path, inputs, monkeypatch):
    from fastmbv1.errors import BudgetTooShort

    def too_short(cfg, on_epoch=None):
        raise BudgetTooShort("--budget 60 is too short on this machine now")

    monkeypatch.setattr("fastmbv1.tune.objective.train", too_short)
    args = tune_args(tmp_path, *inputs)
    args[args.index("--trials") + 1] = "2"
    assert main(args) == 0
    assert [t.state for t in load(tmp_path).trials] == [TrialState.FAIL] * 2


def test_killed_tuner_continues_the_same_study(tmp_path, inputs):
    args = tune_args(tmp_path, *inputs)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastmbv1", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    second = tmp_path / "out" / "trial-0001"
    deadline = time.monotonic() + 120
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.exists() and proc.poll() is None, "the 2nd trial never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    before = load(tmp_path)
    assert [t.state for t in before.trials[:2]] == [TrialState.COMPLETE, TrialState.RUNNING]
    first_value = before.trials[0].value

    assert main(args) == 0
    study = load(tmp_path)
    assert study.trials[0].value == first_value
    assert study.trials[1].state == TrialState.FAIL
    assert [t.number for t in study.get_trials(states=FINISHED)] == [0, 2, 3]


@pytest.mark.parametrize(
    "flags, space",
    [
        (["--trials", "0"], SPACE),
        (["--trial-budget", "-1"], SPACE),
        ([], SPACE + '\n[colour]\ntype = "categorical"\nchoices = ["red"]\n'),
        ([], SPACE.replace("low = 0.05", 'low = "small"')),
        ([], SPACE + '\n[epochs]\ntype = "float"\nlow = 1.0\nhigh = 5.0\n'),
        ([], SPACE.replace("choices = [32, 64]", "choices = []")),
        ([], SPACE.replace("[fixed]", "[fixed]\nbudget = 5.0")),
        ([], SPACE.replace("width = 0.25", "width = -1.0")),
        ([], SPACE + "\n[momentum\n"),
    ],
)
def test_bad_inputs_exit_2_in_one_line(tmp_path, inputs, capsys, flags, space):
    inputs[1].write_text(space)
    args = tune_args(tmp_path, *inputs)
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        args[args.index(flag) + 1] = value
    assert exit_status(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmbv1 tune: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_train_flags_reach_every_trial(tmp_path, inputs):
    args = tune_args(tmp_path, *inputs)
    args[args.index("--trials") + 1] = "2"
    config = tmp_path / "recipe.toml"
    config.write_text("eval_batch_size = 32\nlabel_smoothing = 0.05\nlr = 9.0\n")
    # --width beats the space's [fixed] width = 0.25; --config lies below [fixed] (which
    # says eval_batch_size = 64) and below the searched lr.
    assert main([*args, "--device", "cpu", "--width", "0.125", "--config", str(config)]) == 0
    study = load(tmp_path)
    for n in range(2):
        cfg = json.loads((tmp_path / "out" / f"trial-{n:04d}" / "config.json").read_text())
        assert (cfg["device"], cfg["width"], cfg["budget"]) == ("cpu", 0.125, 3.0)
        assert (cfg["eval_batch_size"], cfg["label_smoothing"]) == (64, 0.05)
        assert cfg["lr"] == study.trials[n].params["lr"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "0.1"], "--lr 0.1 conflicts with the space file"),
        (["--batch-size", "32"], "--batch-size 32 conflicts with the space file"),
        (["--space", None, "--width", "0.5"], "--width 0.5 conflicts with the default space"),
        (["--budget", "5"], "--budget: each trial's budget is --trial-budget"),
        (["--eval-every", "2"], "--eval-every: the tuner sets when trials evaluate"),
        (["--target-acc", None], "fastmbv1 tune needs --target-acc"),
        (["--target-acc", "101"], "--target-acc is a percentage in (0, 100]"),
    ],
)
def test_flags_the_study_cannot_honour_exit_2_in_one_line(tmp_path, inputs, capsys, flags, message):
    args = tune_args(tmp_path, *inputs)
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        if flag not in args:
            args += [flag, value]
        elif value is None:  # leave the flag out
            del args[args.index(flag) : args.index(flag) + 2]
        else:
            args[args.index(flag) + 1] = value
    assert exit_status(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmbv1 tune: error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "out").exists()


def test_default_space_offers_the_pipelines_of_the_configured_device(monkeypatch):
    import torch

    from fastmbv1.tune import space
    from fastmbv1.tune.space import default_space

    asked = []

    def available(device):
        asked.append(device)
        return {"torch": None, "dali": "needs a CUDA GPU"}

    monkeypatch.setattr(space, "available", available)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # "auto" would be cuda
    assert default_space("cpu").params["pipeline"].choices == ("torch",)
    assert asked == [torch.device("cpu")]


def test_misses_rank_below_every_hit_and_by_distance():
    budget, target = 120.0, 70.0
    hit = score(119.0, 70.5, target, budget)
    near, far = score(None, 69.0, target, budget), score(None, 40.0, target, budget)
    assert hit == 119.0 < near < far
    assert score(130.0, 71.0, target, budget) == budget  # a first step over the budget


def test_reporter_prunes_a_trial_behind_the_median_on_the_time_grid():
    from fastmbv1.tune.objective import GRID, Reporter, median_pruner

    study = optuna.create_study(pruner=median_pruner())  # the pruner fastmbv1 tune uses
    budget, target = 100.0, 70.0

    def run(accs_every_10s: list[float]) -> float:
        trial = study.ask()
        reporter = Reporter(trial, target, budget)
        for i, acc in enumerate(accs_every_10s, 1):
            if reporter({"test_acc": acc, "train_s_total": 10.0 * i}):
                study.tell(trial, state=TrialState.PRUNED)
                return i
        reporter.report_until(GRID)
        study.tell(trial, score(reporter.reached_s, reporter.best, target, budget))
        return len(accs_every_10s)

    assert run([30, 50, 72]) == 3
    # Behind the first at 30 s, but one complete trial is too few to prune on.
    assert run([20, 40, 60, 71]) == 4
    # Steps are 5 s: reports at 10 and 20 s fall in the warm-up quarter, the one at 30 s prunes.
    assert run([10, 12, 14, 16, 18, 20]) == 3
    hit = study.trials[0]
    assert hit.value == 30.0 and hit.intermediate_values[GRID] == -72
    # At 25 s (step 5) the best known was the 50 % measured at 20 s; at 5 s nothing yet.
    assert hit.intermediate_values[5] == -50 and hit.intermediate_values[1] == 0


def test_a_pruned_trial_ends_its_run_cleanly(tmp_path, inputs):
    from optuna.distributions import FloatDistribution

    from fastmbv1.tune.objective import Objective
    from fastmbv1.tune.space import Space

    data, _ = inputs
    settings = {"preset": "cpu", "width": 0.25, "eval_batch_size": 64, "pipeline": "torch"}
    # A budget that the first epoch leaves room in: only the pruner can end the run there.
    settings |= {"data": str(data), "budget": 60.0, "target_acc": 99.0, "eval_every": 1}
    # Every report (minus an accuracy, so at least -100) is above -101: prune at the first.
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=-101.0))
    space = Space({"lr": FloatDistribution(0.05, 0.5)})
    study.optimize(Objective(space, settings, None, tmp_path, 99.0, 60.0), n_trials=1)

    assert study.trials[0].state == TrialState.PRUNED
    run = tmp_path / "trial-0000"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "on_epoch" and summary["epochs_done"] == 1
    assert (run / "final.pt").exists()
