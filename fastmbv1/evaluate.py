"""Test-set accuracy: in eval mode, without gradients, under the run's autocast."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from fastmbv1.checkpoint import load
from fastmbv1.config import default_eval_batch
from fastmbv1.machine import pick_device
from pipelines import build_pipeline
from pipelines.cifar10 import load_cifar10


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def batch_dtype(amp: str) -> torch.dtype:
    """Under autocast the pipelines hand over half-size batches: the first conv casts anyway."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches, device: torch.device, amp: str = "off", channels_last: bool = True
) -> tuple[int, int]:
    """(correct, total) over one pass of ``batches``; restores the model's training mode.

    Every batch is as large as the first: a shorter last one is padded with zeros (scored
    only on its own images), so a compiled model sees one static shape.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total, size = 0, None
    for x, y in batches:
        if not channels_last:
            x = x.contiguous()
        n = len(y)
        size = size or n
        with autocast(device, amp):
            logits = model(pad_batch(x, size))[:n]
        correct += (logits.argmax(1) == y).sum()
        total += n
    model.train(was_training)
    return int(correct), total


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` followed by zero images up to ``size``, in ``x``'s memory format."""
    if len(x) >= size:
        return x
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    padded = x.new_zeros(size, *x.shape[1:]).contiguous(memory_format=layout)
    padded[: len(x)] = x
    return padded


def evaluate_checkpoint(path: str, data: str | None = None, device: str = "auto") -> float:
    """Test accuracy (percent) of a saved model on the CIFAR-10 test set; writes nothing."""
    dev = pick_device(device)
    model = load(path).to(dev)
    cifar = load_cifar10(data)
    batches = build_pipeline(
        "torch",
        cifar.test_images,
        cifar.test_labels,
        batch_size=default_eval_batch(dev.type == "cuda", model.views),
        train=False,
        device=dev,
        seed=0,
    )
    correct, total = evaluate(model, batches, dev)
    return 100.0 * correct / total
