"""`sjea train --from`: higher levels trained on a frozen run or a torchvision ResNet file, on real
Fashion-MNIST; the new run works with embed, export and eval; bad sources are one-line errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from conftest import make_run, write_fmnist_folder
from sjea_tools.cli import app
from sjea_tools.io import sha256_file

# Small but real: 256 Fashion-MNIST images, batches of 32, a handful of steps.
SMALL = ["--limit", "256", "--batch-size", "32", "--workers", "0", "--quiet", "--set", "train.log_every=1"]


def run_cli(args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def one_line_error(result, *needles) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def model_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", map_location="cpu", weights_only=True)["model"]


def level_keys(state: dict, k: int) -> list[str]:
    return [key for key in state if key.startswith((f"encoders.{k}.", f"projectors.{k}."))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-level source run (with centring means) and a 2-level run trained on it with --from
    (through the CLI)."""
    base = tmp_path_factory.mktemp("from")
    source = make_run(base / "runs" / "src", levels=1, centred=True)
    result = run_cli(["train", *SMALL, "--max-steps", "3", "--from", source, "--out", "runs/new"], base)
    assert result.exit_code == 0, result.output
    return base, source, base / "runs" / "new"


def test_frozen_level_is_bit_identical_and_config_records_the_source(trained):
    base, source, new = trained
    before, after = model_state(source), model_state(new)
    keys = level_keys(before, 0)
    assert any("running_mean" in k for k in keys) and any("num_batches_tracked" in k for k in keys)
    assert all(torch.equal(before[k], after[k]) for k in keys)  # weights and BatchNorm buffers
    assert level_keys(after, 1)  # the new run's model holds every level
    saved = json.loads((new / "config.json").read_text())["train"]
    assert saved["from_path"] == str(source.resolve()) and saved["frozen_levels"] == 1
    assert saved["from_sha256"] == sha256_file(source / "model.pt")
    assert json.loads((new / "config.json").read_text())["model"]["levels"] == 2  # one level added


def test_metrics_say_the_frozen_level_has_no_loss(trained):
    _, _, new = trained
    steps = [r for r in map(json.loads, (new / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["levels"][0] == {"frozen": True, "loss": None, "invariance": None, "variance": None,
                                  "covariance": None}
        assert math.isfinite(r["levels"][1]["loss"]) and r["loss"] == r["levels"][1]["loss"]


def test_new_run_embeds_with_the_source_level0_vectors_and_exports_and_evals(trained, fmnist_test):
    from sjea_tools.store import open_store

    base, source, new = trained
    folder = write_fmnist_folder(base / "imgs", fmnist_test, 24)
    stores = {}
    for name, run in (("src", source), ("new", new)):
        out = base / f"{name}.h5"
        result = run_cli(["embed", folder, out, "--run", run, "--backend", "torch", "--workers", "0", "--no-index"],
                         base)
        assert result.exit_code == 0, result.output
        with open_store(out) as s:
            stores[name] = (s.paths, s.read_embeddings(0), s.levels)
    assert stores["new"][2] == [0, 1] and stores["src"][0] == stores["new"][0]
    np.testing.assert_allclose(stores["new"][1], stores["src"][1], rtol=0, atol=1e-6)  # CPU float math
    # The frozen level keeps the source's centring means; the new level has its own.
    from sjea_tools.runs import load_model

    src_model, new_model = load_model(source), load_model(new)
    torch.testing.assert_close(new_model.centres[0], src_model.centres[0], rtol=0, atol=0)
    assert new_model.centres[1].shape == (new_model.level_dims[1],)
    exported = run_cli(["export", "--run", new, "--level", "all", "--json", "--quiet"], base)
    assert exported.exit_code == 0, exported.output
    evaluated = run_cli(["eval", "--run", new, "--max-train", "200", "--max-test", "80", "--probe-epochs", "1",
                         "--quiet"], base)
    assert evaluated.exit_code == 0, evaluated.output
    assert [row["level"] for row in json.loads((new / "eval.json").read_text())["levels"]] == [0, 1]


def build(cfg):
    from sjea_tools.trainers.distributed import DistInfo
    from sjea_tools.trainers.frozen import frozen_state
    from sjea_tools.trainers.trainer import build_training

    return build_training(cfg, DistInfo(), torch.device("cpu"), steps_per_epoch=10, frozen=frozen_state(cfg))


def test_two_level_source_trains_level_2_only_and_frozen_state_never_moves(tmp_path, fmnist_test):
    from sjea_tools.config import resolve_config
    from sjea_tools.data.preprocess import normalize_pixels
    from sjea_tools.trainers.frozen import apply_source
    from sjea_tools.trainers.trainer import train_step

    source = make_run(tmp_path / "src", levels=2)
    cfg = apply_source(resolve_config("tiny", overrides={"model.levels": 3, "train.batch_size": 16}), source,
                       {"model.levels"})
    assert (cfg.model.levels, cfg.train.frozen_levels) == (3, 2)
    t = build(cfg)
    trainable = {id(p) for k in (2,) for m in (t.model.encoders[k], t.model.projectors[k]) for p in m.parameters()}
    in_optimizer = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == trainable  # no frozen parameter, every level-2 one
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.model.train()
    assert not any(t.model.encoders[k].training or t.model.projectors[k].training for k in (0, 1))
    x = normalize_pixels(torch.from_numpy(fmnist_test.pixels[:16]), cfg.mean, cfg.std)
    for step in range(2):
        train_step(t, x, x.flip(-1), step)
    after = t.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in level_keys(before, 0) + level_keys(before, 1))
    assert not all(torch.equal(before[k], after[k]) for k in level_keys(before, 2))
    assert not any(p.requires_grad for k in (0, 1) for p in t.model.encoders[k].parameters())


def test_torchvision_checkpoint_fills_level_0(tmp_path):
    torch.manual_seed(0)
    file = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), file)
    result = run_cli(["train", *SMALL, "--max-steps", "2", "--from", file, "--backbone", "resnet18",
                      "--out", "runs/tv"], tmp_path)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tv"
    state, saved = model_state(run), torch.load(file, weights_only=True)
    copied = {k: v for k, v in saved.items() if not k.startswith("fc.")}
    assert all(torch.equal(state["encoders.0.net." + k], v) for k, v in copied.items())
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["stem"] == "standard" and cfg["train"]["frozen_levels"] == 1
    assert cfg["train"]["from_sha256"] == sha256_file(file)


def test_checkpoint_architecture_is_read_from_the_file_and_a_wrong_one_refused(tmp_path):
    from sjea_tools.config import resolve_config
    from sjea_tools.trainers.frozen import apply_source

    file = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), file)
    assert apply_source(resolve_config("tiny"), file).model.backbone == "resnet34"  # tiny's convnet replaced
    result = run_cli(["train", *SMALL, "--from", file, "--backbone", "resnet18", "--out", "runs/x"], tmp_path)
    one_line_error(result, "resnet18", "--backbone resnet34")
    assert not (tmp_path / "runs" / "x").exists()
    other = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    one_line_error(run_cli(["train", *SMALL, "--from", other, "--backbone", "resnet18"], tmp_path), "resnet18")


def test_dry_run_shows_the_source(tmp_path):
    source = make_run(tmp_path / "src", levels=1)
    result = run_cli(["train", "--from", source, "--limit", "64", "--batch-size", "16", "--dry-run", "--json"],
                     tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["config"]["train"]["from_path"] == str(source.resolve())
    assert [lv["frozen"] for lv in summary["levels"]] == [True, False]
    assert not (tmp_path / "runs").exists()
    table = run_cli(["train", "--from", source, "--limit", "64", "--batch-size", "16", "--dry-run"], tmp_path)
    assert table.exit_code == 0 and f"frozen: level 0 from {source.resolve()}" in " ".join(table.output.split())


def test_a_one_level_source_leaves_the_higher_level_settings_to_the_new_level(tmp_path):
    # encoder width and input only shape levels 1 and up: free above a 1-level source, fixed above a 2-level one
    source = make_run(tmp_path / "src", levels=1)
    asked = ["--set", "model.mlp_dims=64-64", "--level-input", "embedding"]
    result = run_cli(["train", "--from", source, *asked, "--limit", "64", "--batch-size", "16", "--dry-run",
                      "--json"], tmp_path)
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["config"]["model"]
    assert model["mlp_dims"] == "64-64" and model["level_input"] == "embedding"
    two = make_run(tmp_path / "two", levels=2)
    one_line_error(run_cli(["train", "--from", two, "--levels", "3", *asked, "--dry-run"], tmp_path),
                   "the frozen levels keep theirs")


def bad_sources(tmp_path: Path) -> dict[str, tuple[list, tuple]]:
    not_run = tmp_path / "notrun"
    not_run.mkdir()
    (not_run / "notes.txt").write_text("hi")
    corrupt = tmp_path / "broken.pt"
    corrupt.write_bytes(b"not a torch file at all")
    two = make_run(tmp_path / "two", levels=2)
    src = make_run(tmp_path / "one", levels=1)
    return {
        "missing": (["--from", tmp_path / "nope"], ("does not exist",)),
        "not a run": (["--from", not_run], ("run folder",)),
        "nothing to train": (["--from", two, "--levels", "2"], ("nothing to train", "--levels 3")),
        "corrupt": (["--from", corrupt], ("broken.pt", "torch.save")),
        "other suffix": (["--from", not_run / "notes.txt"], ("neither a run folder",)),
        "image size": (["--from", src, "--image-size", "32"], ("--image-size 32", "28")),
        "backbone": (["--from", src, "--backbone", "resnet18"], ("--backbone resnet18", "convnet-32")),
    }


def test_bad_sources_are_one_line_errors_that_leave_nothing(tmp_path):
    for name, (args, needles) in bad_sources(tmp_path).items():
        result = run_cli(["train", *SMALL, *args, "--out", "runs/x"], tmp_path)
        one_line_error(result, *needles)
        assert not (tmp_path / "runs" / "x").exists(), name
    resumed = run_cli(["train", "--resume", tmp_path / "one", "--from", tmp_path / "one"], tmp_path)
    one_line_error(resumed, "--from")


# --- --from FILE.onnx: an sjea export or a foreign image encoder as the frozen level 0 ----------------

# The frozen level runs the source graph converted to torch (onnx2torch): float32, other kernels than
# ONNX Runtime's. Measured: about 1e-7 on these graphs; asserted with room.
ONNX_ATOL = 1e-5


def fmnist_batch(data, n: int, spec) -> torch.Tensor:
    from sjea_tools.data.preprocess import normalize_pixels

    return normalize_pixels(torch.from_numpy(data.pixels[:n]), spec.mean, spec.std)


@pytest.fixture(scope="module")
def from_export(tmp_path_factory):
    """A 2-level run trained for a few steps, exported with `sjea export`, and a run trained with
    --from on that all_levels.onnx (through the CLI)."""
    base = tmp_path_factory.mktemp("from-onnx")
    trained = run_cli(["train", *SMALL, "--max-steps", "2", "--out", "runs/src"], base)
    assert trained.exit_code == 0, trained.output
    exported = run_cli(["export", "--run", "runs/src", "--level", "all", "--quiet"], base)
    assert exported.exit_code == 0, exported.output
    source = base / "runs" / "src" / "onnx" / "all_levels.onnx"
    result = run_cli(["train", *SMALL, "--max-steps", "3", "--from", source, "--out", "runs/new"], base)
    assert result.exit_code == 0, result.output
    return base, source, base / "runs" / "new"


def test_onnx_source_is_level_0_equal_to_the_exports_top_level(from_export, fmnist_test):
    from sjea_tools.exports.runtime import OnnxModel
    from sjea_tools.runs import load_model

    _, source, new = from_export
    saved = json.loads((new / "config.json").read_text())
    assert saved["train"]["from_path"] == str(source.resolve()) and saved["train"]["frozen_levels"] == 1
    assert saved["train"]["from_sha256"] == sha256_file(source) and saved["train"]["from_output"] == "level1"
    assert (saved["model"]["backbone"], saved["model"]["level0_dim"], saved["model"]["levels"]) == ("onnx", 512, 2)
    state = model_state(new)  # weights_only=True
    assert state["encoders.0.onnx"].numpy().tobytes() == source.read_bytes()  # the run is self-contained
    assert not any(k.startswith("encoders.0.net.") for k in state)  # the graph's weights are saved once
    onnx_model, model = OnnxModel(source, provider="cpu"), load_model(new)
    assert model.preprocess_spec == onnx_model.preprocess  # size, mean and std taken from the metadata
    x = fmnist_batch(fmnist_test, 64, model.preprocess_spec)
    want = onnx_model.run(x.numpy())[onnx_model.levels.index(1)]
    with torch.no_grad():
        got = model.forward_levels(x, [0])[0].numpy()
    assert got.shape == want.shape == (64, 512)
    np.testing.assert_allclose(got, want, rtol=0, atol=ONNX_ATOL)


def test_onnx_source_trains_only_the_new_level(from_export, fmnist_test):
    from sjea_tools.config import resolve_config
    from sjea_tools.trainers.frozen import apply_source
    from sjea_tools.trainers.trainer import train_step

    _, source, new = from_export
    steps = [r for r in map(json.loads, (new / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["levels"][0]["frozen"] for r in steps)
    cfg = apply_source(resolve_config("tiny", overrides={"train.batch_size": 16}), source)
    t = build(cfg)
    in_optimizer = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for m in (t.model.encoders[1], t.model.projectors[1]) for p in m.parameters()}
    assert not any(p.requires_grad for p in t.model.encoders[0].parameters())
    x = fmnist_batch(fmnist_test, 16, cfg.preprocess_spec)
    t.model.eval()
    with torch.no_grad():
        before = t.model.forward_levels(x, [0])[0].clone()
    upper = {k: v.clone() for k, v in t.model.state_dict().items() if k.startswith(("encoders.1.", "projectors.1."))}
    t.model.train()
    assert not t.model.encoders[0].net.training  # frozen: eval mode whatever train() asks
    for step in range(2):
        train_step(t, x, x.flip(-1), step)
    t.model.eval()
    with torch.no_grad():
        assert torch.equal(t.model.forward_levels(x, [0])[0], before)
    after = t.model.state_dict()
    assert not all(torch.equal(v, after[k]) for k, v in upper.items())


def test_onnx_source_run_embeds_exports_and_evals(from_export, fmnist_test):
    from sjea_tools.exports.runtime import OnnxModel
    from sjea_tools.store import open_store

    base, source, new = from_export
    folder = write_fmnist_folder(base / "imgs", fmnist_test, 24)
    stores = {}
    for backend in ("torch", "onnx"):
        out = base / f"{backend}.h5"
        result = run_cli(["embed", folder, out, "--run", new, "--backend", backend, "--workers", "0", "--no-index"],
                         base)
        assert result.exit_code == 0, result.output
        with open_store(out) as s:
            stores[backend] = (s.paths, [s.read_embeddings(k) for k in (0, 1)], s.levels)
    assert stores["torch"][2] == stores["onnx"][2] == [0, 1] and stores["torch"][0] == stores["onnx"][0]
    for k in (0, 1):
        np.testing.assert_allclose(stores["torch"][1][k], stores["onnx"][1][k], rtol=0, atol=ONNX_ATOL)
    exported = run_cli(["export", "--run", new, "--level", "all", "--json", "--quiet"], base)
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["passed"]  # verified against the torch model as every export is
    whole, src = OnnxModel(new / "onnx" / "all_levels.onnx", provider="cpu"), OnnxModel(source, provider="cpu")
    x = fmnist_batch(fmnist_test, 32, src.preprocess).numpy()
    assert whole.levels == [0, 1] and whole.preprocess == src.preprocess
    # the exported stack holds the source graph: its level 0 is the source's top level
    np.testing.assert_allclose(whole.run(x)[0], src.run(x)[src.levels.index(1)], rtol=0, atol=ONNX_ATOL)
    for random_init in ([], ["--random-init"]):
        evaluated = run_cli(["eval", "--run", new, "--max-train", "200", "--max-test", "80", "--probe-epochs", "1",
                             "--no-baselines", *random_init, "--quiet"], base)
        assert evaluated.exit_code == 0, evaluated.output
    assert [row["level"] for row in json.loads((new / "eval.json").read_text())["levels"]] == [0, 1]
    # a graph has no random initialisation: the random-init result says its level 0 is not a floor
    assert "no random initialisation" in json.loads((new / "eval-random-init.json").read_text())["note"]
    assert "note" not in json.loads((new / "eval.json").read_text())


class SmallCNN(torch.nn.Module):
    """Someone's own image encoder: not an sjea model, no sjea metadata."""

    def __init__(self, pooled: bool = True, heads: int = 1):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                        torch.nn.ReLU())
        self.pooled, self.heads = pooled, heads

    def forward(self, x):
        y = self.body(x)
        if not self.pooled:
            return y
        y = torch.nn.functional.adaptive_avg_pool2d(y, 1)  # (N, 16, 1, 1): flattened by the level
        return (y, y.flatten(1) * 2) if self.heads == 2 else y


def foreign_onnx(path: Path, size: int | None = 28, **kwargs) -> Path:
    """A small CNN exported by torch.onnx.export (TorchScript, opset 17): batch axis dynamic, and
    height and width too when `size` is None."""
    torch.manual_seed(0)
    net = SmallCNN(**kwargs).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        net.body[1].running_mean.uniform_(-0.5, 0.5)
        net.body[1].running_var.uniform_(0.5, 2.0)
    names = ["feat", "feat2"][:kwargs.get("heads", 1)]
    axes = {"x": {0: "n"} if size else {0: "n", 2: "h", 3: "w"}, **{name: {0: "n"} for name in names}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, size or 28, size or 28),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=names, dynamic_axes=axes)
    return path


def test_a_foreign_onnx_encoder_is_level_0(tmp_path, fmnist_test):
    import onnxruntime as ort

    from sjea_tools.runs import load_model

    file = foreign_onnx(tmp_path / "mine.onnx")
    result = run_cli(["train", *SMALL, "--max-steps", "2", "--from", file, "--out", "runs/mine"], tmp_path)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "mine"
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["model"]["level0_dim"], cfg["data"]["image_size"], cfg["train"]["from_output"]) == (16, 28, "feat")
    model = load_model(run)
    x = fmnist_batch(fmnist_test, 32, model.preprocess_spec)  # the dataset's mean and std: not in the file
    want = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        got = model.forward_levels(x, [0])[0].numpy()
    np.testing.assert_allclose(got, want.reshape(32, 16), rtol=0, atol=ONNX_ATOL)


def test_foreign_onnx_sizes_and_outputs_are_settled_by_options(tmp_path):
    dry = ["--limit", "64", "--batch-size", "16", "--dry-run", "--json"]
    free = foreign_onnx(tmp_path / "free.onnx", size=None)
    one_line_error(run_cli(["train", "--from", free, *dry], tmp_path), "any height and width", "--image-size")
    result = run_cli(["train", "--from", free, "--image-size", "32", *dry], tmp_path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["data"]["image_size"] == 32
    fixed = foreign_onnx(tmp_path / "fixed.onnx")
    one_line_error(run_cli(["train", "--from", fixed, "--image-size", "32", *dry], tmp_path),
                   "--image-size 32", "28")
    two = foreign_onnx(tmp_path / "two.onnx", heads=2)
    one_line_error(run_cli(["train", "--from", two, *dry], tmp_path), "2 outputs", "train.from_output")
    result = run_cli(["train", "--from", two, "--set", "train.from_output=feat2", *dry], tmp_path)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["train"]["from_output"] == "feat2"


def bad_onnx_sources(tmp_path: Path) -> dict[str, tuple[Path, tuple]]:
    import onnx
    from onnx import TensorProto, helper

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not an onnx graph at all" * 3)
    external = tmp_path / "external" / "enc.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(str(foreign_onnx(tmp_path / "to-split.onnx"))), str(external), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)

    def graph_file(name, node, out_shape, in_type=TensorProto.FLOAT):
        x = helper.make_tensor_value_info("x", in_type, ["n", 3, 28, 28])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
        model = helper.make_model(helper.make_graph(node, name, [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        return path

    pool = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"])]
    unsupported = graph_file("hardmax", [*pool, helper.make_node("Hardmax", ["f"], ["y"])], ["n", 3])
    spatial = graph_file("spatial", [helper.make_node("Relu", ["x"], ["y"])], ["n", 3, 28, 28])
    pixels = graph_file("pixels", [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
                                   helper.make_node("GlobalAveragePool", ["c"], ["y"])], ["n", 3, 1, 1],
                        in_type=TensorProto.UINT8)
    return {
        "corrupt": (corrupt, ("corrupt.onnx", "not a readable ONNX file")),
        "external data": (external, ("external data file", "save_as_external_data=False")),
        "operator": (unsupported, ("Hardmax", "onnx2torch")),
        "not pooled": (spatial, ("(2, 3, 28, 28) output", "global pooling")),
        "uint8 input": (pixels, ("float32 (N, 3, H, W)",)),
    }


def test_bad_onnx_sources_are_one_line_errors_that_leave_nothing(tmp_path):
    for name, (file, needles) in bad_onnx_sources(tmp_path).items():
        result = run_cli(["train", *SMALL, "--from", file, "--out", "runs/x"], tmp_path)
        one_line_error(result, *needles)
        assert not (tmp_path / "runs" / "x").exists(), name


def test_an_onnx_source_run_resumes_from_its_checkpoint_without_the_file(tmp_path, fmnist_test):
    from sjea_tools.runs import load_model

    source = foreign_onnx(tmp_path / "mine.onnx")
    result = run_cli(["train", *SMALL, "--max-steps", "2", "--set", "train.checkpoint_every=1", "--from", source,
                      "--out", "runs/r"], tmp_path)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "r"
    before = load_model(run)
    (run / "model.pt").unlink()
    source.rename(tmp_path / "moved.onnx")  # the checkpoint holds the graph: the file is not needed
    assert list(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]).count("encoders.0.onnx") == 1
    resumed = run_cli(["train", "--resume", run, "--quiet"], tmp_path)
    assert resumed.exit_code == 0, resumed.output
    x = fmnist_batch(fmnist_test, 16, before.preprocess_spec)
    with torch.no_grad():
        assert torch.equal(load_model(run).forward_levels(x, [0])[0], before.forward_levels(x, [0])[0])
