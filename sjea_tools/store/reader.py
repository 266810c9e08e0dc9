"""Reading a finished store (`Store`, `open_store`) and what decides that rows belong together."""

from __future__ import annotations

import errno
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import SjeaError
from ..spec import PreprocessSpec

FORMAT = "sjea-store/1"
# Rows copied per step when writing or merging stores: about 8 MiB of embeddings per step, so
# memory stays bounded whatever the store size.
COPY_BYTES = 8 << 20
COPY_ROWS = 8192
# Attributes that must agree for rows to belong to the same store (update, resume, merge);
# "preprocess" stands for the PreprocessSpec the attributes image_size, mean, std, colour_mode hold.
IDENTITY_ATTRS = ("model_id", "levels", "dims", "preprocess", "normalized", "dtype", "root")
# Groups of the layout that write_group must not replace (level_K groups are refused too).
RESERVED_GROUPS = {"paths", "labels", "label_names", "failed"}


def copy_rows(dims, itemsize: int) -> int:
    return max(64, min(COPY_ROWS, COPY_BYTES // max(1, sum(int(d) for d in dims) * itemsize)))


def decode(value):
    """An HDF5 attribute or dataset value as plain Python (str, list, int, float). Bytes that are
    not UTF-8 (a file name the file system allowed) come back surrogate-escaped, as os.listdir
    gives them, so the path still opens the file."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, np.ndarray):
        return [decode(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def to_stored_text(values) -> list:
    """Strings for an HDF5 UTF-8 dataset, losslessly: a surrogate-escaped name (bytes that are not
    UTF-8) is stored as its original bytes, which plain h5py reads with .asstr(errors="surrogateescape")."""
    out = []
    for v in values:
        try:
            v.encode("utf-8")
            out.append(v)
        except UnicodeEncodeError:
            out.append(v.encode("utf-8", "surrogateescape"))
    return out


def strings_sha256(values) -> str:
    """The checksum of a string dataset (HDF5 cannot checksum variable-length data itself)."""
    return strings_hash(values).hexdigest()


def strings_hash(values, h=None):
    """`h` (a new sha256 when None) updated with the strings as strings_sha256 hashes them, so a
    prefix's digest can be taken on the way to the whole list's."""
    h = h or hashlib.sha256()
    for v in values:
        h.update(v.encode("utf-8", "surrogateescape") + b"\0")  # no file name holds NUL
    return h


class StoreDamagedError(SjeaError):
    """A checksum or structure check of a store failed: the file changed on disk."""


def damaged_message(path: Path, what: str, detail: str = "") -> str:
    return (f"{path} is damaged: {what}{f' ({detail})' if detail else ''}; its bytes changed on disk. Restore it "
            "from a backup or embed the images again into a new file ('sjea verify' checks a whole store).")


def check_declared_size(path: Path, ds, what: str) -> None:
    """Refuse a dataset that declares more elements than its bytes hold, before it is read: HDF5
    reads unwritten chunks (and unmapped parts of a virtual dataset) as fill values, so a file of
    a few KB could declare 10^9 rows and have a full read allocate gigabytes. sjea stores never
    compress (checksums and shuffle do not shrink data); other filters get a 64:1 allowance."""
    if ds.is_virtual:
        covered = sum(m.vspace.get_select_npoints() for m in ds.virtual_sources())
        short = covered < ds.size
    else:
        plist = ds.id.get_create_plist()
        shrinks = any(plist.get_filter(i)[0] not in (2, 3) for i in range(plist.get_nfilters()))  # shuffle, fletcher32
        short = ds.size * ds.id.get_type().get_size() > ds.id.get_storage_size() * (64 if shrinks else 1)
    if short:
        raise StoreDamagedError(damaged_message(path, f"{what} declares shape {ds.shape}, more than the file's bytes hold"))


def h5py_module():
    import h5py

    return h5py


def centres_of(attrs: dict) -> list[np.ndarray] | None:
    """The centring means (one float32 (dim_K,) per stored level, in `levels` order) a store or
    journal records as attributes centre_K; None when its rows are not centred (written before
    centring, by a model without means, or with --no-normalize)."""
    found = [attrs.get(f"centre_{int(k)}") for k in attrs.get("levels") or []]
    if not found or any(c is None for c in found):
        return None
    return [np.asarray(c, dtype=np.float32).reshape(-1) for c in found]


def whitening_digests_of(attrs: dict) -> list[str | None] | None:
    """The sha256 of each stored level's whitening matrix (None for a level centred only), in
    `levels` order, as attributes whitening_K_sha256 record it; None when no level is whitened."""
    found = [attrs.get(f"whitening_{int(k)}_sha256") for k in attrs.get("levels") or []]
    if centres_of(attrs) is None or all(d is None for d in found):
        return None
    return [None if d is None else str(d) for d in found]


def preprocess_of(attrs: dict) -> PreprocessSpec | None:
    """The preprocessing a store or journal records; stores older than `colour_mode` were RGB."""
    if attrs.get("image_size") is None:
        return None
    return PreprocessSpec.from_dict(attrs)


class Store:
    """A finished store opened for reading (mode "r") or for adding derived groups (mode "a")."""

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        if mode not in ("r", "a", "r+"):
            raise SjeaError(f"store mode must be 'r', 'a' or 'r+' (the same as 'a'), not '{mode}'.")
        if self.path.is_dir():
            raise SjeaError(f"{self.path} is a folder, not an embedding store; pass the .h5 file 'sjea embed' wrote.")
        if not self.path.is_file():
            raise SjeaError(f"store {self.path} does not exist; create it with 'sjea embed IMAGES {self.path}'.")
        if mode != "r":
            _own_copy(self.path)
        self._f = _open_h5(self.path, "r+" if mode == "a" else mode)
        try:
            with self.reading("its attributes"):
                fmt = decode(self._f.attrs.get("format"))
                self.attrs = {k: decode(v) for k, v in self._f.attrs.items()}
        except SjeaError:
            self._f.close()
            raise
        if fmt != FORMAT:
            self._f.close()
            raise SjeaError(f"{self.path} is an HDF5 file but not an sjea embedding store (no '{FORMAT}' format "
                            "attribute); pass a store that 'sjea embed' wrote.")
        missing = [k for k in ("levels", "dims", "model_id") if k not in self.attrs]
        if missing:
            self._f.close()
            raise StoreDamagedError(damaged_message(self.path, f"attribute(s) {', '.join(missing)} missing"))
        try:
            self._check_segments()
        except SjeaError:
            self._f.close()
            raise

    def _check_segments(self) -> None:
        """The store reads only its own file and the segment files it names, each the one recorded
        (store.sources): HDF5 reads a missing source of a virtual dataset as its fill value (NaN rows,
        empty names) and an external one from any path, never an error, so such a store is refused here."""
        from .sources import check_segment_files, check_sources

        with self.reading("its layout"):
            check_sources(self._f, self.path, self.segments)
        check_segment_files(self.path, self.segments, _open_h5, StoreDamagedError)

    @contextmanager
    def reading(self, what: str):
        """Turn what HDF5 raises for damaged bytes (checksum, bad header, missing object) into one line."""
        try:
            yield
        except SjeaError:
            raise
        except (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
            raise StoreDamagedError(damaged_message(self.path, f"cannot read {what}",
                                                    str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
                                    ) from None

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
    def dtype(self) -> np.dtype:
        """The storage type of the embeddings (read_embeddings returns float32 whatever it is)."""
        return np.dtype(self.attrs.get("dtype", "float32"))

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
    def preprocess(self) -> PreprocessSpec | None:
        return preprocess_of(self.attrs)

    @property
    def centres(self) -> list[np.ndarray] | None:
        """The means subtracted from every row before normalising, per stored level (queries get
        the same: Embedder.for_store); None for a store whose rows are not centred."""
        return centres_of(self.attrs)

    @property
    def whitening_digests(self) -> list[str | None] | None:
        """Per stored level, the sha256 of the whitening matrix its rows had (the model carries the
        matrix; Embedder.in_space_of checks it); None for a store whose rows are not whitened."""
        return whitening_digests_of(self.attrs)

    @property
    def fingerprint(self) -> str | None:
        """Changes with every write of the store (None for stores written before it was recorded)."""
        return self.attrs.get("fingerprint")

    @property
    def store_id(self) -> str | None:
        """Names the store across its versions (kept by --update, compaction and a rewrite at the same
        name; new for a merge); its segments folder records it (None: written before it was)."""
        return self.attrs.get("store_id")

    @property
    def segments(self) -> list[dict] | None:
        """The segment files of a store that grew by --update or merge (docs/store-format.md):
        [{"file", "rows", "failed", "fingerprint", "labels"}], in row order; None for a single file."""
        text = self.attrs.get("segments")
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise StoreDamagedError(damaged_message(self.path, "attribute segments is not readable")) from None

    @property
    def history(self) -> list[tuple[str, int]]:
        """(fingerprint, rows) of every earlier version of this store whose rows it still holds
        unchanged as its first rows, oldest first, ending with this version."""
        prints, rows = self.attrs.get("history_fingerprints"), self.attrs.get("history_rows")
        if prints is None or rows is None:
            return [(self.fingerprint, self.n)] if self.fingerprint is not None else []
        return [(str(p), int(r)) for p, r in zip(prints, rows)]

    def rows_unchanged_since(self, fingerprint: str | None) -> int | None:
        """How many first rows this store shares, unchanged, with its version `fingerprint` (what
        an index sidecar records): all of that version's rows, since rows are only ever appended;
        None when that version is not an ancestor of this one (rewritten with --overwrite, say)."""
        return next((rows for p, rows in self.history if fingerprint is not None and p == fingerprint), None)

    @property
    def n(self) -> int:
        with self.reading("/paths"):
            return int(self._f["paths"].shape[0])

    @property
    def paths(self) -> list[str]:
        return self.read_text("paths")

    @property
    def labels(self) -> np.ndarray | None:
        with self.reading("/labels"):
            return self._f["labels"][:] if "labels" in self._f else None

    @property
    def label_names(self) -> list[str] | None:
        return self.read_text("label_names") if "label_names" in self._f else None

    @property
    def failed(self) -> list[tuple[str, str]]:
        return list(zip(self.read_text("failed/paths"), self.read_text("failed/errors")))

    def read_text(self, name: str) -> list[str]:
        """A whole string dataset, checked against its sha256 attribute when it has one."""
        with self.reading(f"/{name}"):
            ds = self._f[name]
            check_declared_size(self.path, ds, f"/{name}")
            values = [decode(v) for v in ds[:]]
            expected = decode(ds.attrs.get("sha256"))
        if expected is not None and strings_sha256(values) != expected:
            raise StoreDamagedError(damaged_message(self.path, f"/{name} does not match its checksum"))
        return values

    def embeddings_dataset(self, level: int):
        """Level `level`'s embeddings dataset, refused unless it has the (rows, dim) the attributes record."""
        name = f"level_{level}/embeddings"
        ds = self._f[name]
        if ds.ndim != 2 or ds.shape != (self.n, self.dims[self.levels.index(level)]):
            raise StoreDamagedError(damaged_message(self.path, f"/{name} has shape {ds.shape}, not the "
                                                    f"(rows, dim) = ({self.n}, {self.dims[self.levels.index(level)]}) "
                                                    "its attributes record"))
        return ds

    def read_embeddings(self, level: int, rows=None) -> np.ndarray:
        """Embeddings of one level as float32, all rows or the rows given (any order)."""
        name = f"level_{level}/embeddings"
        if name not in self._f:
            raise SjeaError(f"{self.path} holds levels {self.levels}, not level {level}.")
        with self.reading(f"/{name}"):
            ds = self.embeddings_dataset(level)
            if rows is None:
                check_declared_size(self.path, ds, f"/{name}")
                return ds[...].astype(np.float32, copy=False)
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size == 0:
                return np.zeros((0, ds.shape[1]), np.float32)
            if rows.min() < 0 or rows.max() >= ds.shape[0]:
                raise SjeaError(f"row index out of range (the store has {ds.shape[0]} rows).")
            # h5py reads increasing unique indices only: read those, then put them in the asked order.
            unique, inverse = np.unique(rows, return_inverse=True)
            return ds[unique].astype(np.float32, copy=False)[inverse]

    def iter_rows(self, chunk: int | None = None, first: int = 0,
                  last: int | None = None) -> Iterator[tuple[list[str], dict[int, np.ndarray]]]:
        """(paths, {level: rows}) blocks of rows first..last-1 (default all) in order, in the
        stored dtype: bounded memory."""
        chunk = chunk or copy_rows(self.dims, self.dtype.itemsize)
        last = self.n if last is None else last
        for start in range(first, last, chunk):
            stop = min(last, start + chunk)
            with self.reading(f"rows {start}-{stop}"):
                paths = [decode(p) for p in self._f["paths"][start:stop]]
                block = {k: self.embeddings_dataset(k)[start:stop] for k in self.levels}
            yield paths, block

    # --- derived groups (clusters, ...) --------------------------------------------------------
    def write_group(self, name: str, arrays: dict, attrs: dict | None = None) -> None:
        """Replace group `name` with these arrays and attributes (needs mode "a")."""
        if self._f.mode == "r":
            raise SjeaError(f"open {self.path} with mode='a' to write group '{name}'.")
        if name in RESERVED_GROUPS or name.startswith("level_"):
            raise SjeaError(f"group '{name}' is part of the store layout and cannot be replaced.")
        if name in self._f:
            del self._f[name]
        g = self._f.create_group(name)
        for key, value in arrays.items():
            value = np.asarray(value)
            if value.dtype.kind in "UO":
                g.create_dataset(key, data=[str(v) for v in value.ravel()], dtype=h5py_module().string_dtype("utf-8"))
            else:
                g.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            g.attrs[key] = value
        self._f.flush()

    def derived_groups(self) -> list:
        """The open h5py groups written after the rows (cluster tree, ...), which a rewrite of
        the rows (a compaction) carries over."""
        return [self._f[k] for k in self._f if k not in RESERVED_GROUPS and not k.startswith("level_")]

    def read_group(self, name: str):
        """(arrays, attrs) of a group written with write_group, or None when it is absent."""
        if name not in self._f:
            return None
        g = self._f[name]
        arrays = {}
        for key, ds in g.items():
            data = ds[...]
            arrays[key] = np.asarray(decode(data)) if data.dtype.kind in "OS" else data
        return arrays, {k: decode(v) for k, v in g.attrs.items()}


def _open_h5(path: Path, mode: str):
    """h5py.File, with a lock held by another process reported as busy (the file is fine) and
    anything else as unreadable."""
    from .guard import StoreBusyError, busy_message

    try:
        return h5py_module().File(path, mode)
    except OSError as e:
        text = str(e)
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in text:
            raise StoreBusyError(busy_message(path)) from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise SjeaError(f"{path} is not a readable HDF5 store ({first}); if it was a store, it is damaged: "
                        "restore it from a backup or embed the images again into a new file.") from None


def _own_copy(path: Path) -> None:
    """A file with other hard links (a shard that `sjea merge` linked as a segment of another store)
    is copied to a file of its own before it is written: segments are immutable."""
    if path.stat().st_nlink > 1:
        import shutil

        from ..io import atomic_path

        with atomic_path(path) as tmp:
            shutil.copyfile(path, tmp)


def open_store(path: str | Path, mode: str = "r") -> Store:
    """Open a finished store; use as a context manager: `with open_store(p) as s: ...`."""
    return Store(path, mode)


def _identity_value(attrs: dict, key: str):
    if key == "preprocess":
        return preprocess_of(attrs)
    if key in ("levels", "dims"):
        return [int(v) for v in (attrs.get(key) or [])]
    return attrs.get(key)


def check_same_identity(expected: dict, found: dict, what: str, fix: str, keys=IDENTITY_ATTRS) -> None:
    """Refuse rows from a different model or with different settings, naming the first difference."""
    if found.get("model_id") != expected.get("model_id"):
        raise SjeaError(f"{what} was written by another model (model id {str(found.get('model_id'))[:12]}, this one "
                        f"is {str(expected.get('model_id'))[:12]}); {fix}")
    for key in keys:
        a, b = _identity_value(expected, key), _identity_value(found, key)
        if a != b:
            raise SjeaError(f"{what} has {key}={b}, this run has {key}={a}; {fix}")
    # The centring means follow from the model (model.pt carries them), so this holds for rows of
    # one model; checked all the same, since rows centred differently would score nonsense together.
    a, b = centres_of(expected), centres_of(found)
    if (a is None) != (b is None):
        raise SjeaError(f"{what} holds {'un' if b is None else ''}centred rows, this run writes "
                        f"{'un' if a is None else ''}centred rows; {fix}")
    if a is not None and not all(np.array_equal(x, y) for x, y in zip(a, b)):
        raise SjeaError(f"{what} was centred with other means than this run's; {fix}")
    if whitening_digests_of(expected) != whitening_digests_of(found):
        raise SjeaError(f"{what} was whitened differently from this run's rows; {fix}")
