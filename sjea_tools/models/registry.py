"""Backbones by name, timm style: `create_backbone("resnet18", stem="small")`."""

from __future__ import annotations

from typing import Callable

from torch import nn

# name -> factory(stem: str, in_channels: int) -> (module mapping images to (B, dim), dim)
BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {}


def register_backbone(name: str):
    def decorate(factory):
        BACKBONES[name] = factory
        return factory

    return decorate


def create_backbone(name: str, stem: str = "small", in_channels: int = 3) -> tuple[nn.Module, int]:
    from ..errors import SjeaError

    if name not in BACKBONES:
        raise SjeaError(f"unknown backbone '{name}' (known: {', '.join(sorted(BACKBONES))}).")
    return BACKBONES[name](stem=stem, in_channels=in_channels)
