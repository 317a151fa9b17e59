"""Training checkpoints: model, optimizer, iteration, RNG states and caller extras in one file.

``save_checkpoint(model, optimizer, iteration, out, **extra)`` / ``load_checkpoint(src, model,
optimizer) -> iteration`` are the CS336 interface; ``load_checkpoint_full`` returns the whole dict
(format, version, iteration, model, optimizer, model_config, rng, extra, checksum) and
``restore_rng_state`` puts the saved RNG states back, so a resumed run draws the same batches.
Deviations from the handout's ``torch.save`` of a dict: the file is written atomically
(``cs336.fileio``), carries a SHA-256 of its contents and is read with ``weights_only=True``
(``cs336.checkpoint_integrity``), so ``extra`` may hold only tensors, numbers, strings, None and
containers of them; NaN/inf weights are refused before writing. Loading names what does not fit
(another model's settings, missing or reshaped weights) and tolerates the ``module.`` and
``_orig_mod.`` prefixes of DDP and torch.compile. Files of other CS336 implementations load when
they are dicts with ``model`` and ``iteration``. A directory is the
sharded (DCP) checkpoint of an fsdp run: ``read_checkpoint`` consolidates it into the same dict
(optimizer None; ``cs336.checkpoint_integrity``).
"""

from __future__ import annotations

import dataclasses
import operator
import os
import random
from collections import OrderedDict
from dataclasses import asdict
from typing import Any, cast

import numpy as np
import torch

from cs336.checkpoint_integrity import (
    FORMAT,
    VERSION,
    CheckpointError,
    NonFiniteWeightsError,
    PathOrFile,
    check_weights,
    last_good_checkpoint,
    payload_digest,
    previous_good_checkpoint,
    read_checkpoint,
    source_name,
    unwrap_model,
    verify_checkpoint,
)
from cs336.fileio import atomic_open

__all__ = [
    "CheckpointError", "NonFiniteWeightsError", "check_model_config", "check_weights", "last_good_checkpoint",
    "load_checkpoint",
    "load_checkpoint_full", "previous_good_checkpoint", "read_checkpoint", "restore_rng_state",
    "save_checkpoint", "verify_checkpoint", "write_checkpoint",
]

# ModelConfig fields that do not change the weights: a checkpoint may load across them.
_RUNTIME_FIELDS = ("kernels",)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# ------------------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    """Torch (CPU and current CUDA device), numpy and Python RNG states, weights_only-loadable."""
    # legacy=True (the default) gives the tuple form, not the dict
    name, keys, pos, has_gauss, cached = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
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
    check_weights(model, where=f"save_checkpoint({source_name(out)})")
    write_checkpoint(model, optimizer, iteration, out, extra)


def write_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, iteration: int,
                     out: PathOrFile, extra: dict[str, Any]) -> None:
    """``save_checkpoint`` for a caller that has already run ``check_weights`` (with its own
    bound): the same file, without a second pass over the weights."""
    try:
        steps = -1 if isinstance(iteration, bool) else operator.index(iteration)  # ints, numpy and 0-d tensors
    except TypeError:
        steps = -1
    if steps < 0:
        raise TypeError(f"save_checkpoint: iteration must be an integer >= 0 (the optimizer steps done), got "
                        f"{iteration!r}")
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    _check_loadable(extra, "extra")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "iteration": steps,
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

def _check_config(name: str, saved: dict | None, model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    if saved is None or config is None:
        return
    check_model_config(name, saved, config)


def check_model_config(name: str, saved: dict | None, config) -> None:
    """Refuse (``CheckpointError``) a checkpoint whose ``model_config`` (``saved``; None: not
    recorded, nothing to check) differs from the ``ModelConfig`` ``config`` in a field that shapes
    the weights, naming each field. Needs no model, so a resume checks it before any work."""
    if saved is None:
        return
    current = asdict(config)
    # A field added after the checkpoint was written is absent from it: the checkpoint's model
    # had that field's default (each new model switch is off by default).
    saved = {**{f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING},
             **saved}
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
    name = source_name(src)
    if payload is None:
        payload = read_checkpoint(src)
    if model is not None:
        model = unwrap_model(model)
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
