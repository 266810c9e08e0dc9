"""FAISS indexes, one per level, saved beside the store (`emb.h5` -> `emb.h5.index/`).

    choose      which kind of index for n vectors within a memory budget (pure, measured limits)
    level_file  one level's index built, tuned and written with its recall probe
    recall      recall@10 against exact search; nprobe / efSearch raised to TARGET_RECALL
    build       build_indexes: every level built, grown or kept, then the sidecar
    growth      the rows added since: a delta part, or folded into the base
    tombstones  the rows removed since: their ids recorded, never returned (index id <-> store row)
    sidecar     index.json, the recall probes, and what says the indexed rows are unchanged
    load        the read side: load_indexes, PartedIndex, and the handle search uses (open_indexes)

Layout: `index.json` (the sidecar: model id, row count, store fingerprint, rows record, per level
kind, parameters, measured recall and what the last run did), `level{K}-{build}.faiss` with
`level{K}-{build}.probe.npz` beside it, delta parts `level{K}-{build}.delta{J}.faiss`, and after
rows were removed from the store `level{K}-{build}.tombs.npy` (the removed ids, sorted). Every
file is written through sjea_tools.io; the sidecar is replaced last, in one rename, so a reader
never sees a half-built set and a kill leaves the previous set usable.
"""

from .build import build_indexes
from .choose import (DEFAULT_MEMORY_BUDGET, FLAT_MAX_ROWS, HNSW_M, HNSW_MAX_ROWS, KINDS, METRICS, PQ_RERANK,
                     choose_index, explicit_spec, factory_string, parse_memory)
from .growth import DELTA_MAX_PARTS, DELTA_MAX_ROWS, DELTA_MAX_SHARE
from .level_file import build_index, save_level
from .load import Indexes, PartedIndex, load_indexes, open_indexes, read_faiss, set_search_params
from .recall import RECALL_SAMPLE, TARGET_RECALL, recall_at_k, recall_probe, tune_and_measure
from .tombstones import TOMBSTONE_MAX_ROWS, TOMBSTONE_MAX_SHARE, Tombstoned
from .sidecar import (ANSWER_KEYS, ForeignIndexError, INDEX_FORMAT, PROBE_KEYS, SIDECAR, index_dir, index_is_current, level_files,
                      read_probe, read_sidecar)

__all__ = ["ANSWER_KEYS", "ForeignIndexError", "DEFAULT_MEMORY_BUDGET", "DELTA_MAX_PARTS", "DELTA_MAX_ROWS", "DELTA_MAX_SHARE",
           "FLAT_MAX_ROWS", "HNSW_M", "HNSW_MAX_ROWS", "INDEX_FORMAT", "Indexes", "KINDS", "METRICS", "PQ_RERANK",
           "PROBE_KEYS", "PartedIndex", "RECALL_SAMPLE", "SIDECAR", "TARGET_RECALL", "TOMBSTONE_MAX_ROWS",
           "TOMBSTONE_MAX_SHARE", "Tombstoned",
           "build_index", "build_indexes", "choose_index", "explicit_spec", "factory_string", "index_dir",
           "index_is_current", "level_files", "load_indexes", "open_indexes", "parse_memory", "read_faiss",
           "read_probe", "read_sidecar", "recall_at_k", "recall_probe", "save_level", "set_search_params",
           "tune_and_measure"]
