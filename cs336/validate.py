"""Up-front checks of command-line paths and files: each error names the flag, the value and a fix.

A command calls these before it generates, downloads or encodes anything, so a typo costs a
second, not the data-preparation time. Numeric fields are checked where config values are parsed
(``cs336.config_io.coerce``: finite, fits int64) and validated (``cs336.config.check_positive``).
All raise ``FlagError`` (a ``ValueError``), whose message is complete for the user
(``cs336.interrupt.run_cli`` prints it as one line).

- ``existing_file(flag, path)`` / ``existing_dir(flag, path)`` / ``writable_dir(flag, path)``.
- ``read_text_file(flag, path)``: a config file that is not UTF-8 text (a binary, a checkpoint
  passed by mistake) is refused with what it looks like, instead of a decode traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class FlagError(ValueError):
    """A command-line or config value that cannot work; the message names the flag and the fix."""


def existing_file(flag: str, path) -> Path:
    p = Path(path)
    if p.is_dir():
        raise FlagError(f"{flag} {p} is a directory; pass a file")
    if not p.is_file():
        raise FlagError(f"{flag} {p} does not exist; check the path")
    if not os.access(p, os.R_OK):
        raise FlagError(f"{flag} {p} is not readable (permissions); fix them or pass another file")
    return p


def existing_dir(flag: str, path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FlagError(f"{flag} {p} is not an existing directory; check the path")
    return p


def writable_dir(flag: str, path) -> Path:
    """``path`` is a directory this process can create files in, or can be created."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FlagError(f"{flag} {p} is a file; pass a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        cause = "a read-only file system" if read_only else "permissions"
        raise FlagError(f"{flag} {p}: cannot write in {probe} ({cause}); pass another directory")
    return p


def read_text_file(flag: str, path) -> str:
    """The UTF-8 text of ``path``; a binary or undecodable file is a ``FlagError``."""
    p = existing_file(flag, path)
    data = p.read_bytes()
    if b"\x00" in data[:8192]:
        kind = "a zip archive (a checkpoint?)" if data[:2] == b"PK" else "a binary file"
        raise FlagError(f"{flag} {p} is {kind}, not a text config file; pass a JSON config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FlagError(f"{flag} {p} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
