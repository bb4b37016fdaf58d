import json
import re

import pytest

from fastmbv1.cli import main
from fastmbv1.info import model_cost
from fastmbv1.models import build_model

# facts.md: the original project's figures, and the conv + linear MACs that we count.
ORIGINAL_MACS = {"mobilenet_v1": 48.4e6, "custom_mobilenet": 28.4e6}
CONV_LINEAR_MACS = {"mobilenet_v1": 46_354_432, "custom_mobilenet": 25_552_896}
PARAMS = {"mobilenet_v1": 3_217_226, "custom_mobilenet": 1_001_642}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_info_json_counts_params_and_macs(name, capsys):
    argv = ["info", "--model", name, "--device", "cpu", "--repeats", "1", "--batch-size", "2"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] == PARAMS[name]
    assert report["macs"] == CONV_LINEAR_MACS[name]
    assert abs(report["macs_with_bn"] / ORIGINAL_MACS[name] - 1) < 0.01
    assert report["size_bytes"] > 4 * PARAMS[name]  # float32 weights plus BN buffers
    assert report["latency_ms"] > 0 and report["images_per_s"] > 0


def test_mobilenet_v1_macs_by_hand():
    # Stem 3x3x3x32 on 32x32; then per block 9*cin + cin*cout MACs per output pixel.
    blocks = [(32, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8),
              (256, 512, 4)] + [(512, 512, 4)] * 5 + [(512, 1024, 2), (1024, 1024, 2)]  # fmt: skip
    macs = 27 * 32 * 32 * 32 + sum((9 * cin + cin * cout) * s * s for cin, cout, s in blocks)
    assert model_cost(build_model("mobilenet_v1"))["macs"] == macs + 1024 * 10


def test_model_cost_keeps_the_training_mode():
    model = build_model("custom_mobilenet", width=0.25).train()
    model_cost(model)
    assert model.training


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet9000"], "unknown model"),
        (["--model", "mobilenet_v1", "--width", "0"], "--width must be > 0"),
        (["--checkpoint", "missing.pt"], "does not exist"),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert main(["info", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_printed_report_is_one_measure_a_line(capsys):
    argv = ["info", "--model", "mobilenet_v1", "--device", "cpu", "--repeats", "1"]
    assert main([*argv, "--batch-size", "2"]) == 0
    lines = [re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines()]
    assert [label for label, _ in lines] == [
        "model",
        "parameters",
        "MACs / image",
        "size on disk",
        "latency",
        "throughput",
    ]
    assert dict(lines)["parameters"] == f"{PARAMS['mobilenet_v1']:,}"
    assert dict(lines)["MACs / image"].startswith(f"{CONV_LINEAR_MACS['mobilenet_v1'] / 1e6:.2f} M")
