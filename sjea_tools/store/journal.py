"""The journal: append-only, crash-safe rows of an embedding run in progress (`OUT.h5.partial/`)."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import SjeaError
from ..io import atomic_write_text
from .guard import writer_lock
from .reader import FORMAT, copy_rows

PARTIAL_SUFFIX = ".partial"
JOURNAL_FORMAT = FORMAT + "-journal"


def partial_path(out: str | Path) -> Path:
    """The journal folder of a run that writes `out`."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


class Journal:
    """The rows of an unfinished run, in a folder: `meta.json`, `commit.json`, `paths.jsonl`,
    `failed.jsonl` and `level_K.bin` (raw rows in the store dtype).

    Only what `commit.json` counts exists; `open` cuts every file back to it. Data is fsynced
    before the commit that counts it is renamed into place, so neither SIGKILL nor a power cut
    can make the journal claim rows it does not hold.
    """

    def __init__(self, folder: Path, meta: dict):
        self.folder = Path(folder)
        self.meta = meta
        self.levels = [int(k) for k in meta["attrs"]["levels"]]
        self.dims = [int(d) for d in meta["attrs"]["dims"]]
        self.dtype = np.dtype(meta["attrs"]["dtype"])
        self.rows = 0
        self.failed = 0
        self._files: dict[str, object] = {}
        self._last_commit = time.monotonic()
        self._lock = None

    # --- create / open ------------------------------------------------------------------------
    # One writer per journal: the store's writer lock (store.guard), taken before the folder is
    # touched; re-entrant, so a run that already holds it (embed_folder does) just keeps it.
    @classmethod
    def create(cls, folder: Path, attrs: dict, base_rows: int = 0, mode: str = "new") -> "Journal":
        folder = Path(folder)
        meta = {"format": JOURNAL_FORMAT, "attrs": attrs, "token": uuid.uuid4().hex, "base_rows": base_rows,
                "mode": mode}
        j = cls(folder, meta)
        j._lock = _lock_for(folder)
        try:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            for name in j._file_names():
                (folder / name).touch()
            j._write_commit(durable=False)
            atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))  # last: marks a usable journal
            j._open_files()
        except BaseException:
            j.close()
            raise
        return j

    @classmethod
    def open(cls, folder: Path) -> "Journal":
        folder = Path(folder)
        lock = _lock_for(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            commit = json.loads((folder / "commit.json").read_text())
            if meta.get("format") != JOURNAL_FORMAT:
                raise ValueError(meta.get("format"))
        except (OSError, ValueError, AttributeError):  # AttributeError: meta.json holds no table
            lock.__exit__(None, None, None)
            raise SjeaError(f"{folder} is not a readable unfinished run; delete it or pass --overwrite.") from None
        j = cls(folder, meta)
        j._lock = lock
        try:
            j._cut_to_commit(commit)
            j._open_files()
        except BaseException:
            j.close()
            raise
        return j

    def _cut_to_commit(self, commit: dict) -> None:
        self.rows, self.failed = int(commit["rows"]), int(commit["failed"])
        sizes = {"paths.jsonl": commit["paths_bytes"], "failed.jsonl": commit["failed_bytes"]}
        for k, d in zip(self.levels, self.dims):
            sizes[f"level_{k}.bin"] = self.rows * d * self.dtype.itemsize
        for name, size in sizes.items():
            path = self.folder / name
            if not path.is_file() or path.stat().st_size < size:
                raise SjeaError(f"{path} is shorter than its commit says (the disk lost data); delete {self.folder} "
                                "or pass --overwrite to start again.")
            os.truncate(path, size)  # drop rows written after the last commit

    @classmethod
    def open_existing(cls, folder: Path) -> "Journal | None":
        """The journal in `folder`, or None; a folder whose creation was cut short (no meta.json
        yet) holds nothing and is removed."""
        folder = Path(folder)
        with writer_lock(_target(folder)):
            if (folder / "meta.json").is_file():
                return cls.open(folder)
            if folder.exists():
                shutil.rmtree(folder)
        return None

    def _file_names(self) -> list[str]:
        return ["paths.jsonl", "failed.jsonl"] + [f"level_{k}.bin" for k in self.levels]

    def _open_files(self) -> None:
        self._files = {name: open(self.folder / name, "ab") for name in self._file_names()}

    # --- writing ------------------------------------------------------------------------------
    def append(self, paths: list[str], rows: dict[int, np.ndarray], failed: list[tuple[str, str]]) -> None:
        """Add a batch: embedded paths with their rows per level, and failed paths with reasons."""
        for k, d in zip(self.levels, self.dims):
            block = np.ascontiguousarray(rows[k], dtype=self.dtype) if paths else np.zeros((0, d), self.dtype)
            if block.shape != (len(paths), d):
                raise ValueError(f"level {k}: expected {(len(paths), d)} rows, got {block.shape}")
            self._files[f"level_{k}.bin"].write(block.astype(block.dtype.newbyteorder("<"), copy=False).tobytes())
        self._files["paths.jsonl"].write("".join(json.dumps(p) + "\n" for p in paths).encode())
        self._files["failed.jsonl"].write("".join(json.dumps([p, e]) + "\n" for p, e in failed).encode())
        self.rows += len(paths)
        self.failed += len(failed)

    def commit(self, every_s: float = 0.0) -> bool:
        """Make everything appended so far durable; with every_s, only if that long since the last."""
        if every_s and time.monotonic() - self._last_commit < every_s:
            return False
        self._write_commit(durable=True)
        return True

    def _write_commit(self, durable: bool) -> None:
        # The append-only data files are fsynced in place (they are never replaced, so
        # atomic_write does not apply); commit.json, which counts them, is replaced atomically.
        for f in self._files.values():
            f.flush()
            if durable:
                os.fsync(f.fileno())
        commit = {"rows": self.rows, "failed": self.failed,
                  "paths_bytes": (self.folder / "paths.jsonl").stat().st_size,
                  "failed_bytes": (self.folder / "failed.jsonl").stat().st_size}
        atomic_write_text(self.folder / "commit.json", json.dumps(commit))
        self._last_commit = time.monotonic()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)

    def remove(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        shutil.rmtree(self.folder, ignore_errors=True)  # still under the lock: no one resumes a half-deleted run
        self.close()

    # --- reading ------------------------------------------------------------------------------
    def paths(self) -> list[str]:
        return _read_jsonl(self.folder / "paths.jsonl", self.rows)

    def failures(self) -> list[tuple[str, str]]:
        return [tuple(v) for v in _read_jsonl(self.folder / "failed.jsonl", self.failed)]

    def iter_rows(self, chunk: int | None = None) -> Iterator[tuple[list[str], dict[int, np.ndarray]]]:
        chunk = chunk or copy_rows(self.dims, self.dtype.itemsize)
        for f in self._files.values():
            f.flush()
        with open(self.folder / "paths.jsonl", "rb") as pf:
            for start in range(0, self.rows, chunk):
                count = min(chunk, self.rows - start)
                paths = [json.loads(pf.readline()) for _ in range(count)]
                block = {}
                for k, d in zip(self.levels, self.dims):
                    block[k] = np.fromfile(self.folder / f"level_{k}.bin", dtype=self.dtype.newbyteorder("<"),
                                           count=count * d, offset=start * d * self.dtype.itemsize).reshape(count, d)
                yield paths, block


def _target(folder: Path) -> Path:
    return folder.with_name(folder.name.removesuffix(PARTIAL_SUFFIX))


def _lock_for(folder: Path):
    lock = writer_lock(_target(folder))
    lock.__enter__()
    return lock


def _read_jsonl(path: Path, count: int) -> list:
    out = []
    with open(path, "rb") as f:
        for _ in range(count):
            out.append(json.loads(f.readline()))
    return out
