"""Score saved runs with one view, flip TTA (2 views) and airbench's 6 views: the same
weights, the test batch read with pickle. Usage: python tta_views.py RUN_DIR..."""

import json
import os
import pickle
import sys
import tarfile

import numpy as np
import torch

import fastmbv1

VIEWS = {"1view": (False, False), "2views": (True, False), "6views": (True, True)}

data = os.environ.get("FASTMBV1_DATA", "../shared/datasets/cifar10/cifar-10-python.tar.gz")
with tarfile.open(data) as tar:
    test = pickle.load(tar.extractfile("cifar-10-batches-py/test_batch"), encoding="bytes")
x = torch.from_numpy(np.asarray(test[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)) / 255
y = torch.tensor(test[b"labels"])
for run in sys.argv[1:]:
    model = fastmbv1.load(run + "/final.pt")
    scores = {}
    for name, (tta, translate) in VIEWS.items():
        model.tta, model.tta_translate = tta, translate
        with torch.no_grad():
            hits = sum((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum().item()
                       for i in range(0, len(y), 1000))  # fmt: skip
        scores[name] = 100 * hits / len(y)
    print(run.rstrip("/").split("/")[-1], json.dumps(scores), flush=True)
