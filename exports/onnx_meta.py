"""What an exported ONNX file says about itself, read without onnx or torch: its metadata, its
preprocessing, the hash of its computing content (read from the protobuf wire format) and the
model identity that hash lets it claim."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from sjea_tools.errors import SjeaError
from sjea_tools.onnx_proto import MAX_CONSTANT_ELEMENTS, check_model_contents, field_spans
from sjea_tools.spec import PreprocessSpec

# Re-exported: the content check lives in layer 0 (sjea_tools.onnx_proto) so that models can run it too.
__all__ = ["MAX_CONSTANT_ELEMENTS", "check_model_contents"]


def parse_metadata(props: dict[str, str]) -> dict:
    """metadata_props (all strings) -> typed values: JSON where the exporter wrote JSON."""
    out = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


def centres_of(metadata: dict, dims: list[int], path: Path) -> list[np.ndarray] | None:
    """The `centres` metadata (one mean per output, in `levels` order) as float32 arrays, or None
    for a file without them (a model trained before centring, or projector outputs)."""
    record = metadata.get("centres")
    if record is None:
        return None
    try:
        centres = [np.asarray(c, dtype=np.float32).reshape(-1) for c in record]
    except (TypeError, ValueError):
        centres = None
    if centres is None or [len(c) for c in centres] != [int(d) for d in dims]:
        raise SjeaError(f"{path} has unreadable centring means (metadata 'centres' does not match the outputs' "
                        "widths); export it again with 'sjea export'.")
    return centres


def whitenings_of(metadata: dict, dims: list[int], path: Path) -> list[np.ndarray | None] | None:
    """The `whitening` metadata (per output, in `levels` order: a (d, d) float32 matrix as
    {shape, dtype, base64}, or null for an output centred only) as arrays, or None for a file
    without it (a model trained before whitening)."""
    import base64
    import binascii

    record = metadata.get("whitening")
    if record is None:
        return None
    try:
        found = [None if r is None else np.frombuffer(base64.b64decode(r["base64"], validate=True), dtype="<f4")
                 .reshape([int(v) for v in r["shape"]]).astype(np.float32) for r in record]
        ok = len(found) == len(dims) and all(w is None or w.shape == (int(d), int(d)) for w, d in zip(found, dims))
    except (TypeError, ValueError, KeyError, binascii.Error):
        ok = False
    if not ok:
        raise SjeaError(f"{path} has an unreadable whitening (metadata 'whitening' does not match the outputs' "
                        "widths); export it again with 'sjea export'.")
    return found if any(w is not None for w in found) else None


def preprocess_spec(metadata: dict, path: Path) -> PreprocessSpec:
    """The graph's input preprocessing: the 'preprocess' record, or, in files exported before it
    existed, the same numbers under their separate keys."""
    record = metadata.get("preprocess")
    if isinstance(record, dict):
        return PreprocessSpec.from_dict(record)
    if "image_size" not in metadata:
        raise SjeaError(f"{path} has no sjea metadata (levels, image size); export it with 'sjea export'.")
    return PreprocessSpec.from_dict({"image_size": metadata["image_size"], "mean": metadata.get("mean"),
                                     "std": metadata.get("std"),
                                     "colour_mode": metadata.get("color_mode", "RGB")})


# Top-level ModelProto fields that describe rather than compute (producer_name, producer_version,
# doc_string, metadata_props): left out of the content hash, so metadata can record the hash.
DESCRIPTIVE_FIELDS = frozenset({2, 3, 6, 14})


def graph_sha256(data: bytes) -> str:
    """sha256 of a serialized ONNX model's computing content: every top-level protobuf field
    (graph with its weights, opsets, functions, IR version) except the descriptive ones, in file
    order. Reads the wire format directly (no onnx import); ValueError when it is not protobuf."""
    return content_hashes(data)[0]


def content_hashes(data: bytes) -> tuple[str, str]:
    """(graph_sha256, sha256 of the descriptive fields) in one pass: together they name the whole
    file's content (the key of its optimised graph, `content_key`)."""
    h, rest, view = hashlib.sha256(), hashlib.sha256(), memoryview(data)
    for num, _, _, start, end in field_spans(view):
        (rest if num in DESCRIPTIVE_FIELDS else h).update(view[start:end])
    return h.hexdigest(), rest.hexdigest()


def content_model_id(graph_hash: str) -> str:
    """The model id of an ONNX file that records no verifiable checkpoint identity."""
    return f"onnx-graph-sha256:{graph_hash}"


class ModelIdentityError(SjeaError):
    """An ONNX file is not the model it claims (or is expected) to be."""


def verified_model_id(data: bytes, metadata: dict, path: Path, actual: str | None = None) -> str:
    """The model id a file may claim: the checkpoint's sha256 from its metadata when its content
    still hashes to the graph_sha256 recorded at export, else (no record) its content hash; a
    mismatch (weights or graph changed after export) is refused. `actual`: graph_sha256(data)
    when the caller has it."""
    try:
        actual = actual or graph_sha256(data)
    except ValueError as e:
        raise SjeaError(f"{path} is not a readable ONNX file ({e}); export it again with 'sjea export'.") from None
    recorded = str(metadata.get("graph_sha256", ""))
    if not recorded:
        return content_model_id(actual)
    if recorded != actual:
        raise ModelIdentityError(f"{path} was modified after export: its graph and weights hash to {actual[:12]}, "
                        f"not the {recorded[:12]} recorded when it was exported; use the genuine file or "
                        "export it again with 'sjea export'.")
    return str(metadata.get("model_sha256") or "") or content_model_id(actual)
