"""`sjea export`: graphs, metadata, dynamic batch, parity on real Fashion-MNIST, the numpy-only
client, and bad input (one line, non-zero exit, no partial .onnx)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sjea_tools.exports.onnx import asks_for_all, export_run, plan_files, read_metadata
from sjea_tools.exports.runtime import OnnxModel, provider_name
from sjea_tools.exports.verify import FP16, FP32, max_abs_diff, min_cosine, verify_onnx, within
from sjea_tools import load_model
from sjea_tools.cli import app
from sjea_tools.data import normalize_pixels
from sjea_tools.errors import SjeaError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def onnx_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).glob("*.onnx")) if Path(folder).exists() else []


def leftovers(folder: Path) -> list[str]:
    """Anything an export may leave behind: .onnx files and temporary files."""
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


def torch_levels(model, pixels: np.ndarray) -> list[np.ndarray]:
    x = normalize_pixels(np.array(pixels), model.mean, model.std)
    with torch.no_grad():
        return [y.numpy() for y in model.forward_levels(x)]


# --- pure parts -------------------------------------------------------------------------------

def test_max_abs_diff_and_min_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    b = np.array([[1.0, 0.1], [0.0, 2.0]], dtype=np.float32)
    assert max_abs_diff(a, b) == pytest.approx(0.1, abs=1e-6)
    assert min_cosine(a, b) == pytest.approx(1 / np.sqrt(1.01), abs=1e-6)
    assert min_cosine(a, a) == pytest.approx(1.0)
    assert min_cosine(np.zeros((2, 3)), np.zeros((2, 3))) == 1.0  # two zero rows are the same
    assert min_cosine(np.zeros((1, 3)), np.ones((1, 3))) == 0.0
    assert max_abs_diff(a, b[:1]) == float("inf")  # shape mismatch never passes
    assert max_abs_diff(a, np.full_like(a, np.nan)) == float("inf")


def test_tolerances_absolute_and_relative():
    assert within(9e-5, 0.999995, reference_scale=100.0, tol=FP32)
    assert not within(2e-4, 0.999995, reference_scale=100.0, tol=FP32)  # absolute: scale ignored
    assert not within(1e-6, 0.9999, reference_scale=1.0, tol=FP32)
    assert within(0.5, 0.9995, reference_scale=100.0, tol=FP16)  # 0.5 <= 1e-2 * 100
    assert not within(0.5, 0.9995, reference_scale=10.0, tol=FP16)


def test_provider_names():
    assert provider_name("cpu") == "CPUExecutionProvider"
    assert provider_name("CUDA") == "CUDAExecutionProvider"
    with pytest.raises(SjeaError, match="unknown provider"):
        provider_name("quantum")


def test_file_plan_for_all_one_and_several_levels():
    def names(plan):
        return [(f.name, f.levels, f.whole) for f in plan]

    assert asks_for_all("all") and asks_for_all(" ALL ") and asks_for_all(None)
    assert not asks_for_all("1") and not asks_for_all([0, 1]) and not asks_for_all(2)
    assert names(plan_files([0, 1], True, "")) == [("level0.onnx", [0], False), ("level1.onnx", [1], False),
                                                   ("all_levels.onnx", [0, 1], True)]
    # a one-level run's 'all' still writes both files; the per-level one is cut out of the graph
    assert names(plan_files([0], True, "-fp16")) == [("level0-fp16.onnx", [0], False),
                                                     ("all_levels-fp16.onnx", [0], True)]
    assert names(plan_files([2], False, "")) == [("level2.onnx", [2], True)]
    assert names(plan_files([0, 2], False, "-uint8")) == [("level0-uint8.onnx", [0], False),
                                                          ("level2-uint8.onnx", [2], False)]


# --- done criterion 1: every level and the all-levels model, 2 and 3 levels, both encoders -------

@pytest.fixture(scope="module")
def exported_mlp2(tmp_path_factory):
    """A 2-level mlp run exported through the CLI with --json (the path users take)."""
    from conftest import make_run

    run = make_run(tmp_path_factory.mktemp("mlp2") / "run", levels=2, encoder="mlp")
    result = runner.invoke(app, ["export", "--run", str(run), "--level", "all", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    return run, json.loads(result.stdout)


def check_report_numbers(report: dict, run: Path, num_levels: int) -> None:
    names = [f"level{k}.onnx" for k in range(num_levels)] + ["all_levels.onnx"]
    assert [Path(f["path"]).name for f in report["files"]] == names
    assert onnx_files(run / "onnx") == sorted(names)
    assert leftovers(run / "onnx") == sorted(names)  # no temporary files
    assert report["passed"] and report["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert report["images"] == "8 images of fashion-mnist (test split)"
    for f in report["files"]:
        v = f["verification"]
        assert v["checker"] == "passed" and v["batch_sizes"] == [1, 8]
        assert [r["level"] for r in v["levels"]] == f["levels"]
        for row in v["levels"]:
            assert 0 <= row["max_abs_diff"] <= 1e-4, row
            assert row["min_cosine"] >= 0.99999, row
            assert row["max_abs_reference"] > 0  # real, non-degenerate outputs were compared
    assert report["files"][-1]["levels"] == list(range(num_levels))


def test_cli_exports_every_level_of_a_2_level_mlp_run(exported_mlp2, fmnist_test):
    run, report = exported_mlp2
    check_report_numbers(report, run, 2)
    # Independently of the report: the all-levels file against PyTorch on 16 other real images.
    model = load_model(run)
    pixels = fmnist_test.pixels[100:116]
    got = OnnxModel(run / "onnx" / "all_levels.onnx", provider="cpu").run(
        normalize_pixels(pixels, model.mean, model.std).numpy())
    for g, w in zip(got, torch_levels(model, pixels)):
        assert max_abs_diff(g, w) <= 1e-4 and min_cosine(g, w) >= 0.99999


def test_exported_graph_holds_no_source_path(exported_mlp2):
    """The exporter records each node's Python stack trace; kept, the file would name this checkout's
    folders and its graph_sha256 would change with the install path."""
    import onnx

    run, report = exported_mlp2
    source_root = str(Path(__file__).resolve().parents[1])
    for f in report["files"]:
        raw = Path(f["path"]).read_bytes()
        assert source_root.encode() not in raw and b"site-packages" not in raw, f["path"]
        props = {p.key for n in onnx.load_from_string(raw).graph.node for p in n.metadata_props}
        assert not any("stack_trace" in k for k in props)


@pytest.mark.parametrize("levels,encoder", [(3, "mlp"), (2, "resnet"), (3, "resnet")])
def test_export_run_every_level_passes_verification(tmp_path, levels, encoder):
    from conftest import make_run

    run = make_run(tmp_path / "run", levels=levels, encoder=encoder)
    report = export_run(run, level="all")
    check_report_numbers(report, run, levels)
    assert report["model_sha256"] == read_metadata(run / "onnx" / "all_levels.onnx")["model_sha256"]


def test_single_level_file_equals_that_output_of_the_all_levels_file(exported_mlp2, fmnist_test):
    run, _ = exported_mlp2
    model = load_model(run)
    x = normalize_pixels(fmnist_test.pixels[:5], model.mean, model.std).numpy()
    both = OnnxModel(run / "onnx" / "all_levels.onnx", provider="cpu").run(x)
    for k in range(2):
        single = OnnxModel(run / "onnx" / f"level{k}.onnx", provider="cpu")
        assert single.levels == [k] and single.output_names == [f"level{k}"]
        np.testing.assert_allclose(single.run(x)[0], both[k], rtol=0, atol=1e-6)


# --- done criteria 2 and 3: dynamic batch, metadata -------------------------------------------

def test_dynamic_batch_1_7_64_through_one_session(exported_mlp2, fmnist_test):
    run, _ = exported_mlp2
    model = load_model(run)
    onnx_model = OnnxModel(run / "onnx" / "all_levels.onnx", provider="cpu")
    assert onnx_model.session.get_inputs()[0].shape[0] == "batch"
    for b in (1, 7, 64):
        pixels = fmnist_test.pixels[200:200 + b]
        got = onnx_model.run(normalize_pixels(pixels, model.mean, model.std).numpy())
        assert [g.shape for g in got] == [(b, d) for d in model.level_dims]
        for g, w in zip(got, torch_levels(model, pixels)):
            assert max_abs_diff(g, w) <= 1e-4


def test_metadata_round_trips(exported_mlp2):
    import onnx

    import sjea_tools
    from sjea_tools.runs import model_id

    run, report = exported_mlp2
    model = load_model(run)
    for name, level, levels in [("level1.onnx", "1", [1]), ("all_levels.onnx", "all", [0, 1])]:
        proto = onnx.load(str(run / "onnx" / name))
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["level"] == level
        assert json.loads(meta["levels"]) == levels
        assert json.loads(meta["outputs"]) == [f"level{k}" for k in levels]
        assert [o.name for o in proto.graph.output] == json.loads(meta["outputs"])
        assert json.loads(meta["dims"]) == [model.level_dims[k] for k in levels]
        assert meta["output"] == "representation"
        assert meta["input_name"] == "images" == proto.graph.input[0].name
        assert meta["preprocessing"] == "none"
        assert int(meta["image_size"]) == model.image_size == 28
        assert json.loads(meta["mean"]) == pytest.approx(list(model.mean))
        assert json.loads(meta["std"]) == pytest.approx(list(model.std))
        assert meta["color_mode"] == "RGB"
        assert meta["precision"] == "fp32"
        assert meta["sjea_version"] == sjea_tools.__version__
        assert int(meta["opset"]) == 18 == next(o.version for o in proto.opset_import if o.domain == "")
        assert meta["model_sha256"] == model_id(model) == report["model_sha256"]
        assert re.fullmatch(r"[0-9a-f]{64}", meta["model_sha256"])
    onnx_model = OnnxModel(run / "onnx" / "all_levels.onnx", provider="cpu")
    assert (onnx_model.levels, onnx_model.dims, onnx_model.image_size) == ([0, 1], model.level_dims, 28)
    assert onnx_model.model_id == model_id(model) and onnx_model.provider == "CPUExecutionProvider"


# --- the numpy-only client from the README ----------------------------------------------------

def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    after = text.split("<!-- snippet:onnx-numpy", 1)[1]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_numpy_only_snippet_runs_without_sjea_on_the_path(exported_mlp2, fmnist_test, tmp_path):
    from PIL import Image

    from sjea_tools.data import model_pixels

    run, _ = exported_mlp2
    # A non-square, larger image exercises the snippet's resize and crop as well.
    image_path = tmp_path / "sneaker.png"
    Image.fromarray(fmnist_test.pixels[0]).resize((50, 36), Image.NEAREST).save(image_path)
    code = readme_snippet()
    assert 'MODEL = "runs/tiny/onnx/all_levels.onnx"' in code and 'IMAGES = ["shoe.jpg", "bag.png"]' in code
    code = code.replace('"runs/tiny/onnx/all_levels.onnx"', repr(str(run / "onnx" / "all_levels.onnx")))
    code = code.replace('["shoe.jpg", "bag.png"]', repr([str(image_path)]))
    code += ("\nimport importlib.util, sys\n"
             "assert importlib.util.find_spec('sjea_tools') is None and importlib.util.find_spec('exports') is None\n"
             "assert 'torch' not in sys.modules\n"
             f"np.savez({str(tmp_path / 'out.npz')!r}, *outputs)\n")  # one array per level: dims differ
    script = tmp_path / "client.py"
    script.write_text(code)
    import onnxruntime
    import PIL

    # -S: no site processing, so the editable install's path hook for sjea-tools is absent; only
    # the folders holding onnxruntime, numpy and Pillow are on the path.
    site_dirs = sorted({str(Path(m.__file__).parents[1]) for m in (onnxruntime, np, PIL)})
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(site_dirs)}
    done = subprocess.run([sys.executable, "-S", str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    dims = load_model(run).level_dims
    assert f"level0 (1, {dims[0]})" in done.stdout and f"level1 (1, {dims[1]})" in done.stdout
    model = load_model(run)
    pixels = model_pixels(Image.open(image_path), model.image_size)[None]
    saved = np.load(tmp_path / "out.npz")
    got = [saved[f"arr_{j}"][0] for j in range(len(saved.files))]
    for g, w in zip(got, torch_levels(model, pixels)):
        assert max_abs_diff(g[None], w) <= 1e-4


# --- variants: embedding output with preprocessing inside, fp16, opset 17 ------------------------

def test_embedding_output_with_uint8_pixels_inside_the_graph(exported_mlp2, fmnist_test, tmp_path):
    run, _ = exported_mlp2
    report = export_run(run, level="1", out=tmp_path / "out", output="embedding", with_preprocessing=True)
    path = tmp_path / "out" / "level1-embedding-uint8.onnx"
    assert report["passed"] and onnx_files(tmp_path / "out") == [path.name]
    onnx_model = OnnxModel(path, provider="cpu")
    assert onnx_model.takes_pixels and onnx_model.input_name == "pixels" and onnx_model.output == "embedding"
    assert onnx_model.session.get_inputs()[0].type == "tensor(uint8)"
    model = load_model(run)
    pixels = fmnist_test.pixels[300:307]
    (got,) = onnx_model.run(pixels)
    with torch.no_grad():
        want = model.forward_embeddings(normalize_pixels(pixels, model.mean, model.std), [1])[0].numpy()
    assert got.shape == (7, model.embedding_dims[1])
    assert max_abs_diff(got, want) <= 1e-4 and min_cosine(got, want) >= 0.99999


def test_several_levels_one_file_each_with_the_umask_mode_and_progress(exported_mlp2, tmp_path):
    """--level 1,0 (the shared spelling) writes level0.onnx and level1.onnx, no all-levels file;
    files are 0644 under umask 022 (not mkstemp's 0600); progress follows the library protocol."""
    run, report_all = exported_mlp2
    calls = []
    previous = os.umask(0o022)
    try:
        report = export_run(run, level="1,0", out=tmp_path / "o",
                            progress=lambda task, done, total: calls.append((task, done, total)))
    finally:
        os.umask(previous)
    assert report["passed"] and report["level"] == "0,1"
    assert leftovers(tmp_path / "o") == ["level0.onnx", "level1.onnx"]
    assert {stat.S_IMODE((tmp_path / "o" / n).stat().st_mode) for n in leftovers(tmp_path / "o")} == {0o644}
    for k in (0, 1):
        meta = read_metadata(tmp_path / "o" / f"level{k}.onnx")
        assert meta["level"] == str(k) and json.loads(meta["levels"]) == [k]
        # the same graph as the one cut out of the all-levels export
        assert (tmp_path / "o" / f"level{k}.onnx").read_bytes() == (run / "onnx" / f"level{k}.onnx").read_bytes()
    tasks = {}
    for task, done, total in calls:
        assert done >= tasks.get(task, (0, None))[0] and total is not None and done <= total  # cumulative
        tasks[task] = (done, total)
    assert tasks == {"exporting the graph": (2, 2), "verifying files": (2, 2)}


def test_preprocess_spec_in_the_metadata_and_from_older_files(exported_mlp2, tmp_path):
    import onnx

    from sjea_tools.exports.onnx import set_metadata
    from sjea_tools.spec import PreprocessSpec

    run, _ = exported_mlp2
    model = load_model(run)
    spec = PreprocessSpec(model.image_size, model.mean, model.std)
    meta = read_metadata(run / "onnx" / "level0.onnx")
    assert PreprocessSpec.from_json(meta["preprocess"]) == spec
    assert OnnxModel(run / "onnx" / "level0.onnx", provider="cpu").preprocess == spec
    # A file exported before the 'preprocess' key existed reads the same spec from the separate keys.
    proto = onnx.load(str(run / "onnx" / "level0.onnx"))
    set_metadata(proto, {k: v for k, v in meta.items() if k != "preprocess"})
    onnx.save(proto, str(tmp_path / "old.onnx"))
    old = OnnxModel(tmp_path / "old.onnx", provider="cpu")
    assert "preprocess" not in old.metadata and old.preprocess == spec
    assert (old.image_size, old.mean, old.std) == (28, spec.mean, spec.std)


def test_fp16_export_meets_its_stated_tolerance(exported_mlp2, tmp_path):
    run, report32 = exported_mlp2
    report = export_run(run, level="1", out=tmp_path, fp16=True)
    (f,) = report["files"]
    assert Path(f["path"]).name == "level1-fp16.onnx" and report["precision"] == "fp16"
    assert read_metadata(f["path"])["precision"] == "fp16"
    fp32_bytes = next(g["bytes"] for g in report32["files"] if g["path"].endswith("level1.onnx"))
    assert f["bytes"] < 0.6 * fp32_bytes  # weights really are half precision
    (row,) = f["verification"]["levels"]
    assert row["passed"] and row["min_cosine"] >= 0.999
    assert row["max_abs_diff"] <= 1e-2 * row["max_abs_reference"]
    assert row["max_abs_diff"] > 1e-6  # it did compute in half precision


def test_opset_17_uses_the_torchscript_exporter(exported_mlp2, tmp_path):
    run, _ = exported_mlp2
    report = export_run(run, level="0", out=tmp_path, opset=17)
    meta = read_metadata(tmp_path / "level0.onnx")
    assert report["passed"] and meta["opset"] == "17" and "torchscript" in meta["exporter"]


def test_verification_catches_a_graph_that_differs_from_the_model(exported_mlp2, fmnist_test):
    run, _ = exported_mlp2
    changed = load_model(run)
    with torch.no_grad():
        last_norm = [m for m in changed.encoders[0].modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
        last_norm.bias.add_(0.05)  # a small, real change of the weights (level 0's last BatchNorm)
    check = verify_onnx(run / "onnx" / "level0.onnx", changed, fmnist_test.pixels[:8])
    assert check["checker"] == "passed" and not check["passed"]
    row = check["levels"][0]
    assert row["max_abs_diff"] > 1e-3 and not row["passed"]


# --- done criterion 4: bad input ---------------------------------------------------------------

def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_level_the_run_does_not_have(exported_mlp2, tmp_path):
    run, _ = exported_mlp2
    line = one_line_error(runner.invoke(app, ["export", "--run", str(run), "--level", "2", "--out", str(tmp_path / "o")]))
    assert "level 2 does not exist" in line and "levels here: 0, 1" in line
    assert not (tmp_path / "o").exists()
    for spelling, expect in [("top", "'all' or level numbers like 0,1"), ("1,1", "repeats a level"),
                             ("all,0", "'all' cannot be combined")]:
        line = one_line_error(runner.invoke(app, ["export", "--run", str(run), "--level", spelling, "--out",
                                                  str(tmp_path / "o")]))
        assert expect in line and "--level" in line
        assert not (tmp_path / "o").exists()


def test_out_naming_one_onnx_file(exported_mlp2, fmnist_test, tmp_path):
    """--out m.onnx with one level writes that file (not a folder called m.onnx); with several levels it
    is refused in one line and nothing is made."""
    run, _ = exported_mlp2
    target = tmp_path / "models" / "level1-mine.onnx"
    result = runner.invoke(app, ["export", "--run", str(run), "--level", "1", "--out", str(target), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert target.is_file() and [f["path"] for f in report["files"]] == [str(target)]
    assert leftovers(target.parent) == ["level1-mine.onnx"]
    model, pixels = load_model(run), fmnist_test.pixels[:8]
    got = OnnxModel(target, provider="cpu").run(normalize_pixels(pixels, model.mean, model.std).numpy())
    assert max_abs_diff(got[0], torch_levels(model, pixels)[1]) <= 1e-4
    line = one_line_error(runner.invoke(app, ["export", "--run", str(run), "--level", "1", "--out", str(target)]))
    assert "already exists" in line and "--overwrite" in line
    line = one_line_error(runner.invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "all.onnx")]))
    assert "names one .onnx file" in line and "3 files" in line and "--level K" in line
    assert not (tmp_path / "all.onnx").exists()


def test_missing_and_corrupt_runs(tmp_path):
    line = one_line_error(runner.invoke(app, ["export", "--run", str(tmp_path / "nope")]))
    assert "does not exist" in line
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.pt").write_bytes(b"not a checkpoint at all")
    line = one_line_error(runner.invoke(app, ["export", "--run", str(corrupt)]))
    assert "model.pt" in line and "not a readable sjea checkpoint" in line
    assert not (corrupt / "onnx").exists()


def test_latest_run_is_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./runs/LATEST here
    line = one_line_error(runner.invoke(app, ["export"]))
    assert "no run found" in line and "--run" in line


def test_unwritable_output_folder(exported_mlp2, tmp_path):
    run, _ = exported_mlp2
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = one_line_error(runner.invoke(app, ["export", "--run", str(run), "--level", "0", "--out", str(blocker / "sub")]))
    assert "not writable" in line and str(blocker / "sub") in line
    line = one_line_error(runner.invoke(app, ["export", "--run", str(run), "--level", "0", "--out", str(blocker)]))
    assert "is a file" in line
    assert blocker.read_text() == "x"


def test_existing_file_needs_overwrite(exported_mlp2):
    run, _ = exported_mlp2
    before = {name: (run / "onnx" / name).read_bytes() for name in onnx_files(run / "onnx")}
    (run / "onnx" / "extra.txt").write_text("keep")
    line = one_line_error(runner.invoke(app, ["export", "--run", str(run), "--level", "all"]))
    assert "already exists" in line and "--overwrite" in line
    assert {name: (run / "onnx" / name).read_bytes() for name in onnx_files(run / "onnx")} == before
    (run / "onnx" / "extra.txt").unlink()
    assert leftovers(run / "onnx") == sorted(before)


def test_bad_options_are_one_line(exported_mlp2, tmp_path):
    run, _ = exported_mlp2
    for args, expect in [(["--output", "logits"], "--output must be one of"), (["--opset", "13"], "17 or newer"),
                         (["--provider", "quantum"], "unknown provider"),
                         (["--images", str(tmp_path / "none")], "is not a folder")]:
        line = one_line_error(runner.invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "o"), *args]))
        assert expect in line
        assert not (tmp_path / "o").exists()  # not even the folder it would have made


def test_forced_cuda_provider_is_never_a_silent_fallback(exported_mlp2, tmp_path, write_fmnist_folder, fmnist_test):
    """On a machine without a usable GPU, --provider cuda fails before exporting, in one line,
    leaving nothing behind. With a GPU it verifies on CUDA."""
    run, _ = exported_mlp2
    images = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 3)
    result = runner.invoke(app, ["export", "--run", str(run), "--level", "0", "--out", str(tmp_path / "o"),
                                 "--provider", "cuda", "--images", str(images), "--json", "--quiet"])
    if result.exit_code == 0:
        report = json.loads(result.stdout)
        assert report["provider"] == "CUDAExecutionProvider" and report["passed"]
        assert report["images"] == f"3 images from {images}"
    else:
        line = one_line_error(result)
        assert "CUDAExecutionProvider" in line and "--provider cpu" in line
        assert not (tmp_path / "o").exists()
