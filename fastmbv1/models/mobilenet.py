"""MobileNetV1 for CIFAR-10 (kuangliu/pytorch-cifar layout), with input normalisation inside.

The model takes RGB in [0, 1]; the mean/std buffers make a saved model self-contained.
``channels`` overrides the per-layer widths so that a pruned network can be rebuilt from
its checkpoint metadata alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmbv1.models.registry import register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# (out channels, stride) of the 13 depthwise-separable blocks; the stem has 32 channels.
STEM = 32
BLOCKS = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]  # fmt: skip


def count_views(tta: bool, tta_translate: bool) -> int:
    """Images a model with these TTA settings looks at per test image: itself, its mirror,
    and with ``tta_translate`` the two shifts and their mirrors."""
    return 1 if not tta else 6 if tta_translate else 2


def scaled(c: int, width: float) -> int:
    return max(1, round(c * width))


class Normalize(nn.Module):
    """(x - mean) / std with the statistics as buffers, so they travel in the state dict.

    The result keeps the batch's dtype: a bf16 batch minus the fp32 buffers would be
    promoted to fp32, a tensor twice the size that autocast's first convolution then casts
    back. Computed in fp32 and rounded once, it is the very bf16 tensor that cast made.
    """

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std).to(x.dtype)


def is_depthwise(m: nn.Module) -> bool:
    """A conv with one filter per input channel (groups == channels), as ``conv_bn`` builds
    the blocks' first convs."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    layers = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Block(nn.Module):
    """Depthwise 3x3 (a real grouped conv) then pointwise 1x1, each with BN and ReLU; without
    ``depthwise_relu`` the depthwise conv's BN output goes straight to the pointwise conv."""

    def __init__(self, cin: int, cout: int, stride: int, depthwise_relu: bool = True):
        super().__init__()
        self.depthwise = conv_bn(cin, cin, 3, stride, groups=cin, relu=depthwise_relu)
        self.pointwise = conv_bn(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class Classifier(nn.Module):
    """Normalise, stem, blocks, then the pooled features to class logits.

    With ``tta`` the model in eval mode answers with the mean of its logits for each image
    and its mirror image (test-time augmentation, one batch of twice the size); with
    ``tta_translate`` as well, half of the answer is that mean and the other half the mean
    over the image moved one pixel up-left and one down-right (border reflected), each with
    its mirror: airbench's six views, in one batch of six times the size. Training always
    sees single images. Being part of the model, the views are saved, loaded and exported.
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: nn.Module,
        features: int,
        num_classes: int,
        normalize: bool,
        dropout: float,
        tta: bool,
        tta_translate: bool = False,
    ):
        super().__init__()
        self.normalize = Normalize() if normalize else nn.Identity()
        self.stem, self.blocks = stem, blocks
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(features, num_classes)
        self.tta, self.tta_translate = tta, tta and tta_translate

    @property
    def views(self) -> int:
        return count_views(self.tta, self.tta_translate)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(self.normalize(x)))
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tta or self.training:
            return self.logits(x)
        # No batch size in the arithmetic, so an exported graph keeps its dynamic batch.
        if not self.tta_translate:
            return self.logits(torch.cat([x, x.flip(3)])).unflatten(0, (2, -1)).mean(0)
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        views = torch.cat([x, padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]])
        logits = self.logits(torch.cat([views, views.flip(3)])).unflatten(0, (2, 3, -1))
        mirrored = logits.mean(0)  # (3, N, classes): the image, then its two shifts
        return 0.5 * mirrored[0] + 0.25 * (mirrored[1] + mirrored[2])


class MobileNetV1(Classifier):
    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 10,
        normalize: bool = True,
        dropout: float = 0.0,
        channels: list[int] | None = None,
        tta: bool = False,
        tta_translate: bool = False,
        depthwise_relu: bool = True,
    ):
        if channels is None:
            channels = [scaled(c, width) for c in [STEM] + [c for c, _ in BLOCKS]]
        if len(channels) != len(BLOCKS) + 1:
            raise ValueError(f"channels needs {len(BLOCKS) + 1} entries, got {len(channels)}")
        stem = conv_bn(3, channels[0], 3)  # first: the seed's draws go in layer order
        blocks = nn.Sequential(
            *(
                Block(cin, cout, stride, depthwise_relu)
                for cin, cout, (_, stride) in zip(channels[:-1], channels[1:], BLOCKS, strict=True)
            )
        )
        super().__init__(
            stem, blocks, channels[-1], num_classes, normalize, dropout, tta, tta_translate
        )


# The class itself, so that build_model checks options against its signature.
register_model(MobileNetV1, "mobilenet_v1")
