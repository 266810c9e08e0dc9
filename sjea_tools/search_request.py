"""What `sjea search` is asked to find, as one value: `SearchRequest`.

    req = SearchRequest(store="photos.h5", queries=("cat.jpg",), k=5, mode="hierarchical", probes=2)

Built by the CLI from its options, in the forms search.search_store takes (queries as strings,
`level` None when not given). The checks that need the store (levels, the cluster tree, the index
metric) stay with the search, which has the store open; the fields here are the search's
parameters, nothing about how the answer is shown (--grid, --json).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SearchRequest:
    """store None: the newest .h5 in this folder. mode None: --level implies per-level, --order
    hierarchical, else the measured default (search.DEFAULT_MODE)."""

    store: Path | None = None
    queries: tuple[str, ...] = ()  # image files and/or folders
    ids: tuple[int, ...] = ()  # stored rows searched with
    k: int = 10
    mode: str | None = None
    level: Any = None  # a levels spec (sjea_tools.levels); an empty list is None
    order: str | None = None
    probes: int = 1
    margin: float = 0.0  # hierarchical: soft gate, every coarse cluster within this cosine of the nearest
    within: str | None = None  # None: search.DEFAULT_WITHIN
    min_score: float | None = None
    where: tuple[str, ...] = ()  # "folder=F", "label=NAME", "path=GLOB" (filters.RowFilter), ANDed
    exclude_same_folder: bool = False

    def row_filter(self):
        """The filters.RowFilter of `where` and `exclude_same_folder` (bad syntax: SjeaError)."""
        from .filters import RowFilter

        return RowFilter.parse(self.where, self.exclude_same_folder)

    def __post_init__(self) -> None:
        # frozen: the given forms are normalised once, here
        object.__setattr__(self, "queries", tuple(str(q) for q in self.queries or ()))
        object.__setattr__(self, "ids", tuple(self.ids or ()))
        object.__setattr__(self, "where", tuple(str(w) for w in self.where or ()))
        object.__setattr__(self, "level", self.level or None)
