"""Score saved runs after recomputing every BN layer's running statistics as an exact mean
over N training images (half of them mirrored), instead of the run's moving average ("precise
BN"). Six views, the test batch read with pickle. Usage: python precise_bn.py RUN_DIR..."""

import json
import os
import pickle
import sys
import tarfile

import numpy as np
import torch
import torch.nn as nn

import fastmbv1

data = os.environ.get("FASTMBV1_DATA", "../shared/datasets/cifar10/cifar-10-python.tar.gz")
with tarfile.open(data) as tar:
    test = pickle.load(tar.extractfile("cifar-10-batches-py/test_batch"), encoding="bytes")
    train = pickle.load(tar.extractfile("cifar-10-batches-py/data_batch_1"), encoding="bytes")
x = torch.from_numpy(np.asarray(test[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)) / 255
y = torch.tensor(test[b"labels"])
x_train = torch.from_numpy(np.asarray(train[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)) / 255


def score(model: nn.Module) -> float:
    with torch.no_grad():
        hits = sum((model.eval()(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum().item()
                   for i in range(0, len(y), 1000))  # fmt: skip
    return 100 * hits / len(y)


for run in sys.argv[1:]:
    scores = {"as saved": score(fastmbv1.load(run + "/final.pt"))}
    for n in (5000, 10000):
        model = fastmbv1.load(run + "/final.pt").train()
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.reset_running_stats()
                bn.momentum = None  # a cumulative mean over every batch, not a moving one
        with torch.no_grad():
            for i in range(0, n, 500):
                batch = x_train[i : i + 500].clone()
                batch[::2] = batch[::2].flip(3)
                model.logits(batch)
        scores[f"precise over {n}"] = score(model)
    print(run.rstrip("/").split("/")[-1], json.dumps(scores), flush=True)
