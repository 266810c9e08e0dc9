"""What a run still has to do: resume an unfinished journal, add to a store (--update), or start.

The decisions, in order: a journal whose store was already renamed into place is finished work,
and so is a store this same command wrote that holds every wanted image; an existing store is
replaced (--overwrite), extended (--update) or refused; a journal is resumed
only when it belongs to this same command (same model, settings, shard, mode and base store),
otherwise refused, or dropped with --overwrite.

An --update follows the folder (Sync): files whose size or modification time differ from those the
store recorded (/file_stats) are embedded again, rows of files gone from the folder are removed
(unless --keep-missing), and the journal counts the base rows that stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SjeaError
from ..store import Journal, StoreBusyError, check_same_identity, open_store, partial_path
from ..store.removal import read_file_stats, stat_files
from ..store.writer import labels_of


@dataclass
class Plan:
    """status "run": embed `todo` into `journal` (on top of `base`, the store --update extends);
    "complete" or "up to date": nothing to do, the store at OUT is the answer."""

    status: str
    journal: Journal | None = None
    base: Path | None = None
    todo: list[str] = field(default_factory=list)
    resumed: int = 0  # images (rows and failures) the resumed journal already holds
    stats: dict = field(default_factory=dict)  # path -> (size, mtime_ns) of every wanted file, taken before reading
    sync: "Sync | None" = None  # --update: what changed in the folder since the store was written

    @property
    def total(self) -> int:
        return len(self.todo) + self.resumed


@dataclass
class Sync:
    """An --update against its folder: rows of changed files and of vanished ones (unless
    --keep-missing) are removed, failures of vanished files dropped; `relabel`: the store lost its
    labels (loose files, before they had a class) and gets them back."""

    changed: set[str]
    vanished: set[str]
    vanished_failed: set[str]
    retried: set[str]  # failures whose file changed since: tried again
    kept_missing: int
    label_names: list[str] | None
    relabel: bool
    old_stats: dict

    @property
    def drop(self) -> set[str]:
        return self.changed | self.vanished

    @property
    def drop_failed(self) -> set[str]:
        return self.vanished_failed | self.retried

    @property
    def needed(self) -> bool:
        return bool(self.drop or self.drop_failed or self.relabel)


def plan_run(out: Path, attrs: dict, wanted: list[str], update: bool, overwrite: bool, root: Path | None = None,
             keep_missing: bool = False) -> Plan:
    """The Plan for embedding the images `wanted` (under `root`) into `out` with store attributes `attrs`."""
    stats = stat_files(root, wanted) if root is not None else {}
    journal = Journal.open_existing(partial_path(out))
    journal, base, finished = _against_existing_store(out, journal, attrs, wanted, update, overwrite)
    if finished:
        return Plan("complete", stats=stats)
    mode = "overwrite" if overwrite else ("update" if base is not None else "new")
    done: set[str] = set()
    base_rows, sync = 0, None
    if base is not None:
        with open_store(base) as s:
            sync = _sync(s, wanted, stats, keep_missing)
            base_rows = s.n - len(sync.drop)
            done.update(p for p in s.paths if p not in sync.drop)
            done.update(p for p, _ in s.failed if p not in sync.drop_failed)
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
    if not todo and base is not None and resumed == 0 and not sync.needed:
        journal.remove()  # --update with nothing new: the store is already up to date
        return Plan("up to date", stats=stats, sync=sync)
    return Plan("run", journal, base, todo, resumed, stats, sync)


def _sync(s, wanted: list[str], stats: dict, keep_missing: bool) -> Sync:
    """What changed in the folder since the store `s` was written. A row whose file's size or
    modification time differs from the one recorded is changed; a store written before they were
    recorded has none: its rows count as unchanged (the update records them, so the next sees)."""
    present = set(wanted)
    old = read_file_stats(s) or {}
    changed = {p for p in s.paths if p in present and p in old and old[p] != stats.get(p)}
    retried = {p for p, _ in s.failed if p in present and p in old and old[p] != stats.get(p)}
    missing = {p for p in s.paths if p not in present}
    missing_failed = {p for p, _ in s.failed if p not in present}
    vanished, vanished_failed = (set(), set()) if keep_missing else (missing, missing_failed)
    stored = set(s.paths)
    live = [p for p in s.paths if p not in vanished] + [p for p in wanted if p not in stored]
    names = labels_of(live)[1] if live else None
    return Sync(changed, vanished, vanished_failed, retried, len(missing) if keep_missing else 0, names,
                s.label_names is None and names is not None and s.n > 0, old)


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
        check_same_identity(attrs, s.attrs, str(out), _other_model_fix(s, update))
        if (s.attrs.get("shard") or None) != attrs["shard"]:
            raise SjeaError(f"{out} holds shard {s.attrs.get('shard') or 'all'}, this run is shard "
                            f"{attrs['shard'] or 'all'}; write to another file or pass --overwrite.")
        if not update and journal is None:
            if _same_command_done(s, attrs, wanted):
                return None, None, True  # a rerun of a finished command (killed while indexing, say)
            raise SjeaError(f"{out} already exists; pass --update to add new images, --overwrite to "
                            "replace it, or write to another file.")
    return journal, out, False


def _other_model_fix(s, update: bool) -> str:
    """How to go on when this run's model or settings differ from the store's: never replace a
    store that its own model can update."""
    own = f"its own model ({s.attrs.get('model_source', '?')})"
    if update:
        return (f"--update without --run/--onnx uses {own}; to embed with this model, write a new file "
                "(--overwrite would replace the store and every row in it).")
    return (f"add to it with --update (without --run/--onnx: {own}), or write this model's store to a new file "
            "(--overwrite would replace the store and every row in it).")


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
    # An update's store stays: dropping the journal is the way out, never replacing the store.
    drop = (f"delete {journal.folder} to drop it" if mode == "update" else "pass --overwrite to start over")
    try:
        check_same_identity(attrs, journal.meta["attrs"], where,
                            f"run the same command again to resume it, or {drop}.")
        if (journal.meta["attrs"].get("shard") or None) != attrs["shard"]:
            raise SjeaError(f"{where} is shard {journal.meta['attrs'].get('shard')}; "
                            f"run the same command again, or {drop}.")
        if journal.meta.get("mode") != mode or journal.meta.get("base_rows") != base_rows:
            raise SjeaError(f"{where} was started as '{journal.meta.get('mode')}' on a store of "
                            f"{journal.meta.get('base_rows')} rows; run that command again, or {drop}.")
    except SjeaError:
        if not overwrite:
            raise
        journal.remove()
        return None
    return journal
