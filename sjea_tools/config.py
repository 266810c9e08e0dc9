"""One configuration object for a run: dataclasses, named presets, file loading, overrides.

Every default lives here. `resolve_config(preset, file, overrides)` is the only way a run's
configuration is built, by the CLI and by Python users alike, and the result is saved with the run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SjeaError
from .io import atomic_write_text
from .spec import PreprocessSpec, ReadsPreprocessSpec

# Per-dataset facts: normalisation, native size, whether images are grayscale.
DATASET_STATS: dict[str, dict[str, Any]] = {
    "cifar10": {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616), "size": 32},
    "cifar100": {"mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762), "size": 32},
    "stl10": {"mean": (0.43, 0.42, 0.39), "std": (0.27, 0.26, 0.27), "size": 64},
    "fashion-mnist": {"mean": (0.2860, 0.2860, 0.2860), "std": (0.3530, 0.3530, 0.3530), "size": 28},
    # An image folder: ImageNet statistics are the usual neutral choice.
    "folder": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "size": 64},
}
DATASETS = ("cifar10", "cifar100", "stl10", "fashion-mnist")
# The level-0 encoders a configuration may name; models/resnet.py and models/convnet.py register a
# factory for each. Kept here, not read from the model registry, so that the configuration layer
# imports no model code (tests/test_models.py checks that the two lists are the same).
RESNET_NAMES = ("resnet18", "resnet34", "resnet50")
# Small plain CNNs for small images on CPU, convnet-W[-D]: stage widths W..8W, D convs per stage.
CONVNET_NAMES = tuple(f"convnet-{w}" + (f"-{d}" if d > 1 else "") for w in (16, 32, 48, 64) for d in (1, 2))
BACKBONE_NAMES = RESNET_NAMES + CONVNET_NAMES
# Level 0 as a frozen ONNX graph (sjea train --from FILE.onnx): not in the registry, since the module
# is built from the graph's bytes, which the run's model file holds (models/onnx_level.py).
ONNX_BACKBONE = "onnx"


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # level-0 image encoder, by registry name
    stem: str = "auto"  # auto | small (3x3 s1, no max-pool) | standard (7x7 s2 + max-pool)
    levels: int = 2  # 1 = plain VICReg
    encoder: str = "resnet"  # higher levels: resnet (one-channel ResNet-18 on a 2-D map) | mlp
    mlp_dims: str = "512-512"  # hidden and output sizes of the mlp encoder
    level_input: str = "representation"  # what level k reads from level k-1: representation | embedding
    projector: str = "512-512-256"  # hidden and output sizes of every level's projector
    projector_last_bias: bool = True  # the authors' projector has one; official VICReg has none
    stop_gradient: bool = False  # detach a level's input from the level below
    level0_dim: int | None = None  # backbone "onnx" only: the size of the frozen graph's output, read from it


@dataclass
class ViewConfig:
    """Per-view overrides of the augmentation (data.view1.*, data.view2.*); None = the shared value."""
    crop_scale: tuple[float, float] | None = None
    flip_p: float | None = None
    jitter: tuple[float, float, float, float] | None = None
    jitter_p: float | None = None
    grayscale_p: float | None = None
    blur_p: float | None = None
    blur_sigma: tuple[float, float] | None = None
    solarize_p: float | None = None


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # one of DATASETS, or a path to an image folder
    data_dir: str | None = None  # local files; None = the usual places, then download
    image_size: int | None = None  # None = the dataset's native size
    mean: tuple[float, float, float] | None = None  # None = the dataset's statistics
    std: tuple[float, float, float] | None = None
    limit: int | None = None  # train on the first N images only (None = all)
    holdout: int = 0  # images held out of training (CIFAR recipe: 5000)
    split_seed: int = 22343
    # Augmentation: a named recipe (data/augment.py RECIPES: authors, vicreg) or "custom" = the fields
    # below for both views; view1/view2 override either, per view.
    augment: str = "custom"
    crop_scale: tuple[float, float] = (0.3, 1.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the training image
    solarize_p: float = 0.0
    view1: ViewConfig = field(default_factory=ViewConfig)
    view2: ViewConfig = field(default_factory=ViewConfig)
    workers: int = 2


@dataclass
class OptimConfig:
    optimizer: str = "adam"  # adam (authors) | lars (official VICReg)
    lr: float = 1e-3  # peak learning rate; with lars scaled by batch_size / 256
    weight_decay: float = 0.0
    momentum: float = 0.9  # lars only
    eta: float = 0.001  # lars trust coefficient
    warmup_epochs: float = 1.0
    final_lr_ratio: float = 0.0  # cosine ends at lr * final_lr_ratio


@dataclass
class LossConfig:
    # One value for every level, or one per level.
    sim_coeff: list[float] = field(default_factory=lambda: [25.0])
    std_coeff: list[float] = field(default_factory=lambda: [25.0])
    cov_coeff: list[float] = field(default_factory=lambda: [1.0])
    level_weights: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class TrainConfig:
    epochs: float = 1.0
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: bool = True  # inputs and weights in NHWC (CPU and GPU)
    compile: bool = False
    augment_on_device: bool = True  # batched augmentation on the training device
    checkpoint_every: int = 200  # steps between checkpoints (and at every epoch end)
    log_every: int = 10  # steps between metric rows
    max_steps: int | None = None  # stop early after this many steps (the lr schedule still spans all epochs)
    # `sjea train --from`: levels 0..frozen_levels-1 are copied from this run folder, torchvision
    # ResNet state_dict file or ONNX file (its model file's sha256 beside it) and stay fixed while the
    # rest train. from_output: the ONNX output taken as level 0 (an sjea export's top level by default).
    from_path: str | None = None
    from_sha256: str | None = None
    from_output: str | None = None
    frozen_levels: int = 0


@dataclass
class RunConfig(ReadsPreprocessSpec):
    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        cfg = cls()
        apply_nested(cfg, data, where="config")
        return validate(cfg)

    def per_level(self, name: str) -> list[float]:
        """A loss setting broadcast to one value per level."""
        values = list(getattr(self.loss, name))
        if len(values) == 1:
            values = values * self.model.levels
        return values

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """What the model of this run expects as input: the data settings, else the dataset's."""
        stats = dataset_stats(self.data.dataset)
        return PreprocessSpec(self.data.image_size or stats["size"], self.data.mean or stats["mean"],
                              self.data.std or stats["std"])


def dataset_stats(dataset: str) -> dict[str, Any]:
    return DATASET_STATS.get(dataset, DATASET_STATS["folder"])


# Named presets: partial dictionaries applied over the defaults above.
PRESETS: dict[str, dict] = {
    # The CPU default: real Fashion-MNIST, all 60,000 training images, minutes on 2 cores; chosen by
    # measurement (docs/recipe_search.md, benchmarks/recipe_search.py): a small convnet with a
    # stride-2 stem learns more per CPU-second than ResNet-18 (whose 28 px map is 1x1 at layer 4),
    # batch 128 learned as much per epoch as 256, and crops of 60-100 % scored above 30-100 % at
    # every epoch measured.
    "tiny": {
        "model": {"backbone": "convnet-32", "stem": "standard", "levels": 2, "encoder": "mlp",
                  "projector": "512-512-256"},
        "data": {"dataset": "fashion-mnist", "crop_scale": (0.6, 1.0)},
        "optim": {"lr": 2e-3, "warmup_epochs": 0.3},
        "train": {"epochs": 6, "batch_size": 128},
    },
    # The authors' recipe (method.md).
    "cifar10-paper": {
        "model": {"backbone": "resnet18", "stem": "small", "levels": 2, "encoder": "resnet"},
        "data": {"dataset": "cifar10", "image_size": 32, "holdout": 5000},
        "train": {"epochs": 200, "batch_size": 256},
    },
    "stl10-paper": {
        "model": {"backbone": "resnet18", "stem": "standard", "levels": 2, "encoder": "resnet"},
        "data": {"dataset": "stl10", "image_size": 64},
        "train": {"epochs": 300, "batch_size": 256},
    },
    # Official VICReg (facebookresearch/vicreg): LARS, base lr 0.2 x batch/256, wd 1e-6, eta 0.001,
    # biases and norms excluded, 10 warm-up epochs, cosine to 0.001 x lr, 8192-8192-8192 projector.
    "vicreg-official": {
        "model": {"backbone": "resnet18", "stem": "small", "levels": 1, "projector": "8192-8192-8192",
                  "projector_last_bias": False},
        "data": {"dataset": "cifar10", "image_size": 32, "holdout": 5000, "augment": "vicreg"},
        "optim": {"optimizer": "lars", "lr": 0.2, "weight_decay": 1e-6, "eta": 0.001, "momentum": 0.9,
                  "warmup_epochs": 10, "final_lr_ratio": 0.001},
        "train": {"epochs": 100, "batch_size": 256},
    },
    # One-level baselines; r50 is parameter-matched to 2-level S-JEA.
    "vicreg-r18": {
        "model": {"backbone": "resnet18", "stem": "small", "levels": 1},
        "data": {"dataset": "cifar10", "image_size": 32, "holdout": 5000},
        "train": {"epochs": 200, "batch_size": 256},
    },
    "vicreg-r50": {
        "model": {"backbone": "resnet50", "stem": "small", "levels": 1},
        "data": {"dataset": "cifar10", "image_size": 32, "holdout": 5000},
        "train": {"epochs": 200, "batch_size": 256},
    },
}


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Convert a value from a file or the command line to the type of the field."""
    try:
        if "list[float]" in annotation:
            if isinstance(value, str):
                return [float(v) for v in value.split(",") if v.strip()]
            if isinstance(value, (int, float)):
                return [float(value)]
            return [float(v) for v in value]
        if "tuple" in annotation:
            if value is None:
                return None
            if isinstance(value, str):
                value = value.split(",")
            return tuple(float(v) for v in value)
        if value is None:
            return None
        if "bool" in annotation:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if "int" in annotation and "float" not in annotation:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if "float" in annotation:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise SjeaError(f"{where}: {value!r} is not a valid value ({annotation}).") from None


def apply_nested(cfg: Any, data: dict, where: str) -> None:
    """Set fields of a (nested) dataclass from a dictionary, refusing unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise SjeaError(f"{where}: unknown setting '{key}' (known: {known}).")
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise SjeaError(f"{where}.{key}: expected a table of settings.")
            apply_nested(current, value, f"{where}.{key}")
        else:
            setattr(cfg, name, _coerce(value, str(fields[name].type), f"{where}.{key}"))


def load_config_file(path: str | Path) -> dict:
    """Read a YAML, TOML or JSON configuration file into a dictionary."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SjeaError(f"cannot read config file {path}: {e.strerror or e}.") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # every parser has its own error type
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SjeaError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SjeaError(f"config file {path} must hold a table of settings at the top level.")
    return data


# --- validation: one table ---------------------------------------------------------------------
# Upper bounds: far above any recipe (the paper uses 2-3 levels; official VICReg a 8192-8192-8192
# projector and batch 2048 over many GPUs), low enough that a typo (levels: 100000) is refused at
# once instead of building a model until the kernel kills the process.
MAX_LEVELS = 16
MAX_WIDTH = 65536  # any one size in model.projector / model.mlp_dims
MAX_DENSE_PARAMETERS = 1_000_000_000  # projectors + mlp encoders over all levels (4 GB of fp32 weights)
MAX_BATCH = 65536
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2**32 - 1  # numpy's seed range

VIEWS = ("data", "data.view1", "data.view2")
LOSS_LISTS = tuple(f"loss.{name}" for name in ("sim_coeff", "std_coeff", "cov_coeff", "level_weights"))
PROBABILITIES = ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")
CHOICES = {"model.stem": ("auto", "small", "standard"), "model.encoder": ("resnet", "mlp"),
           "model.level_input": ("representation", "embedding"), "optim.optimizer": ("adam", "lars"),
           "data.augment": ("custom", "authors", "vicreg"), "train.precision": ("auto", "fp32", "bf16", "fp16")}
RANGES = {  # setting: (lowest, highest)
    "model.levels": (1, MAX_LEVELS), "train.batch_size": (2, MAX_BATCH), "data.image_size": (8, MAX_IMAGE_SIZE),
    "data.workers": (0, 256), "data.split_seed": (0, MAX_SEED), "train.seed": (0, MAX_SEED),
    "train.epochs": (0, 1e6), "train.max_steps": (1, 10**12), "train.checkpoint_every": (1, 10**12),
    "train.log_every": (1, 10**12), "optim.lr": (0, 100.0), "optim.weight_decay": (0, 10.0),
    "optim.momentum": (0, 1.0), "optim.eta": (0, 10.0), "optim.warmup_epochs": (0, 1e6),
    "optim.final_lr_ratio": (0, 1.0),
    **{f"{name}[*]": (0, 1e6) for name in LOSS_LISTS},
    **{f"{view}.jitter[{i}]": (0, 0.5 if i == 3 else 10.0) for view in VIEWS for i in range(4)},  # hue <= 0.5
}


def _sizes(spec: str) -> list[int] | None:
    """'512-512-256' -> [512, 512, 256]; None unless every part is a positive integer."""
    try:
        dims = [int(v) for v in spec.split("-")]
    except ValueError:
        return None
    return dims if all(d > 0 for d in dims) else None


def _dense_weights(cfg: RunConfig) -> int:
    """An upper estimate of the projectors' and mlp encoders' weights: every chain read from a
    2048-wide input (resnet50's output)."""
    m, dense = cfg.model, 0
    for spec_name in ("projector", "mlp_dims"):
        if spec_name == "projector" or m.encoder == "mlp":
            dims = [int(v) for v in getattr(m, spec_name).split("-") if v.strip().isdigit()]
            dense += m.levels * sum(a * b for a, b in zip([2048] + dims, dims))
    return dense


def _range_rules(name: str, low, high) -> list[tuple]:
    label = name.split("[")[0]
    return [(name, lambda v, cfg: v is None or not (math.isfinite(v) and v > high),
             f"{label}: {{v}} is out of range; give a value at most {high:,}."),
            (name, lambda v, cfg: v is None or (math.isfinite(v) and low <= v <= high),
             f"{label}: {{v}} is out of range; give a value from {low:,} to {high:,}.")]


def _view_rules(view: str) -> list[tuple]:
    rules = [(f"{view}.{p}", lambda v, cfg: v is None or 0.0 <= v <= 1.0,  # also refuses NaN
              "{name} is a probability: give a value from 0 to 1 (got {v}).") for p in PROBABILITIES]
    return rules + [
        (f"{view}.crop_scale", lambda v, cfg: v is None or (len(v) == 2 and 0.0 < v[0] <= v[1] <= 1.0),
         "{name}: give min,max with 0 < min <= max <= 1, e.g. 0.3,1.0 (got {v})."),
        (f"{view}.jitter", lambda v, cfg: v is None or (len(v) == 4 and all(x >= 0 for x in v)),  # bounds: RANGES
         "{name}: give brightness,contrast,saturation,hue (hue <= 0.5), e.g. 0.4,0.4,0.4,0.1 (got {v})."),
        (f"{view}.blur_sigma", lambda v, cfg: v is None or (len(v) == 2 and 0.0 < v[0] <= v[1] and math.isfinite(v[1])),
         "{name}: give min,max in pixels with 0 < min <= max, e.g. 0.1,2.0 (got {v})."),
    ]


# (setting, ok(value, cfg), message: what is wrong and how to fix it), checked in this order; the
# message is formatted with the setting's `name`, its value `v`, `n` = len(v), `levels`, `dense`.
# A setting ending in [*] is checked value by value, in [i] its i-th value (when it has one).
RULES: list[tuple] = [
    ("model.levels", lambda v, cfg: v >= 1, "--levels must be 1 or more (got {v})."),
    ("train.batch_size", lambda v, cfg: v >= 2,
     "--batch-size must be 2 or more: VICReg's variance needs a batch (got {v})."),
    ("train.epochs", lambda v, cfg: math.isfinite(v) and v > 0, "--epochs must be positive (got {v})."),
    *[(f"data.{name}", lambda v, cfg: v is None or (len(v) == 3 and all(math.isfinite(x) for x in v)),
       "{name}: give three numbers, one per RGB channel, e.g. 0.5,0.5,0.5 (got {v}).") for name in ("mean", "std")],
    ("data.std", lambda v, cfg: v is None or min(v) > 0, "{name}: every value must be positive (got {v})."),
    ("data.image_size", lambda v, cfg: v is None or v >= 1, "{name} must be positive (got {v})."),
    ("data.limit", lambda v, cfg: v is None or v >= 1,
     "{name} must be 1 or more; leave it unset for all images (got {v})."),
    ("data.holdout", lambda v, cfg: v >= 0, "{name} must be 0 or more (got {v})."),
    *[rule for view in VIEWS for rule in _view_rules(view)],
    ("optim.lr", lambda v, cfg: math.isfinite(v) and v > 0, "{name} must be a positive number (got {v})."),
    ("optim.weight_decay", lambda v, cfg: math.isfinite(v) and v >= 0, "{name} must be 0 or more (got {v})."),
    *[(name, lambda v, cfg: all(math.isfinite(x) and x >= 0 for x in v),
       "{name}: every value must be a finite number, 0 or more (got {v}).") for name in LOSS_LISTS],
    *[rule for name, (low, high) in RANGES.items() for rule in _range_rules(name, low, high)],
    *[(f"model.{name}", lambda v, cfg: not any(d > MAX_WIDTH for d in
                                               (int(x) for x in v.split("-") if x.strip().isdigit())),
       f"{{name}}: '{{v}}' has a size above {MAX_WIDTH}; use smaller layers.") for name in ("projector", "mlp_dims")],
    ("model", lambda v, cfg: _dense_weights(cfg) <= MAX_DENSE_PARAMETERS,
     f"model.projector/mlp_dims: about {{dense:,}} weights over {{levels}} levels (at most "
     f"{MAX_DENSE_PARAMETERS:,}); use fewer levels or smaller layers."),
    *[(name, lambda v, cfg, allowed=allowed: v in allowed, f"{{name}}: '{{v}}' is not one of {', '.join(allowed)}.")
      for name, allowed in CHOICES.items()],
    *[(name, lambda v, cfg: len(v) in (1, cfg.model.levels),
       "{name}: give one value or one per level ({levels}), not {n}.") for name in LOSS_LISTS],
    ("train.frozen_levels", lambda v, cfg: v == 0 or cfg.train.from_path,
     "{name}: frozen levels need a source to copy them from: sjea train --from RUN_OR_FILE."),
    ("train.frozen_levels", lambda v, cfg: 0 <= v < cfg.model.levels,
     "--levels {levels} leaves nothing to train above the {v} frozen level(s) of the source; pass --levels "
     "{v_next} or more."),
    ("model.backbone", lambda v, cfg: v in BACKBONE_NAMES or (v == ONNX_BACKBONE and cfg.train.frozen_levels >= 1),
     f"unknown backbone '{{v}}' (known: {', '.join(BACKBONE_NAMES)}; an ONNX level 0 comes from --from FILE.onnx)."),
    ("model.level0_dim", lambda v, cfg: (v is None) == (cfg.model.backbone != ONNX_BACKBONE) and (v is None or v >= 1),
     "{name}: the output size of a frozen ONNX level 0, set (only) by sjea train --from FILE.onnx (got {v})."),
    *[(f"model.{name}", lambda v, cfg: _sizes(v) is not None,
       "{name}: '{v}' must be sizes joined by '-', e.g. 512-512-256.") for name in ("projector", "mlp_dims")],
]


def _values(cfg: RunConfig, setting: str) -> list:
    """The value(s) a rule's setting names: one, each of a list ([*]), or its i-th when it has one."""
    path, _, index = setting.partition("[")
    value = functools.reduce(getattr, path.split("."), cfg)
    if not index:
        return [value]
    if value is None:
        return []
    return list(value) if index == "*]" else list(value)[int(index[:-1]):int(index[:-1]) + 1]


def validate(cfg: RunConfig) -> RunConfig:
    """`cfg`, or SjeaError with the first rule of RULES it breaks: one line naming the setting and the fix."""
    for setting, ok, message in RULES:
        for v in _values(cfg, setting):
            if not ok(v, cfg):
                n = len(v) if hasattr(v, "__len__") else 0
                raise SjeaError(message.format(name=setting.split("[")[0], v=v, n=n, levels=cfg.model.levels,
                                               dense=_dense_weights(cfg), v_next=cfg.train.frozen_levels + 1))
    return cfg


def resolve_config(preset: str = "tiny", config_file: str | Path | None = None,
                   overrides: dict | None = None) -> RunConfig:
    """Defaults, then the preset, then the file, then explicit overrides (dotted keys)."""
    if preset not in PRESETS:
        raise SjeaError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)}).")
    cfg = RunConfig(name=preset)
    apply_nested(cfg, PRESETS[preset], where=f"preset {preset}")
    if config_file is not None:
        apply_nested(cfg, load_config_file(config_file), where=str(config_file))
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        apply_nested(cfg, _nest(parents, {leaf: value}), where="option")
    return validate(cfg)


def _nest(keys: list[str], leaf: dict) -> dict:
    for key in reversed(keys):
        leaf = {key: leaf}
    return leaf


def save_config(cfg: RunConfig, path: str | Path) -> None:
    atomic_write_text(Path(path), json.dumps(cfg.to_dict(), indent=2) + "\n")
