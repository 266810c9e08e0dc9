"""`sjea train --from SOURCE`: higher levels trained on a frozen stack.

SOURCE is a run folder (all of its levels are frozen; the new run keeps their architecture and
preprocessing), a torchvision ResNet state_dict file (level 0 frozen) or an ONNX image encoder
(level 0 frozen: onnx_source.py). `apply_source` settles
the configuration before anything is written and records the source with its sha256; the
trainer calls `frozen_state` to copy the weights into a new run's model, which then holds every
level, so embed, export and eval use it like any other run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sjea_tools.config import RESNET_NAMES, RunConfig, validate
from sjea_tools.errors import SjeaError
from sjea_tools.io import sha256_file
from sjea_tools.models import create_backbone
from sjea_tools.models.stacked import resolve_stem
from sjea_tools.runs import load_model, model_id, safe_torch_load

# Architecture settings the frozen levels were built with: the new run takes them from a source run.
MODEL_KEYS = ("backbone", "level0_dim", "encoder", "mlp_dims", "level_input", "projector",
              "projector_last_bias")
# Settings that only shape levels 1 and up: a one-level source leaves them to the new levels.
HIGHER_LEVEL_KEYS = ("encoder", "mlp_dims", "level_input")
CHECKPOINT_SUFFIXES = (".pt", ".pth")
ONNX_SUFFIX = ".onnx"
LEVEL0_PREFIX = "encoders.0.net."  # where a torchvision ResNet's weights sit in the stacked model


def apply_source(cfg: RunConfig, source: str | Path, explicit: set[str] = frozenset()) -> RunConfig:
    """`cfg` set up to train on SOURCE's frozen levels. `explicit`: the dotted settings the user
    chose; one that contradicts the source is refused, the others follow the source."""
    path = Path(source)
    if path.is_dir():
        return _from_run(cfg, path, explicit)
    if not path.exists():
        raise SjeaError(f"--from {path} does not exist; pass a run folder from 'sjea train', a torchvision "
                        "ResNet state_dict file (.pt/.pth) or an ONNX image encoder (.onnx).")
    if path.suffix.lower() == ONNX_SUFFIX:
        from .onnx_source import onnx_source

        return validate(onnx_source(cfg, path, explicit, _refuse_conflict, _levels))
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise SjeaError(f"--from {path} is neither a run folder, a .pt/.pth state_dict file nor an .onnx file; pass "
                        "one of those.")
    return _from_checkpoint(cfg, path, explicit)


def _levels(cfg: RunConfig, frozen: int, explicit: set[str]) -> int:
    """The new stack's height: as asked (validate() refuses one with nothing left to train), else
    one level above the frozen ones."""
    return cfg.model.levels if "model.levels" in explicit else frozen + 1


def _refuse_conflict(option: str, asked, source_value, where: str) -> None:
    if asked != source_value:
        flag = "--" + option.split(".")[-1].replace("_", "-")
        raise SjeaError(f"{flag} {asked} differs from {where}'s {source_value}: the frozen levels keep theirs; drop "
                        f"{flag} (or train a new stack without --from).")


def _from_run(cfg: RunConfig, run_dir: Path, explicit: set[str]) -> RunConfig:
    model = load_model(run_dir)  # refuses a folder that is not a run, or a broken model file
    src = model.cfg
    spec = src.preprocess_spec
    source_data = {"image_size": spec.image_size, "mean": tuple(spec.mean), "std": tuple(spec.std)}
    for key, value in source_data.items():
        if f"data.{key}" in explicit and getattr(cfg.data, key) is not None:
            _refuse_conflict(f"data.{key}", getattr(cfg.data, key), value, "the source run")
    data = dataclasses.replace(cfg.data, **source_data)
    source_model = {key: getattr(src.model, key) for key in MODEL_KEYS
                    if src.model.levels > 1 or key not in HIGHER_LEVEL_KEYS}
    source_model["stem"] = resolve_stem(src)
    for key, value in source_model.items():
        if f"model.{key}" in explicit:
            asked = resolve_stem(dataclasses.replace(cfg, data=data)) if key == "stem" else getattr(cfg.model, key)
            _refuse_conflict(f"model.{key}", asked, value, "the source run")
    frozen = src.model.levels
    m = dataclasses.replace(cfg.model, **source_model, levels=_levels(cfg, frozen, explicit))
    train = dataclasses.replace(cfg.train, from_path=str(run_dir.resolve()), from_sha256=model_id(model),
                                frozen_levels=frozen, from_output=src.train.from_output)  # an ONNX level 0's
    return validate(dataclasses.replace(cfg, model=m, data=data, train=train))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A file saved with torch.save(model.state_dict()), read with weights_only=True."""
    try:
        state = safe_torch_load(path)
    except SjeaError:
        raise SjeaError(f"--from {path} is not a readable torch file (corrupt or not saved by torch.save); pass a "
                        "file saved with torch.save(model.state_dict(), path).") from None
    if isinstance(state, dict) and "model" in state and "config" in state:
        raise SjeaError(f"--from {path} is an sjea model file; pass its run folder ({path.parent}) instead.")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SjeaError(f"--from {path} holds no state_dict (a name -> tensor table); save one with "
                        "torch.save(model.state_dict(), path).")
    return {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is not used


def resnet_arch(state: dict[str, torch.Tensor]) -> str | None:
    """Which torchvision ResNet a state_dict is, from its block counts and block kind."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    return {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
            ((3, 4, 6, 3), True): "resnet50"}.get((blocks, bottleneck))


def _fit_resnet(state: dict[str, torch.Tensor], backbone: str, stem: str, path: Path) -> None:
    """One line naming what differs between the file and the level-0 ResNet it should fill."""
    module, _ = create_backbone(backbone, stem=stem)
    want = {k: v.shape for k, v in module.net.state_dict().items()}
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    shapes = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k])]
    if not (missing or extra or shapes):
        return
    found = resnet_arch(state)
    differs = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else
               f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else
               f"{shapes[0]} is {tuple(state[shapes[0]].shape)}, not {tuple(want[shapes[0]])}")
    fix = (f"the file looks like {found}: pass --backbone {found}" if found and found != backbone
           else "pass a torchvision resnet18/34/50 state_dict")
    raise SjeaError(f"--from {path} does not fit a {backbone} level 0 ({differs} tensor names); {fix}.")


def _from_checkpoint(cfg: RunConfig, path: Path, explicit: set[str]) -> RunConfig:
    state = _read_state_dict(path)
    found = resnet_arch(state)
    backbone = cfg.model.backbone if "model.backbone" in explicit or found is None else found
    if backbone not in RESNET_NAMES:
        raise SjeaError(f"--from {path} is a torchvision ResNet file, which fills a ResNet level 0; pass --backbone "
                        f"{found or 'resnet18'} (not {backbone}).")
    conv1 = state.get("conv1.weight")
    stem = "small" if conv1 is not None and conv1.shape[-1] == 3 else "standard"  # 7x7: torchvision's own
    if "model.stem" in explicit:
        _refuse_conflict("model.stem", resolve_stem(cfg), stem, "the file")
    _fit_resnet(state, backbone, stem, path)
    m = dataclasses.replace(cfg.model, backbone=backbone, stem=stem, levels=_levels(cfg, 1, explicit))
    train = dataclasses.replace(cfg.train, from_path=str(path.resolve()), from_sha256=sha256_file(path),
                                frozen_levels=1)
    return validate(dataclasses.replace(cfg, model=m, train=train))


def frozen_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The frozen levels' weights under the stacked model's names, from the source the config
    records; refused when the source file changed since the run was configured."""
    path, frozen = Path(cfg.train.from_path), cfg.train.frozen_levels
    if path.is_dir():
        model = load_model(path)
        changed = model_id(model) != cfg.train.from_sha256
        prefixes = tuple(f"{part}.{k}." for part in ("encoders", "projectors") for k in range(frozen))
        state = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    else:
        if not path.is_file():
            raise SjeaError(f"the source {path} is gone; restore it or train without --from.")
        changed = sha256_file(path) != cfg.train.from_sha256
        if path.suffix.lower() == ONNX_SUFFIX:
            from .onnx_source import source_state

            state = source_state(path)
        else:
            state = {LEVEL0_PREFIX + k: v for k, v in _read_state_dict(path).items()}
    if changed:
        raise SjeaError(f"the source {path} changed since this run was configured (sha256 differs); start the run "
                        "again with --from.")
    return state


def frozen_centres(cfg: RunConfig) -> tuple[list[torch.Tensor], list[torch.Tensor | None]] | None:
    """(means, whitenings) of the source run's frozen levels (trainers.centring), which the new run
    keeps so that its frozen levels' rows equal the source's rows; None for a torchvision file or a
    source run from before centring (the new run's own centring serves)."""
    path, frozen = Path(cfg.train.from_path or ""), cfg.train.frozen_levels
    if not frozen or not cfg.train.from_path or not path.is_dir():
        return None
    model = load_model(path)
    if model_id(model) != cfg.train.from_sha256:
        raise SjeaError(f"the source {path} changed since this run was configured (sha256 differs); start the run "
                        "again with --from.")
    if model.centres is None:
        return None
    whitenings = model.whitenings or [None] * model.num_levels
    return model.centres[:frozen], whitenings[:frozen]


def load_frozen(model, state: dict[str, torch.Tensor]) -> None:
    """Copy the frozen levels' weights into `model`; every one must have a place there."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise SjeaError(f"the source's weights do not fit this model ({str(e).splitlines()[0]}).") from None
    if result.unexpected_keys:
        raise SjeaError(f"the source's weights do not fit this model ({result.unexpected_keys[0]} has no place).")
