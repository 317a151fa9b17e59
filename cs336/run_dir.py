"""The run directory of ``python -m cs336.train``: what is on disk, and who may use it.

    DIR/.cs336-run               marker: this directory was made by cs336.train (who, when)
    DIR/.cs336-lock              fcntl lock of the run using it (holder's pid inside)
    DIR/config.json              resolved TrainConfig
    DIR/metrics.jsonl            one JSON object per logged step
    DIR/checkpoints/step_NNNNNN.pt, DIR/checkpoints/latest (file name of the newest checkpoint)
    DIR/checkpoints/step_NNNNNN.dcp/   sharded checkpoint of an fsdp run (cs336.sharded_checkpoint)
    DIR/tokenizer/, DIR/data/, DIR/loss.png, DIR/samples.txt, DIR/profile/

One room for the directory, so the layout, the marker, the lock, the run naming, the checkpoint
file names (``CHECKPOINT_RE``, one listing) and the metrics file (one reader, one appender) are
each written once; checks that need a model, a tokenizer or a device are ``cs336.preflight``.
A directory is a run directory by its marker or by this exact layout (no other files), never by
two common names, so a user's project holding ``config.json`` and ``checkpoints/`` is refused.
Every write goes through ``cs336.fileio`` (atomic). The lock follows torchtitan's one-owner
rule for a run's outputs; ``fcntl.flock`` is dropped by the kernel however the holder ends.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from cs336.config import ConfigError, TrainConfig
from cs336.config_io import config_from_dict, config_to_dict
from cs336.fileio import atomic_write_text

try:
    import fcntl
except ImportError:  # Windows: the lock is a no-op
    fcntl = None  # type: ignore[assignment]  # a module or None; uses check `fcntl is not None`

MARKER = ".cs336-run"
LOCK = ".cs336-lock"
CHECKPOINT_RE = re.compile(r"^step_(\d+)\.(pt|dcp)$")
"""Names of the trainer's checkpoints: ``step_NNNNNN.pt`` files and the ``step_NNNNNN.dcp``
directories of fsdp runs."""
LAYOUT = frozenset({MARKER, LOCK, "config.json", "metrics.jsonl", "checkpoints", "tokenizer", "data",
                    "loss.png", "samples.txt", "profile", "wandb", "resumes.json"})
"""Every name ``cs336.train`` writes at the top of a run directory."""
RUNS = Path("runs")
"""Parent of the run directories named automatically (no ``--out-dir``); ``runs/latest`` links the newest."""


class RunDirError(ValueError):
    """A run directory is missing a file or holds an inconsistent one; the message says which."""


class RunDirRefused(ValueError):
    """A directory cannot be used as a run directory; the message says why and what to pass."""


class RunDirBusy(RunDirRefused):
    """Another process holds the run directory's lock."""


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The ``step_NNNNNN.pt`` files in ``directory``, oldest step first ([] if it does not exist)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step in a checkpoint's name (``step_000120.pt`` -> 120); -1 for another name."""
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else -1


def _metrics_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (a run directory or the file itself); a missing file, a
    torn last line (the run was killed while writing it) or a foreign line yields what parses."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [row for line in fh if (row := _metrics_row(line)) is not None]


class RunDir:
    """The paths of one run directory, and its config, metrics and checkpoint files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.tokenizer = self.path / "tokenizer"
        self.data = self.path / "data"
        self.config_file = self.path / "config.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.plot_file = self.path / "loss.png"
        self.samples_file = self.path / "samples.txt"

    @property
    def vocab_path(self) -> Path:
        return self.tokenizer / "vocab.json"

    @property
    def merges_path(self) -> Path:
        return self.tokenizer / "merges.txt"

    def create(self) -> None:
        for d in (self.path, self.checkpoints, self.tokenizer, self.data):
            d.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: TrainConfig) -> None:
        atomic_write_text(self.config_file, json.dumps(config_to_dict(cfg), indent=2) + "\n")

    def read_config(self) -> TrainConfig:
        check_not_dangling(self.path, "the run directory")
        if not self.config_file.is_file():
            raise RunDirError(f"{self.config_file} not found; is {self.path} a run directory of "
                              "python -m cs336.train?")
        try:
            return config_from_dict(json.loads(self.config_file.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as exc:
            raise RunDirError(f"{self.config_file} is not a valid run config ({exc}); restore it or "
                              "start a new run") from None

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics_file)

    def truncate_metrics(self, last_step: int) -> None:
        """Drop metric lines past ``last_step`` (logged after the checkpoint a run resumes from)."""
        rows = [r for r in self.read_metrics() if r["step"] <= last_step]
        if self.metrics_file.is_file():
            atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))

    def checkpoint_path(self, step: int, sharded: bool = False) -> Path:
        """``step_NNNNNN.pt``, or the sharded (fsdp) directory ``step_NNNNNN.dcp``."""
        return self.checkpoints / f"step_{step:06d}.{'dcp' if sharded else 'pt'}"

    def checkpoint_files(self) -> list[Path]:
        return checkpoint_files(self.checkpoints)

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint ``checkpoints/latest`` names; without that pointer (a run killed between
        writing its first checkpoint and the pointer, or a deleted pointer) the newest checkpoint
        file; None when there is none."""
        pointer = self.checkpoints / "latest"
        if not pointer.is_file():
            files = self.checkpoint_files()
            return files[-1] if files else None
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise RunDirError(f"{pointer} is not text (damaged); write the file name of an existing "
                              "step_NNNNNN.pt into it") from None
        path = self.checkpoints / name
        if not CHECKPOINT_RE.match(name) or not (path.is_file() or (name.endswith(".dcp") and path.is_dir())):
            raise RunDirError(f"{pointer} names {name!r}, which is not a checkpoint in {self.checkpoints}; "
                              "write the file name of an existing step_NNNNNN.pt into it")
        return path

    def mark_latest(self, path: Path, keep_last: int) -> None:
        """Point ``latest`` at ``path`` and delete all but the newest ``keep_last`` checkpoints up
        to its step. Checkpoints of a later step (left by a continuation that a resume from an
        earlier checkpoint rolled back) are not counted, so they never push this run's own out;
        the run replaces them when it reaches their steps."""
        atomic_write_text(self.checkpoints / "latest", path.name + "\n")
        step = checkpoint_step(path)
        for old in [f for f in self.checkpoint_files() if checkpoint_step(f) <= step][:-keep_last]:
            if old != path:
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)


def _has_run_layout(path: Path) -> bool:
    """A directory from before the marker: a cs336 config.json, checkpoints/ holding only
    checkpoint files, and no top-level name that cs336.train does not write."""
    if not (path / "config.json").is_file() or not (path / "checkpoints").is_dir():
        return False
    if any(p.name not in LAYOUT for p in path.iterdir()):
        return False
    if any(p.name != "latest" and not CHECKPOINT_RE.match(p.name) for p in (path / "checkpoints").iterdir()):
        return False
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and set(config) == {"model", "optim", "data", "train"}


def is_run_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / MARKER).is_file() or _has_run_layout(path))


def check_not_dangling(path: Path, flag: str = "--out-dir") -> None:
    """Refuse a symbolic link whose target is gone (``runs/latest`` after its run was deleted),
    which ``mkdir`` reports as 'File exists' and a reader as a missing config.json."""
    if path.is_symlink() and not path.exists():
        raise RunDirRefused(f"{flag} {path} is a symbolic link to {os.readlink(path)}, which does not exist "
                            "(its run was moved or deleted); pass an existing run directory, or remove the link")


def write_marker(path: Path) -> None:
    info = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "pid": os.getpid(),
            "host": socket.gethostname()}
    atomic_write_text(path / MARKER, json.dumps(info) + "\n")


def claim_run_dir(path: str | os.PathLike, *, flag: str = "--out-dir") -> Path:
    """Create ``path`` or accept it as a run directory: a new or empty directory gets the marker,
    a run directory is accepted, any other directory with files in it is refused."""
    path = Path(path)
    check_not_dangling(path, flag)
    if path.exists() and not path.is_dir():
        raise RunDirRefused(f"{flag} {path} is a file; pass a new directory (or an existing run directory)")
    outer = next((p for p in path.resolve().parents if (p / MARKER).is_file()), None)
    if outer is not None:
        raise RunDirRefused(f"{flag} {path} is inside the run directory {outer}, whose resume, checkpoint "
                            "pruning and layout check own everything under it; pass a directory outside it")
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


def new_run_dir(parent: str | os.PathLike = RUNS, *, attempts: int = 20) -> Path:
    """Create and claim ``parent/YYYYmmdd-HHMMSS-<pid>-<4 hex>`` (``exist_ok=False``, retried on
    a clash), so two runs started in the same second never share a directory."""
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


def link_latest(path: str | os.PathLike) -> Path | None:
    """Point ``<parent>/latest`` (a relative symlink) at the run directory ``path``, replacing
    an older link atomically; nothing when ``latest`` is a real file or directory, or the system
    has no symlinks. Returns the link."""
    path = Path(path).resolve()  # through runs/latest itself: the directory it names
    link = path.parent / "latest"
    if link.exists() and not link.is_symlink():
        return None
    tmp = path.parent / f".latest.{os.getpid()}.{secrets.token_hex(2)}"
    try:
        os.symlink(path.name, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return None
    return link


class RunLock:
    """Exclusive, non-blocking lock on a run directory: ``with RunLock(path): ...`` or
    ``lock = RunLock(path).acquire()`` ... ``lock.release()``. A second holder fails at once
    with ``RunDirBusy`` naming the first one's pid."""

    def __init__(self, path: str | os.PathLike, *, flag: str = "--out-dir") -> None:
        self.path = Path(path)
        self.flag = flag
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
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
