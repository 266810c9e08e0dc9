"""One writer per store, and disk faults as one line.

`writer_lock(store)` is taken once, at the top of every command that writes a store or what lives
beside it, before it touches anything (the journal folder, temporary files, the index folder):
pipeline.embed_locally / merge_and_index / index_store, embed.embed_store (a shard of torchrun or
Ray), engines.ray.embed_with_ray, store.compact_store. The steps below them expect it held
(`require_held`). It is a POSIX record lock (lockf) on a hidden file beside the store, `.NAME.lock`:

- lockf, not flock: it belongs to this process alone, so forked decode workers never inherit it,
  and the kernel drops it the moment the process dies: a killed run never blocks its own resume.
- Re-entrant within a process (a count per path): POSIX drops *every* lock a process holds on a
  file when *any* descriptor of it is closed, so a nested acquire must not open a second one.
  Nested takes remain where a step is also a public entry point of its own: the journal holds the
  lock while open, and merge_stores, compact_store and index.build_indexes take it themselves.
- The holder unlinks the file before it releases it. A process that opened the old file and then
  got the lock sees that the path no longer names its inode and tries again, so two processes can
  never each hold "the" lock through two different files.

Disk faults (full, read-only, forbidden) are mapped to one line by `io.disk_faults`.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import SjeaError
from ..io import disk_faults

_held: dict[str, list] = {}  # lock path -> [fd, count]
_mutex = threading.Lock()


class StoreBusyError(SjeaError):
    """Another process is writing (or reading, for a write) the store: wait, nothing is wrong with it."""


def busy_message(store: Path) -> str:
    return (f"another sjea process is using {store}; wait for it to finish (or stop it), then run the same "
            "command again. Nothing is wrong with the file.")


def lock_path(store: str | Path) -> Path:
    store = Path(store).absolute()
    return store.with_name(f".{store.name}.lock")


@contextmanager
def writer_lock(store: str | Path) -> Iterator[None]:
    """Hold the one writer lock of `store` (see the module text); StoreBusyError when another
    process holds it."""
    path = lock_path(store)
    key = str(path)
    with _mutex:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(path, Path(store)), 1]
    try:
        yield
    finally:
        with _mutex:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                fd = _held.pop(key)[0]
                try:
                    path.unlink(missing_ok=True)  # before the release: see the module text
                except OSError:
                    pass
                os.close(fd)


def held(store: str | Path) -> bool:
    """Whether this process holds the writer lock of `store`."""
    with _mutex:
        return str(lock_path(store)) in _held


def require_held(store: str | Path) -> None:
    """A step that writes `store` under its caller's lock: a missing lock is a bug, said at once."""
    if not held(store):
        raise RuntimeError(f"the writer lock of {store} is not held; take store.writer_lock({str(store)!r}) "
                           "around this call")


def _acquire(path: Path, store: Path) -> int:
    import fcntl

    for _ in range(100):
        with disk_faults(f"the lock file {path}"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreBusyError(busy_message(store)) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed this file while we waited: lock the current one
    raise StoreBusyError(busy_message(store))
