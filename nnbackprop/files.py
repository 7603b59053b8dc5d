"""Writing a run's files so that nothing is lost: atomic replacement, one-line errors, no temporary files left behind.

A file is written to a temporary name in its destination directory (``.NAME.*.tmp``), flushed and ``fsync``-ed, then
renamed over the destination with ``os.replace``: a reader (or a run resumed after a crash) sees the old file or the new
one, never half of one. When the write fails — a full disk, a read-only or missing folder, no permission — the old file
is untouched, the temporary file is removed, and :class:`WriteError` says in one line which file and why. A run killed
in the middle of a write leaves its temporary file; :func:`remove_stale_temp_files` clears them when the next run or
resume starts in that folder.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Callable

from nnbackprop.errors import WriteError

TEMP_SUFFIX = ".tmp"


def _cause(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        name = errno.errorcode.get(error.errno, str(error.errno))
        advice = {errno.ENOSPC: "free some space or write elsewhere (--out)",
                  errno.EDQUOT: "free some space or write elsewhere (--out)",
                  errno.EROFS: "the file system is read-only; write elsewhere (--out)",
                  errno.EACCES: "no permission; write elsewhere (--out) or change the folder's permissions",
                  errno.EPERM: "no permission; write elsewhere (--out) or change the folder's permissions",
                  errno.ENOTDIR: "a part of the path is a file, not a folder; choose another --out",
                  errno.ENOENT: "the folder does not exist; choose another --out"}.get(error.errno, "")
        return f"{os.strerror(error.errno)} ({name}){'; ' + advice if advice else ''}"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}{': ' + text if text else ''}"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes into a binary file object, atomically.

    Raises:
        WriteError: the file could not be written (``path`` keeps its previous content, no temporary file is left).
        Any error ``write`` raises that is not about the file system, after the same clean-up.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if _is_file_system_error(error):
            raise WriteError(f"cannot write {path}: {_cause(error)}") from error
        raise
    _fsync_directory(path.parent)


def _is_file_system_error(error: BaseException) -> bool:
    """An ``OSError``, or the ``RuntimeError`` torch.save raises when its file write fails (``enforce fail at
    inline_container.cc``, e.g. on a full disk)."""
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and "inline_container" in str(error))


def write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of a text file (UTF-8)."""
    atomic_write(path, lambda file: file.write(text.encode()))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prepare_output_dir(directory: str | Path) -> Path:
    """Create ``directory`` if needed and prove it writable by writing and removing a probe file, before anything is
    loaded or trained; raise :class:`WriteError` (naming the folder and the cause) otherwise."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TEMP_SUFFIX, dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise WriteError(f"cannot write to the output folder {directory}: {_cause(error)}") from error
    return directory


def remove_stale_temp_files(directory: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Remove the temporary files that interrupted writes of ``names`` left in ``directory`` (``.NAME.*.tmp``);
    return them. Only call it where no other process is writing (the start of a run)."""
    directory = Path(directory)
    removed = []
    for name in names:
        for tmp in directory.glob(f".{name}.*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
