"""Score a run's final.pt apart from the trainer: fastmbv1.load, and the test batch read
straight from the CIFAR-10 archive with pickle (not through the project's data loader).

    python bench/independent_score.py RUN_DIR [ARCHIVE]   # prints one JSON line

The tests score runs with ``score`` too, so that a fault shared by the trainer's evaluation
and ``fastmbv1 eval`` (decoding, pipeline, ``evaluate``) cannot hide itself.
"""

import json
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

import fastmbv1

ARCHIVE = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10/cifar-10-python.tar.gz"


def cifar_batch(archive=ARCHIVE, name: str = "test_batch") -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file of the archive, read with pickle: its images as floats in [0, 1],
    (N, 3, 32, 32), and its labels."""
    with tarfile.open(archive) as tar:
        batch = pickle.load(tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(images).float().div(255), torch.tensor(batch[b"labels"])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Percent of ``x`` that ``model`` labels as ``y``, in forwards of 1,000 images."""
    with torch.no_grad():
        correct = sum(
            (model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum().item()
            for i in range(0, len(x), 1000)
        )
    return 100 * correct / len(x)


def score(model_file, archive=ARCHIVE, limit: int | None = None) -> float:
    """Test accuracy (percent) of ``fastmbv1.load(model_file)`` on the archive's test batch
    (its first ``limit`` images, as ``--test-limit`` takes them)."""
    x, y = cifar_batch(archive)
    return accuracy(fastmbv1.load(model_file), x[:limit], y[:limit])


def main() -> None:
    run = Path(sys.argv[1])
    archive = sys.argv[2] if len(sys.argv) > 2 else ARCHIVE
    summary = json.loads((run / "summary.json").read_text())
    print(json.dumps({
        "run": str(run), "independent_test_acc": score(run / "final.pt", archive),
        "reported_final_test_acc": summary["final_test_acc"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
