"""What a run still has to do: resume an unfinished journal, add to a store (--update), or start.

The decisions, in order: a journal whose store was already renamed into place is finished work,
and so is a store this same command wrote that holds every wanted image; an existing store is
replaced (--overwrite), extended (--update) or refused; a journal is resumed
only when it belongs to this same command (same model, settings, shard, mode and base store),
otherwise refused, or dropped with --overwrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SjeaError
from ..store import Journal, StoreBusyError, check_same_identity, open_store, partial_path


@dataclass
class Plan:
    """status "run": embed `todo` into `journal` (on top of `base`, the store --update extends);
    "complete" or "up to date": nothing to do, the store at OUT is the answer."""

    status: str
    journal: Journal | None = None
    base: Path | None = None
    todo: list[str] = field(default_factory=list)
    resumed: int = 0  # images (rows and failures) the resumed journal already holds

    @property
    def total(self) -> int:
        return len(self.todo) + self.resumed


def plan_run(out: Path, attrs: dict, wanted: list[str], update: bool, overwrite: bool) -> Plan:
    """The Plan for embedding the images `wanted` into `out` with store attributes `attrs`."""
    journal = Journal.open_existing(partial_path(out))
    journal, base, finished = _against_existing_store(out, journal, attrs, wanted, update, overwrite)
    if finished:
        return Plan("complete")
    mode = "overwrite" if overwrite else ("update" if base is not None else "new")
    done: set[str] = set()
    base_rows = 0
    if base is not None:
        with open_store(base) as s:
            base_rows = s.n
            done.update(s.paths)
            done.update(p for p, _ in s.failed)
    if journal is not None:
        journal = _resumable(journal, attrs, mode, base_rows, overwrite)
    resumed = 0
    if journal is None:
        journal = Journal.create(partial_path(out), attrs, base_rows=base_rows, mode=mode)
    else:
        resumed = journal.rows + journal.failed
        done.update(journal.paths())
        done.update(p for p, _ in journal.failures())
    todo = [p for p in wanted if p not in done]
    if not todo and base is not None and resumed == 0:
        journal.remove()  # --update with nothing new: the store is already up to date
        return Plan("up to date")
    return Plan("run", journal, base, todo, resumed)


def _against_existing_store(out: Path, journal: Journal | None, attrs: dict, wanted: list[str], update: bool,
                            overwrite: bool):
    """(journal, base store or None, finished): what the store already at `out` means for this run."""
    existing = _readable_store(out, overwrite)
    if existing is None:
        return journal, None, False
    with existing as s:
        # A journal whose store was renamed into place before the kill is finished work.
        if journal is not None and journal.meta["token"] == s.attrs.get("run_token"):
            journal.remove()
            journal = None
            if not (update or overwrite):
                return None, None, True
        if overwrite:
            return journal, None, False
        check_same_identity(attrs, s.attrs, str(out), "pass --overwrite to replace it, or write to another file.")
        if (s.attrs.get("shard") or None) != attrs["shard"]:
            raise SjeaError(f"{out} holds shard {s.attrs.get('shard') or 'all'}, this run is shard "
                            f"{attrs['shard'] or 'all'}; write to another file or pass --overwrite.")
        if not update and journal is None:
            if _same_command_done(s, attrs, wanted):
                return None, None, True  # a rerun of a finished command (killed while indexing, say)
            raise SjeaError(f"{out} already exists; pass --update to add new images, --overwrite to "
                            "replace it, or write to another file.")
    return journal, out, False


def _same_command_done(s, attrs: dict, wanted: list[str]) -> bool:
    """The store is what this very command wrote, and every image it would embed is in it."""
    if s.attrs.get("input") != attrs.get("input"):
        return False
    done = set(s.paths)
    done.update(p for p, _ in s.failed)
    return all(p in done for p in wanted)


def _readable_store(out: Path, overwrite: bool):
    """The store at `out` opened, None if there is none; a file that is no store is replaced only
    with --overwrite."""
    if not out.is_file():
        return None
    try:
        return open_store(out)
    except StoreBusyError:
        raise  # a busy store is healthy: never advise replacing it
    except SjeaError as e:
        if overwrite:
            return None
        raise SjeaError(f"{e} Pass --overwrite to replace {out}, or write to another file.") from None


def _resumable(journal: Journal, attrs: dict, mode: str, base_rows: int, overwrite: bool) -> Journal | None:
    """The journal if it belongs to this same command; with --overwrite a foreign one is dropped."""
    where = f"the unfinished run in {journal.folder}"
    try:
        check_same_identity(attrs, journal.meta["attrs"], where,
                            "run the same command again to resume it, or pass --overwrite to start over.")
        if (journal.meta["attrs"].get("shard") or None) != attrs["shard"]:
            raise SjeaError(f"{where} is shard {journal.meta['attrs'].get('shard')}; "
                            "run the same command again, or pass --overwrite to start over.")
        if journal.meta.get("mode") != mode or journal.meta.get("base_rows") != base_rows:
            raise SjeaError(f"{where} was started as '{journal.meta.get('mode')}' on a store of "
                            f"{journal.meta.get('base_rows')} rows; run that command again, or pass --overwrite "
                            "to start over.")
    except SjeaError:
        if not overwrite:
            raise
        journal.remove()
        return None
    return journal
