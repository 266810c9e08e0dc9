"""Models: backbones behind a registry, projector/MLP heads, and the stacked model."""

from . import convnet as _convnet  # noqa: F401  (registers the small CNNs)
from . import resnet as _resnet  # noqa: F401  (registers the ResNet backbones)
from .heads import MLPEncoder, projector
from .registry import BACKBONES, create_backbone, register_backbone
from .stacked import StackedModel, build_model, random_init

__all__ = ["BACKBONES", "MLPEncoder", "StackedModel", "build_model", "create_backbone", "projector",
           "random_init", "register_backbone"]
