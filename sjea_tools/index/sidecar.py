"""The files beside a store (`emb.h5.index/`): the sidecar `index.json`, the recall probes, and
what the sidecar records to tell later whether the store's rows are still the indexed ones."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np

from ..errors import SjeaError
from ..io import sha256_bytes, stale_temp_files
from ..spec import PreprocessSpec
from ..store import IDENTITY_ATTRS

INDEX_FORMAT = "sjea-index/1"
SIDECAR = "index.json"
# Beside each level file: the recall queries and their exact top-k, which growth extends.
PROBE_SUFFIX = ".probe.npz"
# What a recall probe holds: the queries (stored rows) and their exact top-k ...
PROBE_KEYS = ("rows", "queries", "ids", "scores")
# ... and the index's own answers to them (k x rerank wide), which a delta part's growth extends.
ANSWER_KEYS = ("found_ids", "found_scores")
# Stored rows whose vectors the sidecar fingerprints (spread over the indexed rows): a spot check.
CHECK_ROWS = 8
# The store's identity attributes, with "preprocess" spelled as the attributes that hold it.
IDENTITY_KEYS = tuple(key for attr in IDENTITY_ATTRS
                      for key in ([f.name for f in fields(PreprocessSpec)] if attr == "preprocess" else [attr]))


def index_dir(store_path: str | Path) -> Path:
    """The folder of a store's indexes: STORE.index beside it."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".index")


def store_of(folder: Path) -> Path:
    """The store an index folder belongs to (index_dir undone), for the fix a message gives."""
    return folder.with_name(folder.name.removesuffix(".index"))


def read_sidecar(store_path: str | Path) -> dict | None:
    path = index_dir(store_path) / SIDECAR
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise SjeaError(f"{path} is unreadable; rebuild it with: sjea index {store_path}") from None


def read_sidecar_or_none(store_path: str | Path) -> dict | None:
    """The sidecar, or None when it is absent or unreadable (a rebuild replaces it anyway)."""
    try:
        return read_sidecar(store_path)
    except SjeaError:
        return None


class ForeignIndexError(SjeaError):
    """An index file or folder that is not the one built for the store as it is now (another
    store's, another level's, replaced): a state of the files on disk, answered 409 by sjea serve."""


def check_sidecar(store_path: str | Path, sidecar: dict | None, model_id: str, n: int, levels,
                  fingerprint: str | None = None, store_id: str | None = None) -> dict:
    """Refuse an index that does not describe the store as it is now; the message gives the fix.
    Every store write records a new fingerprint and the sidecar the one it was built from, so a
    store rewritten with the same model and row count is still caught."""
    fix = f"rebuild it with: sjea index {store_path}"
    if sidecar is None:
        raise SjeaError(f"{store_path} has no FAISS index yet; build it with: sjea index {store_path}")
    if sidecar.get("format") != INDEX_FORMAT:
        raise SjeaError(f"the index of {store_path} has an unknown format; {fix}")
    if sidecar["model_id"] != model_id:
        raise SjeaError(f"the index of {store_path} was built for another model "
                        f"({sidecar['model_id'][:12]}, store has {model_id[:12]}); {fix}")
    if store_id is not None and sidecar.get("store_id") not in (None, store_id):
        raise ForeignIndexError(f"the index in {index_dir(store_path)} belongs to another store (store id "
                        f"{str(sidecar.get('store_id'))[:12]}, {store_path} has {store_id[:12]}); rebuild it with: "
                        f"sjea index {store_path} --rebuild")
    if fingerprint is not None and sidecar.get("store_fingerprint") != fingerprint:
        raise SjeaError(f"the index of {store_path} is stale: it was built from an earlier version of the store "
                        f"(rewritten since); {fix}")
    if sidecar["n"] != n:
        raise SjeaError(f"the index of {store_path} is stale: built for {sidecar['n']} rows, the store now "
                        f"has {n}; {fix}")
    missing = [lv for lv in levels if str(lv) not in sidecar["levels"]]
    if missing:
        raise SjeaError(f"the index of {store_path} lacks level(s) {missing}; {fix}")
    return sidecar


def index_is_current(store_path: str | Path) -> bool:
    """Whether the index beside a store describes the store as it is now (what load_indexes checks)."""
    from ..store import open_store

    sidecar = read_sidecar_or_none(store_path)
    if sidecar is None:
        return False
    with open_store(store_path) as s:
        try:
            check_sidecar(store_path, sidecar, s.model_id, s.n, s.levels, s.fingerprint, s.store_id)
        except SjeaError:
            return False
    folder = index_dir(store_path)
    return (all((folder / f).is_file() for e in sidecar["levels"].values() for f in level_files(e))
            and not any(foreign_file(folder, sidecar, int(lv)) for lv in sidecar["levels"]))


# A file's digest reads its first and last DIGEST_SPAN bytes (and its size): cheap at any size, and
# another index of the same shape (another store's rows, the other level) differs in them.
DIGEST_SPAN = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of a file's size, first and last DIGEST_SPAN bytes (the whole file when smaller)."""
    import hashlib

    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode() + b"\0")
    with open(path, "rb") as f:
        h.update(f.read(DIGEST_SPAN))
        if size > DIGEST_SPAN:
            f.seek(max(DIGEST_SPAN, size - DIGEST_SPAN))
            h.update(f.read())
    return h.hexdigest()


def digests(folder: Path, entry: dict) -> dict:
    """{file name: digest} of a level's index files, as its sidecar entry records them."""
    return {name: file_digest(folder / name) for name in level_files(entry)}


def foreign_file(folder: Path, sidecar: dict, level: int) -> str | None:
    """The first index file of `level` that is not the one its sidecar recorded (replaced, swapped
    with the other level's or another store's), or None; entries written before digests: None."""
    entry = sidecar["levels"][str(level)]
    recorded = entry.get("digests")
    if not recorded:
        return None
    for name in level_files(entry):
        path = folder / name
        if path.is_file() and recorded.get(name) != file_digest(path):
            return name
    return None


def foreign_message(store_path, folder: Path, name: str) -> str:
    return (f"{folder / name} is not the index file built for {store_path} (replaced, or swapped with another "
            f"level's or another store's); rebuild the index with: sjea index {store_path} --rebuild")


def level_files(entry: dict) -> list[str]:
    """The files of a level's sidecar entry: its base, its delta parts in id order, then its
    tombstones (index.tombstones) where it has any."""
    tombs = [entry["tombstones"]["file"]] if entry.get("tombstones") else []
    return [entry["file"], *(part["file"] for part in entry.get("parts", [])), *tombs]


def read_probe(path: Path) -> dict:
    try:
        with np.load(path) as f:
            return {name: f[name] for name in (*PROBE_KEYS, *ANSWER_KEYS) if name in PROBE_KEYS or name in f.files}
    except (OSError, ValueError, KeyError) as e:
        raise SjeaError(f"{path} is unreadable ({str(e)[:80]}); rebuild the index with: sjea index "
                        f"{store_of(path.parent)} --rebuild") from None


def remove_unused_files(folder: Path, sidecar: dict | None) -> None:
    """Delete the index and probe files the sidecar does not point at (a previous build's, or a
    killed build's) and the temporary files a killed build left (sjea_tools.io names them
    .level*.*.tmp and .index.json.*.tmp). Called under the store's writer lock."""
    levels = sidecar["levels"].values() if sidecar else []
    keep = {f for e in levels for f in level_files(e)} | {e.get("probe") for e in levels}
    if not folder.is_dir():
        return
    for path in [*folder.glob("level*.faiss"), *folder.glob(f"level*{PROBE_SUFFIX}"), *folder.glob("level*.tombs*.npy"),
                 *folder.glob(".level*.tmp"),
                 *stale_temp_files(folder / SIDECAR)]:
        if path.name not in keep:
            path.unlink(missing_ok=True)


class StoredPaths:
    """The store's /paths, read on the first call only (reading 200,000 paths costs ~0.2 s: a
    growth that the store's history vouches for never reads them)."""

    def __init__(self, store):
        self.store, self.read, self._paths = store, False, None

    def __call__(self) -> list[str]:
        if not self.read:
            self._paths, self.read = self.store.paths, True
        return self._paths


def rows_record(store, paths: list[str] | None) -> dict:
    """What an index was built on, checkable later without reading the stored vectors (stale_rows).

    First check: the sidecar's `store_fingerprint` and the store's history of versions
    (Store.rows_unchanged_since: --update and compaction keep the earlier versions' rows as the
    first rows, --overwrite and merge start a new history), which costs nothing whatever the rows.
    The rest serves stores without that history (single files written before it, or rewritten
    since): the store's identity attributes (model, levels, preprocessing, root folder), its
    `created` time (kept by --update, renewed by --overwrite and merge), the sha256 of the indexed
    rows' paths in order (any other image set or order changes it; None when this run did not
    read them: a growth the history vouched for) and the sha256 of CHECK_ROWS stored vectors per
    level (a re-embedding of the same names with other pixels or weights changes them).
    """
    rows = check_rows(store.n)
    return {"paths_sha256": None if paths is None else paths_digest(paths, len(paths))[1],
            "created": store.attrs.get("created"), "identity": identity_digest(store.attrs),
            "check_rows": rows.tolist(),
            "check_sha256": {str(lv): vectors_digest(store, lv, rows) for lv in store.levels}}


def paths_digest(paths: list[str], n_first: int) -> tuple[str, str]:
    """(sha256 of the first n_first paths, of all): one pass over the bytes store.strings_sha256
    hashes (each path + NUL), so the full digest equals the /paths checksum of a store written now."""
    from ..store import strings_hash

    h = strings_hash(paths[:n_first])
    first = h.hexdigest()
    return first, strings_hash(paths[n_first:], h).hexdigest()


def check_rows(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, CHECK_ROWS).round().astype(np.int64))


def identity_digest(attrs: dict) -> str:
    values = {k: attrs.get(k) for k in IDENTITY_KEYS}
    return sha256_bytes(json.dumps(values, sort_keys=True, default=str).encode())


def vectors_digest(store, level: int, rows: np.ndarray) -> str:
    return sha256_bytes(np.ascontiguousarray(store.read_embeddings(level, rows)).tobytes())


def stale_rows(store, old: dict, paths) -> str | None:
    """Why the store's first old["n"] rows are not the rows the index holds, or None if they are.
    The store's history answers in O(1) where it knows the indexed version; otherwise `paths` (a
    callable returning the stored paths, StoredPaths) is read and compared with the record."""
    record, n_old = old.get("rows"), int(old.get("n", 0))
    changed = settings_changed(store, old)
    if changed:
        return changed
    if store.n < n_old:
        return f"the store has {store.n:,} rows, fewer than the {n_old:,} indexed"
    unchanged = store.rows_unchanged_since(old.get("store_fingerprint"))
    if unchanged is not None and unchanged != n_old:
        return f"the store's history gives the indexed version {unchanged:,} rows, the index {n_old:,}"
    if unchanged is None:  # no history of the indexed version: compare what the index recorded
        if record["created"] != store.attrs.get("created"):
            return "the store was written anew (--overwrite or merge) since the index was built"
        if record.get("paths_sha256") is None:
            return "the store keeps no history of the version indexed, and the index no digest of its images"
        if paths_digest(paths(), n_old)[0] != record["paths_sha256"]:
            return f"the store's first {n_old:,} rows are not the indexed images in the same order"
    return vectors_changed(store, record, np.asarray(record["check_rows"], dtype=np.int64))


def settings_changed(store, old: dict) -> str | None:
    """Why the store is not the one the index was built from whatever its rows (no record of them,
    another model, other settings), or None."""
    record = old.get("rows")
    if record is None:
        return "the index was built by an older sjea that did not record its rows"
    if old.get("model_id") != store.model_id:
        return "the store was written by another model"
    if record["identity"] != identity_digest(store.attrs):
        return "the store's settings changed (levels, dimensions, preprocessing or image folder)"
    return None


def vectors_changed(store, record: dict, rows: np.ndarray) -> str | None:
    """Why the stored vectors at `rows` (the record's check rows, where they are now) are not the
    ones the index recorded, or None."""
    if any(vectors_digest(store, lv, rows) != record["check_sha256"].get(str(lv)) for lv in store.levels):
        return "the stored vectors of the indexed rows changed"
    return None

