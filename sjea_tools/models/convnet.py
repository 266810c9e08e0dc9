"""Small plain CNNs for small images on CPU (level-0 encoders for the recipe search).

ResNet-18 with the standard stem leaves a 1x1 map at 28 px and costs about 1.8 GFLOP per
image with the small stem; these nets keep a 7x7 map to the last stage, cost a few tens of MFLOP,
and learn in minutes on 2 CPU cores (docs/recipe_search.md measures the choice).

    convnet-W[-D]: stages of width W, 2W, 4W, 8W; each stage (after the first) halves the map;
    D convs per stage (default 1); BatchNorm + ReLU; global average pooling; out dim 8W.

The stem argument is accepted for registry compatibility: "standard" adds a stride of 2 to the
first conv (for images of 64 px and more), "small" (and "auto" below 64 px) keeps full resolution.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import CONVNET_NAMES
from .registry import register_backbone


def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ConvNet(nn.Module):
    def __init__(self, width: int, depth: int = 1, stem: str = "small", in_channels: int = 3):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = _block(in_channels, widths[0], 2 if stem == "standard" else 1)
        cin = widths[0]
        for i, w in enumerate(widths[1:]):
            for d in range(depth):
                layers += _block(cin, w, 2 if d == 0 else 1)
                cin = w
        self.features = nn.Sequential(*layers)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def _register(name: str) -> None:
    width, _, depth = name.removeprefix("convnet-").partition("-")  # convnet-W[-D]

    @register_backbone(name)
    def factory(stem: str = "small", in_channels: int = 3):
        module = ConvNet(int(width), int(depth or 1), stem, in_channels)
        return module, module.out_dim


for _name in CONVNET_NAMES:  # every convnet name the configuration accepts
    _register(_name)
