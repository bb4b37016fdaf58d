"""Images per second each data pipeline delivers on real CIFAR-10, consumed on the device.

python bench/loaders.py --device cpu --batch-size 512
python bench/loaders.py --pipelines dali torch torchvision:num_workers=2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fastmbv1.errors import UserError
from pipelines import MODULES, build_pipeline, unavailable


def measure_loader(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    device: torch.device | str,
    epochs: int = 1,
    **options,
) -> dict:
    """Time ``epochs`` full training epochs of pipeline ``name`` (built outside the timing)."""
    device = torch.device(device)
    pipeline = build_pipeline(name, images, labels, batch_size=batch_size, train=True,
                              device=device, seed=0, **options)  # fmt: skip
    total = torch.zeros((), device=device)
    count = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for x, _y in pipeline:
            # A reduction on the device makes every batch exist there, however lazy or
            # asynchronous the pipeline is; .item() below waits for the last one.
            total += x.sum(dtype=torch.float32)
            count += len(x)
    total.item()
    seconds = time.perf_counter() - start
    return {"pipeline": name, "batch_size": batch_size, "device": str(device), "images": count,
            "seconds": seconds, "images_per_s": count / seconds, **options}  # fmt: skip


def parse_spec(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=int,...``, e.g. ``torchvision:num_workers=2``."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if not value.lstrip("-").isdigit():
            raise UserError(f"pipeline option {item!r} in {spec!r} is not key=integer")
        options[key] = int(value)
    return name, options


def main() -> None:
    from pipelines.cifar10 import load_cifar10

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="CIFAR-10 archive or folder (default: the usual search)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--pipelines", nargs="+", metavar="NAME[:key=value,...]",
                        default=[*MODULES, "torchvision:num_workers=2"])  # fmt: skip
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    try:
        data = load_cifar10(args.data)
        results = []
        for name, options in map(parse_spec, args.pipelines):
            reason = unavailable(name, args.device)
            if reason is not None:
                print(f"{name}: skipped ({reason})")
                continue
            results.append(measure_loader(name, data.train_images, data.train_labels,
                                          batch_size=args.batch_size, device=args.device,
                                          epochs=args.epochs, **options))  # fmt: skip
            r = results[-1]
            label = name + "".join(f" {k}={v}" for k, v in options.items())
            print(f"{label:28s} {r['device']:6s} batch {r['batch_size']:4d}  "
                  f"{r['images']:7d} images  {r['seconds']:7.2f} s  "
                  f"{r['images_per_s']:9.0f} images/s", flush=True)  # fmt: skip
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
