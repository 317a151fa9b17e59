"""Ownership and exclusivity of a training run directory.

- ``claim_run_dir(path)``: a run directory carries the marker file ``.cs336-run`` (JSON: who
  created it, when), written when the directory is created. A directory that does not exist or
  is empty is claimed (marker written); one with the marker, or a run directory from before the
  marker (``config.json`` beside ``checkpoints/``), is accepted; any other non-empty directory is
  refused, so ``--out-dir ~/Documents`` never gets a ``config.json`` written over a user's file.
- ``RunLock(path)``: an exclusive ``fcntl.flock`` on ``path/.cs336-lock``, taken without waiting:
  a second run in the same directory fails at once naming the holder's pid. The kernel drops
  the lock when the holder's process ends, however it ends (SIGKILL included), so no stale lock
  survives a crash. Under DDP only rank 0 takes it. On systems without ``fcntl`` (Windows) the
  lock is a no-op.
- ``new_run_dir(parent)``: a fresh directory named ``YYYYmmdd-HHMMSS-<pid>-<4 random hex>``,
  created with ``exist_ok=False`` (retried on the unlikely clash), so two runs started in the
  same second never share a directory.
- ``config_conflicts(saved, requested)``: the fields where a resumed run's flags differ from the
  saved ``config.json``, computed before anything is written.
- ``check_tokenizer_fits_model(n_tokens, vocab_size)``: a tokenizer with more ids than the model's
  embedding rows is refused with the flag to change.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

MARKER = ".cs336-run"
LOCK = ".cs336-lock"


class RunDirRefused(ValueError):
    """A directory cannot be used as a run directory; the message says why and what to pass."""


class RunDirBusy(RunDirRefused):
    """Another process holds the run directory's lock."""


def _is_legacy_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def write_marker(path: Path) -> None:
    from cs336.fileio import atomic_write_text

    info = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "pid": os.getpid(),
            "host": socket.gethostname()}
    atomic_write_text(path / MARKER, json.dumps(info) + "\n")


def is_run_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / MARKER).is_file() or _is_legacy_run_dir(path)


def claim_run_dir(path: str | os.PathLike, *, flag: str = "--out-dir") -> Path:
    """Create or accept ``path`` as a run directory (see the module docstring); returns it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirRefused(f"{flag} {path} is a file; pass a new directory (or an existing run directory)")
    if path.is_dir():
        if is_run_dir(path):
            if not (path / MARKER).is_file():
                write_marker(path)
            return path
        entries = [p.name for p in path.iterdir() if p.name != LOCK]
        if entries:
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise RunDirRefused(
                f"{flag} {path} holds files ({shown}) and is not a run directory (no {MARKER} marker); "
                "training there could overwrite them: pass a new or empty directory"
            )
    else:
        path.mkdir(parents=True, exist_ok=True)
    write_marker(path)
    return path


def new_run_dir(parent: str | os.PathLike = "runs", *, attempts: int = 20) -> Path:
    """Create and claim a new uniquely named run directory under ``parent``."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        path = parent / f"{stamp}-{os.getpid()}-{secrets.token_hex(2)}"
        try:
            path.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        write_marker(path)
        return path
    raise RunDirRefused(f"could not create a new run directory under {parent} after {attempts} tries; "
                        "pass --out-dir")


class RunLock:
    """Exclusive, non-blocking lock on a run directory (see the module docstring).

    ``with RunLock(path): ...`` or ``lock = RunLock(path).acquire()`` ... ``lock.release()``.
    """

    def __init__(self, path: str | os.PathLike, *, flag: str = "--out-dir") -> None:
        self.path = Path(path)
        self.flag = flag
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        lock_path = self.path / LOCK
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(
                f"{self.flag} {self.path} is in use by another training run ({holder}); wait for it to "
                "finish, stop it, or pass another --out-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n"
                  .encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def config_conflicts(saved: dict[str, Any], requested: dict[str, Any], *, allowed: tuple[str, ...] = (),
                     prefix: str = "") -> list[str]:
    """``"section.field: saved X, requested Y"`` for each leaf where two nested config dicts
    differ, except dotted names listed in ``allowed`` (fields a resume may change, e.g.
    ``train.max_steps``)."""
    diffs = []
    for key in sorted(set(saved) | set(requested)):
        name = f"{prefix}{key}"
        if name in allowed:
            continue
        a, b = saved.get(key, "<absent>"), requested.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(config_conflicts(a, b, allowed=allowed, prefix=f"{name}."))
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            diffs.append(f"{name}: saved {a!r}, requested {b!r}")
    return diffs


def check_tokenizer_fits_model(n_tokens: int, vocab_size: int, *, tokenizer: str = "the tokenizer",
                               model: str = "the model", flag: str = "--model.vocab_size",
                               fix: str | None = None) -> None:
    """Refuse a tokenizer whose ids (``0..n_tokens-1``) do not all index the model's embedding.
    ``fix`` replaces the default advice (resize the model), e.g. for a model already trained."""
    if n_tokens > vocab_size:
        fix = fix or f"set {flag}={n_tokens} or use a tokenizer with at most {vocab_size} tokens"
        raise ValueError(f"{tokenizer} has {n_tokens} token ids but {model} has {vocab_size} embedding rows "
                         f"({flag}); {fix}")
