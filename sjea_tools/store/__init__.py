"""The embedding store: one HDF5 file per embedded folder, and the journal that makes runs resumable.

Layout (docs/store-format.md; readable with plain h5py):

    /paths                 (n,) UTF-8 strings, relative to the root folder, in embedding order
    /level_K/embeddings    (n, dim_K) float32 or float16, chunked, resizable; one group per level
    /labels, /label_names  class index per row and class names, when every image sits in a class folder
    /failed/paths          files that could not be embedded, and /failed/errors the reason for each
    root attributes        format, sjea_version, model_id, model_source, backend, levels, dims,
                           image_size, mean, std, colour_mode (the model's PreprocessSpec),
                           normalized, dtype, root, created, shard, run_token, fingerprint

A store that grew (`--update`, `sjea merge`) is a small top-level file whose HDF5 virtual datasets
present immutable segment files in `OUT.h5.segments/` as this same layout (`segments`; root
attributes `segments`, `history_fingerprints`, `history_rows`); `sjea compact` makes it one file again.

A run never writes the HDF5 file while it embeds. Rows go to an append-only *journal* folder beside
the output (`OUT.h5.partial/`): one raw file per level, one JSON line per path or failure, and a
small `commit.json` written atomically after the data it counts is on disk. A killed run leaves at
worst some rows past the last commit, which the next run truncates and recomputes, so the rows a
resumed run ends with are exactly those of a clean run. When every image is done the HDF5 file is
written from the journal to a temporary file and renamed over OUT.h5: a store on disk is always
complete, and an existing store is never touched until its replacement is complete (an --update
writes a new segment file, then renames a new top-level file over OUT.h5).

Modules: `reader` (Store, open_store, identity checks), `journal` (Journal), `writer`
(write_store), `segments` (append_segment, add_stores, compact_store), `merge` (shards and
merge_stores), `guard` (the one writer lock per store, disk faults as one line), `verify`
(verify_store: every checksum and invariant of a store).
"""

from __future__ import annotations

from .guard import StoreBusyError, disk_faults, writer_lock
from .journal import PARTIAL_SUFFIX, Journal, partial_path
from .merge import format_shard, merge_stores, parse_shard, shard_slice
from .segments import (AUTO_COMPACT_SEGMENTS, SEGMENTS_SUFFIX, add_stores, append_segment, compact_store,
                       remove_orphans, segments_dir)
from .reader import (FORMAT, IDENTITY_ATTRS, Store, StoreDamagedError, check_same_identity, copy_rows, open_store,
                     preprocess_of, strings_hash)
from .verify import verify_store
from .writer import write_store

__all__ = ["AUTO_COMPACT_SEGMENTS", "FORMAT", "IDENTITY_ATTRS", "PARTIAL_SUFFIX", "SEGMENTS_SUFFIX", "Journal", "Store",
           "StoreBusyError", "StoreDamagedError", "add_stores", "append_segment", "check_same_identity",
           "compact_store", "copy_rows", "disk_faults", "format_shard", "merge_stores", "open_store", "parse_shard",
           "partial_path", "preprocess_of", "remove_orphans", "segments_dir", "shard_slice", "strings_hash",
           "verify_store", "write_store", "writer_lock"]
