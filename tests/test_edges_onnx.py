"""ONNX files at the edges (issue 22): external data is refused (loaded from bytes, ONNX Runtime
read it from the working directory: any file there became weights under the same model id), a
ConstantOfShape memory bomb is refused before ONNX Runtime allocates it, outputs that are not the
metadata's (N, dim) rows are refused, and what cannot be walked is not loaded. Each is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sjea_tools.exports.runtime import OnnxModel  # noqa: E402
from sjea_tools.errors import SjeaError  # noqa: E402

SIZE, DIM = 8, 4
META = {"levels": "[0]", "dims": json.dumps([DIM]), "outputs": '["level_0"]',
        "preprocess": json.dumps({"image_size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3})}


def tiny_model(weight=None, extra_nodes=(), extra_inits=(), out_dim: int = DIM, constant=None) -> onnx.ModelProto:
    """An sjea-like graph: float32 (N, 3, 8, 8) -> mean over H, W -> (N, 3) @ W (3, out_dim) -> level_0."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])
    y = helper.make_tensor_value_info("level_0", TensorProto.FLOAT, ["n", out_dim])
    w = weight if weight is not None else numpy_helper.from_array(
        np.arange(3 * out_dim, dtype=np.float32).reshape(3, out_dim) / 10, "W")
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0)]
    if constant is not None:  # W from a Constant node instead of an initializer
        nodes.append(helper.make_node("Constant", [], ["W"], value=constant))
    nodes += [*extra_nodes, helper.make_node("MatMul", ["m", "W"], ["level_0"])]
    inits = ([] if constant is not None else [w]) + list(extra_inits)
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for k, v in META.items():
        model.metadata_props.add(key=k, value=v)
    return model


def external_weight(location: str) -> onnx.TensorProto:
    w = numpy_helper.from_array(np.zeros((3, DIM), np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(3 * DIM * 4))):
        w.external_data.add(key=k, value=v)
    return w


def write(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def test_a_self_contained_model_loads_and_runs(tmp_path):
    m = OnnxModel(write(tiny_model(), tmp_path / "m.onnx"), provider="cpu")
    (y,) = m.run(np.ones((2, 3, SIZE, SIZE), np.float32))
    assert y.shape == (2, DIM)


@pytest.mark.parametrize("where", ["cwd", "model folder"])
def test_external_data_is_refused_wherever_it_points(tmp_path, monkeypatch, where):
    """The issue's case: location=sub/.ssh/id_key, read from the working directory as weights."""
    secret = np.full((3, DIM), 0.27, np.float32).tobytes()
    cwd, folder = tmp_path / "cwd", tmp_path / "models"
    base = cwd if where == "cwd" else folder
    (base / "sub/.ssh").mkdir(parents=True)
    cwd.mkdir(exist_ok=True)
    (base / "sub/.ssh/id_key").write_bytes(secret)
    monkeypatch.chdir(cwd)
    path = write(tiny_model(weight=external_weight("sub/.ssh/id_key")), folder / "m.onnx")
    with pytest.raises(SjeaError) as e:
        OnnxModel(path, provider="cpu")
    msg = one_line(e)
    assert "external data" in msg and "re-export" in msg and "0.27" not in msg


def test_external_data_in_a_constant_node_is_refused(tmp_path, monkeypatch):
    (tmp_path / "key").write_bytes(np.ones((3, DIM), np.float32).tobytes())
    monkeypatch.chdir(tmp_path)
    path = write(tiny_model(constant=external_weight("key")), tmp_path / "m" / "m.onnx")
    with pytest.raises(SjeaError) as e:
        OnnxModel(path, provider="cpu")
    assert "external data" in one_line(e)


BOMB_SCRIPT = r"""
import resource, sys
from sjea_tools.exports.runtime import OnnxModel
from sjea_tools.errors import SjeaError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    OnnxModel(sys.argv[1], provider="cpu")
    print("loaded", file=sys.stderr)
    rc = 0
except SjeaError as e:
    print(e, file=sys.stderr)
    rc = 3
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
sys.exit(rc)
"""


def test_a_constant_of_shape_bomb_is_refused_before_it_is_allocated(tmp_path):
    """10^8 float32 (400 MB, folded at load: 800 MB) from a file of a few hundred bytes."""
    shape = numpy_helper.from_array(np.array([100_000_000], np.int64), "shp")
    nodes = [helper.make_node("ConstantOfShape", ["shp"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=1),
             helper.make_node("Add", ["W0", "s"], ["W"])]
    w0 = numpy_helper.from_array(np.ones((3, DIM), np.float32), "W0")
    model = tiny_model(extra_nodes=nodes, extra_inits=[shape, w0])
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "W"))
    path = write(model, tmp_path / "bomb.onnx")
    assert path.stat().st_size < 2000
    proc = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    msg = proc.stderr.strip().splitlines()[-1]
    assert "ConstantOfShape" in msg and "100,000,000 elements" in msg and "Traceback" not in proc.stderr
    assert int(proc.stdout.split()[-1]) < 100 * 1024  # KiB: nothing near the 400 MB asked for


def test_outputs_that_are_not_the_metadata_rows_are_refused(tmp_path):
    path = write(tiny_model(out_dim=DIM + 96), tmp_path / "wide.onnx")  # metadata says 4, graph gives 100
    with pytest.raises(SjeaError) as e:
        OnnxModel(path, provider="cpu")
    assert "declares outputs" in one_line(e)


def test_what_cannot_be_walked_is_not_loaded(tmp_path):
    data = tiny_model().SerializeToString()
    # An unknown field 15 of wire type 3 (a protobuf group: start, end) appended: not walkable here.
    path = tmp_path / "odd.onnx"
    path.write_bytes(data + bytes([(15 << 3) | 3, (15 << 3) | 4]))
    with pytest.raises(SjeaError) as e:
        OnnxModel(path, provider="cpu")
    assert "not a readable ONNX file" in one_line(e)


def test_run_failures_are_one_line(tmp_path, monkeypatch):
    m = OnnxModel(write(tiny_model(), tmp_path / "m.onnx"), provider="cpu")

    def fail(*a, **k):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory\nmore")

    monkeypatch.setattr(m.session, "run", fail)
    with pytest.raises(SjeaError) as e:
        m.run(np.ones((1, 3, SIZE, SIZE), np.float32))
    assert "Failed to allocate memory" in one_line(e)
