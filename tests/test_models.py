"""The stacked model: shapes per level, encoder kinds, level inputs, stop-gradient, parameter counts,
and the one preprocess a model applies to a PIL image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sjea_tools import SjeaError, build_model, resolve_config, vicreg_loss
from sjea_tools.data import model_pixels, normalize_pixels
from sjea_tools.config import BACKBONE_NAMES
from sjea_tools.models import BACKBONES, create_backbone
from sjea_tools.spec import PreprocessSpec

SIZE = 8  # tiny images keep ResNet forwards fast on CPU
PROJ = "32-24"  # projector hidden 32, embedding 24
MLP = "40-20"  # mlp encoder hidden 40, representation 20


def small_cfg(levels=2, encoder="mlp", level_input="representation", stop_gradient=False, **extra):
    # The authors' level-0 encoder (ResNet-18), whatever the CPU default's backbone is.
    overrides = {"model.backbone": "resnet18", "model.levels": levels, "model.encoder": encoder, "model.level_input": level_input,
                 "model.stop_gradient": stop_gradient, "model.projector": PROJ, "model.mlp_dims": MLP,
                 "model.stem": "small", "data.image_size": SIZE}
    overrides.update(extra)
    return resolve_config("tiny", overrides=overrides)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- shapes -------------------------------------------------------------------------------------

# One level has no higher encoder, so the encoder kind only matters from two levels on; the
# two-level resnet stack is also built by the level-input tests below.
@pytest.mark.parametrize("levels,encoder", [(1, "mlp"), (2, "mlp"), (3, "mlp"), (3, "resnet")])
def test_levels_build_and_run_with_correct_shapes(levels, encoder):
    torch.manual_seed(0)
    model = build_model(small_cfg(levels, encoder))
    upper_dim = 20 if encoder == "mlp" else 512
    assert model.num_levels == levels
    assert model.level_dims == [512] + [upper_dim] * (levels - 1)
    assert model.embedding_dims == [24] * levels
    x = torch.randn(4, 3, SIZE, SIZE)

    model.train()
    ys, zs = model.forward_train(x)
    assert [tuple(y.shape) for y in ys] == [(4, d) for d in model.level_dims]
    assert [tuple(z.shape) for z in zs] == [(4, 24)] * levels

    model.eval()
    with torch.no_grad():
        all_levels = model.forward_levels(x)
        assert [tuple(y.shape) for y in all_levels] == [(4, d) for d in model.level_dims]
        top = model.forward_levels(x, levels=[levels - 1])
        assert len(top) == 1
        torch.testing.assert_close(top[0], all_levels[-1])
        first = model.forward_levels(x, levels=[0])
        torch.testing.assert_close(first[0], all_levels[0])
        embs = model.forward_embeddings(x)
        assert [tuple(z.shape) for z in embs] == [(4, 24)] * levels
        assert torch.isfinite(torch.cat([e.flatten() for e in embs])).all()
    assert torch.equal(model(x)[0], all_levels[0])  # forward() is forward_levels()


def test_requested_levels_come_back_in_the_requested_order():
    torch.manual_seed(0)
    model = build_model(small_cfg(3, "mlp")).eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        all_levels = model.forward_levels(x)
        picked = model.forward_levels(x, levels=[2, 0])
    torch.testing.assert_close(picked[0], all_levels[2])
    torch.testing.assert_close(picked[1], all_levels[0])


@pytest.mark.parametrize("levels", [[2], [0, 5], [-1], []])
def test_levels_that_do_not_exist_are_a_clear_error(levels):
    torch.manual_seed(0)
    model = build_model(small_cfg(2, "mlp")).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad(), pytest.raises(SjeaError, match="levels here: 0, 1"):
        model.forward_levels(x, levels=levels)
    with torch.no_grad(), pytest.raises(SjeaError, match="levels here: 0, 1"):
        model.forward_embeddings(x, levels=levels)


def test_a_repeated_level_is_refused():
    model = build_model(small_cfg(2, "mlp")).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad(), pytest.raises(SjeaError, match="repeats a level"):
        model.forward_levels(x, levels=[1, 1])
    with torch.no_grad(), pytest.raises(SjeaError, match="repeats a level"):
        model.forward_embeddings(x, levels="0,0")


def test_every_backbone_the_config_accepts_is_registered():
    # and nothing is registered that the configuration would refuse
    assert set(BACKBONE_NAMES) == set(BACKBONES)


@pytest.mark.parametrize("size,kernel", [(32, 3), (64, 3), (96, 7)])
def test_auto_stem_follows_the_image_size(size, kernel):
    model = build_model(small_cfg(1, **{"model.stem": "auto", "data.image_size": size}))
    conv1 = model.encoders[0].net.conv1
    assert conv1.kernel_size == (kernel, kernel)
    assert isinstance(model.encoders[0].net.maxpool, torch.nn.Identity) == (kernel == 3)


def test_levels_differ_from_each_other():
    """Level k really is computed from level k-1, not a copy of it."""
    torch.manual_seed(0)
    model = build_model(small_cfg(2, "mlp")).eval()
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        y0, y1 = model.forward_levels(x)
        manual = model.encoders[1](y0)
    torch.testing.assert_close(y1, manual)
    assert y0.shape != y1.shape


# --- level input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("level_input,expected_in", [("representation", 512), ("embedding", 24)])
def test_mlp_level_one_input_follows_level_input(level_input, expected_in):
    torch.manual_seed(0)
    model = build_model(small_cfg(2, "mlp", level_input)).eval()
    first_linear = next(m for m in model.encoders[1].modules() if isinstance(m, torch.nn.Linear))
    assert first_linear.in_features == expected_in
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ys = model.forward_levels(x)
        source = ys[0] if level_input == "representation" else model.projectors[0](ys[0])
        torch.testing.assert_close(ys[1], model.encoders[1](source))


@pytest.mark.parametrize("level_input,expected_map", [("representation", (16, 32)), ("embedding", (4, 6))])
def test_resnet_level_one_input_follows_level_input(level_input, expected_map):
    torch.manual_seed(0)
    model = build_model(small_cfg(2, "resnet", level_input)).eval()
    conv1 = model.encoders[1].resnet.net.conv1
    assert conv1.in_channels == 1  # the authors' one-channel ResNet-18
    assert model.encoders[1].shape == expected_map  # 512 -> 16x32, 24 -> 4x6
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ys = model.forward_levels(x)
        source = ys[0] if level_input == "representation" else model.projectors[0](ys[0])
        torch.testing.assert_close(ys[1], model.encoders[1](source))
    assert ys[1].shape == (2, 512)


# --- stop gradient ------------------------------------------------------------------------------

def level_one_grads(stop_gradient: bool, level_input: str = "representation"):
    torch.manual_seed(0)
    model = build_model(small_cfg(2, "mlp", level_input, stop_gradient)).train()
    torch.manual_seed(1)
    v1, v2 = torch.randn(6, 3, SIZE, SIZE), torch.randn(6, 3, SIZE, SIZE)
    _, z1 = model.forward_train(v1)
    _, z2 = model.forward_train(v2)
    vicreg_loss(z1[1], z2[1]).total.backward()  # the level-1 loss only

    def total(module):
        return sum(0.0 if p.grad is None else p.grad.abs().sum().item() for p in module.parameters())

    return total(model.encoders[0]), total(model.projectors[0]), total(model.encoders[1])


def test_stop_gradient_on_blocks_level_one_loss_from_level_zero():
    enc0, proj0, enc1 = level_one_grads(stop_gradient=True)
    assert enc0 == 0.0 and proj0 == 0.0
    assert enc1 > 0.0


def test_stop_gradient_off_lets_level_one_loss_train_level_zero():
    enc0, proj0, enc1 = level_one_grads(stop_gradient=False)
    assert enc0 > 0.0  # the authors' default: the level-1 loss also trains level 0
    assert proj0 == 0.0  # level 1 reads the representation, the level-0 projector is not on its path
    assert enc1 > 0.0


def test_stop_gradient_with_embedding_input():
    enc0, proj0, _ = level_one_grads(stop_gradient=True, level_input="embedding")
    assert enc0 == 0.0 and proj0 == 0.0
    enc0, proj0, _ = level_one_grads(stop_gradient=False, level_input="embedding")
    assert enc0 > 0.0 and proj0 > 0.0


def test_stop_gradient_does_not_change_the_forward_values():
    x = torch.randn(4, 3, SIZE, SIZE)
    outs = []
    for stop in (False, True):
        torch.manual_seed(0)
        model = build_model(small_cfg(2, "mlp", stop_gradient=stop)).eval()
        with torch.no_grad():
            outs.append(model.forward_levels(x))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


# --- parameter counts (method.md table) -----------------------------------------------------------

def test_cifar10_paper_parameter_counts_match_the_method():
    model = build_model(resolve_config("cifar10-paper"))
    counts = model.parameter_counts()
    assert counts[0]["encoder"] == 11_168_832  # ResNet-18, CIFAR stem
    assert counts[1]["encoder"] == 11_167_680  # one-channel ResNet-18 f_xi, CIFAR stem
    assert counts[0]["projector"] == 658_688 and counts[1]["projector"] == 658_688  # H=512, out=256
    total = n_params(model)
    assert total == sum(c["encoder"] + c["projector"] for c in counts)
    assert 23.4e6 < total < 23.7e6  # "about 23.5 M"
    assert model.encoders[1].shape == (16, 32)  # 512 -> 16x32


def test_vicreg_r18_parameter_count_matches_the_method():
    model = build_model(resolve_config("vicreg-r18"))
    assert model.num_levels == 1
    assert n_params(model) == 11_827_520


def test_resnet50_backbone_parameter_count_matches_the_method():
    module, dim = create_backbone("resnet50", stem="standard")
    assert dim == 2048
    assert n_params(module) == 23_508_032


def test_official_projector_without_last_bias():
    cfg = small_cfg(1, **{"model.projector_last_bias": False})
    model = build_model(cfg)
    assert model.projectors[0][-1].bias is None
    with_bias = build_model(small_cfg(1))
    assert n_params(with_bias.projectors[0]) - n_params(model.projectors[0]) == 24


# --- preprocess -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_model():
    torch.manual_seed(0)
    return build_model(small_cfg(1, **{"data.mean": "0.4914,0.4822,0.4465", "data.std": "0.2470,0.2435,0.2616"})).eval()


def test_the_model_carries_its_preprocess_spec(cifar_model):
    spec = cifar_model.preprocess_spec
    assert spec == PreprocessSpec(SIZE, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "RGB")
    assert spec == cifar_model.cfg.preprocess_spec
    assert (cifar_model.image_size, cifar_model.mean, cifar_model.std) == (spec.image_size, spec.mean, spec.std)
    # Without explicit statistics the dataset's own apply (Fashion-MNIST for the tiny preset).
    plain = build_model(small_cfg(1)).preprocess_spec
    assert (plain.mean, plain.std) == ((0.2860,) * 3, (0.3530,) * 3)


def expected_normalised(rgb, mean, std):
    return [(c / 255.0 - m) / s for c, m, s in zip(rgb, mean, std)]


def test_preprocess_shape_dtype_and_normalisation(cifar_model):
    rgb = (200, 100, 30)
    x = cifar_model.preprocess(Image.new("RGB", (SIZE, SIZE), rgb))
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    want = expected_normalised(rgb, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    for c in range(3):
        torch.testing.assert_close(x[c], torch.full((SIZE, SIZE), want[c]), rtol=1e-6, atol=1e-6)


def test_preprocess_resizes_short_side_and_centre_crops(cifar_model):
    # A 3:1 image at the model's height: the centre crop is exactly the middle third.
    px = np.zeros((SIZE, 3 * SIZE, 3), dtype=np.uint8)
    px[:, SIZE:2 * SIZE] = 128
    px[:, 2 * SIZE:] = 255
    x = cifar_model.preprocess(Image.fromarray(px))
    assert x.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(x, normalize_pixels(np.full((SIZE, SIZE, 3), 128, np.uint8), cifar_model.mean, cifar_model.std))
    # A large portrait image of one colour comes out at the model's size with that colour.
    big = cifar_model.preprocess(Image.new("RGB", (5 * SIZE, 9 * SIZE), (10, 20, 30)))
    small = cifar_model.preprocess(Image.new("RGB", (SIZE, SIZE), (10, 20, 30)))
    assert big.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(big, small, atol=1e-5, rtol=0)
    # A tiny image is upsampled.
    assert cifar_model.preprocess(Image.new("RGB", (5, 3), (1, 2, 3))).shape == (3, SIZE, SIZE)


def test_preprocess_is_the_data_module_preprocess(cifar_model):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(23, 37, 3), dtype=np.uint8))
    x = cifar_model.preprocess(img)
    ref = normalize_pixels(model_pixels(img, SIZE), cifar_model.mean, cifar_model.std)
    assert torch.equal(x, ref)


@pytest.mark.parametrize("mode", ["L", "LA", "1", "P"])
def test_grayscale_images_become_three_equal_channels(cifar_model, mode):
    rng = np.random.default_rng(1)
    gray = Image.fromarray(rng.integers(0, 256, size=(SIZE, SIZE), dtype=np.uint8))
    img = gray.convert(mode)
    x = cifar_model.preprocess(img)
    assert x.shape == (3, SIZE, SIZE)
    mean = torch.tensor(cifar_model.mean).view(3, 1, 1)
    std = torch.tensor(cifar_model.std).view(3, 1, 1)
    raw = x * std + mean  # undo the normalisation: the three channels are the same gray image
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[1], raw[2], atol=1e-5, rtol=0)
    if mode in ("L", "LA"):
        torch.testing.assert_close(raw[0], torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0), atol=1e-5, rtol=0)


def test_preprocessed_images_run_through_the_model(cifar_model):
    imgs = [Image.new("RGB", (40, 30), (i * 40, 50, 90)) for i in range(3)]
    batch = torch.stack([cifar_model.preprocess(im) for im in imgs])
    with torch.no_grad():
        (y,) = cifar_model.forward_levels(batch)
    assert y.shape == (3, 512) and torch.isfinite(y).all()
