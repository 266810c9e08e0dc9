"""Which stored rows a search may return: `RowFilter`, a boolean mask over a store's rows.

    f = RowFilter.parse(["folder=cat", "path=*/2023/*.jpg"], exclude_same_folder=True)
    allowed = f.mask(paths, labels, label_names, query_folder="dog")   # (n,) bool

Clauses (repeatable, all must hold):
    folder=F     rows in folder F (relative to the store's image root) or below it; folder=. is
                 the top level only
    label=NAME   rows of that class (the store's /labels, one per first sub-folder)
    path=GLOB    rows whose path relative to the root matches GLOB (fnmatch, case-sensitive; `*`
                 also crosses `/`, so */2023/*.jpg matches a/b/2023/x.jpg)
exclude_same_folder: rows in the query's own folder are left out (the query image's folder, or the
stored row's for --id); queries outside the store's root exclude nothing.

Pure: strings and arrays in, a mask out; the store's paths and labels are read once by the caller.
"""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass

import numpy as np

from .errors import SjeaError

WHERE_KEYS = ("folder", "label", "path")
WHERE_HELP = "folder=F (F and below), label=NAME (a class), path=GLOB (fnmatch on the relative path)"


def parent_folder(rel_path: str) -> str:
    """The folder of a stored relative path, '' at the top level."""
    return posixpath.dirname(rel_path.replace("\\", "/"))


def _clean_folder(value: str) -> str:
    value = value.replace("\\", "/").strip("/")
    return "" if value in ("", ".") else posixpath.normpath(value)


@dataclass(frozen=True)
class RowFilter:
    """Clauses as (key, value) pairs, ANDed; see the module docstring."""

    clauses: tuple[tuple[str, str], ...] = ()
    exclude_same_folder: bool = False

    @classmethod
    def parse(cls, where=(), exclude_same_folder: bool = False) -> "RowFilter":
        """From `--where key=value` strings; bad syntax -> SjeaError naming the valid keys."""
        clauses = []
        for text in where or ():
            key, sep, value = str(text).partition("=")
            key = key.strip().lower()
            if not sep or key not in WHERE_KEYS or not value.strip():
                raise SjeaError(f"--where '{text}' is not key=value with a key of {', '.join(WHERE_KEYS)}; "
                                f"use {WHERE_HELP}.")
            clauses.append((key, value.strip()))
        return cls(tuple(clauses), bool(exclude_same_folder))

    def __bool__(self) -> bool:
        return bool(self.clauses) or self.exclude_same_folder

    def describe(self) -> list[str]:
        """The clauses as given, for the result (JSON) and notes."""
        return [f"{k}={v}" for k, v in self.clauses] + (["exclude-same-folder"] if self.exclude_same_folder else [])

    def base_mask(self, paths: list[str], labels: np.ndarray | None, label_names: list[str] | None) -> np.ndarray:
        """The rows every query may return (the clauses, without the per-query folder rule)."""
        keep = np.ones(len(paths), bool)
        folders = None
        for key, value in self.clauses:
            if key == "folder":
                folders = folders if folders is not None else [parent_folder(p) for p in paths]
                keep &= folder_mask(folders, _clean_folder(value))
            elif key == "label":
                keep &= label_mask(labels, label_names, value)
            else:
                keep &= np.fromiter((fnmatch.fnmatchcase(p, value) for p in paths), bool, len(paths))
        return keep

    def query_masks(self, base: np.ndarray, folders: list[str], query_folders: list[str | None]) -> list[np.ndarray]:
        """Per query, the rows it may return: `base`, less its own folder when exclude_same_folder
        (`folders` the stored rows' parent folders, `query_folders` each query's, None: outside the root)."""
        if not self.exclude_same_folder:
            return [base] * len(query_folders)
        folder_arr = np.asarray(folders, dtype=object)
        cache: dict = {}
        out = []
        for qf in query_folders:
            if qf not in cache:
                cache[qf] = base if qf is None else base & (folder_arr != qf)
            out.append(cache[qf])
        return out


def folder_mask(folders: list[str], folder: str) -> np.ndarray:
    if folder == "":
        return np.fromiter((f == "" for f in folders), bool, len(folders))
    prefix = folder + "/"
    return np.fromiter((f == folder or f.startswith(prefix) for f in folders), bool, len(folders))


def label_mask(labels: np.ndarray | None, label_names: list[str] | None, name: str) -> np.ndarray:
    if labels is None or not label_names:
        raise SjeaError("--where label=... needs a store with labels (images in class sub-folders); this one has "
                        "none: use --where folder=F or --where path=GLOB.")
    if name not in label_names:
        shown = ", ".join(label_names[:12]) + (", ..." if len(label_names) > 12 else "")
        raise SjeaError(f"--where label={name}: no such class; the store's classes are {shown}.")
    return np.asarray(labels) == label_names.index(name)
