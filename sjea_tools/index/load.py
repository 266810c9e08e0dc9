"""The read side: FAISS files read (large ones memory-mapped), refused when stale, and searched
through one handle (open_indexes) that carries the metric and the re-rank rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SjeaError
from ..vectors import exact_rerank, l2_normalize, merge_top_k
from .filtered import filtered_search
from .sidecar import ForeignIndexError, check_sidecar, foreign_file, foreign_message, index_dir, read_sidecar, store_of
from .tombstones import Tombstoned, read_tombstones

# Files larger than this are memory-mapped on load rather than read into memory.
MMAP_MIN_BYTES = 256 << 20


def set_search_params(index, params: dict) -> None:
    """Set nprobe / efSearch (whichever the index has) on a FAISS index."""
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, int(value))


def read_faiss(path: Path, mmap: bool | None = None):
    """faiss.read_index, memory-mapped (read-only, zero-copy) for files over MMAP_MIN_BYTES."""
    import faiss

    if mmap is None:
        mmap = path.stat().st_size >= MMAP_MIN_BYTES
    flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise SjeaError(f"{path} is not a readable FAISS index ({str(e).splitlines()[0][:80]}); "
                        f"rebuild it with: sjea index {store_of(path.parent)}") from None


def load_indexes(store_path: str | Path, model_id: str, n: int, levels, mmap: bool | None = None,
                 fingerprint: str | None = None) -> dict:
    """{level: faiss index} for a store whose model id and row count are given; stale -> SjeaError.
    A level with delta parts gets a PartedIndex (base and parts searched as one); the base is
    memory-mapped when large, the parts (small) are read. A level with removed rows is wrapped in
    a Tombstoned (index.tombstones), so every search answers store rows as they are now. The store's fingerprint is read from the
    store unless given."""
    return _load_levels(store_path, read_sidecar(store_path), model_id, n, levels, mmap, fingerprint)


def _load_levels(store_path, sidecar: dict | None, model_id: str, n: int, levels, mmap: bool | None,
                 fingerprint: str | None) -> dict:
    from ..store import open_store

    with open_store(store_path) as s:
        fingerprint, store_id = fingerprint or s.fingerprint, s.store_id
    sidecar = check_sidecar(store_path, sidecar, model_id, n, levels, fingerprint, store_id)
    folder = index_dir(store_path)
    out = {}
    for level in levels:
        entry = sidecar["levels"][str(level)]
        existing(folder / entry["file"], store_path)
        foreign = foreign_file(folder, sidecar, level)
        if foreign:
            raise ForeignIndexError(foreign_message(store_path, folder, foreign))
        index = read_faiss(folder / entry["file"], mmap)
        check_dim(index, entry, folder, store_path)
        set_search_params(index, entry["search_params"])
        if entry.get("parts"):
            index = PartedIndex(index, [read_faiss(existing(folder / part["file"], store_path), mmap=False)
                                        for part in entry["parts"]])
            check_parts(index, entry, folder, store_path)
        tombstones = read_tombstones(folder, entry, store_path)
        if index.ntotal != n + len(tombstones) or (len(tombstones) and tombstones[-1] >= index.ntotal):
            dead = f" ({len(tombstones):,} of them removed rows)" if len(tombstones) else ""
            raise ForeignIndexError(f"{folder / entry['file']} holds {index.ntotal} vectors{dead}, the store {n}; "
                                    f"rebuild with: sjea index {store_path}")
        out[level] = Tombstoned(index, tombstones) if len(tombstones) else index
    return out


def existing(path: Path, store_path) -> Path:
    if not path.is_file():
        raise SjeaError(f"{path} is missing; rebuild the index with: sjea index {store_path}")
    return path


def check_dim(index, entry: dict, folder: Path, store_path) -> None:
    """An index of another width (the other level's file in this one's place) is refused, not searched."""
    if entry.get("dim") is not None and int(index.d) != int(entry["dim"]):
        raise ForeignIndexError(f"{folder / entry['file']} holds {index.d}-wide vectors, the sidecar records "
                        f"{entry['dim']} for this level; rebuild the index with: sjea index {store_path} --rebuild")


def check_parts(index: "PartedIndex", entry: dict, folder: Path, store_path) -> None:
    """Refuse parts whose rows are not the ones the sidecar records (the ids would be off)."""
    for (part, first), record in zip(index.parts, entry["parts"]):
        if first != record["first_row"] or part.ntotal != record["rows"]:
            raise ForeignIndexError(f"{folder / record['file']} holds rows {first:,}+{part.ntotal:,}, the sidecar records "
                            f"{record['first_row']:,}+{record['rows']:,}; rebuild with: sjea index {store_path}")


class PartedIndex:
    """A level's base index and its delta parts searched as one: each is searched for its own
    top k (the parts exactly), ids offset by the rows before it, and the lists merged by score
    (merge_top_k: ties keep the lower id, as a single index holding every row would). Anything
    else (d, efSearch, the HNSW graph, ...) is the base's."""

    def __init__(self, base, parts: list):
        self.base, self.parts = base, []
        first = int(base.ntotal)
        for part in parts:
            self.parts.append((part, first))
            first += int(part.ntotal)
        self.ntotal = first

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) (q, k) as faiss returns them."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        scores, ids = self.base.search(x, min(k, self.base.ntotal))
        for part, first in self.parts:
            s, i = part.search(x, min(k, part.ntotal))
            scores, ids = merge_top_k(scores, ids, s, np.where(i >= 0, i + first, -1), k)
        return scores, ids

    def __getattr__(self, name: str):
        if name in ("base", "parts"):  # not set yet (copy, pickle): never recurse
            raise AttributeError(name)
        return getattr(self.base, name)



def prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as the index holds them: L2-normalised for cosine, as stored for inner product."""
    return l2_normalize(vectors) if metric == "cosine" else vectors


def open_indexes(store_path: str | Path) -> "Indexes":
    """The read handle of a store's indexes; its sidecar is read here, once (None: no index yet)."""
    return Indexes(store_path, read_sidecar(store_path))


class Indexes:
    """What search needs of a store's indexes, opened once per store version: `metric` (cosine,
    the default where no index exists yet, or inner-product), `kinds` {level: kind}, `load` (the
    FAISS files of some levels, refused when stale) and `search` (a level's top k, exact scores)."""

    def __init__(self, store_path: str | Path, sidecar: dict | None):
        self.store_path, self.sidecar, self.loaded = Path(store_path), sidecar, {}
        self.metric = (sidecar or {}).get("metric", "cosine")
        self.cosine = self.metric == "cosine"

    @property
    def kinds(self) -> dict:
        return {lv: e.get("kind") for lv, e in (self.sidecar or {}).get("levels", {}).items()}

    def load(self, model_id: str, n: int, levels, mmap: bool | None = None,
             fingerprint: str | None = None) -> "Indexes":
        """Read the FAISS files of `levels` (load_indexes' checks, on the sidecar read at open); self."""
        self.loaded = _load_levels(self.store_path, self.sidecar, model_id, n, levels, mmap, fingerprint)
        return self

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        return prepare(vectors, self.metric)

    def search(self, level: int, queries: np.ndarray, k: int, get_rows,
               mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) (q, k) of prepared queries in a loaded level: the index proposes k x its
        rerank candidates (PQ_RERANK where it holds compressed codes), re-scored exactly from the
        stored vectors get_rows(sorted ids) gives (prepared), so no reported score is approximate.
        mask: the (n,) rows the queries may return (filtered.filtered_search), -inf / -1 padded."""
        index, entry = self.loaded[level], self.sidecar["levels"][str(level)]
        if mask is not None:
            return filtered_search(index, entry, queries, k, get_rows, mask)
        rerank = max(1, entry.get("rerank", 1))
        _, candidates = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(index.ntotal, k * rerank))
        return exact_rerank(queries, candidates, get_rows, k)
