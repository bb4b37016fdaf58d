"""Score saved runs with view sets beyond airbench's six: every 1-pixel shift (border
reflected) of each test image, each with its mirror, combined in several ways. The same
weights, the test batch read with pickle. Usage: python more_views.py RUN_DIR..."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fastmbv1

SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/: independent_score
from independent_score import cifar_batch  # noqa: E402

data = os.environ.get("FASTMBV1_DATA", "../shared/datasets/cifar10/cifar-10-python.tar.gz")
x, y = cifar_batch(data)


def accuracy(logits: torch.Tensor) -> float:
    return round(100 * (logits.argmax(1) == y).float().mean().item(), 2)


def mean(logits: dict, shifts: list) -> torch.Tensor:
    return sum(logits[s] for s in shifts) / len(shifts)


for run in sys.argv[1:]:
    model = fastmbv1.load(run + "/final.pt").eval()
    logits = {s: [] for s in SHIFTS}  # each shift's mean over the view and its mirror
    with torch.no_grad():
        for i in range(0, len(y), 500):
            padded = F.pad(x[i : i + 500], (1, 1, 1, 1), mode="reflect")
            for dy, dx in SHIFTS:
                view = padded[:, :, 1 + dy : 33 + dy, 1 + dx : 33 + dx]
                both = model.logits(torch.cat([view, view.flip(3)])).unflatten(0, (2, -1))
                logits[(dy, dx)].append(both.mean(0))
    logits = {s: torch.cat(v) for s, v in logits.items()}

    centre = logits[(0, 0)]
    diagonal, cross = [(-1, -1), (1, 1), (-1, 1), (1, -1)], [(-1, 0), (1, 0), (0, -1), (0, 1)]
    scores = {
        "2 (flip TTA)": accuracy(centre),
        "6 (the model's: centre half, up-left and down-right a quarter each)": accuracy(
            0.5 * centre + 0.5 * mean(logits, [(-1, -1), (1, 1)])
        ),
        "6 equal": accuracy(mean(logits, [(0, 0), (-1, -1), (1, 1)])),
        "10, the four diagonal shifts": accuracy(0.5 * centre + 0.5 * mean(logits, diagonal)),
        "10, the four straight shifts": accuracy(0.5 * centre + 0.5 * mean(logits, cross)),
        "18, centre half": accuracy(0.5 * centre + 0.5 * mean(logits, diagonal + cross)),
        "18 equal": accuracy(mean(logits, SHIFTS)),
    }
    print(run.rstrip("/").split("/")[-1], json.dumps(scores), flush=True)
