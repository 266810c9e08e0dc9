"""ResNet backbones from torchvision with the two stems S-JEA uses, and any number of input channels.

The small stem (3x3 conv, stride 1, no max-pool) is the CIFAR one; the standard stem (7x7 conv,
stride 2, max-pool) is ImageNet's. The classifier is removed: the output is the pooled feature.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from ..config import RESNET_NAMES
from .registry import register_backbone


class ResNetBackbone(nn.Module):
    def __init__(self, arch: str, stem: str, in_channels: int):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        if stem == "small":
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _register(arch: str) -> None:
    @register_backbone(arch)
    def factory(stem: str = "small", in_channels: int = 3):
        module = ResNetBackbone(arch, stem, in_channels)
        return module, module.out_dim


for _arch in RESNET_NAMES:  # every ResNet name the configuration accepts is a torchvision ResNet
    _register(_arch)


def map_shape(dim: int) -> tuple[int, int]:
    """The 2-D map a vector is reshaped into: as square as possible (256 -> 16x16, 512 -> 16x32)."""
    h = max(d for d in range(1, int(dim**0.5) + 1) if dim % d == 0)
    return h, dim // h


class VectorResNet(nn.Module):
    """The authors' higher-level encoder: a vector reshaped to a one-channel map, then a ResNet-18."""

    def __init__(self, in_dim: int, stem: str):
        super().__init__()
        self.shape = map_shape(in_dim)
        self.resnet = ResNetBackbone("resnet18", stem, in_channels=1)
        self.out_dim = self.resnet.out_dim

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.resnet(v.reshape(v.shape[0], 1, *self.shape))
