"""CustomMobileNet: the original project's own residual MobileNet (1,001,642 parameters).

A 16-channel stem, then 22 depthwise-separable blocks that all carry a residual connection:
the identity where the block keeps its shape, a strided 1x1 conv + BN where it does not.
The block follows the ResNet convention (ReLU after the sum), so the pointwise BN output is
added before the activation. Like ``MobileNetV1``, inputs are RGB in [0, 1] and ``channels``
overrides every layer's width so a pruned network can be rebuilt from its checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastmbv1.models.mobilenet import Classifier, conv_bn, scaled
from fastmbv1.models.registry import register_model

# (out channels, stride) of the 22 blocks; the stem has 16 channels. 32x32 -> 2x2.
STEM = 16
BLOCKS = (
    [(32, 1)] * 3
    + [(64, 2)] + [(64, 1)] * 3
    + [(128, 2)] + [(128, 1)] * 8
    + [(256, 2)] + [(256, 1)] * 3
    + [(512, 2), (512, 1)]
)  # fmt: skip
BASE_CHANNELS = [STEM] + [c for c, _ in BLOCKS]
# Whether a block's shortcut is a 1x1 conv is a property of the architecture, not of the
# (possibly pruned) widths: a pruned identity block must keep in == out, and a projecting
# block keeps its conv even where pruning happened to make its widths equal.
PROJECTS = [
    s != 1 or cin != cout for cin, (cout, s) in zip(BASE_CHANNELS[:-1], BLOCKS, strict=True)
]


class ResidualBlock(nn.Module):
    """Depthwise 3x3 + BN + ReLU (no ReLU without ``depthwise_relu``), pointwise 1x1 + BN,
    plus the shortcut, then ReLU."""

    def __init__(
        self, cin: int, cout: int, stride: int, projection: bool, depthwise_relu: bool = True
    ):
        super().__init__()
        if not projection and cin != cout:
            raise ValueError(f"identity shortcut needs in == out channels, got {cin} -> {cout}")
        self.depthwise = conv_bn(cin, cin, 3, stride, groups=cin, relu=depthwise_relu)
        self.pointwise = conv_bn(cin, cout, 1, relu=False)
        self.shortcut = conv_bn(cin, cout, 1, stride, relu=False) if projection else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.pointwise(self.depthwise(x)) + self.shortcut(x))


class CustomMobileNet(Classifier):
    def __init__(
        self,
        width: float = 1.0,
        num_classes: int = 10,
        normalize: bool = True,
        dropout: float = 0.5,
        channels: list[int] | None = None,
        tta: bool = False,
        tta_translate: bool = False,
        depthwise_relu: bool = True,
    ):
        if channels is None:
            channels = [scaled(c, width) for c in BASE_CHANNELS]
        if len(channels) != len(BASE_CHANNELS):
            raise ValueError(f"channels needs {len(BASE_CHANNELS)} entries, got {len(channels)}")
        stem = conv_bn(3, channels[0], 3)  # first: the seed's draws go in layer order
        blocks = nn.Sequential(
            *(
                ResidualBlock(cin, cout, stride, projects, depthwise_relu)
                for cin, cout, (_, stride), projects in zip(
                    channels[:-1], channels[1:], BLOCKS, PROJECTS, strict=True
                )
            )
        )
        super().__init__(
            stem, blocks, channels[-1], num_classes, normalize, dropout, tta, tta_translate
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # He-normal with fan_in keeps the forward activation variance per layer. For a
        # depthwise weight (C, 1, 3, 3) fan_in is 9, the true number of inputs per output;
        # PyTorch's fan_out would count all C channels and start those layers near zero.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


# The class itself, so that build_model checks options against its signature.
register_model(CustomMobileNet, "custom_mobilenet")
