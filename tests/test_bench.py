"""``fastmbv1 bench``: every subcommand on tiny sizes, its pictures, the report on made-up run
folders, and the help."""

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_batches, write_archive

from fastmbv1 import peak
from fastmbv1.cli import main
from fastmbv1.config import PRESETS
from fastmbv1.data import recipe_pipeline
from fastmbv1.errors import BudgetTooShort
from fastmbv1.flops import training_flops_per_image
from fastmbv1.measure import epoch
from fastmbv1.measure import report as report_module
from fastmbv1.measure.budget import ORIGINAL_T4, epochs_in, original_budget
from fastmbv1.measure.cli import BENCHES, add_arguments
from fastmbv1.measure.inputs import preset_config
from fastmbv1.measure.report import read_run, report
from fastmbv1.metrics import THRESHOLDS
from fastmbv1.models import build_model
from fastmbv1.plan import make_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


@pytest.fixture
def bench(capsys, monkeypatch):
    """Run ``fastmbv1 bench COMMAND`` (split on spaces: the paths here have none) as a shell
    would, so that a saved file records it as its command; (status, stdout, stderr)."""

    def run(command: str) -> tuple[int, str, str]:
        argv = ["bench", *command.split()]
        monkeypatch.setattr(sys, "argv", ["fastmbv1", *argv])
        status = main(argv)
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture
def bench_json(bench):
    def run(command: str) -> dict:
        status, out, err = bench(command + " --json")
        assert status == 0, err
        return json.loads(out)

    return run


def printed_table(out: str) -> tuple[str, list[list[str]]]:
    """The header line and the cells of each line below the dashed rule that a table prints."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) == {"-"})
    return lines[rule - 1], [line.split() for line in lines[rule + 1 :]]


def is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_loaders_table_saved_file_and_plots(bench, tmp_path):
    status, out, err = bench(
        "loaders --device cpu --synthetic --images 64 --batch-sizes 32 "
        f"--pipelines torch torchvision:num_workers=0 --save --results {tmp_path} "
        f"--plot {tmp_path / 'loaders.png'}"
    )
    assert status == 0, err
    header, rows = printed_table(out)
    assert header.split()[:4] == ["pipeline", "workers", "chunk", "batch"]
    assert [r[:4] for r in rows] == [["torch", "-", "-", "32"], ["torchvision", "0", "-", "32"]]
    [saved] = tmp_path.glob("loaders-*.json")
    doc = json.loads(saved.read_text())
    assert doc.keys() >= {"command", "machine", "versions", "results"}
    assert [r["images"] for r in doc["results"]] == [64, 64]
    assert all(r["images_per_s"] > 0 for r in doc["results"])
    # Host time per batch: 2 batches per epoch, each at least what its own gather took.
    assert all(0 < r["host_ms_per_batch"] < 1000 * r["seconds"] / 2 for r in doc["results"])
    # --plot FILE, and with --save the same picture beside the JSON.
    assert is_png(tmp_path / "loaders.png") and is_png(saved.with_suffix(".png"))
    saved.with_suffix(".png").unlink()
    # The saved file is drawn again without measuring: beside itself, or where --out says.
    assert bench(f"plot {saved}")[0] == 0 and is_png(saved.with_suffix(".png"))
    assert bench(f"plot {saved} --out {tmp_path / 'again.svg'}")[0] == 0
    assert (tmp_path / "again.svg").read_text().startswith("<?xml")


def test_loaders_read_the_data_set(bench_json, tiny_archive):
    doc = bench_json(
        f"loaders --device cpu --data {tiny_archive} --batch-sizes 8 --pipelines torch"
    )
    [row] = doc["results"]
    assert row["images"] == 40 and row["device"] == "cpu"  # 5 batch files of 8


def test_step_grid_with_mfu_and_roofline(bench, small_peaks, tmp_path):
    status, out, err = bench(
        "step --device cpu --models mobilenet_v1 --widths 0.25 --channels-last on off "
        f"--amp off --batch-size 8 --steps 1 --warmup 0 --plot {tmp_path / 'step.png'} "
        f"--save --results {tmp_path}"
    )
    assert status == 0, err
    rows = json.loads(next(tmp_path.glob("step-*.json")).read_text())["results"]
    assert [r["channels_last"] for r in rows] == [True, False]
    assert all(r["images_per_s"] > 0 and r["compile_s"] is None for r in rows)
    flops = training_flops_per_image(build_model("mobilenet_v1", width=0.25))
    peak_now = peak.cached_peak(torch.device("cpu"), "fp32")["flops_per_s"]  # measured, cached
    for r in rows:
        assert r["flops_per_image"] == flops and r["peak_flops_per_s"] == peak_now
        assert r["achieved_flops_per_s"] == pytest.approx(flops * 8 / r["step_s"])
        assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / r["peak_flops_per_s"])
        # The step's lower bound is the sum of its layers' bounds, each max(compute, memory).
        assert r["bound_s"] == pytest.approx(sum(layer["bound_s"] for layer in r["layers"]))
        assert r["over_bound"] == pytest.approx(r["step_s"] / r["bound_s"])
        names = [layer["layer"] for layer in r["layers"]]
        assert names[:4] == ["normalize", "stem", "bn+relu", "dw1"] and names[-2:] == [
            "classifier",
            "sgd",
        ]
        assert {f"dw{i}" for i in range(1, 14)} | {f"pw{i}" for i in range(1, 14)} <= set(names)
        for layer in r["layers"]:
            assert layer["measured_s"] > 0
            compute = layer["flops"] / r["peak_flops_per_s"]
            memory = layer["bytes"] / r["bandwidth_bytes_per_s"]
            if layer["count"] == 1:
                assert layer["bound_s"] == pytest.approx(max(compute, memory))
            else:  # a group: the sum of its members' bounds
                assert layer["bound_s"] >= max(compute, memory) * (1 - 1e-9)
    header, _ = printed_table(out)
    assert "MFU" in header and "x bound" in header
    assert out.count("each layer alone against its bound") == 2
    assert is_png(tmp_path / "step.png")


class Delayed:
    """A pipeline made input-bound: each batch comes late by four times the step before it
    took (half a second for the first), however busy the shared machine is."""

    def __init__(self, pipe):
        self.pipe, self.epoch = pipe, 0

    def __len__(self) -> int:
        return len(self.pipe)

    def __iter__(self):
        step_s = 0.125
        for batch in self.pipe:
            time.sleep(4 * step_s)
            handed = time.perf_counter()
            yield batch
            step_s = time.perf_counter() - handed  # the consumer's step on this batch


def test_epoch_au_drops_and_the_verdict_says_input_bound_when_a_pipeline_is_delayed(
    bench, monkeypatch, tmp_path
):
    def small(name, device):  # batches of 16: quick steps
        return replace(preset_config(name, device), batch_size=16)

    def delayed(cfg, *args, **kwargs):
        return Delayed(recipe_pipeline(cfg, *args, **kwargs))

    monkeypatch.setattr(epoch, "preset_config", small)
    monkeypatch.setattr(epoch, "recipe_pipeline", delayed)  # the resident batches are not
    status, out, err = bench(
        "epoch --device cpu --preset cpu --synthetic --images 48 --pipelines torch resident "
        f"--plot {tmp_path / 'epoch.png'} --save --results {tmp_path}"
    )
    assert status == 0, err
    _, cells = printed_table(out)
    assert [c[1] for c in cells[:2]] == ["torch", "resident"]
    torch_verdict, resident_verdict = out.splitlines()[-2:]
    assert torch_verdict.startswith("torch: input-bound, AU ")
    assert "x the resident one" in torch_verdict
    assert resident_verdict.startswith("resident: compute-bound") and "upper" in resident_verdict
    assert is_png(tmp_path / "epoch.png")
    saved = json.loads(next(tmp_path.glob("epoch-*.json")).read_text())
    rows = {r["pipeline"]: r for r in saved["results"]}
    # Delayed by 4 steps' time a batch from the second on: AU under 1/5 there, 1/2 overall.
    assert rows["torch"]["au"] < 0.5 and rows["torch"]["au"] < rows["resident"]["au"] - 0.3
    assert rows["torch"]["bound"] == "input" and rows["resident"]["bound"] == "compute"
    assert rows["torch"]["epoch_s"] > rows["resident"]["epoch_s"]
    for r in rows.values():
        assert r["au"] == pytest.approx(r["compute_s"] / r["epoch_s"])
        assert r["images"] == 48 and r["steps"] == 3
    assert rows["resident"]["data_wait_s"] < 0.05  # its batches were there before the epoch


def test_budget_projects_and_shows_the_original(bench_json, tmp_path):
    batch = make_config({"preset": "cpu"}).batch_size
    doc = bench_json(
        f"budget --device cpu --presets cpu --synthetic --images {batch} --budget 3600 60 "
        f"--plot {tmp_path / 'budget.png'}"
    )
    preset, *originals = doc["results"]
    assert preset["run"] == "cpu" and preset["images_measured"] == batch
    # One batch measured, scaled to a full epoch of 50,000 images.
    assert preset["epoch_s"] > 0 and preset["epochs_in_3600s"] >= preset["epochs_in_60s"]
    assert [r["run"] for r in originals] == [r["run"] for r in ORIGINAL_T4]
    assert is_png(tmp_path / "budget.png")


def test_roofline_predicts_every_preset_as_a_model_not_a_measurement(bench, tmp_path):
    status, out, err = bench(f"roofline --gpu h100 --save --results {tmp_path}")
    assert status == 0, err
    header, cells = printed_table(out)
    assert "step floor ms" in header and "epoch floor s" in header
    assert [" ".join(row[-3:]) for row in cells[: len(PRESETS)]] == [
        "model, not measurement"
    ] * len(PRESETS)
    assert out.strip().endswith("every figure above is a model, not measurement")
    doc = json.loads((tmp_path / "roofline-h100.json").read_text())
    rows = {r["preset"]: r for r in doc["results"]}
    assert set(rows) == set(PRESETS)
    fast = rows["fast"]
    assert fast["what"] == "model, not measurement" and fast["card"].startswith("NVIDIA H100")
    assert (fast["amp"], fast["compile"], fast["peak_dtype"]) == ("bf16", True, "bf16")
    assert fast["flops_per_image"] == training_flops_per_image(build_model("mobilenet_v1"))
    for r in rows.values():
        assert r["step_floor_s"] == max(r["roofline_step_s"], r["launch_step_s"])
        assert r["epoch_floor_s"] == pytest.approx(50_000 // r["batch_size"] * r["step_floor_s"])
        assert r["launch_step_s"] == pytest.approx(r["kernels_per_step"] * 5e-6)
        # No step beats its model FLOPs at the card's peak.
        floor = r["batch_size"] * r["flops_per_image"] / r["peak_flops_per_s"]
        assert r["roofline_step_s"] > floor
    # fp32 convolutions run at TF32's rate on an H100, the original recipes' dtype
    assert rows["baseline"]["peak_dtype"] == "tf32"


def test_roofline_from_a_spec_file_bends_with_its_roofs(bench_json, tmp_path):
    def spec(name: str, bandwidth: float, latency: float) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(
            f'name = "{name}"\nbandwidth = {bandwidth}\nlaunch_latency = {latency}\n'
            "[peak_flops]\nfp32 = 1e12\nbf16 = 4e12\n"
        )
        return path

    def fast(path: Path) -> dict:
        return bench_json(f"roofline --spec {path} --presets fast")["results"][0]

    compute = fast(spec("compute", 1e18, 1e-12))  # no memory or launch limit to speak of
    assert compute["bound_by"] == "roofline" and compute["memory_bound_share"] == 0
    # Then the floor is the FLOPs over the peak: the model's, plus batch norm's and SGD's few.
    model_s = 512 * compute["flops_per_image"] / 4e12
    assert model_s < compute["step_floor_s"] < 1.1 * model_s
    memory = fast(spec("memory", 1e9, 1e-12))
    assert memory["memory_bound_share"] > 0.9 and memory["step_floor_s"] > compute["step_floor_s"]
    launches = fast(spec("launches", 1e18, 1.0))
    assert launches["bound_by"] == "launches"
    assert launches["step_floor_s"] == launches["kernels_per_step"] * 1.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("bandwidth = 1e12\n", "needs peak_flops"),
        ("bandwidth = 1e12\n[peak_flops]\nbf16 = 1e12\n", "needs fp32 at least"),
        ("bandwidth = -1\n[peak_flops]\nfp32 = 1e12\n", "bandwidth must be > 0"),
        ("bandwidth = 1e12\n[peak_flops]\nfp32 = 1e12\nfp8 = 2e12\n", "unknown dtype(s) fp8"),
        ("bandwidth = 'fast'\n[peak_flops]\nfp32 = 1e12\n", "must be a number"),
        ("bandwidth = [", "not valid TOML"),
    ],
)
def test_bad_spec_is_one_line_and_status_2(bench, tmp_path, text, message):
    (tmp_path / "card.toml").write_text(text)
    status, out, err = bench(f"roofline --spec {tmp_path / 'card.toml'}")
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1


def test_peak_measures_and_caches_this_machines_roofs(bench_json, small_peaks):
    rows = bench_json("peak --device cpu --dtypes fp32")["results"]
    assert [r["roof"] for r in rows] == ["matmul fp32", "copy 8 MiB"]
    assert all(r["now"] > 0 and r["best"] >= r["now"] for r in rows)
    assert peak.cached_peak(torch.device("cpu"), "fp32")["flops_per_s"] == rows[0]["best"]


# The step file in mfu-cpu/ has the roofline's layers; the one beside the others predates it.
@pytest.mark.parametrize("what", ["loaders", "step", "epoch", "budget", "mfu-cpu/step"])
def test_plot_redraws_the_committed_results(bench, tmp_path, what):
    [saved] = RESULTS.glob(f"{what}-*.json")
    status, _, err = bench(f"plot {saved} --out {tmp_path / 'redrawn.png'}")
    assert status == 0, err
    assert is_png(tmp_path / "redrawn.png")


def test_original_figures():
    baseline = original_budget((3600.0,))[0]
    assert baseline["s_per_epoch"] == pytest.approx(34.85)
    assert baseline["epochs_in_3600s"] == 103
    assert epochs_in(100, 30, setup_s=20) == 2 and epochs_in(10, 30) == 0


@pytest.mark.parametrize(
    "command, message",
    [
        ("step --device cpu --batch-size 0", "--batch-size must be >= 1"),
        ("step --device cpu --widths 0", "--widths values must be > 0"),
        ("loaders --synthetic --pipelines nope", "unknown pipeline 'nope'"),
        ("loaders --synthetic --pipelines torch:num_workers=x", "not key=integer"),
        ("epoch --synthetic --pipelines torch:prefetch=2", "only num_workers"),
        ("report", "name run folders"),
    ],
)
def test_bad_input_is_one_line_and_status_2(bench, command, message):
    status, _, err = bench(command)
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def bad_files(tmp_path):
    """Files that ``bench plot`` must refuse, by name."""
    files = {
        "not-json.json": "loaders, images/s\n",
        "a-list.json": "[1, 2]",
        "report.json": json.dumps({"command": "fastmbv1 bench report runs/x", "machine": "m",
                                   "device": "cpu", "results": []}),
        "nothing-measured.json": json.dumps(
            {"command": "fastmbv1 bench loaders --pipelines dali", "machine": "m",
             "device": "cpu", "results": [{"pipeline": "dali", "note": "skipped: no GPU"}]}
        ),
    }  # fmt: skip
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "a-file").write_text("")
    shutil.copy(next(RESULTS.glob("step-*.json")), tmp_path / "step.json")  # a good one
    return tmp_path


@pytest.mark.parametrize(
    "command, message",
    [
        ("loaders --synthetic --plot {dir}/missing/x.png", "there is no folder"),
        ("loaders --synthetic --plot {dir}/a-file/x.png", "there is no folder"),
        ("loaders --synthetic --plot {dir}/x.txt", "name a picture file"),
        ("step --device cpu --plot {dir}", "name a picture file"),
        ("plot {dir}/missing.json", "unreadable (No such file or directory)"),
        ("plot {dir}/not-json.json", "unreadable"),
        ("plot {dir}/a-list.json", "not a fastmbv1 bench result file"),
        ("plot {dir}/report.json", "its command is none of fastmbv1 bench loaders"),
        ("plot {dir}/nothing-measured.json", "no measured results to draw"),
        ("plot {dir}/report.json {dir}/a-list.json --out {dir}/x.png", "--out names one"),
        ("plot {dir}/step.json --out {dir}/missing/x.png", "there is no folder"),
        # A good file first: it is not drawn either, as the second is refused.
        ("plot {dir}/step.json {dir}/nothing-measured.json", "no measured results"),
    ],
)
def test_bad_plot_input_is_one_line_and_status_2(bench, bad_files, command, message):
    status, out, err = bench(command.format(dir=bad_files))
    assert status == 2 and out == ""  # refused before measuring anything
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(bad_files.glob("**/*.png"))


def test_plot_without_matplotlib_is_refused_before_measuring(bench, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... fails
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    status, out, err = bench(f"loaders --synthetic --images 64 --plot {tmp_path / 'x.png'}")
    assert status == 2 and out == ""
    assert "need matplotlib" in err and len(err.strip().splitlines()) == 1


def test_every_flag_says_what_it_does_and_its_default():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert parser.description and set(commands.choices) == {*BENCHES, "report", "plot"}
    for name, sub in commands.choices.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, f"bench {name} {action.option_strings}"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "(default: " in action.help, f"bench {name} {action.option_strings}"


def fake_run(folder, accs, wall_step=10.0, summary=True):
    """A run folder as fastmbv1 train leaves it: one record per epoch, a summary if done."""
    folder.mkdir(parents=True)
    records = [
        {
            "epoch": i + 1,
            "step": 10 * (i + 1),
            "lr": 0.1,
            "train_loss": 1.0,
            "train_acc": acc,
            "test_acc": acc,
            "train_s": 8.0,
            "train_s_total": 8.0 * (i + 1),
            "eval_s": 1.0,
            "eval_s_total": i + 1.0,
            "wall_s": wall_step * (i + 1),
            "data_wait_s": 0.1,
            "images_per_s": 5000.0,
            "complete": True,
        }
        for i, acc in enumerate(accs)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary:
        (folder / "summary.json").write_text(
            json.dumps(
                {
                    "final_test_acc": accs[-1],
                    "epochs_done": len(accs),
                    "device": "Fake GPU",
                    "train_s": 8.0 * len(accs),
                    "wall_s": wall_step * len(accs) + 2,
                }
            )
        )
    return folder


def test_report_draws_and_tabulates(bench, tmp_path):
    fast = fake_run(tmp_path / "runs" / "fast", [70.0, 84.0, 90.5, 93.2])
    slow = fake_run(tmp_path / "runs" / "slow", [50.0, 81.0], wall_step=30.0, summary=False)
    out = tmp_path / "report"
    status, stdout, err = bench(f"report {fast} {slow} --out {out}")
    assert status == 0, err
    assert (out / "report.png").read_bytes()[:8] == PNG_MAGIC
    table = (out / "report.md").read_text()
    assert stdout == table
    header, rule, *rows = [line for line in table.splitlines() if line.startswith("|")]
    assert header.split("|")[1].strip() == "run" and set(rule) == {"|", "-"}
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[0] for c in cells] == ["fast", "slow"]
    # run, device, final acc, epochs, train s, wall s, then 80 85 90 92 93 94
    assert cells[0][1:6] == ["Fake GPU", "93.20", "4", "32.0", "42.0"]
    assert cells[0][6:] == ["20.0", "30.0", "30.0", "40.0", "40.0", "-"]
    assert cells[1][1:6] == ["", "81.00", "2", "16.0", "60.0"]  # no summary, no device
    assert cells[1][6:] == ["60.0"] + ["-"] * (len(THRESHOLDS) - 1)


def test_report_refuses_a_folder_without_metrics(bench, tmp_path):
    good = fake_run(tmp_path / "good", [80.0])
    (tmp_path / "empty").mkdir()
    status, _, err = bench(f"report {good} {tmp_path / 'empty'} --out {tmp_path / 'out'}")
    assert status == 2 and "no metrics.jsonl" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def launch_command(tmp_path: Path, presets: str) -> str:
    """``report --launch`` training each of ``presets`` for one epoch of a tiny archive, into
    tmp_path/runs, reporting into tmp_path/out."""
    data = write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))
    config = tmp_path / "tiny.toml"
    config.write_text(
        'width = 0.25\nbatch_size = 50\neval_batch_size = 100\nepochs = 1\npipeline = "torch"\n'
    )
    return (
        f"report --launch --presets {presets} --budget 60 --config {config} --data {data} "
        f"--device cpu --runs-dir {tmp_path / 'runs'} --out {tmp_path / 'out'}"
    )


def test_report_launches_runs(bench, tmp_path):
    status, _, err = bench(launch_command(tmp_path, "cpu"))
    assert status == 0, err
    run = read_run(tmp_path / "runs" / "cpu-60s")
    assert run["summary"]["epochs_done"] == 1
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == PNG_MAGIC


def test_report_launch_trains_the_rest_after_a_refusal(bench, tmp_path, monkeypatch):
    # A refusal comes from the speed measured at a run's own start, so fake it for one preset:
    # the presets after it still train, the report holds them, and the refusal is one line.
    real_train = report_module.train

    def train(cfg, **kwargs):
        if cfg.preset == "baseline":
            raise BudgetTooShort("--budget 60 is too short on this machine now")
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(report_module, "train", train)
    status, out, err = bench(launch_command(tmp_path, "baseline cpu"))
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        "fastmbv1 bench: error: not trained: baseline: --budget 60 is too short on this machine now"
    )
    assert read_run(tmp_path / "runs" / "cpu-60s")["summary"]["epochs_done"] == 1
    assert "cpu-60s" in (tmp_path / "out" / "report.md").read_text() and "cpu-60s" in out


def test_report_function_returns_rows(tmp_path):
    rows = report([fake_run(tmp_path / "a", [85.0])], tmp_path / "out")
    assert rows[0]["tta_85"] == 10.0 and rows[0]["tta_90"] is None
