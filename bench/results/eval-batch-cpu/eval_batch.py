"""Evaluation speed by batch size on this machine: test images/s with flip TTA (two
forwards per image), channels_last, fp32, no_grad, on 2,000 random images; one untimed
batch first. Usage, from the repository root with the venv active:
python bench/results/eval-batch-cpu/eval_batch.py > bench/results/eval-batch-cpu/results.txt"""

import platform
import time

import torch

import fastmbv1.models  # noqa: F401  (registers the models)
from fastmbv1.models.registry import build_model

torch.manual_seed(0)
images = torch.rand(2000, 3, 32, 32).contiguous(memory_format=torch.channels_last)
machine = platform.processor() or platform.machine()
print(f"{machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
for name, width in (("custom_mobilenet", 1.0), ("mobilenet_v1", 0.5), ("mobilenet_v1", 0.25)):
    model = build_model(name, width=width, tta=True).to(memory_format=torch.channels_last).eval()
    for batch in (1000, 500, 250, 128, 64, 32):
        with torch.no_grad():
            model(images[:batch])
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                model(images[i : i + batch])
            seconds = time.perf_counter() - start
        speed = len(images) / seconds
        print(f"{name} width {width:g} eval batch {batch:4d}: {speed:7,.0f} test images/s")
