"""Score a run's final.pt apart from the trainer: fastmbv1.load, and the test batch read
straight from the CIFAR-10 archive with pickle (not through the project's data loader).

    python bench/independent_score.py RUN_DIR [ARCHIVE]   # prints one JSON line
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


def main() -> None:
    run = Path(sys.argv[1])
    archive = sys.argv[2] if len(sys.argv) > 2 else ARCHIVE
    model = fastmbv1.load(run / "final.pt")
    with tarfile.open(archive) as tar:
        test = pickle.load(tar.extractfile("cifar-10-batches-py/test_batch"), encoding="bytes")
    images = np.asarray(test[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    x = torch.from_numpy(images).float().div(255)
    y = torch.tensor(test[b"labels"])
    with torch.no_grad():
        correct = sum(
            (model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum().item()
            for i in range(0, len(x), 1000)
        )
    summary = json.loads((run / "summary.json").read_text())
    print(json.dumps({
        "run": str(run), "independent_test_acc": 100 * correct / len(x),
        "reported_final_test_acc": summary["final_test_acc"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
