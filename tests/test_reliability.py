"""Crashes, interrupts, numerical faults and bad input: nothing saved is ever lost."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import independent_score, tiny_batches, tiny_config, write_archive

import fastmbv1.train
from fastmbv1 import augment
from fastmbv1.checkpoint import latest_training_state
from fastmbv1.cli import main
from fastmbv1.errors import Interrupted, UserError
from fastmbv1.schedule import lr_factor
from fastmbv1.train import train

FLAGS = [
    "--preset",
    "cpu",
    "--width",
    "0.25",
    "--batch-size",
    "32",
    "--eval-batch-size",
    "64",
    "--pipeline",
    "torch",
    "--checkpoint-every",
    "1",
    "--keep",
    "10",
]


@pytest.fixture
def data(tmp_path):
    return write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))


def config(tmp_path, data, name="run", **kw):
    return tiny_config(
        tmp_path, data, name, **{"epochs": 4, "checkpoint_every": 1, "keep": 10, **kw}
    )


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_times(rs):
    timing = {
        "train_s",
        "train_s_total",
        "eval_s",
        "eval_s_total",
        "wall_s",
        "data_wait_s",
        "images_per_s",
    }
    return [{k: v for k, v in r.items() if k not in timing} for r in rs]


@pytest.mark.parametrize(
    "recipe",
    [{"dropout": 0.2}, {"ema": 0.9, "tta": True}, {"muon": 0.5, "dirac": True}],
    ids=["dropout", "ema-tta", "muon"],
)
def test_resume_equals_the_uninterrupted_run(tmp_path, data, recipe):
    full = train(config(tmp_path, data, "full", **recipe))
    # The same run stopped after epoch 2: its folder as it was then, then resumed.
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_bytes((full.out / "config.json").read_bytes())
    (cut / "checkpoint-0002.pt").write_bytes((full.out / "checkpoint-0002.pt").read_bytes())
    resumed = train(config(tmp_path, data, "cut", **recipe), resume=str(cut))
    pairs = zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True)
    for (k, a), b in pairs:
        assert torch.equal(a, b), k
    assert without_times(records(cut)) == without_times(records(full.out))
    assert resumed.summary["final_test_acc"] == full.summary["final_test_acc"]


def run_cli(args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "fastmbv1", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_leaves_a_resumable_checkpoint(tmp_path, data):
    out = tmp_path / "run"
    proc = run_cli(
        [
            *FLAGS,
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "500",
            "--checkpoint-every",
            "1000",
        ]
    )
    wait_for(lambda: (out / "metrics.jsonl").exists() and records(out), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert f"--resume {out}" in err and "Traceback" not in err
    state, path = latest_training_state(out)
    assert state["epoch"] >= 1
    r = subprocess.run(
        [sys.executable, "-m", "fastmbv1", "train", "--resume", str(out), "--budget", "20"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    assert records(out)[0]["epoch"] == 1 and records(out)[-1]["epoch"] > state["epoch"]
    summary = json.loads((out / "summary.json").read_text())
    assert independent_score(out / "final.pt", data) == summary["final_test_acc"]


SLOW_SECOND_SAVE = """
import sys, time, torch
import fastmbv1.checkpoint as c
real_save, calls = torch.save, []
def slow_save(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("format") == c.TRAIN_FORMAT:
        calls.append(1)
        if len(calls) == 2:  # half a checkpoint on disk, then hang until killed
            f.write(b"PK" * 1000); f.flush()
            open(sys.argv[1], "w").close()
            time.sleep(600)
    return real_save(obj, f, *a, **k)
torch.save = slow_save
from fastmbv1.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, data):
    out, marker = tmp_path / "run", tmp_path / "writing"
    args = ["train", *FLAGS, "--data", str(data), "--out", str(out), "--epochs", "4"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SECOND_SAVE, str(marker), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert sorted(p.name for p in out.glob("checkpoint-*.pt")) == ["checkpoint-0001.pt"]
    state, _ = latest_training_state(out)
    assert state["epoch"] == 1
    r = subprocess.run(
        [sys.executable, "-m", "fastmbv1", "train", "--resume", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    assert [x["epoch"] for x in records(out)] == [1, 2, 3, 4]


# Window 1 is the CPU's check after every step; window 2 runs the CUDA path, which checks a
# window of steps at once (25 there), so the step named must be found inside the window.
@pytest.mark.parametrize("window", [1, 2])
def test_nan_exits_4_naming_its_step_and_lr(tmp_path, data, monkeypatch, capsys, window):
    monkeypatch.setitem(fastmbv1.train.NAN_CHECK_EVERY, "cpu", window)
    real, calls = augment.mixed_loss, []

    def poisoned(*args):
        # Only the loss's value turns NaN: the gradients and so the weights stay finite, and
        # step 10's loss is finite again. A check of the window's last step alone misses it.
        calls.append(1)
        loss = real(*args)
        return loss + loss.detach() * float("nan") if len(calls) == 9 else loss

    monkeypatch.setattr(augment, "mixed_loss", poisoned)
    out = tmp_path / "run"
    # 6 steps an epoch, 18 in all: step 9 is the third of epoch 2.
    args = ["train", *FLAGS, "--data", str(data), "--out", str(out), "--epochs", "3"]
    assert main(args) == 4
    lr = 0.2 * lr_factor("onecycle", 8 / 18, 1, warmup=0.2, decay=0.94)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        f"fastmbv1 train: error: loss became nan at step 9 (epoch 2, lr {lr:.4g})"
    )
    assert len(calls) == 9 + (window > 1)  # stopped at the end of the window holding it
    state, _ = latest_training_state(out)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model_record"]["state_dict"].values())
    assert not (out / "final.pt").exists()


def test_a_second_sigint_stops_at_once(tmp_path, data, monkeypatch, capsys):
    real, calls = augment.mixed_loss, []

    def interrupted_twice(*args):
        calls.append(1)
        if len(calls) == 9:  # in epoch 2: the first asks to finish the step, the second stops
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(augment, "mixed_loss", interrupted_twice)
    out = tmp_path / "run"
    args = ["train", *FLAGS, "--data", str(data), "--out", str(out), "--epochs", "3"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert (
        "SIGINT: finishing this step and saving a checkpoint (SIGINT again to stop at once)" in err
    )
    assert err.strip().splitlines()[-1] == "fastmbv1 train: interrupted"
    assert len(calls) == 9  # not even step 9 finished
    assert sorted(p.name for p in out.glob("*.pt")) == ["checkpoint-0001.pt"]


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, data, monkeypatch):
    real = torch.save

    def filling(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            f.write(b"x" * 100)
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", filling)
    with pytest.raises(UserError, match="No space left on device") as e:
        train(config(tmp_path, data))
    assert "\n" not in str(e.value)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == ["checkpoint-0001.pt"]
    assert not list(out.glob(".*.tmp"))
    assert latest_training_state(out)[0]["epoch"] == 1


def cli_error(*args):
    r = subprocess.run(
        [sys.executable, "-m", "fastmbv1", *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def test_out_folder_mistakes(tmp_path, data):
    out = tmp_path / "run"
    train(config(tmp_path, data, epochs=1))
    before = sorted(p.name for p in out.iterdir())
    assert "already holds a run" in cli_error(
        "train", *FLAGS, "--data", str(data), "--out", str(out)
    )
    assert sorted(p.name for p in out.iterdir()) == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in cli_error("train", *FLAGS, "--out", str(a_file), "--data", str(data))
    assert "not writable" in cli_error(
        "train", *FLAGS, "--out", "/proc/fastmbv1/run", "--data", str(data)
    )


def test_resume_refuses_recipe_changes_and_bad_checkpoints(tmp_path, data):
    out = tmp_path / "run"
    train(config(tmp_path, data, epochs=1))
    before = sorted(p.name for p in out.iterdir())
    assert "ended with its schedule (stopped by epochs)" in cli_error(
        "train", "--resume", str(out), "--budget", "1000"
    )
    assert sorted(p.name for p in out.iterdir()) == before
    train(config(tmp_path, data, epochs=2), overwrite=True, on_epoch=lambda record: True)
    assert "differs from the run being resumed" in cli_error(
        "train", "--resume", str(out), "--lr", "0.9"
    )
    for p in out.glob("checkpoint-*.pt"):
        p.write_bytes(p.read_bytes()[:500])
    assert "no readable checkpoint" in cli_error("train", "--resume", str(out))
    assert "not a fastmbv1 run folder" in cli_error("train", "--resume", str(tmp_path / "nothing"))
    assert "unreadable or truncated" in cli_error(
        "eval", "--checkpoint", str(out / "checkpoint-0001.pt")
    )


def test_resume_refuses_a_finished_run_only_where_its_schedule_has_nothing_left(tmp_path):
    from fastmbv1.rundir import refuse_a_finished_schedule

    def ended(**summary):
        (tmp_path / "summary.json").write_text(json.dumps(summary))

    ended(stopped_by="budget", progress=0.97, budget_s=600.0)
    refuse_a_finished_schedule(tmp_path, 1200.0)  # 3 % of its schedule left, and time for it
    with pytest.raises(UserError, match="give a larger --budget"):
        refuse_a_finished_schedule(tmp_path, 600.0)
    ended(stopped_by="budget", progress=1.0, budget_s=600.0)
    with pytest.raises(UserError, match="no --budget leaves it anything"):
        refuse_a_finished_schedule(tmp_path, 1200.0)
    ended(stopped_by="target_acc", progress=0.5, budget_s=600.0)
    refuse_a_finished_schedule(tmp_path, 600.0)  # stopped early: the rest is still there


def test_data_path_of_the_wrong_kind(tmp_path):
    wrong = tmp_path / "cifar.zip"
    wrong.write_bytes(os.urandom(100))
    assert "is not CIFAR-10" in cli_error(
        "train", "--data", str(wrong), "--out", str(tmp_path / "r")
    )


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from fastmbv1.state import rng_state, set_rng_state

    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # leaves a cached Gaussian and a mid-block position to restore
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.randn(), torch.rand(3).tolist())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.randn(), torch.rand(3).tolist()) == expected


def test_interrupt_mid_epoch_resumes_exactly(tmp_path, data, monkeypatch):
    full = train(config(tmp_path, data, "full", checkpoint_every=0))
    real, calls = augment.mixed_loss, []

    def signalling(*args):  # SIGTERM arrives during step 9, in the middle of epoch 2
        calls.append(1)
        if len(calls) == 9:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(augment, "mixed_loss", signalling)
    cut = config(tmp_path, data, "cut", checkpoint_every=0)
    with pytest.raises(Interrupted, match="during epoch 2"):
        train(cut)
    monkeypatch.setattr(augment, "mixed_loss", real)
    assert latest_training_state(tmp_path / "cut")[0]["epoch"] == 1
    resumed = train(cut, resume=str(tmp_path / "cut"))
    pairs = zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True)
    for (k, a), b in pairs:
        assert torch.equal(a, b), k
    assert without_times(records(tmp_path / "cut")) == without_times(records(full.out))


def test_two_runs_with_one_seed_are_identical(tmp_path, data):
    a = train(config(tmp_path, data, "a", epochs=2))
    b = train(config(tmp_path, data, "b", epochs=2))
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def test_checkpoints_every_epoch_when_epochs_are_slow_and_keep_the_newest(
    tmp_path, data, monkeypatch
):
    monkeypatch.setattr(fastmbv1.train, "AUTO_CHECKPOINT_EPOCH_S", 0.0)  # every epoch is slow
    slow = train(config(tmp_path, data, "slow", epochs=3, checkpoint_every=None, keep=2)).out
    assert sorted(p.name for p in slow.glob("checkpoint-*.pt")) == [
        "checkpoint-0002.pt",
        "checkpoint-0003.pt",
    ]
    monkeypatch.setattr(fastmbv1.train, "AUTO_CHECKPOINT_EPOCH_S", float("inf"))
    quick = train(config(tmp_path, data, "quick", epochs=2, checkpoint_every=None)).out
    assert not list(quick.glob("checkpoint-*.pt")) and (quick / "final.pt").exists()


def test_overwrite_clears_the_old_runs_checkpoints(tmp_path, data):
    out = tmp_path / "run"
    train(config(tmp_path, data, epochs=3))
    assert (out / "checkpoint-0003.pt").exists()
    train(config(tmp_path, data, epochs=1), overwrite=True)
    assert sorted(p.name for p in out.glob("checkpoint-*.pt")) == ["checkpoint-0001.pt"]
    assert len(records(out)) == 1


def test_mistakes_found_before_anything_is_written(tmp_path, data):
    out = tmp_path / "never"
    assert "unknown model" in cli_error("train", "--model", "resnet", "--out", str(out))
    assert "larger than the training set" in cli_error(
        "train", *FLAGS, "--batch-size", "4096", "--data", str(data), "--out", str(out)
    )
    assert "--sync-bn needs CUDA" in cli_error(
        "train", *FLAGS, "--sync-bn", "--data", str(data), "--out", str(out)
    )
    assert not out.exists()
    assert "cannot be combined with --resume" in cli_error(
        "train", "--resume", str(out), "--config", "x.toml"
    )
