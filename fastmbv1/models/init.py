"""Initialisations that start a network closer to where training takes it (airbench's).

``whiten_stem`` sets the stem's filters from the training images: the eigenvectors of the
covariance of their 3x3 patches, largest first, each scaled by one over the square root of
its eigenvalue, and each twice, as itself and its negative, so that after BN and ReLU both
signs of every component pass. A stem with C filters gets the top C/2 components: at width
0.25 (8 filters) the top 4, which hold most of the patches' variance (the mean brightness
and the two smoothest gradients come first). ``dirac_pointwise`` makes each pointwise conv
the identity on as many channels as it has inputs and outputs in common, so that a block
starts by passing its depthwise conv's output on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The first images of the training set whose patches are whitened: ~0.9 M patches.
WHITEN_IMAGES = 1000
EPS = 5e-4  # added to the eigenvalues, so the faintest components are not blown up


@torch.no_grad()
def whiten_stem(model: nn.Module, images: np.ndarray) -> None:
    """Set ``model.stem[0]`` (a conv) from the patch whitening of ``images`` (N, 32, 32, 3)
    uint8, as the model sees them (after its own normalisation). A model whose stem does not
    start with a conv is left as it is, as ``dirac_pointwise`` leaves one without blocks."""
    stem = getattr(model, "stem", None)
    conv = stem[0] if isinstance(stem, nn.Sequential) else None
    if not isinstance(conv, nn.Conv2d):
        return
    x = torch.tensor(images[:WHITEN_IMAGES]).permute(0, 3, 1, 2)  # a copy: the cache is read-only
    x = model.normalize(x.float().div(255))
    patches = F.unfold(x, conv.kernel_size).transpose(1, 2).flatten(0, 1).double()
    values, vectors = torch.linalg.eigh(patches.T @ patches / len(patches))  # ascending
    top = min(conv.out_channels // 2, len(values))
    values, vectors = values.flip(0)[:top], vectors.flip(1)[:, :top].T
    filters = (vectors / (values + EPS).sqrt()[:, None]).view(top, *conv.weight.shape[1:])
    conv.weight[:top] = filters.to(conv.weight.dtype)
    conv.weight[top : 2 * top] = -filters.to(conv.weight.dtype)


@torch.no_grad()
def dirac_pointwise(model: nn.Module) -> None:
    """Each block's pointwise conv as the identity on its first min(in, out) outputs (a
    model without such blocks is left as it is)."""
    for module in model.modules():
        pointwise = getattr(module, "pointwise", None)
        if pointwise is not None:
            weight = pointwise[0].weight  # (out, in, 1, 1)
            nn.init.dirac_(weight[: min(weight.shape[:2])])
