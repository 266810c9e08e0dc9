"""What an exported ONNX file says about itself, read without onnx or torch: its metadata, its
preprocessing, the hash of its computing content (read from the protobuf wire format) and the
model identity that hash lets it claim."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from sjea_tools.errors import SjeaError
from sjea_tools.spec import PreprocessSpec


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


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def graph_sha256(data: bytes) -> str:
    """sha256 of a serialized ONNX model's computing content: every top-level protobuf field
    (graph with its weights, opsets, functions, IR version) except the descriptive ones, in file
    order. Reads the wire format directly (no onnx import); ValueError when it is not protobuf."""
    return content_hashes(data)[0]


def content_hashes(data: bytes) -> tuple[str, str]:
    """(graph_sha256, sha256 of the descriptive fields) in one pass: together they name the whole
    file's content (the key of its optimised graph, `content_key`)."""
    h, rest, view = hashlib.sha256(), hashlib.sha256(), memoryview(data)
    for num, _, _, start, end in _field_spans(view):
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


# --- what a file may hold: self-contained, no constant-shaped memory bombs --------------------------
# Which length-delimited field of each ONNX message holds which message (onnx.proto numbers), so
# every tensor is found wherever it sits: initializers, Constant nodes, subgraphs, functions.
_CHILDREN = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
# Ops whose output size is read from a second tensor's values: with a constant there, ONNX Runtime
# allocates the output when it folds constants at load (a 189-byte file asked for 2 GB).
_SHAPED_OPS = {b"ConstantOfShape": 0, b"Expand": 1, b"Tile": 1}
# The most elements such an output may have: far above any shape an sjea export builds (its shapes
# are per image and small), far below a memory bomb (2^24 float32 = 64 MiB).
MAX_CONSTANT_ELEMENTS = 1 << 24
_MAX_DEPTH = 64  # nested subgraphs; deeper is not a model, it is a stack bomb


def _field_spans(buf):
    """(field number, wire type, value, start, end) of each field of one protobuf message: values are
    ints, or memoryviews of length-delimited fields; [start, end) spans the whole field with its key."""
    pos, n = 0, len(buf)
    while pos < n:
        start = pos
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        if pos > n:
            raise ValueError("truncated field")
        yield key >> 3, wire, value, start, pos


def _fields(buf):
    """(field number, wire type, value) of one protobuf message."""
    for num, wire, value, _, _ in _field_spans(buf):
        yield num, wire, value


def _int64s(tensor) -> list[int] | None:
    """The values of a small INT64 tensor (a shape, repeats), else None."""
    values, raw, dtype = [], None, None
    for num, wire, value in _fields(tensor):
        if num == 2 and wire == 0:
            dtype = value
        elif num == 7 and wire == 0:
            values.append(value)
        elif num == 7 and wire == 2:  # packed
            pos = 0
            while pos < len(value):
                v, pos = _varint(value, pos)
                values.append(v)
        elif num == 9 and wire == 2:
            raw = value
    if dtype != 7 or (raw is not None and len(raw) > 512):  # a weight, not a shape
        return None
    if raw is not None:
        raw = bytes(raw)
        values = [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, len(raw) - 7, 8)]
    return [v - (1 << 64) if v >= 1 << 63 else v for v in values][:64]


class _Contents:
    """What check_model_contents gathers in one walk of the file."""

    def __init__(self):
        self.external: list[str] = []
        self.constants: dict[bytes, list[int]] = {}  # tensor name -> its int64 values
        self.shaped: list[tuple[bytes, bytes]] = []  # (op, the input naming its output size)

    def walk(self, buf, kind: str, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise ValueError(f"subgraphs nested over {_MAX_DEPTH} deep")
        if kind == "tensor":
            return self.tensor(buf)
        if kind == "node":
            self.node(buf)
        children = _CHILDREN[kind]
        for num, wire, value in _fields(buf):
            if wire == 2 and num in children:
                self.walk(value, children[num], depth + 1)

    def tensor(self, buf, name: bytes | None = None) -> None:
        for num, wire, value in _fields(buf):
            if num == 8 and wire == 2 and name is None:
                name = bytes(value)
            elif (num == 13 and wire == 2) or (num == 14 and wire == 0 and value == 1):
                self.external.append((name or b"").decode("utf-8", "replace") or "a constant")
        values = _int64s(buf)
        if name and values is not None:
            self.constants[name] = values

    def node(self, buf) -> None:
        inputs, outputs, op = [], [], b""
        for num, wire, value in _fields(buf):
            if num == 1 and wire == 2:
                inputs.append(bytes(value))
            elif num == 2 and wire == 2:
                outputs.append(bytes(value))
            elif num == 4 and wire == 2:
                op = bytes(value)
        if op == b"Constant" and outputs:  # its 'value' tensor goes by the node's output name
            for num, wire, value in _fields(buf):
                if num == 5 and wire == 2:
                    for a, w, t in _fields(value):
                        if a == 5 and w == 2 and _int64s(t) is not None:
                            self.constants[outputs[0]] = _int64s(t)
        if op in _SHAPED_OPS and len(inputs) > _SHAPED_OPS[op]:
            self.shaped.append((op, inputs[_SHAPED_OPS[op]]))


def check_model_contents(data: bytes, path: Path) -> None:
    """Refuse, before ONNX Runtime sees the bytes: tensors stored outside the file (external data
    resolves against the working directory when a model is loaded from bytes, so any file there
    could become weights under the same model id), and ConstantOfShape / Expand / Tile outputs of
    a constant size over MAX_CONSTANT_ELEMENTS (allocated at load). ValueError when not protobuf."""
    found = _Contents()
    found.walk(memoryview(data), "model")
    if found.external:
        raise SjeaError(f"{path} keeps tensor {found.external[0]!r} in an external data file; only self-contained "
                        "files are loaded (sjea export writes them): re-export it, or save it with "
                        "onnx.save(onnx.load(path), path, save_as_external_data=False) where you trust its data files.")
    for op, name in found.shaped:
        values = found.constants.get(name)
        size = 1
        for v in values or []:
            size *= max(v, 0)
        if values is not None and size > MAX_CONSTANT_ELEMENTS:
            raise SjeaError(f"{path} asks for a {op.decode()} output of {size:,} elements (over "
                            f"{MAX_CONSTANT_ELEMENTS:,}): not an sjea model; export the model again with 'sjea export'.")
