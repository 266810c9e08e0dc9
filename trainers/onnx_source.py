"""`sjea train --from FILE.onnx`: a frozen ONNX image encoder as level 0.

The file is checked (self-contained, readable, not modified after `sjea export`), its input and
preprocessing settled, converted once to measure what level 0 gives (its size, and that the
converted module computes what ONNX Runtime computes on the same batch), and recorded with its
sha256 and the output taken. An `sjea export` file brings its preprocessing (metadata) and gives its
top level's output by default (one frozen level: what the graph computes last, every level below
inside it); a foreign graph gives its only output, and its input's size when the graph fixes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch

from sjea_tools.config import ONNX_BACKBONE, RunConfig
from sjea_tools.errors import SjeaError
from sjea_tools.exports.onnx import FORMAT
from sjea_tools.exports.onnx_meta import parse_metadata, preprocess_spec, verified_model_id
from sjea_tools.models.onnx_level import OnnxLevel, read_graph

LEVEL0_KEY = "encoders.0.onnx"  # where the graph's bytes sit in the stacked model's state
# The converted module must give what ONNX Runtime gives on the same batch (float32, other kernels).
MAX_ABS_DIFF = 1e-4


def onnx_source(cfg: RunConfig, path: Path, explicit: set[str], refuse_conflict, levels) -> RunConfig:
    """`cfg` set up to train above the ONNX file at `path` (level 0, frozen). `refuse_conflict` and
    `levels` are frozen.py's: one rule for every kind of source."""
    where = f"--from {path}"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SjeaError(f"cannot read {where} ({e.strerror or e}); pass a readable ONNX file.") from None
    proto = read_graph(data, where)
    metadata = parse_metadata({p.key: p.value for p in proto.metadata_props})
    ours = metadata.get("format") == FORMAT
    if "model.backbone" in explicit:
        refuse_conflict("model.backbone", cfg.model.backbone, ONNX_BACKBONE, "the file")
    size = _input_size(proto, where, ours, metadata)
    if ours:
        verified_model_id(data, metadata, path)  # an export changed after the fact is refused
        spec = preprocess_spec(metadata, path)
        source_data = {"image_size": spec.image_size, "mean": tuple(spec.mean), "std": tuple(spec.std)}
    elif size is not None:
        source_data = {"image_size": size}
    elif "data.image_size" in explicit and cfg.data.image_size:
        source_data = {}
    else:
        raise SjeaError(f"{where} takes images of any height and width; pass the size it was trained at with "
                        "--image-size N.")
    for key, value in source_data.items():
        if f"data.{key}" in explicit and getattr(cfg.data, key) is not None:
            refuse_conflict(f"data.{key}", getattr(cfg.data, key), value, "the file")
    data_cfg = dataclasses.replace(cfg.data, **source_data)
    output = cfg.train.from_output if "train.from_output" in explicit else _default_output(proto, metadata, ours)
    dim = _measure(data, where, output, dataclasses.replace(cfg, data=data_cfg).image_size)
    m = dataclasses.replace(cfg.model, backbone=ONNX_BACKBONE, level0_dim=dim, levels=levels(cfg, 1, explicit))
    train = dataclasses.replace(cfg.train, from_path=str(path.resolve()), from_sha256=hashlib.sha256(data).hexdigest(),
                                from_output=output, frozen_levels=1)
    return dataclasses.replace(cfg, model=m, data=data_cfg, train=train)


def _input_size(proto, where: str, ours: bool, metadata: dict) -> int | None:
    """The square image size the graph's one float32 (N, 3, H, W) input fixes, or None when H and
    W are free."""
    if ours and metadata.get("preprocessing") == "normalize":
        raise SjeaError(f"{where} takes uint8 pixels (exported with --with-preprocessing); export the run again "
                        "without --with-preprocessing.")
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise SjeaError(f"{where} has {len(inputs)} inputs; pass an image encoder with one (N, 3, H, W) input.")
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if tensor.elem_type != 1 or len(dims) != 4 or dims[1] != 3:  # 1: FLOAT
        shown = "x".join("?" if d is None else str(d) for d in dims) or "no shape"
        raise SjeaError(f"{where} takes {shown} input, not float32 (N, 3, H, W) RGB images; pass an encoder of "
                        "normalised RGB images.")
    h, w = dims[2:]
    if h is not None and w is not None and h != w:
        raise SjeaError(f"{where} takes {h}x{w} images; sjea feeds square ones (resize, then centre crop): pass "
                        "an encoder of square images.")
    return h if h is not None and w is not None else None


def _default_output(proto, metadata: dict, ours: bool) -> str | None:
    """An sjea export: its top level's output (the others are computed inside it); else the only one."""
    names = [o.name for o in proto.graph.output]
    if ours and len(names) > 1:
        levels = [int(k) for k in metadata.get("levels", [])]
        if len(levels) == len(names):
            return names[levels.index(max(levels))]
    return names[0] if len(names) == 1 else None  # None: OnnxLevel asks for --set train.from_output


def _measure(data: bytes, where: str, output: str | None, size: int) -> int:
    """Level 0's output size, from running the converted graph on a small batch; refused when it is
    not one row per image or differs from ONNX Runtime's output for the same batch."""
    import onnxruntime as ort

    level = OnnxLevel(1, output)
    level.load_graph(data, where)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            y = level.net(x)
        y = y[level.index] if isinstance(y, (list, tuple)) else y
    except Exception as e:  # noqa: BLE001 - whatever the converted graph raises
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SjeaError(f"{where} does not run on a (2, 3, {size}, {size}) batch once converted ({first}); pass "
                        "--image-size with the size it takes, or export it with a fixed input shape.") from None
    if y.dim() < 2 or any(s != 1 for s in y.shape[2:]):
        raise SjeaError(f"{where} gives a {tuple(y.shape)} output, not one feature row per image; export the encoder "
                        "with its global pooling (output (N, D) or (N, D, 1, 1)).")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    ref = session.run([session.get_outputs()[level.index].name], {session.get_inputs()[0].name: x.numpy()})[0]
    diff = float(np.abs(y.flatten(1).numpy() - ref.reshape(len(ref), -1)).max())
    if not diff <= MAX_ABS_DIFF * max(1.0, float(np.abs(ref).max())):
        raise SjeaError(f"{where} converted by onnx2torch differs from ONNX Runtime by {diff:.3g} (max abs); "
                        "export the encoder again at opset 17 with standard operators.")
    return int(y[0].numel())


def source_state(path: Path) -> dict[str, torch.Tensor]:
    """The frozen level's state: the graph's bytes (the module is rebuilt from them on load)."""
    return {LEVEL0_KEY: torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)}
