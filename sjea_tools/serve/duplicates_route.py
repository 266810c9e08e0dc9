"""GET /api/duplicates: the near-duplicate groups of `sjea duplicates` for the page, read-only.

The groups come from `sjea_tools.duplicates.find_duplicates` (the command's own search), computed
once per (store version, level, threshold) and cached; nothing here deletes or moves a file.
"""

from __future__ import annotations

import csv
import io
import threading
from typing import Literal, Optional
from urllib.parse import quote

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, Response

from ..errors import SjeaError
from ..levels import parse_levels
from .state import StoreHolder, fingerprint

# The all-pairs search grows as rows²: about 11 s for 20,000 rows of 128 dims on 2 cores
# (sjea_tools/duplicates.py), so about 70 s at this limit, the longest a page request should make
# its user wait; larger stores are refused with the command line that does the same offline.
MAX_DUPLICATE_ROWS = 50_000
# Results kept per store version (level x threshold combinations a user tried); a new version clears them.
MAX_CACHED = 8
CSV_HEADER = ("group", "path", "action", "score")  # the columns of `sjea duplicates --list`


class TooManyRows(SjeaError):
    """A store too large for the all-pairs search inside a request (HTTP 400)."""


def add_duplicates_routes(app: FastAPI, holder: StoreHolder) -> None:
    cache = DuplicatesCache(holder)

    @app.get("/api/duplicates", summary="Near-duplicate groups (as `sjea duplicates`)", tags=["duplicates"],
             responses={200: {"content": {"text/csv": {}}}})
    def duplicates(level: str = Query("0", description="The one level whose vectors are compared."),
                   threshold: Optional[float] = Query(None, description="Cosine in (0, 1] at or above which two "
                                                      "rows are copies [default: the command's]."),
                   format: Literal["json", "csv"] = Query("json", description="csv: the keep/remove list of "
                                                          "`sjea duplicates --list`.")) -> Response:
        """Groups of rows whose vectors at `level` have cosine >= threshold, the file to keep first
        (`keep_rule`), the others to review; ids for thumbnails and originals. Never deletes anything.
        Stores over MAX_DUPLICATE_ROWS rows are refused: run `sjea duplicates STORE --list keep.csv`."""
        result = cache.get(level, threshold)
        if format == "csv":
            return csv_response(result, holder.path.stem)
        return JSONResponse(page_result(result))


class DuplicatesCache:
    """find_duplicates' results of the holder's current store version, by (level, threshold)."""

    def __init__(self, holder: StoreHolder):
        self.holder = holder
        self._lock = threading.Lock()  # one search at a time: it uses every core for up to a minute
        self._cached: tuple = (None, {})  # (store version, {(level, threshold): result}), swapped whole

    def get(self, level: str, threshold: float | None) -> dict:
        from ..duplicates import check_threshold, default_thresholds, find_duplicates

        loaded = self.holder.current()
        threshold = default_thresholds(loaded.path)[0] if threshold is None else check_threshold(threshold)
        wanted = parse_levels(level, loaded.levels, option="--level")
        if len(wanted) != 1:
            raise SjeaError(f"--level takes one level (levels here: {', '.join(map(str, loaded.levels))}).")
        version, key = (id(loaded), loaded.fingerprint), (wanted[0], threshold)
        hit = self._lookup(version, key)  # a cached answer never waits behind another search
        if hit is not None:
            return hit
        with self._lock:
            if self._cached[0] != version:
                self._cached = (version, {})
            results = self._cached[1]
            if key in results:
                return results[key]
            if loaded.n > MAX_DUPLICATE_ROWS:
                raise TooManyRows(f"{loaded.n:,} rows are more than the page searches for duplicates "
                                  f"({MAX_DUPLICATE_ROWS:,}, about a minute); run: sjea duplicates {loaded.path} "
                                  "--list keep.csv")
            result = find_duplicates(loaded.path, level=wanted[0], threshold=threshold)
            # The search reads the file: kept only when it is still the version the ids belong to.
            if fingerprint(loaded.path) == loaded.fingerprint and result["rows"] == loaded.n:
                if len(results) >= MAX_CACHED:
                    results.pop(next(iter(results)))
                results[key] = result
            return result

    def _lookup(self, version: tuple, key: tuple) -> dict | None:
        cached_version, results = self._cached
        return results.get(key) if cached_version == version else None


def page_result(result: dict) -> dict:
    """The command's result with each member's id (its row) and the URLs the page shows it by."""
    groups = [{"group": g["group"], "size": g["size"],
               "members": [{"id": m["row"], "path": m["path"], "score": m["score"], "action": m["action"],
                            "thumbnail": f"/api/items/{m['row']}/thumbnail",
                            "original": f"/api/items/{m['row']}/original"} for m in g["members"]]}
              for g in result["groups"]]
    keys = ("level", "threshold", "pixel_threshold", "rows", "candidates", "unreadable", "pairs", "to_remove",
            "keep_rule")
    return {**{k: result[k] for k in keys}, "max_rows": MAX_DUPLICATE_ROWS, "groups": groups}


def csv_response(result: dict, stem: str) -> Response:
    """The keep/remove list, rows by the command's own keep_remove_rows."""
    from ..duplicates import keep_remove_rows

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(keep_remove_rows(result))
    name = quote(f"{stem}-duplicates-level{result['level']}.csv")
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f"attachment; filename*=UTF-8''{name}"})
