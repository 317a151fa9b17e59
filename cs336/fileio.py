"""Atomic file writes: the one helper every writer in the project uses.

A file is written to a temporary file in the same directory, flushed to disk, then renamed over
the destination with ``os.replace`` (atomic on POSIX and Windows), so a crash or a failing write
never leaves a partial file where the old one was. Under ``cs336.interrupt.handling_signals`` the
temporary file's creation is not split by a signal, so an interruption never leaves it behind.

File mode: ``mkstemp`` creates the temporary file 0600; before the rename it gets the mode of the
file it replaces, or, for a new file, ``0o666`` less the process umask, which is what ``open``
would have given it (so a 0644 file stays 0644, and umask 002 gives 0664).

Failures a user can fix (no space left, permission denied, read-only file system, quota, busy)
leave as ``WriteError``, an ``OSError`` whose message names the file and the fix: ``writing(path)``
translates them, whether they come as an ``OSError`` without a file name (``write(2)`` failing),
as torch's ``RuntimeError`` from its zip writer (``PytorchStreamWriter failed writing file``,
``[enforce fail at inline_container.cc]``, which drops the errno) or as safetensors'
``SafetensorError`` (``IoError(Os { code: 28, ... })``). ``atomic_open`` writes under it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from cs336.interrupt import deferred_signals

FIXES: dict[int | None, str] = {
    errno.ENOSPC: "free space on that file system or write somewhere else",
    errno.EDQUOT: "free space within your quota or write somewhere else",
    errno.EFBIG: "write it to a file system that allows larger files",
    errno.EACCES: "fix its permissions or write somewhere else",
    errno.EPERM: "fix its permissions or write somewhere else",
    errno.EROFS: "write somewhere else",
    errno.EBUSY: "another process holds it; retry once it is free, or use another path",
    errno.ETXTBSY: "another process holds it; retry once it is free, or use another path",
    errno.EISDIR: "pass a file path",
    errno.ENOTDIR: "a component of the path is a file; fix the path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EEXIST: "remove it or use another path",
    errno.ENOTEMPTY: "empty or remove it, or use another path",
    errno.ELOOP: "fix the symbolic links of the path",
    errno.EMLINK: "use another directory",
    errno.EIO: "check the disk, or write somewhere else",
    errno.EXDEV: "keep source and destination on one file system",
}
"""errno -> the fix a user can make; any other errno is not treated as the user's to fix."""


class WriteError(OSError):
    """Writing ``filename`` failed for a reason the user can fix; ``str()`` is one line naming the
    file, the cause and the fix."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}; {FIXES.get(self.errno, 'check the path')}"


def _about(exc: OSError, path: Path) -> bool:
    """Whether ``exc`` concerns writing ``path``: no file named, ``path`` itself, one of its
    directories, or a temporary file beside it."""
    if exc.filename is None:
        return True
    name = Path(os.fsdecode(exc.filename))
    return name == path or name in path.parents or name.parent == path.parent


def _errno_of(exc: BaseException, path: Path) -> int | None:
    """The errno behind a failure to write ``path``, or None when ``exc`` is not one."""
    if isinstance(exc, OSError):  # one naming an unrelated file already says which
        return exc.errno if exc.errno in FIXES and _about(exc, path) else None
    name = type(exc).__name__
    text = str(exc)
    if name == "SafetensorError" or (isinstance(exc, RuntimeError) and (
            "PytorchStreamWriter failed" in text or "inline_container" in text or "file write failed" in text)):
        found = re.search(r"code: (\d+)|errno:? ?(\d+)", text, re.IGNORECASE)
        if found:
            return int(found.group(1) or found.group(2))
        if "No space left" in text or "StorageFull" in text:
            return errno.ENOSPC
        return -1  # a write failed, cause not given (torch drops the errno)
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a user-fixable failure of the block, which writes ``path``, into a ``WriteError``
    naming it (module docstring); other exceptions pass unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        code = _errno_of(exc, Path(path))
        if code is None:
            raise
        if code == errno.EEXIST and _file_in_the_way(exc):  # mkdir(parents=True) under a file
            code = errno.ENOTDIR
        if code == -1:
            code = errno.ENOSPC if _nearly_full(Path(path).parent) else errno.EIO
        raise WriteError(code, os.strerror(code), str(path)) from None


def _file_in_the_way(exc: BaseException) -> bool:
    name = getattr(exc, "filename", None)
    return name is not None and os.path.lexists(name) and not os.path.isdir(name)


def _nearly_full(directory: Path) -> bool:
    """Whether the file system of ``directory`` has under 1 MiB left (torch's writer reports a
    full disk without an errno)."""
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (``os.umask`` can only be
    read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def final_mode(path: str | os.PathLike) -> int:
    """Permission bits a rewrite of ``path`` should have: those of the existing file, else
    ``0o666 & ~umask``."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def temp_beside(path: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file in ``path``'s directory, already carrying
    ``final_mode(path)``; rename it over ``path`` with ``os.replace`` when complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.fchmod(fd, final_mode(path))
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``,
    on an exception it is removed and ``path`` is left as it was. ``kwargs`` go to ``open``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        # the name is known to the cleanup below before a signal lands
        with deferred_signals(), writing(path):
            fd, tmp = temp_beside(path)
        with writing(path), os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        with writing(path):
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 with ``\\n`` line endings on every platform."""
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
