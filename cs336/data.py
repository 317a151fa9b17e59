"""Token files and batches for language-model training (CS336 assignment 1, section 5.1).

- ``load_tokens(path)`` opens a 1-D token file as a read-only ``np.memmap`` (no copy into RAM).
  The file's dtype and length come from a JSON sidecar ``<path>.json`` holding at least
  ``{"dtype": "uint16", "count": N}`` (written by ``save_tokens`` and the tokenizer CLI); without
  one, the ``dtype`` argument (default uint16) is used.
- ``save_tokens(path, tokens)`` writes such a file and its sidecar, each atomically.
- ``get_batch`` samples ``batch_size`` windows with starts uniform in ``[0, len - T - 1]``; the
  targets are the inputs shifted by one token. It draws from ``generator`` or, without one, from
  torch's global RNG (which checkpoints save and restore).
- ``iter_batches`` walks the array in order in non-overlapping windows, for validation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cs336.fileio import atomic_write_bytes

DEFAULT_DTYPE = np.uint16


class TokenFileError(ValueError):
    """A token file cannot be used; the message names the file and what to do."""


def sidecar_path(path: str | os.PathLike) -> Path:
    """The metadata file of a token file: ``<path>.json``."""
    return Path(f"{os.fspath(path)}.json")


def _integer_dtype(dtype, where: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TokenFileError(f"{where}: {dtype!r} is not a numpy dtype; use e.g. uint16 or int32") from None
    if dt.kind not in "iu":
        raise TokenFileError(f"{where}: token dtype must be an integer type, got {dt.name}")
    return dt


def _read_sidecar(path: Path) -> dict | None:
    meta_path = sidecar_path(path)
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenFileError(f"{meta_path}: unreadable token-file metadata ({exc}); delete it and "
                             f"pass the dtype explicitly, or re-encode {path.name}") from None
    if not isinstance(meta, dict) or "dtype" not in meta:
        raise TokenFileError(f"{meta_path}: expected a JSON object with 'dtype' and 'count'; "
                             f"re-encode {path.name} or delete the sidecar")
    count = meta.get("count")
    if "count" in meta and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise TokenFileError(f"{meta_path}: 'count' is {count!r}, not a number of tokens (a non-negative "
                             f"integer); the sidecar is damaged: re-encode {path.name}")
    return meta


def load_tokens(path: str | os.PathLike, dtype=None) -> np.memmap:
    """Open a token file read-only as a 1-D memmap; see the module docstring for the dtype."""
    path = Path(path)
    if not path.is_file():
        raise TokenFileError(f"token file {path} does not exist; encode a text file first "
                             "(python -m cs336.tokenizer encode ...) or fix the path")
    meta = _read_sidecar(path)
    if meta is not None:
        dt = _integer_dtype(meta["dtype"], str(sidecar_path(path)))
        if dtype is not None and np.dtype(dtype) != dt:
            raise TokenFileError(f"{path}: its sidecar {sidecar_path(path).name} says dtype {dt.name} "
                                 f"but {np.dtype(dtype).name} was requested; drop the dtype argument")
    else:
        dt = _integer_dtype(DEFAULT_DTYPE if dtype is None else dtype, str(path))
    size = path.stat().st_size
    if size == 0:
        raise TokenFileError(f"token file {path} is empty; re-encode it from a non-empty text")
    if size % dt.itemsize != 0:
        raise TokenFileError(
            f"token file {path} has {size} bytes, not a multiple of {dt.itemsize} ({dt.name}); "
            "it is truncated or has another dtype: re-encode it or pass the right dtype"
        )
    count = size // dt.itemsize
    if meta is not None and "count" in meta and meta["count"] != count:
        raise TokenFileError(
            f"token file {path} holds {count} {dt.name} tokens but {sidecar_path(path).name} "
            f"records {meta['count']}; the file is truncated or was overwritten: re-encode it"
        )
    return np.memmap(path, dtype=dt, mode="r", shape=(count,))


def save_tokens(path: str | os.PathLike, tokens, dtype=DEFAULT_DTYPE, **meta) -> Path:
    """Write ``tokens`` (1-D ints) as raw ``dtype`` plus the ``<path>.json`` sidecar, atomically.

    ``tokens`` must hold integers (floats are refused, not truncated). Extra keyword arguments
    (e.g. ``vocab_size``) are recorded in the sidecar; ``count`` is not one of them (it is the
    length of ``tokens``).
    """
    path = Path(path)
    dt = _integer_dtype(dtype, str(path))
    if "count" in meta:
        raise ValueError(f"save_tokens: count={meta['count']!r} would replace the sidecar's token count "
                         "(the length of tokens); drop it")
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"save_tokens: expected a 1-D token array, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"save_tokens: tokens must be integer ids, got an array of {arr.dtype}; convert them "
                         "first (e.g. np.rint(x).astype(np.int64) after checking they are whole numbers)")
    if arr.size and (arr.min() < np.iinfo(dt).min or arr.max() > np.iinfo(dt).max):
        raise ValueError(f"save_tokens: token ids span [{arr.min()}, {arr.max()}], outside {dt.name}; "
                         "use a wider dtype (uint32)")
    atomic_write_bytes(path, arr.astype(dt, copy=False).tobytes())
    sidecar = {"dtype": dt.name, "count": int(arr.size), **meta}
    atomic_write_bytes(sidecar_path(path), (json.dumps(sidecar, indent=1) + "\n").encode())
    return path


def _check(dataset, batch_size: int, context_length: int) -> None:
    if getattr(dataset, "ndim", 1) != 1:
        raise ValueError(f"dataset must be a 1-D token array, got shape {dataset.shape}")
    if batch_size <= 0 or context_length <= 0:
        raise ValueError(f"batch_size and context_length must be positive, got {batch_size}, {context_length}")
    if len(dataset) < context_length + 1:
        raise ValueError(
            f"dataset has {len(dataset)} tokens but a window needs context_length + 1 = "
            f"{context_length + 1}; use more data or a shorter context_length"
        )


def _to_device(windows: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    buf = torch.from_numpy(windows.astype(np.int64))  # (B, T + 1)
    device = torch.device(device)
    if device.type == "cuda":
        buf = buf.pin_memory().to(device, non_blocking=True)
    else:
        buf = buf.to(device)
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


def get_batch(dataset, batch_size: int, context_length: int, device: str | torch.device,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training batch: (inputs, targets), LongTensors (batch_size, context_length) on ``device``,
    with ``targets[b, t] == inputs[b, t + 1]`` (both windows read from the same span)."""
    _check(dataset, batch_size, context_length)
    high = len(dataset) - context_length  # starts in [0, len - T - 1]
    starts = torch.randint(0, high, (batch_size,), generator=generator).numpy()
    index = starts[:, None] + np.arange(context_length + 1)  # (B, T + 1)
    return _to_device(np.asarray(dataset[index]), device)


def num_windows(dataset, context_length: int) -> int:
    """How many non-overlapping (input, target) windows ``iter_batches`` yields over ``dataset``."""
    return (len(dataset) - 1) // context_length


def iter_batches(dataset, batch_size: int, context_length: int, device: str | torch.device,
                 max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic batches for evaluation: window ``i`` covers tokens ``[i*T, (i+1)*T]``, windows
    in order, ``batch_size`` per batch (the last batch may be smaller), at most ``max_batches``."""
    _check(dataset, batch_size, context_length)
    total = num_windows(dataset, context_length)
    offsets = np.arange(context_length + 1)
    produced = 0
    for first in range(0, total, batch_size):
        if max_batches is not None and produced >= max_batches:
            return
        starts = np.arange(first, min(first + batch_size, total)) * context_length
        yield _to_device(np.asarray(dataset[starts[:, None] + offsets]), device)  # (b, T + 1)
        produced += 1
