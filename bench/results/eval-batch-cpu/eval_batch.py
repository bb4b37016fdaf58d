"""Evaluation speed by batch size on this machine: test images/s with flip TTA (two
forwards per image), or with --views 6 airbench's six views (--tta-translate), channels_last,
fp32, no_grad, on 2,000 random images; one untimed batch first. Usage, from the repository
root with the venv active:
python bench/results/eval-batch-cpu/eval_batch.py > bench/results/eval-batch-cpu/results.txt
python bench/results/eval-batch-cpu/eval_batch.py --views 6 > .../results-6views.txt
(--batches B... to time only some batch sizes)"""

import argparse
import platform
import time

import torch

import fastmbv1.models  # noqa: F401  (registers the models)
from fastmbv1.models.registry import build_model

parser = argparse.ArgumentParser()
parser.add_argument("--views", type=int, choices=(2, 6), default=2)
parser.add_argument("--batches", type=int, nargs="+", default=[1000, 500, 250, 128, 64, 32, 16])
args = parser.parse_args()
views = args.views
torch.manual_seed(0)
images = torch.rand(2000, 3, 32, 32).contiguous(memory_format=torch.channels_last)
machine = platform.processor() or platform.machine()
print(f"{machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, {views} views")
for name, width in (("custom_mobilenet", 1.0), ("mobilenet_v1", 0.5), ("mobilenet_v1", 0.25)):
    model = build_model(name, width=width, tta=True, tta_translate=views == 6)
    model = model.to(memory_format=torch.channels_last).eval()
    for batch in args.batches:
        with torch.no_grad():
            model(images[:batch])
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                model(images[i : i + batch])
            seconds = time.perf_counter() - start
        speed = len(images) / seconds
        print(f"{name} width {width:g} eval batch {batch:4d}: {speed:7,.0f} test images/s")
