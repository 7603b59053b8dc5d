"""Writing a run's files so that nothing is lost: atomic replacement, one-line errors, no temporary files left behind.

A file is written to a temporary name in its destination directory (``.NAME.*.tmp``), flushed and ``fsync``-ed, then
renamed over the destination with ``os.replace``: a reader (or a run resumed after a crash) sees the old file or the new
one, never half of one. When the write fails — a full disk, a read-only or missing folder, no permission — the old file
is untouched, the temporary file is removed, and :class:`WriteError` says in one line which file and why. A run killed
in the middle of a write leaves its temporary file; :func:`remove_stale_temp_files` clears them when the next run or
resume starts in that folder. :func:`lock_output_dir` keeps a second run from writing into a folder a first one is
writing to.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from nnbackprop.errors import OutputLockedError, WriteError

TEMP_SUFFIX = ".tmp"
LOCK_FILE = ".lock"


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
    if isinstance(error, RuntimeError) and "inline_container" in text:  # torch.save's writer met a short write
        return f"the write stopped short ({text}); check the free space, or write elsewhere (--out)"
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
    """An ``OSError``, or the ``RuntimeError`` ``torch.save`` raises when its own file write fails (``enforce fail at
    inline_container.cc``, e.g. on a full disk; serialise into a ``BytesIO`` first to get the ``OSError``)."""
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


@contextlib.contextmanager
def lock_output_dir(directory: str | Path) -> Iterator[Path]:
    """Hold the output folder ``directory`` for one run: a second run that asks for it while the first holds it (two
    ``--overwrite`` runs, a ``--resume`` of a run still going) raises :class:`OutputLockedError` naming the holder's
    pid, instead of writing over the first run's files.

    The lock is an ``fcntl.flock`` on ``directory/.lock`` (created, with the folder, if needed), which holds the pid
    of its holder. The kernel releases it when the holder ends, however it ends, so the lock file of a process that
    died is taken over; on leaving the ``with`` block the file is removed and the lock released. Where the file system
    has no ``flock`` (or the platform no ``fcntl``), the pid in the file decides: a living process keeps the folder.

    Raises:
        OutputLockedError: another process holds the folder. WriteError: the folder or its lock file cannot be
            written.
    """
    directory = prepare_output_dir(directory)
    path = directory / LOCK_FILE
    fd = _lock(path)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a run waiting on this file sees it gone and opens anew
        os.close(fd)


def _lock(path: Path) -> int:
    """Open ``path``, hold it and write this process's pid into it; return the file descriptor."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise WriteError(f"cannot lock the output folder {path.parent} ({path.name}): {_cause(error)}") from error
        try:
            if not _try_flock(fd):
                pid = _holder(fd)
                raise OutputLockedError(f"{path.parent} is in use by another run ("
                                        f"{'pid ' + str(pid) if pid is not None else 'its pid not yet written'}), "
                                        "which writes its results there; wait for it to end, or write elsewhere "
                                        "(--out)")
            try:
                held = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                held = False
            if held:  # else the holder removed the file between our open and our lock: open it anew
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _try_flock(fd: int) -> bool:
    """Take the lock on ``fd`` without waiting; ``False`` when another process holds it. Without ``flock``, whether
    the pid in the file is not a living process's."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
    pid = _holder(fd)
    if pid is None or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, under another user
        return False
    return False


def _holder(fd: int) -> int | None:
    """The pid written in the lock file ``fd``, if any."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
