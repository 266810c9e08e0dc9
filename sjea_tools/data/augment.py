"""Two-view augmentation for VICReg/S-JEA, batched on the training device.

Each op runs on a whole float batch in a few tensor ops with per-image random parameters, and
follows torchvision's per-image op (tests/test_augment.py checks each against it on real images):

- `crop_boxes` + `resized_crop_flip`: RandomResizedCrop's sampling (10 tries of area and log
  aspect ratio, integer boxes, then the centre-crop fallback) and bilinear resize, then
  RandomHorizontalFlip, as one grid_sample;
- `color_jitter`: ColorJitter's brightness, contrast, saturation and hue (HSV) with its factor
  ranges, in a random order drawn per image, applied with probability p (RandomApply);
- `random_grayscale`, `random_blur` (GaussianBlur: sigma in pixels of the image being augmented,
  kernel radius ceil(3 sigma_max), reflect padding) and `random_solarize` (threshold 0.5).

Each view has its own settings (`ViewSettings`): `view_settings(cfg.data)` resolves a named
recipe (`RECIPES`: the official VICReg one is asymmetric) or the flat `data.*` fields, then the
per-view overrides `data.view1.*` / `data.view2.*`. The per-image torchvision pipeline
(`per_image_transform`) is the reference and the fallback for `augment_on_device=False`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..baselines import is_grey
from ..config import DataConfig

_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass(frozen=True)
class ViewSettings:
    """Augmentation of one view, in the order applied."""

    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the image being augmented
    solarize_p: float = 0.0


# Named recipes: (view 1, view 2).
_AUTHORS = ViewSettings()  # S-JEA authors' code: both views alike (method.md)
_VICREG_1 = ViewSettings(crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, solarize_p=0.0)
RECIPES: dict[str, tuple[ViewSettings, ViewSettings]] = {
    "authors": (_AUTHORS, _AUTHORS),
    # facebookresearch/vicreg augmentations.py: blur p 1.0 / 0.1, solarize 0 / 0.2.
    "vicreg": (_VICREG_1, dataclasses.replace(_VICREG_1, blur_p=0.1, solarize_p=0.2)),
}
_VIEW_FIELDS = ("crop_scale", "flip_p", "jitter", "jitter_p", "grayscale_p", "blur_p", "blur_sigma", "solarize_p")


def view_settings(cfg: DataConfig) -> tuple[ViewSettings, ViewSettings]:
    """The two views' settings: the named recipe (`data.augment`), or the flat `data.*` fields when it is
    "custom", then the non-empty fields of `data.view1` / `data.view2` on top."""
    if cfg.augment == "custom":
        flat = ViewSettings(**{name: getattr(cfg, name) for name in _VIEW_FIELDS})
        views = (flat, flat)
    else:
        views = RECIPES[cfg.augment]
    out = []
    for view, over in zip(views, (cfg.view1, cfg.view2)):
        changes = {name: getattr(over, name) for name in _VIEW_FIELDS if getattr(over, name) is not None}
        out.append(dataclasses.replace(view, **changes))
    return out[0], out[1]


def _uniform(shape, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=device) * (hi - lo) + lo


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:  # a grey batch carried as one channel (augment_batch): what the three would give
        return sum(_LUMA) * x
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


# --- crop and flip ----------------------------------------------------------------------------------

def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               g: torch.Generator, device=None, attempts: int = 10) -> torch.Tensor:
    """(n, 4) integer boxes (top, left, h, w) sampled as torchvision's RandomResizedCrop.get_params:
    up to 10 tries of (area, log aspect ratio), the first that fits wins; else a centre crop of the
    whole image clamped to the ratio range."""
    area = height * width
    target = area * _uniform((n, attempts), scale[0], scale[1], g, device)
    aspect = torch.exp(_uniform((n, attempts), math.log(ratio[0]), math.log(ratio[1]), g, device))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # first try that fits
    found = ok.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    top = torch.floor(torch.rand(n, generator=g, device=device) * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(torch.rand(n, generator=g, device=device) * (width - w + 1)).clamp(max=width - w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=w.dtype, device=w.device)
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(found[:, None], boxes, fallback).long()


def resized_crop_flip(x: torch.Tensor, size: int, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Each image's box (top, left, h, w) resized bilinearly to size x size (half-pixel centres, clamped
    at the box's edge, as torchvision's crop-then-resize), mirrored where `flip` is true, as one grid_sample. Equal to
    torchvision's resized_crop when the box is not larger than the output (no antialiasing here)."""
    n, _, height, width = x.shape
    top, left, h, w = boxes.to(x.dtype).unbind(1)
    sign = torch.where(flip, -1.0, 1.0).to(x.dtype)
    # The affine grid is separable (no rotation or shear): x follows the column, y the row. Two (n, size)
    # vectors instead of F.affine_grid, whose batched matmul was the largest op of the CPU augmentation.
    centres = (2 * torch.arange(size, device=x.device, dtype=x.dtype) + 1) / size - 1  # output pixel centres
    gx = (w / width * sign)[:, None] * centres + ((2 * left + w) / width - 1)[:, None]
    gy = (h / height)[:, None] * centres + ((2 * top + h) / height - 1)[:, None]
    # Clamp to the box's outer pixel centres: torchvision crops first, so its resize clamps at the box edge.
    gx = gx.clamp(((2 * left + 1) / width - 1)[:, None], ((2 * (left + w) - 1) / width - 1)[:, None])
    gy = gy.clamp(((2 * top + 1) / height - 1)[:, None], ((2 * (top + h) - 1) / height - 1)[:, None])
    grid = torch.stack((gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --- colour ---------------------------------------------------------------------------------------

def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_image(factor)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_image(factor)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_image(factor)
    return (f * x + (1 - f) * _gray(x)).clamp(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """torchvision's conversion (after Pillow), for a batch."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    rng = maxc - minc
    ones = torch.ones_like(maxc)
    s = rng / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, rng)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    h = (bc - gc) * is_r + (2.0 + rc - bc) * is_g + (4.0 + gc - rc) * is_b
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.long().remainder(6)
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    vpqt = torch.stack((v, p, q, t), dim=1)  # (n, 4, H, W)
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=x.device)
    index = select[:, i].moveaxis(0, 1)  # (n, 3, H, W): which of v, p, q, t each channel takes
    return vpqt.gather(1, index)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, 0] + factor.view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def jitter_factors(n: int, strength, g: torch.Generator, device=None) -> torch.Tensor:
    """(n, 4) factors in ColorJitter's ranges: [max(0, 1-s), 1+s] for the first three, [-h, h] for hue."""
    b, c, s, hue = strength
    cols = [_uniform(n, max(0.0, 1 - v), 1 + v, g, device) for v in (b, c, s)]
    cols.append(_uniform(n, -hue, hue, g, device))
    return torch.stack(cols, dim=1)


def color_jitter(x: torch.Tensor, strength, p: float, g: torch.Generator, factors: torch.Tensor | None = None,
                 order: torch.Tensor | None = None) -> torch.Tensor:
    """ColorJitter(*strength) with probability p; the order of the four adjustments is a random
    permutation drawn per image (torchvision draws one per call, i.e. per image). `factors` (n, 4)
    and `order` (n, 4) may be given instead of drawn."""
    n, device = x.shape[0], x.device
    apply = torch.rand(n, generator=g, device=device) < p
    if factors is None:
        factors = jitter_factors(n, strength, g, device)
    factors = factors.to(x.dtype)
    if order is None:
        order = torch.argsort(torch.rand(n, 4, generator=g, device=device), dim=1)
    active = [k for k in range(4) if strength[k]]
    if not active or p == 0:
        return x
    # Each image gets each op once, on the subset whose permutation puts it at this position: the
    # whole-batch form (every op at every position, then a select) cost 7x the rest of the
    # augmentation at batch 256 (0.68 vs 0.10 s a batch of two views, 28 px, 2 cores).
    # Saturation and hue leave a grey image grey and unchanged (luma weights sum to 1; its HSV
    # saturation is 0), and the other two keep it grey: on greyscale data (Fashion-MNIST) they are
    # skipped instead of paying for the HSV round trip, the costliest op here.
    colour = (x.amax(dim=1) != x.amin(dim=1)).flatten(1).any(dim=1)
    out = x.clone()
    for position in range(4):
        for k in active:
            wanted = (order[:, position] == k) & apply & (colour if k >= 2 else True)
            rows = wanted.nonzero().squeeze(1)
            if rows.numel():
                out[rows] = _JITTER_OPS[k](out[rows], factors[rows, k])
    return out


def random_grayscale(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    apply = torch.rand(x.shape[0], generator=g, device=x.device) < p
    return torch.where(_per_image(apply), _gray(x).expand_as(x), x)


# --- blur and solarisation --------------------------------------------------------------------------

def blur_radius(sigma_max: float, size: int) -> int:
    """Kernel radius: 3 sigma, and less than the image side (reflect padding needs it)."""
    return max(1, min(int(math.ceil(3 * sigma_max)), size - 1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Each image blurred with its own sigma (pixels): separable, reflect-padded, as torchvision's
    gaussian_blur with kernel_size 2*radius+1."""
    n, ch, hgt, wid = x.shape
    t = torch.linspace(-radius, radius, 2 * radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(ch, dim=0)  # (n*ch, K)
    y = x.reshape(1, n * ch, hgt, wid)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(n * ch, 1, 1, -1), groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(n * ch, 1, -1, 1), groups=n * ch)
    return y.view(n, ch, hgt, wid)


def random_blur(x: torch.Tensor, p: float, g: torch.Generator, sigma: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    """GaussianBlur with sigma ~ U(sigma) in pixels, per image, with probability p."""
    n = x.shape[0]
    sig = _uniform(n, sigma[0], sigma[1], g, x.device)
    apply = torch.rand(n, generator=g, device=x.device) < p
    y = gaussian_blur(x, sig, blur_radius(sigma[1], min(x.shape[-2:])))
    return torch.where(_per_image(apply), y, x)


def random_solarize(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    apply = torch.rand(x.shape[0], generator=g, device=x.device) < p
    return torch.where(_per_image(apply) & (x >= 0.5), 1 - x, x)


# --- views ------------------------------------------------------------------------------------------

def augment_float(x: torch.Tensor, view: ViewSettings, size: int, g: torch.Generator) -> torch.Tensor:
    """One augmented view of a float batch in [0, 1] (N, 3, H, W), unnormalised."""
    n, _, height, width = x.shape
    boxes = crop_boxes(n, height, width, view.crop_scale, view.crop_ratio, g, x.device)
    flip = torch.rand(n, generator=g, device=x.device) < view.flip_p
    x = resized_crop_flip(x, size, boxes, flip)
    if view.jitter_p and any(view.jitter):
        x = color_jitter(x, view.jitter, view.jitter_p, g)
    if view.grayscale_p:
        x = random_grayscale(x, view.grayscale_p, g)
    if view.blur_p:
        x = random_blur(x, view.blur_p, g, view.blur_sigma)
    if view.solarize_p:
        x = random_solarize(x, view.solarize_p, g)
    return x


def augment_batch(pixels: torch.Tensor, view: ViewSettings, size: int, mean, std, g: torch.Generator,
                  grey: bool | None = None) -> torch.Tensor:
    """One augmented, normalised view (N, 3, size, size) of a uint8 (N, H, W, 3) batch.

    A grey batch (Fashion-MNIST) is augmented as one channel and expanded at the end: every op maps
    equal channels to equal channels, and the random draws are the same, so the view equals the
    three-channel one within float rounding (tests/test_augment.py; faster: benchmarks/bench_step.py).
    `grey=None` checks the batch (a host sync on GPU); two_views checks once for both views."""
    x = pixels.permute(0, 3, 1, 2)
    if is_grey(pixels) if grey is None else grey:
        x = x[:, :1]
    x = augment_float(x.float().div_(255.0), view, size, g).expand(-1, 3, -1, -1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def two_views(pixels: torch.Tensor, cfg: DataConfig, size: int, mean, std, g: torch.Generator):
    v1, v2 = view_settings(cfg)
    grey = is_grey(pixels)
    return augment_batch(pixels, v1, size, mean, std, g, grey), augment_batch(pixels, v2, size, mean, std, g, grey)


def per_image_transform(view: ViewSettings, size: int, mean, std):
    """The same view as a per-image torchvision pipeline (runs in DataLoader workers)."""
    from torchvision.transforms import v2 as T

    steps = [  # in float from the start, like the batched path (uint8 would also change solarize's threshold)
        T.ToDtype(torch.float32, scale=True),
        T.RandomResizedCrop(size, scale=view.crop_scale, ratio=view.crop_ratio, antialias=True),
        T.RandomHorizontalFlip(view.flip_p),
        T.RandomApply([T.ColorJitter(*view.jitter)], p=view.jitter_p),
        T.RandomGrayscale(view.grayscale_p),
    ]
    if view.blur_p:
        radius = blur_radius(view.blur_sigma[1], size)
        steps.append(T.RandomApply([T.GaussianBlur(2 * radius + 1, sigma=view.blur_sigma)], p=view.blur_p))
    if view.solarize_p:
        steps.append(T.RandomSolarize(0.5, p=view.solarize_p))
    steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


def per_image_transforms(cfg: DataConfig, size: int, mean, std):
    """Both views' per-image pipelines."""
    v1, v2 = view_settings(cfg)
    return per_image_transform(v1, size, mean, std), per_image_transform(v2, size, mean, std)
