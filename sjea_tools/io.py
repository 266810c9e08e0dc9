"""File writing that survives kills, full disks and readers: the one home of atomic writes.

Every writer of the project (run files, checkpoints, stores, indexes, ONNX files, images) goes
through `atomic_path`: the content is produced in a temporary file in the target's folder, fsynced,
given the permissions the user's umask asks for (mkstemp makes 0600, which would hide a store from
a colleague or a web server in the same group), renamed over the target, and the folder is fsynced
so the rename itself survives a power cut. A reader, or a kill at any moment, sees the old file or
the new one, never half of one; a failure removes the temporary file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, BinaryIO

TEMP_SUFFIX = ".tmp"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What open() would give a new file: 0666 minus the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_path_beside(path: Path, tag: str = "") -> Path:
    """A fresh, empty temporary file next to `path` (same file system, so the rename is atomic);
    its name starts with '.<name>.' and ends with '.tmp' so `stale_temp_files` finds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{tag}", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def commit_temp(tmp: Path, path: Path) -> None:
    """fsync `tmp`, give it the umask's mode, rename it over `path`, fsync the folder."""
    fsync_path(tmp)
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a library that writes files itself (h5py, onnx,
    faiss, Pillow); on a clean exit it becomes `path` atomically, on any error it is removed."""
    path = Path(path)
    tmp = temp_path_beside(path)
    try:
        yield tmp
        commit_temp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file) on a temporary binary file, then put it in place as `atomic_path` does."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def stale_temp_files(path: str | Path) -> list[Path]:
    """Temporary files a killed writer of `path` left beside it (see `temp_path_beside`)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}") if p.is_file())


def remove_stale_temp_files(path: str | Path) -> int:
    """Delete what `stale_temp_files` finds; the next run of a killed command calls this."""
    removed = 0
    for p in stale_temp_files(path):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# errno -> (what is wrong, how to fix). A write that fails for one of these is the user's disk or
# permissions, not a bug: one line, never a traceback. Nothing was replaced (atomic writes).
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space (df -h) or write to another folder, then run "
                   "again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write to another folder, then run again"),
    errno.EFBIG: ("file too large for this file system", "write to another folder"),
    errno.EROFS: ("read-only file system", "write to a folder on a writable disk"),
    errno.EACCES: ("permission denied", "check the folder's owner and mode, or write to another folder"),
    errno.EPERM: ("operation not permitted", "check the folder's owner and mode, or write to another folder"),
}
# Libraries that write files themselves (torch.save, h5py) may report a full disk without an errno
# (torch: "unexpected pos ..."); with less than this free beside the target, the disk is blamed.
FULL_DISK_BYTES = 1 << 20


def disk_error_code(err: BaseException) -> int | None:
    """The errno of a failure that is the disk's or the folder's fault (one of _WRITE_ERRORS), else
    None. HDF5 and FAISS report errno only in their message text ("errno = 28"), so that is read too."""
    code = getattr(err, "errno", None)
    if code in _WRITE_ERRORS:
        return code
    text = str(err)
    return next((c for c in _WRITE_ERRORS if f"errno = {c}," in text or os.strerror(c) in text), None)


def writing_error(err: BaseException, path: str | Path | None = None) -> "SjeaError | None":
    """The one-line SjeaError for a failed write caused by the disk or permissions (full, read-only,
    quota, access), naming `path` (or the file in the OSError; a temporary file is named by its folder),
    else None: the caller re-raises the original, which is then a real bug."""
    from .errors import SjeaError

    code = disk_error_code(err)
    if code is None and path is not None:
        try:
            folder = Path(path) if Path(path).is_dir() else Path(path).parent
            if shutil.disk_usage(folder).free < FULL_DISK_BYTES:
                code = errno.ENOSPC
        except OSError:
            pass
    if code is None:
        return None
    where = path if path is not None else getattr(err, "filename", None)
    if where is not None:
        where = Path(where)
        if where.name.startswith(".") and where.name.endswith(TEMP_SUFFIX):
            where = where.parent  # the temporary file beside the target: name the folder
    what, fix = _WRITE_ERRORS[code]
    return SjeaError(f"cannot write {where}: {what}; {fix}." if where is not None else f"{what}; {fix}.")


@contextmanager
def disk_faults(what: str) -> Iterator[None]:
    """Re-raise a full/read-only/forbidden-disk failure inside the block as one SjeaError line that
    says the work done so far is kept (writes are atomic; journals resume)."""
    from .errors import SjeaError

    try:
        yield
    except (OSError, RuntimeError) as e:  # FAISS reports a failed write as RuntimeError
        code = disk_error_code(e)
        if code is None:
            raise
        reason, fix = _WRITE_ERRORS[code]
        raise SjeaError(f"cannot write {what}: {reason}. Nothing already written was lost; {fix}.") from None


def check_writable(path: str | Path) -> None:
    """Refuse, before minutes of work, an output that could not be written (read-only disk, no
    permission): a temporary file is made and removed where the real write will make one (in the
    nearest existing folder above it, so that nothing is created before the work succeeds)."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        temp_path_beside(folder / Path(path).name).unlink()
    except OSError as e:
        raise (writing_error(e, path) or e) from None


def require_free_space(path: str | Path, need: int) -> None:
    """Raise ENOSPC before writing `need` bytes at `path` when its folder has less free: HDF5 does
    not survive a full disk in the middle of a write (measured here: a segmentation fault), so
    writers of HDF5 files ask first. The caller's `disk_faults` turns it into one line."""
    folder = Path(path).absolute().parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # the write itself reports what is wrong with the folder
    if free < need:
        raise OSError(errno.ENOSPC, f"{need / 1e6:.1f} MB needed for {path}, {free / 1e6:.1f} MB free")
