"""The paper's pictures for a run: t-SNE of each level (Figure 2), the covariance term of each
level over training (Figure 4), and the sub-clusters of one class at the top level (Figure 3).

matplotlib and scikit-learn are an optional extra (`pip install 'sjea-tools[plots]'`). Figures
are drawn on `matplotlib.figure.Figure` objects (no pyplot global state, no display needed) and
written through a temporary file and a rename.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import SjeaError
from .progress import ProgressFn
from .vectors import l2_normalize

PLOT_KINDS = ("tsne", "covariance", "subclusters")
TSNE_PERPLEXITY = 30
TSNE_SEED = 123
THUMBS_PER_CLUSTER = 10


def require_plot_libraries() -> None:
    missing = [m for m in ("matplotlib", "sklearn") if importlib.util.find_spec(m) is None]
    if missing:
        # No square brackets in the message: the CLI prints it through rich markup.
        raise SjeaError(f"plots need {' and '.join('scikit-learn' if m == 'sklearn' else m for m in missing)}: "
                        "install the 'plots' extra of sjea-tools (pip install matplotlib scikit-learn).")


# --- pure computations ------------------------------------------------------------------------------

def sklearn_threads():
    """scikit-learn's OpenMP pool sized like torch's (torch.set_num_threads / OMP_NUM_THREADS).

    Two OpenMP runtimes (torch's and scikit-learn's) each spinning a full pool on a busy
    machine made t-SNE 10x slower in our measurements; one shared size avoids that.
    """
    import torch
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=torch.get_num_threads())


def tsne_2d(features: np.ndarray, perplexity: float = TSNE_PERPLEXITY, seed: int = TSNE_SEED) -> np.ndarray:
    """Paper Figure 2: t-SNE of L2-normalised features, coordinates min-max scaled to [0, 1]."""
    from sklearn.manifold import TSNE

    x = l2_normalize(features)
    perplexity = min(perplexity, max(1.0, (len(x) - 1) / 3))  # sklearn needs perplexity < n
    with sklearn_threads():
        coords = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(x)
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    return (coords - lo) / np.maximum(hi - lo, 1e-12)


def sub_clusters(features: np.ndarray, n_clusters: int, seed: int = 0,
                 typical: int = THUMBS_PER_CLUSTER) -> tuple[np.ndarray, list[np.ndarray]]:
    """Paper Figure 3: spherical k-means of L2-normalised features with clusters.kmeans, the one
    `sjea clusters` uses, so both agree. (cluster of each row, per cluster its `typical` rows
    nearest the centre, most typical first)."""
    from .clusters import examples_of, kmeans

    x = l2_normalize(features)
    centroids, assign = kmeans(x, n_clusters, seed)
    nearest = [examples_of(x, np.flatnonzero(assign == c), centroids[c], typical) for c in range(len(centroids))]
    return assign, [rows[rows >= 0] for rows in nearest]


def covariance_series(rows: list[dict]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(steps, covariance term of each level) from metrics.jsonl rows of kind 'step'."""
    steps = [r for r in rows if r.get("kind") == "step" and r.get("levels")]
    if not steps:
        raise SjeaError("metrics.jsonl holds no training steps yet; train longer (sjea train) before plotting.")
    n_levels = len(steps[0]["levels"])
    x = np.asarray([r["step"] for r in steps], dtype=np.float64)
    ys = [np.asarray([r["levels"][k]["covariance"] if k < len(r["levels"]) else np.nan for r in steps], dtype=np.float64)
          for k in range(n_levels)]
    return x, ys


def resolve_class(class_name: str | None, class_names: Sequence[str]) -> int:
    """A class by name (case-insensitive) or index; the first class when None."""
    if class_name is None:
        return 0
    lowered = [c.lower() for c in class_names]
    if class_name.lower() in lowered:
        return lowered.index(class_name.lower())
    if class_name.isdigit() and int(class_name) < len(class_names):
        return int(class_name)
    raise SjeaError(f"unknown class '{class_name}' (classes: {', '.join(class_names)}).")


# --- drawing ------------------------------------------------------------------------------------------

def _save(fig, path: Path) -> Path:
    from .io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _class_colours(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def draw_tsne(coords: list[np.ndarray], labels: np.ndarray, class_names: Sequence[str], levels: Sequence[int],
              title: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(coords) + 1.8, 4.4))
    axes = fig.subplots(1, len(coords), squeeze=False)[0]
    colours = _class_colours(len(class_names))
    for ax, xy, level in zip(axes, coords, levels):
        for c, name in enumerate(class_names):
            pick = labels == c
            ax.scatter(xy[pick, 0], xy[pick, 1], s=3, color=colours[c], label=name, linewidths=0)
        ax.set_title(f"level {level}")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), markerscale=4, frameon=False, fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def draw_covariance(steps: np.ndarray, series: list[np.ndarray], title: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for k, y in enumerate(series):
        ax.plot(steps, y, label=f"level {k}", linewidth=1.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("covariance term (unweighted)")
    if all(np.nanmin(y) > 0 for y in series):
        ax.set_yscale("log")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return _save(fig, path)


def draw_subclusters(coords: np.ndarray, clusters: np.ndarray, strips: list[np.ndarray], title: str, path: Path) -> Path:
    """Left: t-SNE of the class coloured by sub-cluster. Right: one strip of thumbnails per sub-cluster."""
    from matplotlib.figure import Figure

    n = len(strips)
    fig = Figure(figsize=(11, max(4.0, 1.3 * n)))
    grid = fig.add_gridspec(n, 2, width_ratios=[1, 1.6])
    colours = _class_colours(n)
    ax = fig.add_subplot(grid[:, 0])
    for c in range(n):
        pick = clusters == c
        ax.scatter(coords[pick, 0], coords[pick, 1], s=6, color=colours[c], label=f"sub-cluster {c} ({pick.sum()})",
                   linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(frameon=False, fontsize=8, markerscale=3)
    for c, strip in enumerate(strips):
        sub = fig.add_subplot(grid[c, 1])
        sub.imshow(strip)
        sub.set_xticks([])
        sub.set_yticks([])
        sub.set_ylabel(f"{c}", rotation=0, labelpad=12, color=colours[c], fontsize=12, fontweight="bold")
        for spine in sub.spines.values():
            spine.set_edgecolor(colours[c])
            spine.set_linewidth(2)
    fig.suptitle(title)
    return _save(fig, path)


def thumbnail_strip(data, rows: Sequence[int], size: int, pad: int = 2) -> np.ndarray:
    """Images of `data` side by side at size x size pixels, as one uint8 (H, W, 3) array."""
    from PIL import Image

    from .data import decode_image, model_pixels

    strip = np.full((size, len(rows) * (size + pad) - pad if rows else size, 3), 255, dtype=np.uint8)
    for j, i in enumerate(rows):
        if data.pixels is not None:
            img = Image.fromarray(data.pixels[i])
        else:
            img = decode_image(data.paths[i], target_size=size)
        strip[:, j * (size + pad): j * (size + pad) + size] = model_pixels(img, size)
    return strip


# --- a run's plots ------------------------------------------------------------------------------------

def plot_run(run=None, out_dir: str | Path | None = None, class_name: str | None = None,
             kinds: Sequence[str] | None = None, dataset: str | None = None, data_dir: str | None = None,
             max_points: int = 2000, n_clusters: int = 3, seed: int = 0, device: str = "cpu",
             progress: ProgressFn | None = None) -> list[Path]:
    """Write the PNGs of a run (default all of PLOT_KINDS) to out_dir (default RUN/plots); silent
    unless given `progress` (feature extraction of the images plotted)."""
    from .evaluation import eval_dataset, load_eval_splits
    from .io import check_writable
    from .runs import find_run, load_model, read_metrics

    kinds = list(PLOT_KINDS) if not kinds else list(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in PLOT_KINDS]
    if unknown:
        raise SjeaError(f"unknown plot '{unknown[0]}' (choose from {', '.join(PLOT_KINDS)}).")
    if n_clusters < 2:
        raise SjeaError(f"--clusters must be 2 or more (got {n_clusters}).")
    require_plot_libraries()
    run_dir = find_run(run)
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    name = run_dir.name
    # Check everything that can be wrong before any slow work.
    check_writable(out_dir / f"{kinds[0]}.png")  # the first PNG to be written (subclusters_<class>.png alike)
    series = covariance_series(read_metrics(run_dir)) if "covariance" in kinds else None
    if "tsne" not in kinds and "subclusters" not in kinds:
        return [draw_covariance(*series, f"{name}: covariance term per level", out_dir / "covariance.png")]

    model = load_model(run_dir, device=device)
    dataset, data_dir = eval_dataset(model.cfg, dataset, data_dir)
    _, test = load_eval_splits(dataset, data_dir, seed)
    class_names = test.class_names or [str(c) for c in range(int(test.labels.max()) + 1)]
    chosen = resolve_class(class_name, class_names) if "subclusters" in kinds else None
    written: list[Path] = []
    if series is not None:
        written.append(draw_covariance(*series, f"{name}: covariance term per level", out_dir / "covariance.png"))
    if "tsne" in kinds:
        written.append(plot_tsne(model, test, class_names, max_points, seed, f"{name}: t-SNE of each level",
                                 f"{dataset} test", out_dir / "tsne.png", progress))
    if "subclusters" in kinds:
        written.append(plot_subclusters(model, test, class_names[chosen], test.labels == chosen, n_clusters,
                                        max_points, seed, f"{name}: level {model.num_levels - 1} sub-clusters of "
                                        f"'{class_names[chosen]}'", f"{dataset} test", out_dir, progress))
    return written


def plot_tsne(model, test, class_names: Sequence[str], max_points: int, seed: int, title: str, source: str,
              path: Path, progress: ProgressFn | None = None) -> Path:
    """Figure 2: every level of the model on `max_points` random test images (titled with `source`)."""
    from .evaluation import extract_features, random_subset

    levels = list(range(model.num_levels))
    sample = test.subset(random_subset(len(test), max_points, seed))
    feats = extract_features(model, sample, levels, progress=progress, task="t-SNE features")
    return draw_tsne([tsne_2d(f) for f in feats], sample.labels, class_names, levels,
                     f"{title} ({source}, {len(sample)} images)", path)


def plot_subclusters(model, test, class_label: str, in_class_mask: np.ndarray, n_clusters: int, max_points: int,
                     seed: int, title: str, source: str, out_dir: Path, progress: ProgressFn | None = None) -> Path:
    """Figure 3: sub-clusters of one class's test images at the model's top level, with the most
    typical members of each as thumbnails (titled with `source`)."""
    from .clusters import MIN_POINTS_PER_CLUSTER
    from .evaluation import extract_features, random_subset

    in_class = np.flatnonzero(in_class_mask)
    in_class = in_class[random_subset(len(in_class), max_points, seed)]
    need = n_clusters * MIN_POINTS_PER_CLUSTER  # k-means keeps at least this many rows per cluster
    if len(in_class) < need:
        raise SjeaError(f"class '{class_label}' has {len(in_class)} test images (with --max-points {max_points}); "
                        f"--clusters {n_clusters} needs at least {need}: lower --clusters or raise --max-points.")
    members = test.subset(in_class)
    top = model.num_levels - 1
    (feats,) = extract_features(model, members, [top], progress=progress, task=f"'{class_label}' features")
    clusters, typical = sub_clusters(feats, n_clusters, seed)
    size = max(32, model.image_size)
    strips = [thumbnail_strip(members, rows.tolist(), size=size) for rows in typical]
    safe = "".join(ch if ch.isalnum() else "_" for ch in class_label)
    return draw_subclusters(tsne_2d(feats), clusters, strips, f"{title} ({source}, {len(members)} images)",
                            out_dir / f"subclusters_{safe}.png")
