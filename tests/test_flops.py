"""FLOPs and bytes counted from the layer shapes, the cached peaks, and the MFU and AU that a
training run reports against them."""

import json

import pytest
import torch
from conftest import tiny_batches, tiny_config, write_archive

from fastmbv1 import peak
from fastmbv1.flops import layer_costs, model_flops_per_image, training_flops_per_image
from fastmbv1.metrics import format_utilisation, utilisation
from fastmbv1.models import build_model
from fastmbv1.models.mobilenet import BLOCKS, STEM, scaled
from fastmbv1.state import Totals
from fastmbv1.train import train


def mobilenet_macs(width: float) -> tuple[int, int]:
    """(all conv + linear MACs, the stem's) of MobileNetV1 on one 32x32 image, by hand."""
    channels = [scaled(c, width) for c in [STEM] + [c for c, _ in BLOCKS]]
    stem = 32 * 32 * 3 * 9 * channels[0]
    macs, side = stem, 32
    for cin, cout, (_, stride) in zip(channels, channels[1:], BLOCKS, strict=False):
        side //= stride
        macs += side * side * cin * 9 + side * side * cin * cout  # depthwise, pointwise
    return macs + channels[-1] * 10, stem


@pytest.mark.parametrize("width", [1.0, 0.5, 0.25])
def test_flops_per_image_agree_with_the_layer_shapes(width):
    macs, stem = mobilenet_macs(width)
    costs = layer_costs(build_model("mobilenet_v1", width=width))
    matmul = [c for c in costs if c.macs]
    assert sum(c.forward_flops for c in matmul) == 2 * macs  # forward: 2 x the MACs
    # Training: grad-input and grad-weight each cost a forward, but the stem's input is data.
    assert model_flops_per_image(costs) == 6 * macs - 2 * stem
    # "About 6 x": within 3.5 % (5.87 at width 0.25, where the stem is 6.6 % of the MACs),
    # the stem's missing grad-input being all of the difference.
    assert 5.8 <= model_flops_per_image(costs) / macs <= 6.0


def test_depthwise_backward_counts_twice_its_forward_not_as_if_dense():
    costs = layer_costs(build_model("mobilenet_v1", width=1.0))
    depthwise = [c for c in costs if c.kind == "depthwise"]
    assert [c.name for c in depthwise] == [f"dw{i}" for i in range(1, 14)]
    side = 32
    for c, (_, stride) in zip(depthwise, BLOCKS, strict=True):
        side //= stride
        assert c.macs == c.in_shape[0] * 9 * side * side  # 9 MACs per output, one channel in
        assert c.backward_flops == 2 * c.forward_flops  # FlopCounterMode: 65x at 64 channels


def test_bytes_follow_the_rule_each_tensor_once_per_pass():
    costs = {c.name: c for c in layer_costs(build_model("mobilenet_v1", width=1.0))}
    dw1, stem = costs["dw1"], costs["stem"]
    # forward x, y; backward dy, x, dx: five 32x32x32 activations; weights w, then w and dw
    assert dw1.bytes(128, 4) == 128 * 5 * 32 * 32 * 32 * 4 + 3 * 32 * 9 * 4
    assert dw1.bytes(128, 2) == 128 * 5 * 32 * 32 * 32 * 2 + 3 * 32 * 9 * 4  # bf16 activations
    # The stem makes no gradient for its input, so reads no weights backward either.
    assert stem.bytes(1, 4) == (3 * 1024 * 2 + 32 * 1024 * 2) * 4 + 2 * 32 * 27 * 4
    # A batch norm and the ReLU on its output are one layer; the model has 27 of them.
    assert sum(c.kind == "bn+relu" for c in costs.values()) == 27


def test_counting_leaves_the_model_as_it_was():
    model = build_model("custom_mobilenet", width=0.25).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops = training_flops_per_image(model)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])  # BN statistics untouched
    # Progressive resizing: half the side, about a quarter of the arithmetic.
    assert 0.2 < training_flops_per_image(model, 16) / flops < 0.3


def test_peaks_are_cached_per_machine_keeping_the_highest(small_peaks):
    cpu = torch.device("cpu")
    assert peak.cached_peak(cpu, "fp32") is None
    measured = peak.measure_peaks(cpu, ["fp32"])
    assert measured["flops"]["fp32"] > 0 and measured["bandwidth"] > 0
    cached = json.loads(peak.cache_file().read_text())[peak.machine_key(cpu)]
    assert cached["flops"]["fp32"]["flops_per_s"] == measured["flops"]["fp32"]
    assert cached["bandwidth"]["buffer_bytes"] == 8 * 2**20
    peak.remember(cpu, {"fp32": 1.0, "bf16": 7.0}, 1.0)  # a slower reading replaces nothing
    assert peak.cached_peak(cpu, "fp32")["flops_per_s"] == measured["flops"]["fp32"]
    assert peak.cached_peak(cpu, "bf16")["flops_per_s"] == 7.0
    assert peak.cached_peaks(cpu)["bandwidth"]["bytes_per_s"] == measured["bandwidth"]
    peak.remember(cpu, {"fp32": 1e15}, None)
    assert peak.cached_peak(cpu, "fp32")["flops_per_s"] == 1e15


def test_a_run_reports_mfu_against_the_cached_peak_and_au_without_measuring(
    tmp_path, monkeypatch, capsys
):
    cpu = torch.device("cpu")
    peak.remember(cpu, {"fp32": 1e12}, None)

    def never(*args, **kwargs):
        raise AssertionError("a training run measured the peak")

    monkeypatch.setattr(peak, "matmul_flops", never)
    monkeypatch.setattr(peak, "copy_bandwidth", never)
    data = write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))
    summary = train(tiny_config(tmp_path, data, epochs=2)).summary
    images = 2 * (200 // 32) * 32  # two epochs of 6 batches of 32
    flops = training_flops_per_image(build_model("mobilenet_v1", width=0.25))
    assert summary["model_flops"] == images * flops
    busy = summary["train_s"] - summary["compile_s"]
    assert summary["achieved_flops_per_s"] == pytest.approx(images * flops / busy)
    assert summary["mfu"] == pytest.approx(summary["achieved_flops_per_s"] / 1e12)
    assert summary["peak_dtype"] == "fp32" and summary["peak_flops_per_s"] == 1e12
    assert 0.5 < summary["au"] <= 1.0 and summary["compute_s"] <= busy
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"machine use: MFU {summary['mfu']:.1%}")
    assert f"AU {summary['au']:.1%}" in last
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["mfu"] == summary["mfu"] and saved["au"] == summary["au"]


def test_without_a_cached_peak_mfu_is_unknown_and_says_how_to_measure_it():
    totals = Totals(train_s=10.0, compile_s=2.0, compute_s=6.0, model_flops=8e9)
    summary = {**vars(totals), **utilisation(totals, "bf16", None)}
    assert summary["mfu"] is None and summary["au"] == 0.75
    assert summary["achieved_flops_per_s"] == 1e9
    line = format_utilisation(summary)
    assert "no bf16 matmul peak is cached" in line and "fastmbv1 bench peak" in line
    assert "AU 75.0%" in line
