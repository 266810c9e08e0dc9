"""The small CNN backbones (convnet-W[-D]) used by the recipe search."""

from __future__ import annotations

import pytest
import torch

from sjea_tools.config import resolve_config
from sjea_tools.models import BACKBONES, build_model, create_backbone


@pytest.mark.parametrize("name,dim", [("convnet-16", 128), ("convnet-32-2", 256)])
def test_convnet_shapes_and_map_sizes(name, dim):
    net, out = create_backbone(name, stem="small")
    assert out == dim and name in BACKBONES
    x = torch.randn(4, 3, 28, 28)
    assert net(x).shape == (4, dim)
    # small stem keeps 28 px through the first stage, then 14, 7, 4; standard halves once more first.
    assert net.features(x).shape[-1] == 4
    std, _ = create_backbone(name, stem="standard")
    assert std.features(x).shape[-1] == 2


def test_convnet_in_a_stacked_model_trains_a_step():
    cfg = resolve_config("tiny", overrides={"model.backbone": "convnet-16", "model.stem": "small"})
    model = build_model(cfg)
    assert model.level_dims[0] == 128
    ys, zs = model.forward_train(torch.randn(8, 3, 28, 28))
    loss = sum(z.pow(2).mean() for z in zs)
    loss.backward()
    assert all(p.grad is not None for p in model.encoders[0].parameters())
