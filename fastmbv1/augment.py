"""Batch-level regularisation on the training device: mixup, cutmix and cutout.

Whole-batch tensor operations only, no loop over samples. Every random draw comes from the
one ``torch.Generator`` passed in, so a seeded generator replays the same augmentation.
The generator lives on the host: scalars (lam, the mixup-or-cutmix choice, the box) are read
there without touching a GPU, and the per-sample tensors (permutation, cutout centres) travel
to the batch's device through pinned memory without blocking, so no step waits for them. The
same seed gives the same batches on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

FULL_SIDE = 32  # CIFAR-10's images
RESIZE_UNTIL = 0.5  # progressive resizing reaches the full side half way through the schedule


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; a copy from pageable memory would block until it is done."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _uniform(generator: torch.Generator) -> float:
    return torch.rand((), generator=generator).item()


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (), generator=generator))


def _beta(alpha: float, generator: torch.Generator) -> float:
    # torch.distributions.Beta takes no generator; Beta(a, a) = G1 / (G1 + G2) with
    # G ~ Gamma(a, 1), and torch._standard_gamma does take one.
    concentration = torch.full((2,), alpha, dtype=torch.float64)
    g = torch._standard_gamma(concentration, generator=generator)
    return (g[0] / g.sum()).item()


def _paste_box(
    x: torch.Tensor, perm: torch.Tensor, lam: float, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    """CutMix (Yun et al., clovaai reference): paste a box of area ~(1 - lam) from x[perm].

    The box is centred uniformly and clipped at the borders, so the returned lam is
    recomputed from the area actually pasted.
    """
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy, cx = _randint(h, generator), _randint(w, generator)
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    out = x.clone()
    out[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    return out, 1.0 - (y2 - y1) * (x2 - x1) / (h * w)


def mix(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mixup: float,
    cutmix: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mix a batch with a shuffled copy of itself; returns (x, y_a, y_b, lam).

    mixup (facebookresearch/mixup-cifar10): lam ~ Beta(mixup, mixup) and
    x = lam * x + (1 - lam) * x[perm]. cutmix: lam ~ Beta(cutmix, cutmix), a box of area
    (1 - lam) is pasted from x[perm] and lam becomes 1 - pasted area / image area. With both
    alphas > 0 each batch uses one of the two, chosen with probability 0.5; with both 0 the
    batch passes through as (x, y, y, 1.0). Train on ``mixed_loss(criterion, logits, y_a,
    y_b, lam)``. ``x`` is not modified in place.
    """
    if mixup <= 0 and cutmix <= 0:
        return x, y, y, 1.0
    use_cutmix = cutmix > 0 and (mixup <= 0 or _uniform(generator) < 0.5)
    perm = _to(torch.randperm(x.shape[0], generator=generator), x.device)
    if use_cutmix:
        x_mixed, lam = _paste_box(x, perm, _beta(cutmix, generator), generator)
    else:
        lam = _beta(mixup, generator)
        x_mixed = lam * x + (1.0 - lam) * x[perm]
    return x_mixed, y, y[perm], lam


def mixed_loss(
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    y_a: torch.Tensor,
    y_b: torch.Tensor,
    lam: float | torch.Tensor,
) -> torch.Tensor:
    """lam * criterion(logits, y_a) + (1 - lam) * criterion(logits, y_b).

    ``lam`` may be a 0-d tensor on the logits' device (a captured CUDA graph reads it there);
    it is then never compared on the host, which would wait for the device.
    """
    if isinstance(lam, float) and lam == 1.0:  # an unmixed batch: one loss, not two
        return criterion(logits, y_a)
    return lam * criterion(logits, y_a) + (1.0 - lam) * criterion(logits, y_b)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Cutout (DeVries & Taylor): zero a size x size square per sample, clipped at the borders.

    Centres are uniform over the whole image, so squares near an edge are cut short. The
    square spans [c - size // 2, c - size // 2 + size) on each axis: for even sizes exactly
    DeVries & Taylor's box, for odd ones the full ``size`` rather than their ``size - 1``.
    The model normalises inside, so zero here is black, not the data-set mean.
    """
    if size <= 0:
        return x
    n, _, h, w = x.shape
    top = _to(torch.randint(h, (n, 1), generator=generator) - size // 2, x.device)
    left = _to(torch.randint(w, (n, 1), generator=generator) - size // 2, x.device)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + size)  # (n, h)
    in_cols = (cols >= left) & (cols < left + size)  # (n, w)
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (n, 1, h, w)
    # In place on a copy that keeps x's layout: masked_fill would return a contiguous tensor
    # and drop channels_last.
    return x.clone(memory_format=torch.preserve_format).masked_fill_(mask, 0)


def side_at(start: int, progress: float) -> int:
    """Progressive resizing: the image side at ``progress`` through the schedule, growing
    linearly from ``start`` pixels to the full 32 at ``RESIZE_UNTIL``, by 4 pixels."""
    if start >= FULL_SIDE:
        return FULL_SIDE
    side = start + (FULL_SIDE - start) * min(1.0, progress / RESIZE_UNTIL)
    return min(FULL_SIDE, int(side) // 4 * 4)


def augment_batch(
    x: torch.Tensor, y: torch.Tensor, cfg, generator: torch.Generator, side: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """A training batch as the recipe ``cfg`` (a TrainConfig) regularises it: scaled down to
    ``side`` pixels (progressive resizing), cutout, then mixup or cutmix; returns ``mix``'s
    (x, y_a, y_b, lam)."""
    if side < x.shape[-1]:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
    if not cfg.channels_last:
        x = x.contiguous()
    if cfg.cutout:
        x = cutout(x, cfg.cutout, generator)
    return mix(x, y, mixup=cfg.mixup, cutmix=cfg.cutmix, generator=generator)
