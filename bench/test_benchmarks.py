"""The ``fastmbv1 bench`` measurements as pytest-benchmark benchmarks (never in ``make test``).

    pytest bench/                                   # real CIFAR-10 when found, else random
    FASTMBV1_BENCH_IMAGES=50000 FASTMBV1_BENCH_DEVICE=cuda pytest bench/ --benchmark-json=b.json

Each round calls the same function as the command line; its own figures (images/s, the
data share of an epoch) go into the benchmark's ``extra_info``. The file is not named
test_bench.py: tests/ has one, and two test modules of one name cannot share a session.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fastmbv1.config import narrowest
from fastmbv1.machine import pick_device
from fastmbv1.measure.budget import project_budget
from fastmbv1.measure.epoch import profile_epoch
from fastmbv1.measure.inputs import load_data
from fastmbv1.measure.loaders import measure_loader
from fastmbv1.plan import make_config, resolve
from fastmbv1.timing import measure_step
from pipelines import unavailable

ROOT = Path(__file__).resolve().parents[1]
REAL_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10" / "cifar-10-python.tar.gz"
IMAGES = int(os.environ.get("FASTMBV1_BENCH_IMAGES", "5000"))
DEVICE = pick_device(os.environ.get("FASTMBV1_BENCH_DEVICE", "auto"))
# The CPU cannot afford full widths and batches in a benchmark round; a GPU can.
PRESET = "fast" if DEVICE.type == "cuda" else "cpu"
PIPELINES = [("dali", 0), ("torch", 0), ("torchvision", 0), ("torchvision", os.cpu_count())]


@pytest.fixture(scope="module")
def data():
    source = os.environ.get("FASTMBV1_DATA") or (REAL_CIFAR if REAL_CIFAR.is_file() else None)
    return load_data(source and str(source), IMAGES, synthetic=source is None)


def preset(**fields):
    cfg = make_config({"preset": PRESET, "device": DEVICE.type, **fields})
    return narrowest(resolve(cfg, DEVICE)[0])


def skip_unavailable(name: str) -> None:
    reason = unavailable(name, DEVICE)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("name, workers", PIPELINES, ids=lambda v: str(v))
def test_loader(benchmark, data, name, workers):
    skip_unavailable(name)
    options = {"num_workers": workers} if name == "torchvision" else {}
    result = benchmark.pedantic(
        measure_loader,
        args=(name, data.train_images, data.train_labels),
        kwargs={"batch_size": preset().batch_size, "device": DEVICE, **options},
        rounds=3,
    )
    benchmark.extra_info.update(result)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("amp", ["off", "bf16"])
@pytest.mark.parametrize("width", [1.0, 0.5])
@pytest.mark.parametrize("model", ["mobilenet_v1", "custom_mobilenet"])
def test_step(benchmark, model, width, amp, channels_last):
    cfg = preset(model=model, width=width, amp=amp, channels_last=channels_last)
    result = benchmark.pedantic(measure_step, args=(cfg, DEVICE), kwargs={"steps": 5}, rounds=1)
    benchmark.extra_info.update(result)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiling on a CPU takes minutes")
def test_step_compiled(benchmark):
    result = benchmark.pedantic(measure_step, args=(preset(compile=True), DEVICE), rounds=1)
    benchmark.extra_info.update(result)


@pytest.mark.parametrize("name, workers", PIPELINES, ids=lambda v: str(v))
def test_epoch(benchmark, data, name, workers):
    skip_unavailable(name)
    cfg = replace(preset(), pipeline=name, num_workers=workers)
    result = benchmark.pedantic(
        profile_epoch, args=(cfg, data.train_images, data.train_labels, DEVICE), rounds=1
    )
    benchmark.extra_info.update(result)


def test_budget(benchmark, data):
    result = benchmark.pedantic(project_budget, args=(preset(), data, DEVICE), rounds=1)
    benchmark.extra_info.update(result)
