"""Training checkpoints: model, optimizer, iteration, RNG states and caller extras in one file.

``save_checkpoint(model, optimizer, iteration, out, **extra)`` writes a dict with the keys

    format "cs336-checkpoint", version 1, iteration (int), model (state dict),
    optimizer (state dict or None), model_config (dict of the model's ModelConfig or None),
    rng {torch, cuda, numpy, python}, extra {...}

To a path it writes a temporary file in the same directory and renames it over the target
(``os.replace``), so a crash or a failing save never leaves a partial file where the old one was.
Everything stored is readable by ``torch.load(..., weights_only=True)``: the numpy and Python RNG
states are converted to tensors and ints, and ``extra`` may hold only tensors, numbers, strings,
None and lists/tuples/dicts of them (anything else is refused before writing).

``load_checkpoint(src, model, optimizer) -> iteration`` is the CS336 adapter: it loads weights
and optimizer state and leaves the global RNGs alone. ``load_checkpoint_full(src, model=None,
optimizer=None)`` returns the whole dict (and loads into whatever is given), and
``restore_rng_state(d)`` puts the saved RNG states back, so a resumed run draws the same batches.

Integrity (``cs336.checkpoint_integrity``): ``save_checkpoint`` stores ``checksum`` = SHA-256 of
the whole dict and ``_read`` recomputes it, so a file whose bytes changed after writing is refused
with a message naming the file and ``previous_good_checkpoint``, the newest earlier
``step_NNNNNN.pt`` beside it that verifies. Files without a checksum (other implementations,
older files) load unverified. ``save_checkpoint`` refuses a model with NaN or inf weights
(``NonFiniteWeightsError``, nothing written).

Every user-visible failure (missing, truncated or corrupt file, a file that is not a checkpoint,
a checkpoint of a model with other settings, missing or unexpected weights) raises one
``CheckpointError`` naming the file and what to do. Files from other CS336 implementations load if
they are dicts with ``model`` and ``iteration`` keys. Wrappers (DistributedDataParallel's
``module.``, torch.compile's ``_orig_mod.``) are removed on save and tolerated on load.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch

from cs336.checkpoint_integrity import (
    CHECKPOINT_RE,
    CheckpointError,
    NonFiniteWeightsError,
    check_weights,
    fallback_hint,
    last_good_checkpoint,
    payload_digest,
    previous_good_checkpoint,
    verify_checkpoint,
)
from cs336.fileio import atomic_open

__all__ = [
    "CHECKPOINT_RE", "CheckpointError", "NonFiniteWeightsError", "check_weights", "last_good_checkpoint",
    "load_checkpoint", "load_checkpoint_full", "previous_good_checkpoint", "restore_rng_state",
    "save_checkpoint", "verify_checkpoint",
]

FORMAT = "cs336-checkpoint"
VERSION = 1
# ModelConfig fields that do not change the weights: a checkpoint may load across them.
_RUNTIME_FIELDS = ("kernels",)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

PathOrFile = str | os.PathLike | IO[bytes]


def _name(f: PathOrFile) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return str(getattr(f, "name", "<file object>"))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while True:
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, torch.nn.Module):
                model = inner
                break
        else:
            return model


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# ------------------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    """Torch (CPU and current CUDA device), numpy and Python RNG states, weights_only-loadable."""
    # legacy=True (the default) returns the tuple form
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # Only the current device: touching the others would create a CUDA context on every
        # GPU from every data-parallel rank.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def restore_rng_state(d: dict[str, Any]) -> None:
    """Restore the RNG states saved by ``save_checkpoint``; ``d`` is the loaded checkpoint dict
    or its ``"rng"`` entry. The CUDA state is that of the current device on both sides."""
    rng = d.get("rng", d) if isinstance(d, dict) else None
    if not isinstance(rng, dict) or "torch" not in rng:
        raise CheckpointError("restore_rng_state: no RNG states in this checkpoint (it was not written "
                              "by cs336.checkpoint.save_checkpoint); the resumed run draws new batches")
    torch.set_rng_state(rng["torch"].to(torch.uint8))
    cuda_states = rng.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_states[0].to(torch.uint8))
    nps = rng.get("numpy")
    if nps is not None:
        np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"],
                             nps["has_gauss"], nps["cached_gaussian"]))
    pys = rng.get("python")
    if pys is not None:
        random.setstate((pys["version"], tuple(int(v) for v in pys["state"].tolist()),
                         pys["gauss_next"]))


# ------------------------------------------------------------------------------------ save

def _check_loadable(value: Any, where: str) -> None:
    """Refuse values that torch.load(weights_only=True) could not read back."""
    # Exact types: subclasses such as numpy.float64 (a float) pickle as their own class.
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_loadable(v, f"{where}[{i}]")
        return
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"save_checkpoint: {where} has a key of type {type(k).__name__}; use str keys")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"save_checkpoint: {where} is a {type(value).__module__}.{type(value).__name__}, which "
        "torch.load(weights_only=True) cannot read; convert it to a tensor, number, str, list or dict"
    )


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    iteration: int, out: PathOrFile, **extra: Any) -> None:
    """Write model, optimizer, iteration, RNG states and ``extra`` to ``out`` (see module docstring).
    Refuses (``NonFiniteWeightsError``, nothing written) a model with NaN or inf weights."""
    model = _unwrap(model)
    config = getattr(model, "config", None)
    _check_loadable(extra, "extra")
    check_weights(model, where=f"save_checkpoint({_name(out)})")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "iteration": int(iteration),
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "model_config": asdict(config) if config is not None else None,
        "rng": rng_state(),
        "extra": extra,
    }
    payload["checksum"] = {"sha256": payload_digest(payload)}
    if not isinstance(out, (str, os.PathLike)):
        torch.save(payload, out)
        return
    with atomic_open(out, "wb") as f:
        torch.save(payload, f)


# ------------------------------------------------------------------------------------ load

def _is_zip(src: PathOrFile) -> bool:
    """torch.save writes a zip archive; a cut or overwritten file lacks its central directory."""
    if isinstance(src, (str, os.PathLike)):
        return zipfile.is_zipfile(src)
    if not (hasattr(src, "seek") and hasattr(src, "tell")):
        return True  # cannot peek a stream; torch.load reports what it finds
    start = src.tell()
    try:
        return zipfile.is_zipfile(src)
    finally:
        src.seek(start)


def read_checkpoint(src: PathOrFile) -> dict[str, Any]:
    """The checkpoint dict of ``src``, its archive and checksum checked (errors name the previous
    valid checkpoint); ``load_checkpoint_full(src, ..., payload=...)`` then loads it without a
    second read."""
    return _read(src)


def _read(src: PathOrFile, hint: bool = True) -> dict[str, Any]:
    """The checkpoint dict of ``src``, checked; ``hint`` adds the fallback checkpoint to errors."""
    name = _name(src)

    def earlier() -> str:
        return fallback_hint(src) if hint else "use an earlier checkpoint"

    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise CheckpointError(f"checkpoint {name} does not exist; check the path (or the run's "
                              "checkpoints/ directory)")
    if not _is_zip(src):
        raise CheckpointError(
            f"checkpoint {name} is truncated or corrupt (not a complete torch zip archive; an "
            f"interrupted copy leaves such files). {earlier()}"
        )
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise CheckpointError(
                f"checkpoint {name} holds objects other than tensors and plain containers, which "
                "could run code when loaded; it is refused. Re-save it with cs336.checkpoint."
            ) from None
        raise CheckpointError(f"checkpoint {name} is corrupt ({exc}). {earlier()}") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... for damaged archives
        raise CheckpointError(
            f"checkpoint {name} is truncated or corrupt ({type(exc).__name__}: {exc}). {earlier()}"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict) or "iteration" not in obj:
        bare = ""
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            bare = " It holds a bare state dict: load it with model.load_state_dict()."
        raise CheckpointError(
            f"{name} is not a training checkpoint (expected a dict with 'model' and 'iteration', "
            f"got {type(obj).__name__}).{bare}"
        )
    if obj.get("format", FORMAT) != FORMAT or obj.get("version", VERSION) > VERSION:
        raise CheckpointError(f"checkpoint {name} has format {obj.get('format')!r} version "
                              f"{obj.get('version')!r}; this cs336 reads {FORMAT!r} up to version {VERSION}")
    checksum = obj.get("checksum")
    if isinstance(checksum, dict) and "sha256" in checksum and payload_digest(obj) != checksum["sha256"]:
        raise CheckpointError(
            f"checkpoint {name} is corrupt: its contents no longer match the SHA-256 recorded when it "
            f"was saved (the file changed on disk). {earlier()}"
        )
    obj.setdefault("optimizer", None)
    obj.setdefault("model_config", None)
    obj.setdefault("rng", None)
    obj.setdefault("extra", {})
    return obj


def _check_config(name: str, saved: dict | None, model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    if saved is None or config is None:
        return
    current = asdict(config)
    fields = sorted((set(saved) | set(current)) - set(_RUNTIME_FIELDS))
    diffs = [f"{f}: checkpoint {saved.get(f, '<absent>')!r}, model {current.get(f, '<absent>')!r}"
             for f in fields if saved.get(f, "<absent>") != current.get(f, "<absent>")]
    if diffs:
        raise CheckpointError(
            f"checkpoint {name} was written by a model with other settings ({'; '.join(diffs)}); "
            "build the model with the checkpoint's config (TransformerLM.from_config) or pick "
            "a checkpoint of this model"
        )


def _load_model(name: str, state: dict[str, Any], model: torch.nn.Module) -> None:
    state = _strip_prefixes(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"checkpoint {name} does not fit this model: {'; '.join(parts)}; "
                              "it belongs to a different architecture")
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if isinstance(state[k], torch.Tensor) and state[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {name} does not fit this model: {len(mismatched)} weights differ in shape "
            f"(checkpoint vs model: {'; '.join(mismatched[:3])}); it belongs to a model of another size"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {name} does not fit this model ({exc})") from None


def load_checkpoint_full(src: PathOrFile, model: torch.nn.Module | None = None,
                         optimizer: torch.optim.Optimizer | None = None, *,
                         payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint; load it into ``model``/``optimizer`` when given; return the whole dict
    (keys: iteration, model, optimizer, model_config, rng, extra, ...). RNGs are not touched.
    ``payload``: ``src``'s dict as ``read_checkpoint`` returned it (not read again)."""
    name = _name(src)
    if payload is None:
        payload = _read(src)
    if model is not None:
        model = _unwrap(model)
        _check_config(name, payload["model_config"], model)
        _load_model(name, payload["model"], model)
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise CheckpointError(f"checkpoint {name} holds no optimizer state; resume needs one "
                                  "written during training (or load weights only with optimizer=None)")
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {name}: its optimizer state does not fit this optimizer "
                                  f"({exc}); build the optimizer over the same parameter groups") from None
    return payload


def load_checkpoint(src: PathOrFile, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> int:
    """Load weights (and optimizer state, if an optimizer is given); return the saved iteration."""
    return int(load_checkpoint_full(src, model, optimizer)["iteration"])
