"""Score saved runs after recomputing every BN layer's running statistics as an exact mean
over N training images (half of them mirrored), instead of the run's moving average ("precise
BN"). Six views, the test batch read with pickle. Usage: python precise_bn.py RUN_DIR..."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

import fastmbv1

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/: independent_score
from independent_score import accuracy, cifar_batch  # noqa: E402

data = os.environ.get("FASTMBV1_DATA", "../shared/datasets/cifar10/cifar-10-python.tar.gz")
x, y = cifar_batch(data)
x_train, _ = cifar_batch(data, "data_batch_1")


def score(model: nn.Module) -> float:
    return accuracy(model.eval(), x, y)


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
