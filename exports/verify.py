"""Parity of an exported graph against the PyTorch model it came from, on real images.

The check `sjea export` runs after every export: `onnx.checker` (full check, with strict shape
inference), then ONNX Runtime against PyTorch in eval mode at batch 1 and at batch 8, per level:
the largest absolute difference and the smallest row-wise cosine similarity.

Tolerances (stated, not tuned per run):
- fp32: max |ORT - torch| <= 1e-4 and min cosine >= 0.99999.
- fp16: the graph computes in half precision, so the bound is relative to the size of the
  output: max |ORT - torch| <= 1e-2 * max |torch| and min cosine >= 0.999 (fp16 keeps ~3
  significant digits; 18+ layers of rounding stay well inside this).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sjea_tools.errors import SjeaError

BATCH_SIZES = (1, 8)  # batch 1 and a batch of 7 or more, as the export contract asks


@dataclass(frozen=True)
class Tolerance:
    max_abs_diff: float  # absolute, or relative to max |reference| when `relative`
    min_cosine: float
    relative: bool = False

    def describe(self) -> str:
        bound = f"{self.max_abs_diff:g} x max|torch|" if self.relative else f"{self.max_abs_diff:g}"
        return f"max abs diff <= {bound}, cosine >= {self.min_cosine}"


FP32 = Tolerance(max_abs_diff=1e-4, min_cosine=0.99999)
FP16 = Tolerance(max_abs_diff=1e-2, min_cosine=0.999, relative=True)


def tolerance_for(fp16: bool) -> Tolerance:
    return FP16 if fp16 else FP32


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest element-wise |a - b| (inf when shapes differ or a value is not finite)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    d = np.abs(a - b)
    return float(d.max()) if np.isfinite(d).all() else float("inf")


def min_cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> float:
    """Smallest cosine similarity between matching rows of a and b (N, D).

    Two all-zero rows count as identical (1.0); a zero row against a non-zero one as 0.0.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("-inf")
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(axis=1) / np.maximum(na * nb, eps)
    cos = np.where((na < eps) & (nb < eps), 1.0, cos)
    return float(cos.min()) if np.isfinite(cos).all() else float("-inf")


def within(diff: float, cosine: float, reference_scale: float, tol: Tolerance) -> bool:
    bound = tol.max_abs_diff * (reference_scale if tol.relative else 1.0)
    return diff <= bound and cosine >= tol.min_cosine


def verification_pixels(model, images: str | Path | None = None, n: int = max(BATCH_SIZES)) -> tuple[np.ndarray, str]:
    """n real images as uint8 (n, S, S, 3) at the model's size, and where they came from.

    Default: the run's own dataset (test split); `images`: a folder, decoded with the project's
    decoder. Both go through sjea_tools.data's one row/file -> pixels path.
    """
    if images is not None:
        pixels, source = _folder_pixels(Path(images), int(model.image_size), n)
    else:
        pixels, source = _dataset_pixels(model, n)
    # Fewer images than the large batch: repeat them, so the batched path is still exercised.
    while len(pixels) < n:
        pixels.append(pixels[len(pixels) % max(1, len(pixels))])
    return np.stack(pixels[:n]).astype(np.uint8), source


def _folder_pixels(root: Path, size: int, n: int) -> tuple[list[np.ndarray], str]:
    """The first n readable images of a folder; unreadable ones are skipped (the first reason is
    reported when none can be read)."""
    from sjea_tools.data import file_pixels, scan_images

    if not root.is_dir():
        raise SjeaError(f"--images {root} is not a folder; pass a folder of image files.")
    pixels, errors = [], []
    for rel in scan_images(root):
        try:
            pixels.append(file_pixels(root / rel, size))
        except (OSError, ValueError) as e:
            errors.append(f"{rel}: {e}")
        if len(pixels) == n:
            break
    if not pixels:
        raise SjeaError(f"no readable images under {root} to verify the export with"
                        f"{' (' + errors[0] + ')' if errors else ''}.")
    return pixels, f"{len(pixels)} images from {root}"


def _dataset_pixels(model, n: int) -> tuple[list[np.ndarray], str]:
    from sjea_tools.data import load_dataset, row_pixels

    cfg = model.cfg
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir, split="test")
    pixels = [row_pixels(data, i, int(model.image_size)) for i in range(min(n, len(data)))]
    if not pixels:
        raise SjeaError(f"the run's dataset {cfg.data.dataset} has no test images; pass --images DIR.")
    return pixels, f"{len(pixels)} images of {cfg.data.dataset} (test split)"


def reference_outputs(model, pixels: np.ndarray, levels: list[int], output: str) -> list[np.ndarray]:
    """What PyTorch (eval mode, fp32, CPU) gives for uint8 pixels through the one preprocess."""
    import torch

    from sjea_tools.data import normalize_pixels

    x = normalize_pixels(pixels, model.preprocess_spec)
    with torch.no_grad():
        ys = model.forward_embeddings(x, levels) if output == "embedding" else model.forward_levels(x, levels)
    return [y.float().cpu().numpy() for y in ys]


def check_graph(path: Path) -> str | None:
    """onnx.checker's full check (with strict shape inference); None when it passes, else why."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # ValidationError, InferenceError
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def reference_by_batch(model, pixels: np.ndarray, levels: list[int], output: str,
                       batch_sizes=BATCH_SIZES) -> dict[int, dict[int, np.ndarray]]:
    """PyTorch outputs {batch size: {level: array}}, computed once and shared by several files."""
    return {b: dict(zip(levels, reference_outputs(model, pixels[:b], levels, output))) for b in batch_sizes}


def verify_onnx(path: str | Path, model, pixels: np.ndarray, provider: str | None = None,
                fp16: bool = False, batch_sizes=BATCH_SIZES, reference: dict | None = None) -> dict:
    """Check an exported file against `model` on `pixels` (uint8 NHWC); a report dict.

    The report has `passed`, the provider ONNX Runtime actually used, and per level the worst
    max abs diff and min cosine over all batch sizes. `reference` (from `reference_by_batch`)
    saves recomputing PyTorch's outputs when several files of one model are checked.
    """
    from sjea_tools.data import normalize_pixels

    from .runtime import OnnxModel

    path = Path(path)
    tol = tolerance_for(fp16)
    report = {"path": str(path), "checker": "passed", "provider": None, "batch_sizes": list(batch_sizes),
              "tolerance": asdict(tol), "tolerance_text": tol.describe(), "levels": [], "passed": False}
    problem = check_graph(path)
    if problem is not None:
        report["checker"] = f"failed: {problem}"
        return report
    onnx_model = OnnxModel(path, provider=provider, precise=True)
    report["provider"] = onnx_model.provider
    model.eval()
    worst = {k: {"level": k, "max_abs_diff": 0.0, "min_cosine": 1.0, "max_abs_reference": 0.0}
             for k in onnx_model.levels}
    for b in batch_sizes:
        batch = pixels[:b]
        if len(batch) != b:
            raise SjeaError(f"verification needs {b} images, got {len(batch)}.")
        feed = batch if onnx_model.takes_pixels else normalize_pixels(batch, model.preprocess_spec).numpy()
        got = onnx_model.run(feed)
        if reference is not None and b in reference and all(k in reference[b] for k in onnx_model.levels):
            want = [reference[b][k] for k in onnx_model.levels]
        else:
            want = reference_outputs(model, batch, onnx_model.levels, onnx_model.output)
        for k, g, w in zip(onnx_model.levels, got, want):
            row = worst[k]
            row["max_abs_diff"] = max(row["max_abs_diff"], max_abs_diff(g, w))
            row["min_cosine"] = min(row["min_cosine"], min_cosine(g, w))
            row["max_abs_reference"] = max(row["max_abs_reference"], float(np.abs(w).max()))
    for row in worst.values():
        row["passed"] = within(row["max_abs_diff"], row["min_cosine"], row["max_abs_reference"], tol)
    report["levels"] = list(worst.values())
    report["passed"] = all(r["passed"] for r in report["levels"])
    return report
