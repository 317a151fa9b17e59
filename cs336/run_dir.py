"""The run directory of ``python -m cs336.train`` and loading a trained model back from it.

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

from cs336.config import ConfigError, TrainConfig, config_from_dict, config_to_dict
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
        files = [p for p in self.checkpoints.iterdir() if CKPT_RE.match(p.name)]
        return sorted(files, key=lambda p: int(CKPT_RE.match(p.name).group(1)))

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


def load_for_inference(*, run_dir: str | None = None, checkpoint: str | None = None,
                       tokenizer_dir: str | None = None, device: str = "cpu"):
    """(model in eval mode, tokenizer) from a run directory or a checkpoint file."""
    from cs336.checkpoint import CheckpointError, load_checkpoint_full
    from cs336.hardware import resolve_device
    from cs336.model import TransformerLM
    from cs336.tokenizer import Tokenizer

    if run_dir is not None:
        rd = RunDir(run_dir)
        if not rd.path.is_dir():
            raise RunDirError(f"run directory {rd.path} does not exist; pass the --out-dir of a training run")
        ckpt = rd.latest_checkpoint()
        if ckpt is None:
            raise RunDirError(f"{rd.checkpoints} has no 'latest' checkpoint; train first or pass --checkpoint")
    else:
        ckpt = Path(checkpoint)
        rd = RunDir(ckpt.resolve().parent.parent)
    state = load_checkpoint_full(ckpt)
    cfg_dict = state.get("extra", {}).get("config")
    if cfg_dict is None:
        raise CheckpointError(f"{ckpt} carries no training config (it was not written by "
                              "python -m cs336.train); load it with cs336.checkpoint.load_checkpoint "
                              "into a model you build yourself")
    try:
        cfg = config_from_dict(cfg_dict)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt}: its stored config is invalid ({exc})") from None
    model = TransformerLM.from_config(cfg.model, device=resolve_device(device, "--device"))
    load_checkpoint_full(ckpt, model)
    model.eval()
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else rd.tokenizer
    vocab, merges = tok_dir / "vocab.json", tok_dir / "merges.txt"
    if not vocab.is_file() or not merges.is_file():
        raise RunDirError(f"no tokenizer at {tok_dir} (vocab.json + merges.txt); pass --tokenizer-dir")
    tokenizer = Tokenizer.from_files(str(vocab), str(merges), list(cfg.data.special_tokens))
    return model, tokenizer
