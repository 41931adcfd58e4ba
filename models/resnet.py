"""ResNet-18 on torchvision's building blocks, for one-channel images."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


class _Block(BasicBlock):
    """torchvision's BasicBlock without in-place ops: per-sample-gradient hooks (DP-SGD)
    cannot follow a tensor modified in place. Same parameters and outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


def resnet18(num_classes: int, norm: Callable[[int], nn.Module] | None = None) -> nn.Module:
    """ResNet-18 for greyscale input; ``norm`` replaces BatchNorm (GroupNorm for DP-SGD)."""
    model: nn.Module = ResNet(_Block, [2, 2, 2, 2], num_classes=num_classes, norm_layer=norm)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
