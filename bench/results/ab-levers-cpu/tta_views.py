"""Score saved runs with one view, flip TTA (2 views) and airbench's 6 views: the same
weights, the test batch read with pickle. Usage: python tta_views.py RUN_DIR..."""

import json
import os
import sys
from pathlib import Path

import fastmbv1

VIEWS = {"1view": (False, False), "2views": (True, False), "6views": (True, True)}

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/: independent_score
from independent_score import accuracy, cifar_batch  # noqa: E402

data = os.environ.get("FASTMBV1_DATA", "../shared/datasets/cifar10/cifar-10-python.tar.gz")
x, y = cifar_batch(data)
for run in sys.argv[1:]:
    model = fastmbv1.load(run + "/final.pt")
    scores = {}
    for name, (tta, translate) in VIEWS.items():
        model.tta, model.tta_translate = tta, translate
        scores[name] = accuracy(model, x, y)
    print(run.rstrip("/").split("/")[-1], json.dumps(scores), flush=True)
