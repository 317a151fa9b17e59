"""Atomic file writes: the one helper every writer in the project uses.

A file is written to a temporary file in the same directory, flushed to disk, then renamed over
the destination with ``os.replace`` (atomic on POSIX and Windows), so a crash or a failing write
never leaves a partial file where the old one was. Under ``cs336.interrupt.handling_signals`` the
temporary file's creation is not split by a signal, so an interruption never leaves it behind.

File mode: ``mkstemp`` creates the temporary file 0600; before the rename it gets the mode of the
file it replaces, or, for a new file, ``0o666`` less the process umask, which is what ``open``
would have given it (so a 0644 file stays 0644, and umask 002 gives 0664).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from cs336.interrupt import deferred_signals


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with deferred_signals():  # the name is known to the cleanup below before a signal lands
            fd, tmp = temp_beside(path)
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
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
