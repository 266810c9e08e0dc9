"""The embedding store: one HDF5 file per embedded folder, and the journal that makes runs resumable.

Layout (docs/store-format.md; readable with plain h5py):

    /paths                 (n,) UTF-8 strings, relative to the root folder, in embedding order
    /level_K/embeddings    (n, dim_K) float32 or float16, chunked, resizable; one group per level
    /labels, /label_names  class index per row and class names, when every image sits in a class folder
    /failed/paths          files that could not be embedded, and /failed/errors the reason for each
    root attributes        format, sjea_version, model_id, model_source, backend, levels, dims,
                           image_size, mean, std, normalized, dtype, root, created, shard, run_token

A run never writes the HDF5 file while it embeds. Rows go to an append-only *journal* folder beside
the output (`OUT.h5.partial/`): one raw file per level, one JSON line per path or failure, and a
small `commit.json` written atomically after the data it counts is on disk. A killed run leaves at
worst some rows past the last commit, which the next run truncates and recomputes, so the rows a
resumed run ends with are exactly those of a clean run. When every image is done the HDF5 file is
written from the journal to a temporary file and renamed over OUT.h5: a store on disk is always
complete, and an existing store is never touched until its replacement is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import SjeaError

FORMAT = "sjea-store/1"
PARTIAL_SUFFIX = ".partial"
# Rows per HDF5 chunk aim at about 1 MiB, the size HDF5's chunk cache handles well.
CHUNK_BYTES = 1 << 20
# Rows copied per step when writing or merging stores: about 8 MiB of embeddings per step, so
# memory stays bounded whatever the store size.
COPY_BYTES = 8 << 20
COPY_ROWS = 8192


def copy_rows(dims, itemsize: int) -> int:
    return max(64, min(COPY_ROWS, COPY_BYTES // max(1, sum(int(d) for d in dims) * itemsize)))
# Attributes that must agree for rows to belong to the same store (update, resume, merge).
IDENTITY_ATTRS = ("model_id", "levels", "dims", "image_size", "normalized", "dtype", "root")


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_decode(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _h5py():
    import h5py

    return h5py


class Store:
    """A finished store opened for reading (mode "r") or for adding derived groups (mode "a")."""

    def __init__(self, path: str | Path, mode: str = "r"):
        h5py = _h5py()
        self.path = Path(path)
        if mode not in ("r", "a", "r+"):
            raise SjeaError(f"store mode must be 'r' or 'a', not '{mode}'.")
        if self.path.is_dir():
            raise SjeaError(f"{self.path} is a folder, not an embedding store; pass the .h5 file 'sjea embed' wrote.")
        if not self.path.is_file():
            raise SjeaError(f"store {self.path} does not exist; create it with 'sjea embed IMAGES {self.path}'.")
        try:
            self._f = h5py.File(self.path, "r+" if mode == "a" else mode)
        except OSError as e:
            raise SjeaError(f"{self.path} is not a readable HDF5 store ({str(e).splitlines()[0]}); "
                            "re-create it with 'sjea embed'.") from None
        if _decode(self._f.attrs.get("format")) != FORMAT:
            self._f.close()
            raise SjeaError(f"{self.path} is an HDF5 file but not an sjea embedding store (no '{FORMAT}' format "
                            "attribute); re-create it with 'sjea embed'.")
        self.attrs = {k: _decode(v) for k, v in self._f.attrs.items()}

    # --- context manager ----------------------------------------------------------------------
    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- what the store holds -----------------------------------------------------------------
    @property
    def levels(self) -> list[int]:
        return [int(v) for v in self.attrs["levels"]]

    @property
    def dims(self) -> list[int]:
        return [int(v) for v in self.attrs["dims"]]

    @property
    def model_id(self) -> str:
        return self.attrs["model_id"]

    @property
    def root(self) -> str:
        return self.attrs["root"]

    @property
    def normalized(self) -> bool:
        return bool(self.attrs["normalized"])

    @property
    def n(self) -> int:
        return int(self._f["paths"].shape[0])

    @property
    def paths(self) -> list[str]:
        return [_decode(p) for p in self._f["paths"][:]]

    @property
    def labels(self) -> np.ndarray | None:
        return self._f["labels"][:] if "labels" in self._f else None

    @property
    def label_names(self) -> list[str] | None:
        return [_decode(p) for p in self._f["label_names"][:]] if "label_names" in self._f else None

    @property
    def failed(self) -> list[tuple[str, str]]:
        g = self._f["failed"]
        return list(zip((_decode(p) for p in g["paths"][:]), (_decode(e) for e in g["errors"][:])))

    def read_embeddings(self, level: int, rows=None) -> np.ndarray:
        """Embeddings of one level as float32, all rows or the rows given (any order)."""
        name = f"level_{level}/embeddings"
        if name not in self._f:
            raise SjeaError(f"{self.path} holds levels {self.levels}, not level {level}.")
        ds = self._f[name]
        if rows is None:
            return ds[...].astype(np.float32, copy=False)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, ds.shape[1]), np.float32)
        if rows.min() < 0 or rows.max() >= ds.shape[0]:
            raise SjeaError(f"row index out of range (the store has {ds.shape[0]} rows).")
        # h5py reads increasing unique indices only: read those, then put them in the asked order.
        unique, inverse = np.unique(rows, return_inverse=True)
        return ds[unique].astype(np.float32, copy=False)[inverse]

    def iter_rows(self, chunk: int | None = None) -> Iterator[tuple[list[str], dict[int, np.ndarray]]]:
        """(paths, {level: rows}) blocks in order, in the stored dtype: bounded memory."""
        chunk = chunk or copy_rows(self.dims, np.dtype(self.attrs.get("dtype", "float32")).itemsize)
        for start in range(0, self.n, chunk):
            stop = min(self.n, start + chunk)
            paths = [_decode(p) for p in self._f["paths"][start:stop]]
            yield paths, {k: self._f[f"level_{k}/embeddings"][start:stop] for k in self.levels}

    # --- derived groups (clusters, ...) --------------------------------------------------------
    def write_group(self, name: str, arrays: dict, attrs: dict | None = None) -> None:
        """Replace group `name` with these arrays and attributes (needs mode "a")."""
        if self._f.mode == "r":
            raise SjeaError(f"open {self.path} with mode='a' to write group '{name}'.")
        if name in _RESERVED or name.startswith("level_"):
            raise SjeaError(f"group '{name}' is part of the store layout and cannot be replaced.")
        if name in self._f:
            del self._f[name]
        g = self._f.create_group(name)
        for key, value in arrays.items():
            value = np.asarray(value)
            if value.dtype.kind in "UO":
                g.create_dataset(key, data=[str(v) for v in value.ravel()], dtype=_h5py().string_dtype("utf-8"))
            else:
                g.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            g.attrs[key] = value
        self._f.flush()

    def read_group(self, name: str):
        """(arrays, attrs) of a group written with write_group, or None when it is absent."""
        if name not in self._f:
            return None
        g = self._f[name]
        arrays = {}
        for key, ds in g.items():
            data = ds[...]
            arrays[key] = np.asarray(_decode(data)) if data.dtype.kind in "OS" else data
        return arrays, {k: _decode(v) for k, v in g.attrs.items()}


_RESERVED = {"paths", "labels", "label_names", "failed"}


def open_store(path: str | Path, mode: str = "r") -> Store:
    """Open a finished store; use as a context manager: `with open_store(p) as s: ...`."""
    return Store(path, mode)


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def check_same_identity(expected: dict, found: dict, what: str, fix: str, keys=IDENTITY_ATTRS) -> None:
    """Refuse rows from a different model or with different settings, naming the first difference."""
    if found.get("model_id") != expected.get("model_id"):
        raise SjeaError(f"{what} was written by another model (model id {str(found.get('model_id'))[:12]}, this one "
                        f"is {str(expected.get('model_id'))[:12]}); {fix}")
    for key in keys:
        a, b = expected.get(key), found.get(key)
        if key in ("levels", "dims"):
            a, b = [int(v) for v in (a or [])], [int(v) for v in (b or [])]
        if a != b:
            raise SjeaError(f"{what} has {key}={b}, this run has {key}={a}; {fix}")


# --- the journal: append-only, crash-safe rows of a run in progress ----------------------------

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

    def _acquire_lock(self) -> None:
        """One writer per journal: a second run on the same OUT stops instead of interleaving rows.

        A POSIX record lock (lockf), not flock: it belongs to this process alone, so forked decode
        workers do not inherit it, and the kernel drops it the moment the process dies: a killed
        run never blocks its own resume."""
        import fcntl

        self._lock = open(self.folder / "lock", "a+b")
        try:
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            target = self.folder.name.removesuffix(PARTIAL_SUFFIX)
            raise SjeaError(f"another 'sjea embed' is writing {target} right now "
                            f"(it holds {self.folder / 'lock'}); wait for it to finish or stop it first.") from None

    # --- create / open ------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, attrs: dict, base_rows: int = 0, mode: str = "new") -> "Journal":
        from .io import atomic_write_text

        folder = Path(folder)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        meta = {"format": FORMAT + "-journal", "attrs": attrs, "token": uuid.uuid4().hex, "base_rows": base_rows,
                "mode": mode}
        j = cls(folder, meta)
        j._acquire_lock()
        for name in j._file_names():
            (folder / name).touch()
        j._write_commit(durable=False)
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))  # last: marks a usable journal
        j._open_files()
        return j

    @classmethod
    def open(cls, folder: Path) -> "Journal":
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            commit = json.loads((folder / "commit.json").read_text())
            assert meta.get("format") == FORMAT + "-journal"
        except (OSError, ValueError, AssertionError):
            raise SjeaError(f"{folder} is not a readable unfinished run; delete it or pass --overwrite.") from None
        j = cls(folder, meta)
        j._acquire_lock()
        j.rows, j.failed = int(commit["rows"]), int(commit["failed"])
        sizes = {"paths.jsonl": commit["paths_bytes"], "failed.jsonl": commit["failed_bytes"]}
        for k, d in zip(j.levels, j.dims):
            sizes[f"level_{k}.bin"] = j.rows * d * j.dtype.itemsize
        for name, size in sizes.items():
            path = folder / name
            if not path.is_file() or path.stat().st_size < size:
                raise SjeaError(f"{path} is shorter than its commit says (the disk lost data); delete {folder} "
                                "or pass --overwrite to start again.")
            os.truncate(path, size)  # drop rows written after the last commit
        j._open_files()
        return j

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
        from .io import atomic_write_text

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
            self._lock.close()  # releases the lock
            self._lock = None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)

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


def _read_jsonl(path: Path, count: int) -> list:
    out = []
    with open(path, "rb") as f:
        for _ in range(count):
            out.append(json.loads(f.readline()))
    return out


# --- writing a finished store -----------------------------------------------------------------

def folder_labels_of(paths: list[str]) -> tuple[np.ndarray | None, list[str] | None]:
    from .data.datasets import folder_labels

    return folder_labels(paths)


@contextmanager
def _temporary_beside(out: Path):
    """A temporary file in out's folder, renamed over out on success, removed on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_store(out: str | Path, attrs: dict, row_sources: Iterable[Iterable[tuple[list[str], dict]]],
                failures: list[tuple[str, str]]) -> Path:
    """Write a complete store from blocks of rows (stores, journals), via a temporary file and a rename."""
    h5py = _h5py()
    out = Path(out)
    levels = [int(k) for k in attrs["levels"]]
    dims = [int(d) for d in attrs["dims"]]
    dtype = np.dtype(attrs["dtype"])
    text = h5py.string_dtype("utf-8")
    all_paths: list[str] = []
    with _temporary_beside(out) as tmp:
        with h5py.File(tmp, "w") as f:
            paths_ds = f.create_dataset("paths", shape=(0,), maxshape=(None,), dtype=text, chunks=(COPY_ROWS,))
            level_ds = {}
            for k, d in zip(levels, dims):
                chunk_rows = max(1, min(65536, CHUNK_BYTES // (d * dtype.itemsize)))
                level_ds[k] = f.create_group(f"level_{k}").create_dataset(
                    "embeddings", shape=(0, d), maxshape=(None, d), dtype=dtype, chunks=(chunk_rows, d))
                level_ds[k].attrs["level"] = k
            n = 0
            for source in row_sources:
                for paths, block in source:
                    m = len(paths)
                    paths_ds.resize((n + m,))
                    paths_ds[n:n + m] = paths
                    for k in levels:
                        level_ds[k].resize((n + m, level_ds[k].shape[1]))
                        level_ds[k][n:n + m] = np.asarray(block[k]).astype(dtype, copy=False)
                    all_paths.extend(paths)
                    n += m
            if len(set(all_paths)) != len(all_paths):
                raise SjeaError(f"the rows for {out} name some images twice; the inputs overlap (merge each "
                                "shard once).")
            labels, names = folder_labels_of(all_paths)
            if labels is not None:
                f.create_dataset("labels", data=labels)
                f.create_dataset("label_names", data=names, dtype=text)
            g = f.create_group("failed")
            g.create_dataset("paths", data=[p for p, _ in failures], dtype=text, maxshape=(None,))
            g.create_dataset("errors", data=[e for _, e in failures], dtype=text, maxshape=(None,))
            for key, value in attrs.items():
                if value is not None:
                    f.attrs[key] = value
            f.attrs["format"] = FORMAT
    return out


# --- merging shards ---------------------------------------------------------------------------

def parse_shard(spec) -> tuple[int, int] | None:
    """'I/N' (0 <= I < N) to (I, N); None stays None."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, (tuple, list)):
        i, n = (int(v) for v in spec)
    else:
        try:
            i, n = (int(v) for v in str(spec).split("/"))
        except ValueError:
            raise SjeaError(f"--shard must look like I/N, e.g. 0/4, not '{spec}'.") from None
    if n < 1 or not 0 <= i < n:
        raise SjeaError(f"--shard {i}/{n}: I must be between 0 and N-1 ({0}..{max(n - 1, 0)}) and N at least 1.")
    return i, n


def shard_slice(count: int, shard: tuple[int, int] | None) -> slice:
    """The contiguous block of `count` items that shard I of N takes (sizes differ by at most one)."""
    if shard is None:
        return slice(0, count)
    i, n = shard
    return slice(i * count // n, (i + 1) * count // n)


def merge_stores(inputs: list[str | Path], out: str | Path) -> dict:
    """Combine the shards of one embedding run into the store a single run would have written."""
    out = Path(out)
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise SjeaError("give the shard stores to merge, e.g. 'sjea merge out-*.h5 out.h5'.")
    if out.is_dir():
        raise SjeaError(f"output {out} is a folder; give a file name such as {out / 'embeddings.h5'}.")
    if any(p.resolve() == out.resolve() for p in inputs):
        raise SjeaError(f"output {out} is also one of the inputs; write the merged store to a new file.")
    stores = [open_store(p) for p in inputs]
    try:
        by_index: dict[int, Store] = {}
        first = stores[0].attrs
        total = None
        for s in stores:
            shard = s.attrs.get("shard")
            if not shard:
                raise SjeaError(f"{s.path} is not a shard (it was written without --shard); merge only the files "
                                "'sjea embed --shard I/N' wrote.")
            i, n = parse_shard(shard)
            # Shards may come from machines that mount the folder elsewhere: the root may differ.
            check_same_identity(first, s.attrs, str(s.path), "merge only shards of the same run.",
                                keys=[k for k in IDENTITY_ATTRS if k != "root"])
            if total is None:
                total = n
            elif n != total:
                raise SjeaError(f"{s.path} is shard {i}/{n} but {stores[0].path} is one of {total}; merge shards of one run.")
            if s.attrs.get("scan_count") != first.get("scan_count"):
                raise SjeaError(f"{s.path} saw {s.attrs.get('scan_count')} images, {stores[0].path} saw "
                                f"{first.get('scan_count')}: the shards scanned different folders.")
            if i in by_index:
                raise SjeaError(f"{s.path} and {by_index[i].path} are both shard {i}/{n}.")
            by_index[i] = s
        missing = sorted(set(range(total)) - set(by_index))
        if missing:
            raise SjeaError(f"shards {', '.join(f'{i}/{total}' for i in missing)} are missing; embed them with "
                            f"--shard and merge all {total}.")
        ordered = [by_index[i] for i in range(total)]
        attrs = {k: v for k, v in first.items() if k not in ("shard", "run_token", "format")}
        attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        attrs["merged_from"] = [str(s.path) for s in ordered]
        failures = [f for s in ordered for f in s.failed]
        write_store(out, attrs, [s.iter_rows() for s in ordered], failures)
        rows = sum(s.n for s in ordered)
    finally:
        for s in stores:
            s.close()
    return {"out": str(out), "shards": total, "rows": rows, "failed": len(failures)}
