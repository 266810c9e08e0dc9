"""Small MLP blocks: the projector of every level and the cheap MLP encoder for higher levels."""

from __future__ import annotations

from torch import nn


def parse_dims(spec: str) -> list[int]:
    return [int(v) for v in spec.split("-")]


def projector(in_dim: int, spec: str, last_bias: bool = True) -> nn.Sequential:
    """VICReg's expander: (Linear-BN-ReLU) for each hidden size, then a final Linear."""
    dims = [in_dim, *parse_dims(spec)]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """A higher-level encoder on vectors: (Linear-BN-ReLU) per size; the last output is Y[k]."""

    def __init__(self, in_dim: int, spec: str):
        super().__init__()
        dims = [in_dim, *parse_dims(spec)]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)
        self.out_dim = dims[-1]

    def forward(self, v):
        return self.net(v)
