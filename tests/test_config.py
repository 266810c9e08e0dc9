"""Run configuration: presets, files (YAML/TOML/JSON), overrides, validation, round trip."""

from __future__ import annotations

import json

import pytest

from sjea_tools import PRESETS, RunConfig, SjeaError, resolve_config
from sjea_tools.config import load_config_file, save_config


# --- presets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves(name):
    cfg = resolve_config(name)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == name
    assert cfg.model.levels >= 1 and cfg.train.batch_size >= 2
    assert len(cfg.mean) == 3 and len(cfg.std) == 3 and cfg.image_size > 0


def test_preset_values_follow_the_method():
    paper = resolve_config("cifar10-paper")
    assert (paper.model.levels, paper.model.encoder, paper.model.stem) == (2, "resnet", "small")
    assert (paper.data.dataset, paper.image_size, paper.data.holdout, paper.data.split_seed) == ("cifar10", 32, 5000, 22343)
    assert (paper.optim.optimizer, paper.optim.lr, paper.train.batch_size) == ("adam", 1e-3, 256)
    assert paper.mean == (0.4914, 0.4822, 0.4465) and paper.std == (0.2470, 0.2435, 0.2616)
    assert paper.per_level("sim_coeff") == [25.0, 25.0] and paper.per_level("cov_coeff") == [1.0, 1.0]
    stl = resolve_config("stl10-paper")
    assert stl.image_size == 64 and stl.mean == (0.43, 0.42, 0.39)
    assert resolve_config("vicreg-r18").model.levels == 1
    assert resolve_config("vicreg-r50").model.backbone == "resnet50"
    tiny = resolve_config("tiny")
    assert tiny.data.dataset == "fashion-mnist" and tiny.image_size == 28


def test_default_preset_is_tiny():
    assert resolve_config().name == "tiny"
    assert resolve_config().to_dict() == resolve_config("tiny").to_dict()


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(SjeaError, match="unknown preset 'cifar11'") as e:
        resolve_config("cifar11")
    for name in PRESETS:
        assert name in str(e.value)


# --- overrides and bad values -------------------------------------------------------------------

def test_overrides_with_dotted_keys_and_dashes():
    cfg = resolve_config("tiny", overrides={"model.levels": 3, "model.level-input": "embedding",
                                            "train.batch_size": "64", "optim.lr": "0.01",
                                            "model.stop_gradient": "yes", "train.epochs": None})
    assert cfg.model.levels == 3 and cfg.model.level_input == "embedding"
    assert cfg.train.batch_size == 64 and cfg.optim.lr == 0.01 and cfg.model.stop_gradient is True
    assert cfg.train.epochs == 6  # None means "not given", the preset's value stays


def test_unknown_option_names_the_known_ones():
    with pytest.raises(SjeaError, match="unknown setting 'bogus'.*levels"):
        resolve_config("tiny", overrides={"model.bogus": 1})
    with pytest.raises(SjeaError, match="unknown setting 'nosuchsection'"):
        resolve_config("tiny", overrides={"nosuchsection.x": 1})


@pytest.mark.parametrize("key,value,pattern", [
    ("train.batch_size", "abc", r"train.batch_size: 'abc' is not a valid value"),
    ("model.levels", 2.5, r"model.levels: 2.5 is not a valid value"),
    ("model.stop_gradient", "maybe", r"stop_gradient: 'maybe' is not a valid value"),
    ("optim.lr", "fast", r"optim.lr: 'fast' is not a valid value"),
    ("model.encoder", "transformer", r"model.encoder: 'transformer' is not one of resnet, mlp"),
    ("model.level_input", "image", r"model.level_input: 'image' is not one of representation, embedding"),
    ("model.stem", "big", r"model.stem: 'big' is not one of"),
    ("optim.optimizer", "sgd", r"optim.optimizer: 'sgd' is not one of adam, lars"),
    ("train.precision", "fp8", r"train.precision: 'fp8' is not one of"),
    ("model.backbone", "vgg16", r"unknown backbone 'vgg16' \(known: .*resnet18"),
    ("model.projector", "512-x", r"model.projector: '512-x' must be sizes joined by '-'"),
    ("model.projector", "512-0-256", r"model.projector"),
    ("model.mlp_dims", "", r"model.mlp_dims"),
    ("train.epochs", 0, r"--epochs must be positive"),
    ("loss.sim_coeff", "a,b", r"loss.sim_coeff"),
])
def test_bad_values_raise_a_clear_error(key, value, pattern):
    with pytest.raises(SjeaError, match=pattern):
        resolve_config("tiny", overrides={key: value})


def test_a_scalar_where_a_table_belongs_is_refused():
    with pytest.raises(SjeaError, match="expected a table"):
        RunConfig.from_dict({"model": 3})


@pytest.mark.parametrize("levels", [0, -1])
def test_levels_below_one_refused(levels):
    with pytest.raises(SjeaError, match="levels must be 1 or more"):
        resolve_config("tiny", overrides={"model.levels": levels})


@pytest.mark.parametrize("batch", [1, 0])
def test_batch_below_two_refused(batch):
    with pytest.raises(SjeaError, match="batch-size must be 2 or more"):
        resolve_config("tiny", overrides={"train.batch_size": batch})
    assert resolve_config("tiny", overrides={"train.batch_size": 2}).train.batch_size == 2


@pytest.mark.parametrize("key,value", [
    ("data.mean", "0.5,0.5"),           # three channels need three values
    ("data.std", "0.2,0.0,0.2"),        # division by zero in the preprocess
    ("data.image_size", 0),
    ("optim.lr", -0.001),
    ("optim.lr", "nan"),
    ("data.flip_p", 1.5),
    ("data.crop_scale", "0.9,0.3"),
    ("data.holdout", -5),
    ("data.limit", 0),
    ("loss.level_weights", "1,-1"),
    ("loss.cov_coeff", "inf"),
    ("data.jitter", "0.4,0.4"),
    ("train.epochs", "nan"),
])
def test_values_that_would_break_training_later_are_refused_now(key, value):
    with pytest.raises(SjeaError, match=key.split(".")[1]):
        resolve_config("tiny", overrides={key: value})


# --- per-level loss settings --------------------------------------------------------------------

def test_per_level_lists_broadcast_and_keep_order():
    cfg = resolve_config("tiny", overrides={"model.levels": 3, "loss.level_weights": "1,0.5,0.25",
                                            "loss.cov_coeff": 0.04})
    assert cfg.per_level("level_weights") == [1.0, 0.5, 0.25]
    assert cfg.per_level("cov_coeff") == [0.04, 0.04, 0.04]
    assert cfg.per_level("sim_coeff") == [25.0, 25.0, 25.0]
    assert cfg.per_level("std_coeff") == [25.0, 25.0, 25.0]


def test_per_level_list_from_a_file_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  levels: 2\nloss:\n  sim_coeff: [25, 10]\n")
    assert resolve_config("tiny", path).per_level("sim_coeff") == [25.0, 10.0]


@pytest.mark.parametrize("name", ["sim_coeff", "std_coeff", "cov_coeff", "level_weights"])
def test_per_level_list_length_is_checked(name):
    with pytest.raises(SjeaError, match=rf"loss.{name}: give one value or one per level \(2\), not 3"):
        resolve_config("tiny", overrides={"model.levels": 2, f"loss.{name}": "1,2,3"})
    # the same list is fine once the stack has three levels
    cfg = resolve_config("tiny", overrides={"model.levels": 3, f"loss.{name}": "1,2,3"})
    assert cfg.per_level(name) == [1.0, 2.0, 3.0]


# --- files ----------------------------------------------------------------------------------------

YAML_TEXT = """
model:
  levels: 3
  encoder: resnet
data:
  limit: 100
train:
  epochs: 3
  batch_size: 32
"""

TOML_TEXT = """
[model]
levels = 3
encoder = "resnet"

[data]
limit = 100

[train]
epochs = 3
batch_size = 32
"""


@pytest.mark.parametrize("suffix,text", [(".yaml", YAML_TEXT), (".yml", YAML_TEXT), (".toml", TOML_TEXT),
                                         (".json", json.dumps({"model": {"levels": 3, "encoder": "resnet"},
                                                               "data": {"limit": 100},
                                                               "train": {"epochs": 3, "batch_size": 32}}))])
def test_config_files_load_and_override_the_preset(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    cfg = resolve_config("tiny", config_file=path)
    assert (cfg.model.levels, cfg.model.encoder, cfg.data.limit, cfg.train.epochs, cfg.train.batch_size) == \
        (3, "resnet", 100, 3.0, 32)
    # settings the file does not mention keep the preset's value
    assert cfg.model.stem == "standard" and cfg.data.dataset == "fashion-mnist"
    assert cfg.name == "tiny"


def test_overrides_beat_file_beat_preset(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(TOML_TEXT)
    preset_only = resolve_config("tiny")
    assert preset_only.data.limit is None and preset_only.train.epochs == 6
    cfg = resolve_config("tiny", config_file=path, overrides={"data.limit": 50, "model.encoder": "mlp"})
    assert cfg.data.limit == 50            # override beats file
    assert cfg.model.encoder == "mlp"      # override beats file
    assert cfg.train.epochs == 3.0         # file beats preset
    assert cfg.model.levels == 3           # file beats default
    assert cfg.optim.warmup_epochs == 0.3  # preset beats default, untouched by file and overrides


def test_empty_config_file_changes_nothing(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert resolve_config("tiny", path).to_dict() == resolve_config("tiny").to_dict()


@pytest.mark.parametrize("name,text,pattern", [
    ("bad.yaml", "model: [levels: 2\n", r"bad.yaml is not valid yaml"),
    ("bad.toml", "[model\nlevels = 2\n", r"bad.toml is not valid toml"),
    ("bad.json", "{\"model\": ", r"bad.json is not valid json"),
    ("list.yaml", "- 1\n- 2\n", r"must hold a table of settings"),
    ("unknown.yaml", "model:\n  depth: 3\n", r"unknown setting 'depth'"),
    ("badvalue.toml", "[train]\nbatch_size = \"many\"\n", r"train.batch_size: 'many' is not a valid value"),
])
def test_bad_config_files_raise_a_clear_error(tmp_path, name, text, pattern):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SjeaError, match=pattern) as e:
        resolve_config("tiny", config_file=path)
    assert "\n" not in str(e.value)  # one line for the CLI


def test_missing_config_file(tmp_path):
    with pytest.raises(SjeaError, match="cannot read config file .*nope.yaml"):
        load_config_file(tmp_path / "nope.yaml")


# --- round trip -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_through_dict_and_json(tmp_path, name):
    cfg = resolve_config(name, overrides={"loss.level_weights": "1,0.5", "model.levels": 2,
                                          "data.mean": "0.1,0.2,0.3", "train.max_steps": 7})
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg
    save_config(cfg, tmp_path / "config.json")
    loaded = RunConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert loaded == cfg
    assert loaded.mean == (0.1, 0.2, 0.3) and isinstance(loaded.data.crop_scale, tuple)
    assert loaded.per_level("level_weights") == [1.0, 0.5]


def test_from_dict_validates():
    with pytest.raises(SjeaError, match="levels must be 1 or more"):
        RunConfig.from_dict({"model": {"levels": 0}})
    with pytest.raises(SjeaError, match="unknown setting 'colour'"):
        RunConfig.from_dict({"data": {"colour": "red"}})


# --- bounds: a typo is refused at once, before any model is built --------------------------------

@pytest.mark.parametrize("key,value,pattern", [
    ("model.levels", 100000, r"model.levels: 100000 is out of range; give a value at most 16"),
    ("model.projector", "100000-256", r"model.projector: '100000-256' has a size above 65536"),
    ("model.projector", "60000-60000-60000", r"about [\d,]+ weights over 2 levels"),
    ("model.mlp_dims", "70000", r"model.mlp_dims: '70000' has a size above"),
    ("train.batch_size", 10**7, r"train.batch_size: 10000000 is out of range"),
    ("data.image_size", 100000, r"data.image_size: 100000 is out of range"),
    ("data.image_size", 4, r"data.image_size: 4 is out of range; give a value from 8 to 4,096"),
    ("data.workers", -1, r"data.workers: -1"),
    ("train.seed", -1, r"train.seed: -1"),
    ("train.seed", 2**40, r"train.seed: .* at most 4,294,967,295"),
    ("train.epochs", 1e9, r"train.epochs"),
    ("train.max_steps", 0, r"train.max_steps: 0"),
    ("train.checkpoint_every", 0, r"train.checkpoint_every"),
    ("train.log_every", -3, r"train.log_every"),
    ("optim.lr", 1e4, r"optim.lr: 10000.0 is out of range; give a value at most 100"),
    ("optim.weight_decay", "inf", r"optim.weight_decay"),
    ("optim.momentum", 1.5, r"optim.momentum"),
    ("optim.eta", "nan", r"optim.eta: nan"),
    ("optim.warmup_epochs", -1, r"optim.warmup_epochs"),
    ("optim.final_lr_ratio", 2, r"optim.final_lr_ratio"),
    ("loss.std_coeff", "1e9", r"loss.std_coeff: 1000000000.0 is out of range"),
    ("data.jitter", "0.4,0.4,0.4,0.9", r"data.jitter: 0.9 .* at most 0.5"),
    ("data.jitter", "inf,0.4,0.4,0.1", r"data.jitter: inf"),
])
def test_values_beyond_any_run_are_refused_with_one_line(key, value, pattern):
    with pytest.raises(SjeaError, match=pattern) as e:
        resolve_config("tiny", overrides={key: value})
    assert "\n" not in str(e.value)


def test_bounds_admit_the_largest_real_recipes():
    # Official VICReg's projector and batch on ImageNet-sized images, over three levels ...
    cfg = resolve_config("vicreg-r50", overrides={"model.projector": "8192-8192-8192", "train.batch_size": 2048,
                                                  "model.levels": 3, "data.image_size": 224, "optim.lr": 0.2})
    assert cfg.model.levels == 3 and cfg.model.projector == "8192-8192-8192"
    # ... and the most levels with the usual projector.
    assert resolve_config("cifar10-paper", overrides={"model.levels": 16}).model.levels == 16


def test_a_saved_config_out_of_bounds_is_refused_on_load():
    data = resolve_config("tiny").to_dict()
    data["model"]["levels"] = 100000
    with pytest.raises(SjeaError, match="model.levels: 100000 is out of range"):
        RunConfig.from_dict(data)


def test_dry_run_of_a_huge_config_file_is_refused_fast_and_small(tmp_path):
    """`--config` with model.levels: 100000 --dry-run used to build the model until the kernel killed
    it at 22 GB; now the CLI refuses it before importing torch."""
    import subprocess
    import sys

    (tmp_path / "big.yaml").write_text("model:\n  levels: 100000\n")
    child = ("import resource, subprocess, sys; "
             "r = subprocess.run([sys.executable, '-c', 'from sjea_tools.cli import main; main()', 'train', "
             "'--config', sys.argv[1], '--dry-run'], capture_output=True, text=True); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.stderr.write(r.stderr + r.stdout)")
    done = subprocess.run([sys.executable, "-c", child, str(tmp_path / "big.yaml")], capture_output=True,
                          text=True, timeout=120)
    rc, peak_kb = map(int, done.stdout.split())
    assert rc == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["error: model.levels: 100000 is out of range; give a value at most 16."]
    assert peak_kb < 300_000, f"peak {peak_kb} KB: something big was built or imported"


def test_a_bad_projector_is_refused_under_python_O():
    """Validation is not `assert`: under `python -O` (asserts stripped) the projector '0-512' is still
    refused, as the one-line error of `sjea train`."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-O", "-c", "from sjea_tools.cli import main; main()", "train",
                           "--dry-run", "--projector", "0-512"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines() == [
        "error: model.projector: '0-512' must be sizes joined by '-', e.g. 512-512-256."]


def test_every_rule_names_a_real_setting():
    """A rule whose setting was renamed would check nothing: each one must read a value of the defaults."""
    from sjea_tools.config import RULES, _values

    cfg = resolve_config("tiny", overrides={"data.view1.jitter": "0.1,0.1,0.1,0.1"})
    for setting, _, _ in RULES:
        _values(cfg, setting)  # AttributeError on a setting that does not exist
    assert len({setting for setting, _, _ in RULES}) > 50
