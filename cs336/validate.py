"""Up-front checks of command-line values: each error names the flag, the value and a fix.

A command calls these on every numeric field and path before it generates, downloads or encodes
anything, so a typo costs a second, not the data-preparation time. All raise ``FlagError``
(a ``ValueError``), whose message is complete for the user (``cs336.interrupt.run_cli`` prints it
as one line).

- ``finite(flag, x)``: a real number, not NaN or +-inf (``float("nan")`` parses from "nan").
- ``in_range(flag, x, low, high, ...)``: finite and within bounds (open or closed at each end).
- ``positive_int(flag, n, maximum)`` / ``fits_int(flag, n, bits)``: an int (not a bool, not a float)
  that fits the type it will be stored in (``torch.randint`` bounds, int64 step counters, ...).
- ``existing_file(flag, path)`` / ``existing_dir(flag, path)`` / ``writable_dir(flag, path)``.
- ``read_text_file(flag, path)``: a config file that is not UTF-8 text (a binary, a checkpoint
  passed by mistake) is refused with what it looks like, instead of a decode traceback.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path


class FlagError(ValueError):
    """A command-line or config value that cannot work; the message names the flag and the fix."""


def finite(flag: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise FlagError(f"{flag}={x!r}: expected a number")
    if not math.isfinite(float(x)):
        raise FlagError(f"{flag}={x!r}: must be a finite number, not NaN or infinity; pass an ordinary value")
    return float(x)


def in_range(flag: str, x, low: float | None = None, high: float | None = None, *,
             low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """``x`` finite and in the interval; the message states the interval (and ``hint``)."""
    v = finite(flag, x)
    below = low is not None and (v <= low if low_open else v < low)
    above = high is not None and (v >= high if high_open else v > high)
    if below or above:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise FlagError(f"{flag}={x!r}: must be in {interval}" + (f"; {hint}" if hint else ""))
    return v


def fits_int(flag: str, n, bits: int = 63, *, minimum: int = 0) -> int:
    """``n`` an int with ``minimum <= n < 2**bits``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise FlagError(f"{flag}={n!r}: expected a whole number")
    if n < minimum or n >= 2 ** bits:
        raise FlagError(f"{flag}={n}: must be between {minimum} and {2 ** bits - 1}")
    return int(n)


def positive_int(flag: str, n, maximum: int | None = None) -> int:
    v = fits_int(flag, n, minimum=1)
    if maximum is not None and v > maximum:
        raise FlagError(f"{flag}={n}: must be at most {maximum}")
    return v


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
        raise FlagError(f"{flag} {p}: cannot write in {probe} (permissions); pass another directory")
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
