"""A narrow torchvision-style ResNet for 28x28 grayscale images (Fashion-MNIST).

Same attribute names as ``torchvision.models.ResNet`` (conv1, bn1, relu, maxpool, layer1..4,
avgpool, fc) so :func:`~conceptguard.classifier.split.split_torchvision_resnet` applies; a 3x3
stride-1 stem, no max-pool, one ``BasicBlock`` per stage at strides 1, 2, 2, 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

_STAGE_STRIDES = (1, 2, 2, 2)


class SmallResNet(nn.Module):
    """ResNet with ``BasicBlock`` stages of the given widths; feature dim = ``widths[-1]``."""

    def __init__(self, num_classes: int, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        if len(widths) != len(_STAGE_STRIDES) or min(widths) < 1:
            raise ValueError(f"widths must be 4 positive ints, got {list(widths)}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        in_width = widths[0]
        stages = []
        for width, stride in zip(widths, _STAGE_STRIDES, strict=True):
            stages.append(_stage(in_width, width, stride))
            in_width = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(in_width: int, width: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_width != width:
        downsample = nn.Sequential(
            nn.Conv2d(in_width, width, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(width))
    return nn.Sequential(BasicBlock(in_width, width, stride=stride, downsample=downsample))


def _init_weights(model: nn.Module) -> None:
    """torchvision's ResNet init (no zero-init of residual BNs: with one block per stage it
    would reduce stages 2-4 to their 1x1 shortcuts at the start and slow training badly)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def small_resnet(num_classes: int = 10, in_channels: int = 1,
                 widths: Sequence[int] = (16, 32, 64, 128)) -> nn.Module:
    """The demo classifier: a narrow ResNet-10 adapted to 28x28 inputs."""
    return SmallResNet(num_classes, in_channels, widths)
