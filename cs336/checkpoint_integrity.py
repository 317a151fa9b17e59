"""Checkpoint integrity: checksum, weight guards, and finding the checkpoint to fall back to.

- ``payload_digest(d)``: SHA-256 over every value of a checkpoint dict except ``checksum``: key
  paths, tensor dtypes, shapes and raw bytes, and the repr of plain values, in the dict's order
  (which pickling keeps). ``cs336.checkpoint`` stores it on save and recomputes it on load, so a
  byte changed on disk is caught; torch's zip reader checks no CRC, so a flipped byte inside a
  tensor otherwise loads as a wrong weight.
- ``check_weights(model, max_abs)``: NaN/inf (and, with ``max_abs``, exploding) weights raise
  ``NonFiniteWeightsError`` before they become a checkpoint. One host sync over all tensors.
- ``verify_checkpoint(path)``, ``previous_good_checkpoint(path)``, ``last_good_checkpoint(dir)``:
  the newest intact checkpoint with finite weights among the trainer's ``step_NNNNNN.pt`` files,
  for the messages of a corrupt load and of divergence.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import IO, Any

import torch


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit; the message names the file and the fix."""


class NonFiniteWeightsError(CheckpointError):
    """Weights hold NaN/inf (or exceed a bound): they must not become a checkpoint."""


CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")
"""File names of the trainer's checkpoints (``cs336.run_dir``): ``step_NNNNNN.pt``."""




def _unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    from cs336.checkpoint import _unwrap

    return _unwrap(model)


def _digest_into(h, value: Any, where: str) -> None:
    h.update(where.encode())
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        for k, v in value.items():
            _digest_into(h, v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        h.update(type(value).__name__.encode())
        for i, v in enumerate(value):
            _digest_into(h, v, f"{where}[{i}]")
    else:
        h.update(f"={type(value).__name__}:{value!r}".encode())


def payload_digest(payload: dict[str, Any]) -> str:
    """SHA-256 (hex) of everything in a checkpoint dict except its ``checksum`` entry."""
    h = hashlib.sha256()
    for k, v in payload.items():
        if k != "checksum":
            _digest_into(h, v, k)
    return h.hexdigest()


def check_weights(model: torch.nn.Module, max_abs: float | None = None, *, where: str = "model") -> None:
    """Raise ``NonFiniteWeightsError`` when a parameter or buffer holds NaN/inf or, with
    ``max_abs``, a value beyond it; the message names the first such tensors. One host sync."""
    module = _unwrap_model(model)
    named = [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()]
             if t.is_floating_point() and t.numel()]
    if not named:
        return
    peaks = torch.stack([t.detach().abs().amax().float() for _, t in named]).cpu()
    bad = [(n, float(p)) for (n, _), p in zip(named, peaks, strict=True) if not torch.isfinite(p)
           or (max_abs is not None and p > max_abs)]
    if bad:
        listed = ", ".join(f"{n} (max |w| {p:.3g})" for n, p in bad[:3])
        limit = "NaN/inf" if max_abs is None else f"NaN/inf or |w| > {max_abs:g}"
        raise NonFiniteWeightsError(
            f"{where}: {len(bad)} weight tensors hold {limit}: {listed}; training diverged, so this "
            "state is not saved. Resume from the last good checkpoint with a lower --optim.lr or "
            "more --optim.warmup_iters"
        )


def fallback_hint(src: str | os.PathLike | IO[bytes]) -> str:
    if not isinstance(src, (str, os.PathLike)):
        return "Load an earlier checkpoint."
    prev = previous_good_checkpoint(src)
    if prev is None:
        return "No earlier valid checkpoint is beside it; start the run again."
    return f"The previous valid checkpoint is {prev}: load that one (or resume from it)."


def verify_checkpoint(path: str | os.PathLike, max_abs: float | None = None) -> dict[str, Any]:
    """Read ``path`` and check it whole (archive, checksum, finite weights, with ``max_abs`` no
    weight beyond it); return the dict or raise ``CheckpointError``."""
    from cs336.checkpoint import _read

    payload = _read(path, hint=False)
    for k, v in payload["model"].items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            peak = float(v.detach().abs().amax())
            if not math.isfinite(peak) or (max_abs is not None and peak > max_abs):
                raise NonFiniteWeightsError(f"checkpoint {path}: weight {k} has max |w| {peak:.3g}")
    return payload


def _step_files(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of ``step_NNNNNN.pt`` files in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found, reverse=True)


def previous_good_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``path``'s directory with a lower step than ``path`` (all of them
    when ``path`` is not a ``step_NNNNNN.pt``) that passes ``verify_checkpoint``; None if none."""
    path = Path(path)
    m = CHECKPOINT_RE.match(path.name)
    below = int(m.group(1)) if m else None
    for step, candidate in _step_files(path.parent):
        if (below is None or step < below) and candidate != path:
            try:
                verify_checkpoint(candidate)
            except CheckpointError:
                continue
            return candidate
    return None


def last_good_checkpoint(directory: str | os.PathLike, max_abs: float | None = None) -> Path | None:
    """The newest ``step_NNNNNN.pt`` in ``directory`` that passes ``verify_checkpoint`` (intact,
    finite weights, none beyond ``max_abs``); None if there is none. The divergence message names it."""
    for _, candidate in _step_files(Path(directory)):
        try:
            verify_checkpoint(candidate, max_abs)
        except CheckpointError:
            continue
        return candidate
    return None


