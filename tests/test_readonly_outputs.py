"""Read-only and full disks under eval, plot, export, images and train: one line on stderr, exit 2,
no traceback, what was written before is intact and no temporary file is left.

Real file systems, not mocks: a read-only tmpfs, a read-only bind mount of a run folder, and a small
tmpfs filled to the last byte. Mounting needs root with CAP_SYS_ADMIN (chmod 0555 does not stop
root); where that is missing the tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sjea_tools.cli import app

runner = CliRunner()


def _mount(*args) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount ({' '.join(args)}): {done.stderr.strip() or 'mount failed'}; needs root with "
                    "CAP_SYS_ADMIN")


@pytest.fixture
def mounts(tmp_path):
    """mount(kind, ...) -> a mounted folder under tmp_path; all unmounted at the end."""
    mounted: list[Path] = []

    def mount(kind: str, source: Path | None = None, size: str = "1m") -> Path:
        target = tmp_path / f"{kind}-{uuid.uuid4().hex[:6]}"
        target.mkdir()
        if kind == "ro":
            _mount("-t", "tmpfs", "-o", f"size={size},ro", "tmpfs", str(target))
        elif kind == "bind-ro":  # an existing folder, read-only at a second path
            _mount("--bind", str(source), str(target))
            mounted.append(target)
            _mount("-o", "remount,bind,ro", str(target))
            return target
        else:  # a writable tmpfs the test fills
            _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target))
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def fill(folder: Path) -> None:
    """Write until the file system refuses one more byte (unbuffered: nothing is left to flush)."""
    for name, block in (("filler", 4096), ("filler-tail", 1)):  # then the last partial block
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while os.write(fd, b"\0" * block):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def assert_one_line(result, *needles) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- eval -----------------------------------------------------------------------------------------

EVAL = ["--max-train", "200", "--max-test", "50", "--probe-epochs", "1", "--quiet"]


def test_eval_into_a_read_only_folder_is_refused_before_the_work(tmp_path, make_run, mounts):
    run = make_run(tmp_path / "run", levels=1)
    ro = mounts("ro")
    result = runner.invoke(app, ["eval", "--run", str(run), "--out", str(ro / "sub" / "e.json"), *EVAL])
    assert_one_line(result, str(ro / "sub" / "e.json"), "read-only file system")
    assert list(ro.iterdir()) == []


def test_eval_beside_a_read_only_run_keeps_the_old_result(tmp_path, make_run, mounts):
    run = make_run(tmp_path / "run", levels=1)
    (run / "eval.json").write_text('{"old": true}\n')
    ro_run = mounts("bind-ro", source=run)
    result = runner.invoke(app, ["eval", "--run", str(ro_run), *EVAL])
    assert_one_line(result, "read-only file system")
    assert (run / "eval.json").read_text() == '{"old": true}\n' and temp_files(run) == []


def test_eval_on_a_full_disk_keeps_the_old_result_and_leaves_no_temp_file(tmp_path, make_run, mounts):
    run = make_run(tmp_path / "run", levels=1)
    full = mounts("full", size="256k")
    (full / "e.json").write_text('{"old": true}\n')
    fill(full)
    result = runner.invoke(app, ["eval", "--run", str(run), "--out", str(full / "e.json"), "--save-features", *EVAL])
    assert_one_line(result, "no space left on the device")
    assert (full / "e.json").read_text() == '{"old": true}\n'
    assert temp_files(full) == []


# --- export ---------------------------------------------------------------------------------------

def test_export_to_read_only_and_full_disks(tmp_path, make_run, mounts):
    run = make_run(tmp_path / "run", levels=1)
    ro = mounts("ro")
    assert_one_line(runner.invoke(app, ["export", "--run", str(run), "--out", str(ro), "--quiet"]),
                    str(ro), "not writable")
    full = mounts("full", size="512k")
    (full / "keep.onnx").write_bytes(b"earlier export")
    fill(full)
    result = runner.invoke(app, ["export", "--run", str(run), "--out", str(full), "--quiet"])
    assert_one_line(result, "no space left on the device")
    assert (full / "keep.onnx").read_bytes() == b"earlier export"
    assert temp_files(full) == [] and not list(full.glob("level*.onnx"))


# --- plot -----------------------------------------------------------------------------------------

def test_plot_to_read_only_and_full_disks(tmp_path, make_run, mounts):
    run = make_run(tmp_path / "run", levels=1)
    ro = mounts("ro")
    result = runner.invoke(app, ["plot", "--run", str(run), "--only", "tsne", "--out-dir", str(ro / "p"), "--quiet"])
    assert_one_line(result, str(ro / "p"), "read-only file system")
    full = mounts("full", size="256k")
    fill(full)
    result = runner.invoke(app, ["plot", "--run", str(run), "--only", "tsne", "--max-points", "100",
                                 "--out-dir", str(full), "--quiet"])
    assert_one_line(result, "no space left on the device")
    assert temp_files(full) == [] and not (full / "tsne.png").exists()


# --- images ---------------------------------------------------------------------------------------

def test_images_on_a_full_disk_keep_whole_files_and_resume_after_space_is_freed(mounts):
    from PIL import Image

    ro = mounts("ro")
    assert_one_line(runner.invoke(app, ["images", "fashion-mnist", str(ro / "im"), "--limit", "3"]),
                    str(ro / "im"), "read-only file system")
    full = mounts("full", size="1m")  # tmpfs takes a 4 KiB page per image file: 1 MiB holds ~200
    (full / "room").write_bytes(b"\0" * 40960)
    fill(full)
    (full / "room").unlink()  # room for about ten images, not for 2000
    result = runner.invoke(app, ["images", "fashion-mnist", str(full / "im"), "--limit", "2000"])
    assert_one_line(result, "no space left on the device")
    assert temp_files(full) == []
    written = sorted((full / "im").rglob("*.png"))
    assert 0 < len(written) < 2000
    for path in written:  # every file there is a whole image
        with Image.open(path) as img:
            img.load()
    (full / "filler").unlink()
    result = runner.invoke(app, ["images", "fashion-mnist", str(full / "im"), "--limit", "150", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 150 and summary["written"] == 150 - min(len(written), 150)


# --- train ----------------------------------------------------------------------------------------

def test_train_on_a_full_disk_is_one_line_and_leaves_no_temp_file(mounts):
    full = mounts("full", size="1m")  # config.json fits, a checkpoint does not
    result = runner.invoke(app, ["train", "--out", str(full / "t"), "--max-steps", "1", "--limit", "128",
                                 "--batch-size", "64", "--workers", "0", "--quiet"])
    assert_one_line(result, "no space left on the device")
    assert temp_files(full) == []
    # A start that failed before its first checkpoint leaves nothing that would refuse the rerun.
    assert not (full / "t").exists() or not any((full / "t").iterdir())
