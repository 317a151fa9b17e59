"""The run directory of ``python -m cs336.train`` (``cs336.inference`` loads a trained model back).

Layout::

    DIR/config.json              resolved TrainConfig (config_to_dict)
    DIR/metrics.jsonl            one JSON object per logged step
    DIR/checkpoints/step_NNNNNN.pt, DIR/checkpoints/latest (file name of the newest checkpoint)
    DIR/tokenizer/vocab.json, merges.txt
    DIR/data/                    generated corpus and encoded token files
    DIR/loss.png, DIR/samples.txt

Every file is written atomically (temporary file in the same directory, then ``os.replace``), so
an interrupted write leaves the previous version in place. ``checkpoints/latest`` is replaced only
after its checkpoint is complete, and old checkpoints are deleted only after that.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cs336.config import ConfigError, TrainConfig
from cs336.config_io import config_from_dict, config_to_dict
from cs336.fileio import atomic_write_text

CKPT_RE = re.compile(r"^step_(\d+)\.pt$")


class RunDirError(ValueError):
    """A run directory is missing a file or holds an inconsistent one; the message says which."""


class RunDir:
    def __init__(self, path: str | Path):
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

    # --- config ---------------------------------------------------------------------------
    def write_config(self, cfg: TrainConfig) -> None:
        atomic_write_text(self.config_file, json.dumps(config_to_dict(cfg), indent=2) + "\n")

    def read_config(self) -> TrainConfig:
        if not self.config_file.is_file():
            raise RunDirError(f"{self.config_file} not found; is {self.path} a run directory of "
                              "python -m cs336.train?")
        try:
            return config_from_dict(json.loads(self.config_file.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, ConfigError) as exc:
            raise RunDirError(f"{self.config_file} is not a valid run config ({exc}); restore it or "
                              "start a new run") from None

    # --- metrics --------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def truncate_metrics(self, last_step: int) -> None:
        """Drop metric lines past ``last_step`` (logged after the checkpoint a run resumes from)."""
        if not self.metrics_file.is_file():
            return
        kept = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        atomic_write_text(self.metrics_file, "".join(line + "\n" for line in kept))

    # --- checkpoints ----------------------------------------------------------------------
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}.pt"

    def checkpoint_files(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        steps = {p: int(m.group(1)) for p in self.checkpoints.iterdir() if (m := CKPT_RE.match(p.name))}
        return sorted(steps, key=steps.__getitem__)

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        path = self.checkpoints / name
        if not CKPT_RE.match(name) or not path.is_file():
            raise RunDirError(f"{pointer} names {name!r}, which is not a checkpoint in {self.checkpoints}; "
                              "write the file name of an existing step_NNNNNN.pt into it")
        return path

    def mark_latest(self, path: Path, keep_last: int) -> None:
        """Point ``latest`` at ``path`` and delete all but the newest ``keep_last`` checkpoints."""
        atomic_write_text(self.checkpoints / "latest", path.name + "\n")
        for old in self.checkpoint_files()[:-keep_last]:
            if old != path:
                old.unlink(missing_ok=True)
