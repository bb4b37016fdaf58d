"""Where the time goes, shown: profiler traces with labelled regions, TensorBoard scalars."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_batches, tiny_config, write_archive
from torch.autograd import DeviceType

from fastmbv1.cli import main
from fastmbv1.profile import rank_ops
from fastmbv1.train import train


@pytest.fixture
def data(tmp_path):
    return write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))


def labels(trace_path) -> set[str]:
    """The names of the events in a Chrome-format trace (it must parse as JSON)."""
    return {e.get("name") for e in json.loads(trace_path.read_text())["traceEvents"]}


STEP_REGIONS = {"forward", "backward", "optimizer step"}


def test_bench_step_trace_has_the_step_regions_and_prints_top_operators(tmp_path, capsys):
    args = "bench step --device cpu --models mobilenet_v1 --widths 0.25 --channels-last on "
    args += f"--amp off --batch-size 8 --steps 1 --warmup 0 --trace {tmp_path / 't'}"
    assert main(args.split()) == 0
    [trace] = (tmp_path / "t").glob("*/*.pt.trace.json")
    assert labels(trace) >= STEP_REGIONS
    out = capsys.readouterr().out
    assert "operators by their own time" in out and "(depthwise)" in out and "(pointwise)" in out


def event(key, device_type, device_us, cpu_us=0.0, shapes=()):
    """One row of ``key_averages``, as the profiler hands it over."""
    return SimpleNamespace(
        key=key, count=1, input_shapes=list(shapes), device_type=device_type,
        self_device_time_total=device_us, self_cpu_time_total=cpu_us,
    )  # fmt: skip


def test_cuda_operator_table_counts_each_kernel_once():
    # On CUDA a kernel's 300 us are both the launching operator's self device time and the
    # kernel event's own: the table sums the operators, so the shares add up to the device
    # time once, and the depthwise convolution keeps its shape-given name.
    depthwise = [[8, 32, 16, 16], [32, 1, 3, 3]]
    events = [
        event("aten::cudnn_convolution", DeviceType.CPU, 300.0, 20.0, depthwise),
        event("void cudnn::depthwise_kernel", DeviceType.CUDA, 300.0),
        event("aten::add_", DeviceType.CPU, 100.0, 5.0),
        event("void elementwise_kernel", DeviceType.CUDA, 100.0),
        event("forward", DeviceType.CUDA, 400.0),  # a labelled region on the GPU timeline
    ]
    rows = rank_ops(events, torch.device("cuda"))
    assert [r["op"] for r in rows] == ["aten::cudnn_convolution (depthwise)", "aten::add_"]
    assert [r["self_ms"] for r in rows] == [0.3, 0.1]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert rows[0]["share"] == pytest.approx(0.75)


def test_bench_epoch_trace_has_data_augment_and_evaluation_regions(tmp_path, capsys):
    args = "bench epoch --device cpu --preset cpu --synthetic --images 256 --pipelines torch "
    args += f"--trace {tmp_path / 't'}"
    assert main(args.split()) == 0
    [trace] = (tmp_path / "t").glob("*/*.pt.trace.json")
    assert labels(trace) >= STEP_REGIONS | {"data wait", "augment", "evaluation"}


def test_train_profiles_steps_of_the_second_epoch_into_the_run_folder(tmp_path, data, capsys):
    train(tiny_config(tmp_path, data, epochs=2, profile_steps=3, cutout=8))
    [trace] = (tmp_path / "run" / "trace").glob("*.pt.trace.json")
    assert labels(trace) >= STEP_REGIONS | {"data wait", "augment"}
    assert "trace of 3 steps" in capsys.readouterr().out


def test_tensorboard_gets_the_epoch_scalars_and_the_config(tmp_path, data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(tmp_path, data, epochs=2, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"lr", "loss/train", "accuracy/train", "accuracy/test", "speed/images_per_s"}
    assert tags >= expected | {"time/data_wait_share", "time/eval_s"}
    assert [s.step for s in events.Scalars("accuracy/test")] == [1, 2]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_tensorboard_without_the_package_is_a_one_line_error_before_training(
    tmp_path, data, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    out = tmp_path / "run"
    status = main(["train", "--tensorboard", "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "pip install" in err
    assert not out.exists()
