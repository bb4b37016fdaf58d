import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import independent_score, tiny_batches, tiny_config, write_archive

import fastmbv1
from fastmbv1.config import PRESETS, TrainConfig
from fastmbv1.plan import make_config
from fastmbv1.schedule import lr_factor
from fastmbv1.train import train

RECORD_FIELDS = {
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_acc",
    "test_acc",
    "train_s",
    "train_s_total",
    "eval_s",
    "wall_s",
    "data_wait_s",
    "images_per_s",
}


@pytest.fixture
def tiny_data(tmp_path):
    return write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))


def test_short_real_run_writes_every_output(tmp_path, real_cifar_path, real_cache, monkeypatch):
    monkeypatch.setenv("FASTMBV1_CACHE", str(real_cache))
    # With the weights' average and flip TTA: what is evaluated and saved is neither the raw
    # weights nor the single view.
    cfg = tiny_config(
        tmp_path, real_cifar_path, train_limit=1024, test_limit=500, epochs=2, ema=0.9, tta=True
    )
    result = train(cfg)
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["pipeline"] == "torch"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert r.keys() >= RECORD_FIELDS
        assert r["test_acc"] is not None
        assert r["images_per_s"] == pytest.approx(1024 / r["train_s"])  # 32 batches of 32
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "final_test_acc",
        "time_to_accuracy",
        "compile_s",
        "peak_memory_bytes",
        "device",
        "versions",
        "train_s",
        "eval_s",
        "wall_s",
    ):
        assert key in summary
    assert set(summary["time_to_accuracy"]) == {"80", "85", "90", "92", "93", "94"}
    # The reported accuracy is what final.pt scores on the same 500 real test images, read
    # with pickle and fastmbv1.load alone (one image of slack for rounding at a near tie).
    independent = independent_score(out / "final.pt", real_cifar_path, limit=500)
    assert summary["final_test_acc"] == pytest.approx(independent, abs=0.2)

    loaded = fastmbv1.load(out / "final.pt")
    assert not loaded.training
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x))


@pytest.mark.timeout(60)  # a budget that no longer stops the run fails here, not hangs
def test_budget_stops_on_time_and_anneals(tmp_path, tiny_data, monkeypatch):
    # Epochs of 4 steps, each ending in a checkpoint: the last save is inside the budget too.
    # 8 s: enough steps to see the LR's peak even where a busy machine takes 0.4 s a step.
    cfg = tiny_config(
        tmp_path, tiny_data, epochs=10_000, budget=8.0, batch_size=8, train_limit=32,
        eval_every=1000, checkpoint_every=1,
    )  # fmt: skip
    real_set_lr, lrs = fastmbv1.train.set_lr, []

    def set_lr(run, lr: float) -> None:  # every step's LR
        lrs.append(lr)
        real_set_lr(run, lr)

    monkeypatch.setattr(fastmbv1.train, "set_lr", set_lr)
    # The first optimiser of a process imports torch._dynamo, seconds of the budget on a
    # busy machine: a cold start is not what this measures.
    import torch._dynamo  # noqa: F401

    start = time.perf_counter()
    summary = train(cfg).summary
    took = time.perf_counter() - start
    assert summary["stopped_by"] == "budget"
    # The whole run, checkpoints, final evaluation, final.pt and summary.json included.
    assert summary["wall_s"] <= took <= cfg.budget
    # The step count alone would leave the LR in its first warm-up steps: time drives it up
    # to the peak and back down before the budget ends.
    assert max(lrs) > 0.5 * cfg.lr
    assert lrs[-1] < 0.25 * cfg.lr


def test_time_to_accuracy_is_the_first_epoch_that_reached_it(tmp_path, tiny_data, monkeypatch):
    scripted = iter([(30, 100), (85, 100), (37, 40), (3, 40)])  # 30, 85, 92.5, then 7.5 %
    monkeypatch.setattr("fastmbv1.train.evaluate", lambda *a, **k: next(scripted))
    summary = train(tiny_config(tmp_path, tiny_data, epochs=4)).summary
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["test_acc"] for r in records] == [30.0, 85.0, 92.5, 7.5]

    def at(epoch: int) -> dict:
        r = records[epoch - 1]
        return {"epoch": epoch, "train_s": r["train_s_total"], "wall_s": r["wall_s"]}

    assert summary["time_to_accuracy"] == {
        "80": at(2), "85": at(2), "90": at(3), "92": at(3), "93": None, "94": None,
    }  # fmt: skip
    assert summary["final_test_acc"] == 7.5  # the last evaluation, not the best


def test_onecycle_shape():
    f = [lr_factor("onecycle", p, 0, warmup=0.2, decay=1) for p in (0, 0.1, 0.2, 0.6, 1.0)]
    assert f == pytest.approx([0.04, 0.52, 1.0, 0.5, 0.0])
    assert lr_factor("exponential", 0.5, 3, warmup=0, decay=0.94) == pytest.approx(0.94**3)
    assert lr_factor("constant", 0.9, 7, warmup=0, decay=0.5) == 1.0


def test_target_acc_stops_early(tmp_path, tiny_data):
    summary = train(tiny_config(tmp_path, tiny_data, epochs=50, target_acc=1.0)).summary
    assert summary["stopped_by"] == "target_acc"
    assert summary["epochs_done"] == 1


def test_baseline_preset_is_the_original_recipe():
    cfg = make_config({"preset": "baseline"})
    original = {
        "model": "mobilenet_v1",
        "width": 1.0,
        "batch_size": 100,
        "lr": 0.03,
        "momentum": 0.0,
        "nesterov": False,
        "weight_decay": 5e-4,
        "epochs": 100,
        "schedule": "constant",
        "normalize": False,
        "pipeline": "torchvision",
        "num_workers": 0,
        "amp": "off",
        "compile": False,
        "label_smoothing": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "cutout": 0,
        "dropout": 0.0,
    }
    assert {k: getattr(cfg, k) for k in original} == original
    assert set(PRESETS["baseline"]) <= set(TrainConfig.__dataclass_fields__)


def test_custom_preset_is_the_original_custom_recipe():
    cfg = make_config({"preset": "custom"})
    original = {
        "model": "custom_mobilenet",
        "batch_size": 500,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 2.5e-3,
        "schedule": "exponential",
        "lr_decay": 0.94,
        "mixup": 1.0,
        "epochs": 105,
        "pipeline": "torchvision",
        "dropout": 0.5,
    }
    assert {k: getattr(cfg, k) for k in original} == original


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fastmbv1", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["train", "--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
        (["train", "--budget", "-5"], "--budget must be > 0"),
        (["train", "--width", "0"], "--width must be > 0"),
        (["train", "--lr", "fast"], "invalid float value"),
        (["train", "--amp", "fp8"], "invalid choice"),
        (["train", "--muon", "-1"], "--muon must be >= 0"),
        (["train", "--translate", "5"], "--translate must be in [0, 4]"),
        (["train", "--muon", "0.5", "--amp", "fp16"], "--muon: not with --amp fp16"),
        (["train", "--preset", "nope"], "unknown preset"),
        (["train", "--config", "missing.toml"], "does not exist"),
    ],
)
def test_bad_flags_are_one_line_errors(args, pattern):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert pattern in r.stderr


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = 'high'\n")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("learning_rate = 0.1\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = = 1\n")
    for path, pattern in [
        (bad, "lr must be of type float"),
        (unknown, "unknown field"),
        (broken, "not valid TOML"),
    ]:
        r = run_cli("train", "--config", str(path))
        assert r.returncode == 2 and pattern in r.stderr and "Traceback" not in r.stderr


def test_config_file_and_flags_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('preset = "baseline"\nlr = 0.05\nepochs = 3\n')
    cfg = make_config({"epochs": 7}, str(f))
    assert (cfg.preset, cfg.lr, cfg.epochs, cfg.batch_size) == ("baseline", 0.05, 7, 100)


@pytest.mark.slow
def test_real_cifar_learns_on_the_cpu(tmp_path, real_cifar_path, real_cache, monkeypatch):
    """A bounded real run: a broken trainer stays near 10 %; this must get far above it."""
    monkeypatch.setenv("FASTMBV1_CACHE", str(real_cache))
    cfg = make_config(
        {
            "preset": "cpu",
            "data": str(real_cifar_path),
            "out": str(tmp_path / "r"),
            "budget": 150.0,
            "epochs": 4,
            "width": 0.25,
            "eval_every": 100,
            "test_limit": 2000,
        }
    )
    summary = train(cfg).summary
    assert summary["wall_s"] <= 155
    assert summary["final_test_acc"] > 45.0, summary["final_test_acc"]
    assert np.isfinite(summary["train_s"])


def test_fp16_skipped_steps_are_counted_without_asking_the_host():
    from fastmbv1.step import build_run, train_step

    cfg = make_config({"preset": "cpu", "amp": "fp16", "compile": False})
    run = build_run(cfg, torch.device("cpu"))
    y = torch.arange(8) % 10
    good = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    bad = torch.full_like(good, float("inf"))  # overflows for sure
    skipped = 0
    for x in (bad, good, good, bad, good):
        scale = run.scaler.get_scale()  # the scaler halves its scale exactly when it skips
        train_step(run, x, y, y, 1.0)
        skipped += run.scaler.get_scale() < scale
    assert int(run.skipped_steps) == skipped >= 2
