"""`sjea images`: a dataset written as real image files in class sub-folders."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from sjea_tools.cli import app
from sjea_tools.data import load_dataset, scan_images

runner = CliRunner()


def test_writes_real_test_images_by_class_and_keeps_existing_files(tmp_path, fmnist_test):
    out = tmp_path / "imgs"
    result = runner.invoke(app, ["images", "fashion-mnist", str(out), "--limit", "25", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 25 and summary["written"] == 25
    files = scan_images(out)
    assert len(files) == 25
    first = next(f for f in files if f.endswith("000000.png"))
    assert first.split("/")[0] == fmnist_test.class_names[fmnist_test.labels[0]].replace("/", "-").replace(" ", "_")
    assert np.array_equal(np.asarray(Image.open(out / first).convert("RGB")), fmnist_test.pixels[0])
    # The folder reads back as a labelled dataset with the same classes.
    folder = load_dataset(str(out))
    assert sorted(set(folder.class_names)) == folder.class_names and folder.labels is not None
    again = runner.invoke(app, ["images", "fashion-mnist", str(out), "--limit", "30", "--json"])
    assert json.loads(again.stdout)["written"] == 5  # only the missing ones


def test_written_images_get_the_umask_mode_and_no_temporary_files(tmp_path):
    """Images are written through sjea_tools.io: mode 0644 under umask 022, not mkstemp's 0600."""
    previous = os.umask(0o022)
    try:
        result = runner.invoke(app, ["images", "fashion-mnist", str(tmp_path / "imgs"), "--limit", "3",
                                     "--format", "jpg", "--json"])
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    files = sorted(p for p in (tmp_path / "imgs").rglob("*") if p.is_file())
    assert len(files) == 3 and all(p.suffix == ".jpg" and not p.name.startswith(".") for p in files)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
    assert all(Image.open(p).format == "JPEG" for p in files)


def test_bad_format_and_output_are_one_line(tmp_path):
    bad = runner.invoke(app, ["images", "fashion-mnist", str(tmp_path / "x"), "--format", "gifx"])
    assert bad.exit_code == 2 and "--format" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    clash = runner.invoke(app, ["images", "fashion-mnist", str(blocker), "--limit", "2"])
    assert clash.exit_code == 2 and "not a folder" in clash.stderr
    assert blocker.read_text() == "keep"


def test_resume_refuses_options_it_would_ignore(tmp_path):
    result = runner.invoke(app, ["train", "--resume", str(tmp_path), "--epochs", "3"])
    assert result.exit_code == 2 and "saved settings" in result.stderr and "drop --epochs" in result.stderr
