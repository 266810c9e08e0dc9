"""Two-view augmentation for VICReg/S-JEA, batched on the training device.

The whole recipe of method.md (random resized crop with flip, colour jitter with probability,
grayscale, optional blur and solarisation) runs on a uint8 batch in a handful of tensor ops with
per-image random parameters, so augmentation no longer bounds CPU data loading. The per-image
torchvision pipeline (`per_image_transform`) is kept as the reference and as the fallback for
`augment_on_device=False`; benchmarks/bench_train.py compares the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import DataConfig

_LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, gch, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return _LUMA[0] * r + _LUMA[1] * gch + _LUMA[2] * b


def resized_crop_flip(x: torch.Tensor, size: int, scale: tuple[float, float], flip_p: float,
                      g: torch.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip for each image of a float batch, as one grid_sample."""
    n, device = x.shape[0], x.device
    area = _uniform(n, scale[0], scale[1], g, device)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g, device)
    aspect = torch.exp(log_r)
    # Crop width/height as fractions of the image side; clipped like torchvision's fallback.
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    x0 = torch.rand(n, generator=g, device=device) * (1 - w)
    y0 = torch.rand(n, generator=g, device=device) * (1 - h)
    flip = torch.where(torch.rand(n, generator=g, device=device) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = 2 * x0 + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: torch.Tensor, strength: tuple[float, float, float, float], p: float,
                 g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter, each image with probability p."""
    n, device = x.shape[0], x.device
    b, c, s, hue = strength
    apply = (torch.rand(n, generator=g, device=device) < p).view(n, 1, 1, 1)
    out = x
    if b:
        out = (out * _uniform(n, max(0, 1 - b), 1 + b, g, device).view(n, 1, 1, 1)).clamp(0, 1)
    if c:
        mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * _uniform(n, max(0, 1 - c), 1 + c, g, device).view(n, 1, 1, 1) + mean).clamp(0, 1)
    if s:
        gray = _gray(out)
        out = ((out - gray) * _uniform(n, max(0, 1 - s), 1 + s, g, device).view(n, 1, 1, 1) + gray).clamp(0, 1)
    if hue:
        # Hue rotation as a rotation of the chroma plane in YIQ space: linear, so batched.
        angle = _uniform(n, -hue, hue, g, device) * 2 * math.pi
        out = _rotate_hue(out, angle).clamp(0, 1)
    return torch.where(apply, out, x)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
# Inverted once here: torch.linalg.inv on a GPU tensor would synchronise every step.
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    to_yiq = _RGB_TO_YIQ.to(x.device, x.dtype)
    to_rgb = _YIQ_TO_RGB.to(x.device, x.dtype)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(angle.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = to_rgb @ rot @ to_yiq  # (n, 3, 3)
    return torch.einsum("nij,njhw->nihw", m, x)


def random_grayscale(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    apply = (torch.rand(x.shape[0], generator=g, device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(x).expand_as(x), x)


def random_blur(x: torch.Tensor, p: float, g: torch.Generator, sigma: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    """Gaussian blur with a per-image sigma, as one grouped separable convolution."""
    n, ch, hgt, wid = x.shape
    device = x.device
    radius = max(1, int(math.ceil(3 * sigma[1] * hgt / 224)))  # kernel scaled to the image like BYOL's 23 px at 224
    sig = _uniform(n, *sigma, g, device) * hgt / 224 + 1e-3
    t = torch.arange(-radius, radius + 1, device=device, dtype=x.dtype)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sig.view(-1, 1) ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(ch, dim=0)  # (n*ch, K)
    y = x.reshape(1, n * ch, hgt, wid)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(n * ch, 1, 1, -1), groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(n * ch, 1, -1, 1), groups=n * ch)
    apply = (torch.rand(n, generator=g, device=device) < p).view(n, 1, 1, 1)
    return torch.where(apply, y.view(n, ch, hgt, wid), x)


def random_solarize(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    apply = (torch.rand(x.shape[0], generator=g, device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= 0.5), 1 - x, x)


def augment_batch(pixels: torch.Tensor, cfg: DataConfig, size: int, mean, std, g: torch.Generator) -> torch.Tensor:
    """One augmented, normalised view (N, 3, size, size) of a uint8 (N, H, W, 3) batch."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    x = resized_crop_flip(x, size, cfg.crop_scale, cfg.flip_p, g)
    x = color_jitter(x, cfg.jitter, cfg.jitter_p, g)
    x = random_grayscale(x, cfg.grayscale_p, g)
    if cfg.blur_p:
        x = random_blur(x, cfg.blur_p, g)
    if cfg.solarize_p:
        x = random_solarize(x, cfg.solarize_p, g)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def two_views(pixels: torch.Tensor, cfg: DataConfig, size: int, mean, std, g: torch.Generator):
    return augment_batch(pixels, cfg, size, mean, std, g), augment_batch(pixels, cfg, size, mean, std, g)


def per_image_transform(cfg: DataConfig, size: int, mean, std):
    """The same recipe as a per-image torchvision pipeline (runs in DataLoader workers)."""
    from torchvision.transforms import v2 as T

    steps = [
        T.RandomResizedCrop(size, scale=cfg.crop_scale, antialias=True),
        T.RandomHorizontalFlip(cfg.flip_p),
        T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
        T.RandomGrayscale(cfg.grayscale_p),
    ]
    if cfg.blur_p:
        steps.append(T.RandomApply([T.GaussianBlur(23 * size // 224 // 2 * 2 + 1, sigma=(0.1, 2.0))], p=cfg.blur_p))
    if cfg.solarize_p:
        steps.append(T.RandomSolarize(0.5, p=cfg.solarize_p))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    return T.Compose(steps)
