"""What a store may read: its own file and the segment files its top-level file names, nothing else.

HDF5 can take a dataset's bytes from elsewhere: an *external* link or dataset (any file, e.g.
/etc/passwd read as /paths) and a virtual dataset (VDS) whose source is any path. A crafted store
would then disclose files through `sjea serve` and `sjea search --json`, or borrow another store's
rows. `check_sources` refuses such a store on open (metadata only, no row is read);
`check_segment_files` binds each segment file to the entry that names it (its own fingerprint and
row count, attributes only), so a segment swapped for another store's is refused before a read.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from ..errors import SjeaError

SEGMENTS_SUFFIX = ".segments"


class ForeignSourceError(SjeaError):
    """A store reads (or would read) bytes from outside its own file and segments folder."""


def allowed_sources(segments: list[dict] | None) -> set[str]:
    """The source file names a store's virtual datasets may use: the files its `segments` entries
    name, each `NAME.h5.segments/FILE` (relative, one folder deep, no '..')."""
    names = {n for g in segments or [] for n in (g.get("file"), g.get("labels")) if n}
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) != 2 or not parts[0].endswith(SEGMENTS_SUFFIX) or ".." in parts or name.startswith("/"):
            raise ForeignSourceError(_foreign(None, name, "is not a file inside a segments folder beside the store"))
    return names


def check_sources(f, path: Path, segments: list[dict] | None) -> None:
    """Refuse external links, external storage, and virtual sources other than the named segments."""
    allowed = allowed_sources(segments)
    problems: list[str] = []

    def visit(name, link):
        if type(link).__name__ == "ExternalLink":
            problems.append(f"/{name} is a link into the file {link.filename}")
            return None
        obj = f.get(name, getlink=False) if type(link).__name__ == "HardLink" else None
        if obj is None or not hasattr(obj, "shape"):
            return None
        if obj.external:
            problems.append(f"/{name} keeps its bytes in the external file {obj.external[0][0]}")
        elif obj.is_virtual:
            for vs in obj.virtual_sources():
                if vs.file_name != "." and vs.file_name not in allowed:
                    problems.append(f"/{name} reads from {vs.file_name}, which is not one of its segment files")
        return None

    f.visititems_links(visit)
    if problems:
        raise ForeignSourceError(_foreign(path, problems[0], ""))


def _foreign(path: Path | None, what: str, why: str) -> str:
    where = f"{path}: " if path is not None else "a segment entry "
    return (f"{where}{what}{' ' + why if why else ''}; a store may read only its own file and its segments "
            "folder, so it is refused (embed the images again with 'sjea embed', or restore the store from a "
            "backup).")


def check_segment_files(path: Path, segments: list[dict] | None, open_h5, error=SjeaError) -> None:
    """Each segment file the store names exists beside it and is the one recorded: its
    `fingerprint` attribute and its row count (attributes and shapes, never rows), and it holds no
    external or virtual data of its own. Labels files carry their segment's fingerprint too.
    `error`: the class raised (the reader's StoreDamagedError)."""
    for g in segments or []:
        for name, kind in ((g["file"], "segment"), (g.get("labels"), "labels")):
            if not name:
                continue
            where = path.parent / name
            if not where.is_file():
                raise error(
                    f"{path} is incomplete: its segment file {where} is missing (a store of several segments is "
                    f"this file and the folder {Path(name).parent}/ beside it: move or copy them together, "
                    "keeping their names), or restore it from a backup.")
            with open_h5(where, "r") as part:
                found = _segment_identity(part, kind)
                check_sources(part, where, None)
            if found != (str(g["fingerprint"]), int(g["rows"])) and found[0] is not None:
                raise error(
                    f"{where} is not the one the store recorded as its {kind} file (fingerprint {str(found[0])[:12]}, "
                    f"{found[1]} rows; recorded {str(g['fingerprint'])[:12]}, {g['rows']} rows): it was replaced, "
                    f"maybe by another store's; put the right file back (the store is {path}), or embed again into a new file.")


def _segment_identity(part, kind: str) -> tuple[str | None, int]:
    """(fingerprint, rows) a segment or labels file records about itself."""
    key = "fingerprint" if kind == "segment" else "segment_fingerprint"
    value = part.attrs.get(key)
    value = value.decode() if isinstance(value, bytes) else value
    rows = int(part["paths" if kind == "segment" else "labels"].shape[0])
    return (None if value is None else str(value)), rows
