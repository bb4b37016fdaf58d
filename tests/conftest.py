"""Shared fixtures: tiny CIFAR-10 archives in the real format, and the real copy."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10" / "cifar-10-python.tar.gz"
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def tiny_batches(per_batch: int = 8, seed: int = 0) -> dict[str, dict]:
    """Batch dicts exactly like the originals (bytes keys, (N, 3072) uint8, label lists)."""
    rng = np.random.default_rng(seed)
    return {
        name: {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        for name in BATCHES
    }


def write_folder(root: Path, batches: dict[str, dict]) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, d in batches.items():
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": []}, protocol=2))
    return folder


def write_archive(path: Path, batches: dict[str, dict]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, d in batches.items():
            raw = pickle.dumps(d, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture
def tiny_archive(tmp_path) -> Path:
    return write_archive(tmp_path / "cifar-10-python.tar.gz", tiny_batches())


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own cache and no $FASTMBV1_DATA, unless it asks for the shared one."""
    monkeypatch.setenv("FASTMBV1_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTMBV1_DATA", raising=False)


@pytest.fixture
def small_peaks(monkeypatch):
    """The peak microbenchmarks at a test's size (a 1 GiB copy and a 2048 matmul are for
    measuring a machine, not for a test)."""
    from fastmbv1 import peak

    monkeypatch.setattr(peak, "COPY_BYTES", 8 * 2**20)
    monkeypatch.setitem(peak.MATMUL_SIDE, "cpu", 128)


@pytest.fixture(scope="session")
def real_cifar_path() -> Path:
    if not REAL_CIFAR.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"the real CIFAR-10 copy is missing at {REAL_CIFAR}")
        pytest.skip(f"no real CIFAR-10 copy at {REAL_CIFAR}")
    return REAL_CIFAR


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory) -> Path:
    """One decoded cache of the real data for the whole session (decoding takes seconds)."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture
def real_cifar(real_cifar_path, real_cache, monkeypatch):
    from pipelines.cifar10 import load_cifar10

    monkeypatch.setenv("FASTMBV1_CACHE", str(real_cache))
    return load_cifar10(real_cifar_path)


def with_data_statistics(model):
    """``model`` in eval mode with BN statistics of one batch of random images, not the
    defaults: its logits have a sane scale and its answers differ from image to image."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch sets the statistics outright
    with torch.no_grad():
        model.train()(torch.rand(64, 3, 32, 32))
    return model.eval()


def logits_in_fresh_process(path: Path, x, tmp_path: Path):
    """What ``fastmbv1.load(path)`` returns for ``x`` in a new Python process."""
    import subprocess
    import sys

    import torch

    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch, fastmbv1; m = fastmbv1.load(sys.argv[1]);"
        "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])"
    )
    args = [str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    subprocess.run([sys.executable, "-c", code, *args], check=True, timeout=120)
    return torch.load(tmp_path / "y.pt")


def independent_score(model_file: Path, archive: Path, limit: int | None = None) -> float:
    """Test accuracy (percent) of a saved model by ``bench/independent_score.py``: the test
    batch (its first ``limit`` images) read from the archive with pickle, none of the
    trainer's data or evaluation code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "independent_score", ROOT / "bench" / "independent_score.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.score(model_file, archive, limit)


def tiny_config(tmp_path: Path, data, name: str = "run", **fields):
    """A quick run's config: quarter width, small batches, the torch pipeline, an evaluation
    every epoch, written to ``tmp_path / name``; ``fields`` override any of it."""
    from fastmbv1.plan import make_config

    base = dict(
        preset="cpu",
        data=str(data),
        out=str(tmp_path / name),
        width=0.25,
        epochs=2,
        batch_size=32,
        eval_batch_size=64,
        pipeline="torch",
        eval_every=1,
    )
    return make_config({**base, **fields})


def tiny_classifier(
    width=1.0, normalize=True, dropout=0.0, tta=False, tta_translate=False, num_classes=10
):
    """Normalise, pool, classify: a network Inductor compiles in a few kernels, not minutes,
    and one without depthwise blocks (it takes no ``depthwise_relu``)."""
    import torch

    from fastmbv1.models.mobilenet import Classifier

    identity = torch.nn.Identity()
    return Classifier(identity, identity, 3, num_classes, normalize, dropout, tta, tta_translate)
