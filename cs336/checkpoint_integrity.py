"""Reading a checkpoint file and proving it intact, and finding the intact one to fall back to.

- ``read_checkpoint(src)``: the one reader of a checkpoint file (``torch.load`` with
  ``weights_only=True``): a cut archive, a foreign pickle, another format or a changed byte is a
  ``CheckpointError`` naming the file and the newest earlier intact ``step_NNNNNN.pt`` beside it.
- ``payload_digest(d)``: SHA-256 over key paths, tensor dtypes, shapes and raw bytes and the repr
  of plain values. torch's zip reader checks no CRC, so without it a flipped byte inside a tensor
  loads as a wrong weight. Files without a checksum (other CS336 implementations) load unverified.
- ``check_weights(model, max_abs)``: NaN/inf or exploding weights never become a checkpoint; one
  host sync for all tensors.
- ``verify_checkpoint``, ``previous_good_checkpoint``, ``last_good_checkpoint``: the fallback
  search, over ``cs336.run_dir.checkpoint_files`` (the one listing of ``step_NNNNNN.pt``).
Why a module apart from ``cs336.checkpoint``: that one owns what goes into the file (save, load
into a model); this one owns whether a file can be trusted, which the run directory, the
divergence message and resume need without building a model.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import torch

from cs336.run_dir import CHECKPOINT_RE, checkpoint_files, checkpoint_step

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

FORMAT = "cs336-checkpoint"
VERSION = 1

PathOrFile = str | os.PathLike | IO[bytes]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit; the message names the file and the fix."""


class NonFiniteWeightsError(CheckpointError):
    """Weights hold NaN/inf (or exceed a bound): they must not become a checkpoint."""


def source_name(f: PathOrFile) -> str:
    """The path of ``f`` for messages (a file object's ``name``)."""
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return str(getattr(f, "name", "<file object>"))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (``module``) and torch.compile (``_orig_mod``)."""
    while True:
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, torch.nn.Module):
                model = inner
                break
        else:
            return model


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


def read_checkpoint(src: PathOrFile, *, hint: bool = True) -> dict[str, Any]:
    """The checkpoint dict of ``src``: archive, format and checksum checked; an error names the
    previous intact checkpoint beside it (``hint=False``: not searched). A directory is a sharded
    checkpoint, consolidated in this process (``read_sharded``)."""
    if is_sharded_checkpoint(src):
        return read_sharded(src, hint=hint)
    name = source_name(src)

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
    _check_structure(obj, name)
    return obj


def _check_structure(obj: dict[str, Any], name: str) -> None:
    """The entries every reader indexes have the types it assumes (a file of another program can
    hold anything under these names); ``iteration`` becomes a plain int (a 0-d integer tensor of
    another implementation included)."""
    iteration = obj["iteration"]
    if isinstance(iteration, torch.Tensor) and iteration.numel() == 1 and not iteration.is_floating_point():
        iteration = int(iteration.item())
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        problem = f"its 'iteration' is {iteration!r}, not a step count (an integer >= 0)"
    else:
        obj["iteration"] = iteration
        opt = obj["optimizer"]
        problem = next((f"its {key!r} is of type {type(obj[key]).__name__}, not a dict" for key in
                        ("model_config", "rng", "extra", "optimizer")
                        if obj[key] is not None and not isinstance(obj[key], dict)), "")
        if not problem and opt is not None and not (isinstance(opt.get("state"), dict)
                                                    and isinstance(opt.get("param_groups"), list)):
            problem = "its 'optimizer' is not an optimizer state dict (no 'state' and 'param_groups')"
    if problem:
        raise CheckpointError(f"{name} is not a training checkpoint of this format: {problem}; it was "
                              "written by another program. Pick a checkpoint written by cs336.checkpoint")


def _digest_into(h, value: Any, where: str) -> None:
    h.update(where.encode())
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            # numpy's stubs give ndarray __buffer__ only for Python >= 3.12; it is a buffer on every version
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
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


def check_weights(model: torch.nn.Module, max_abs: float | None = None, *, where: str = "model",
                  reduce=None) -> None:
    """Raise ``NonFiniteWeightsError`` when a parameter or buffer holds NaN/inf or, with
    ``max_abs``, a value beyond it; the message names the first such tensors. One host sync.
    ``reduce``: applied to the vector of per-tensor peaks (under FSDP, the max over ranks of
    each rank's shards, ``cs336.parallel.max_across_ranks``)."""
    model = unwrap_model(model)
    named = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()]
             if t.is_floating_point() and t.numel()]
    if not named:
        return
    from cs336.parallel import local

    shards = [local(t.detach()) for _, t in named]
    peaks = torch.stack([t.abs().amax().float() if t.numel() else t.new_zeros((), dtype=torch.float32)
                         for t in shards])
    if reduce is not None:
        peaks = reduce(peaks)
    peaks = peaks.cpu()
    bad = [(n, float(p)) for (n, _), p in zip(named, peaks, strict=True) if not torch.isfinite(p)
           or (max_abs is not None and p > max_abs)]
    if bad:
        listed = ", ".join(f"{n} (max |w| {p:.3g})" for n, p in bad[:3])
        limit = "NaN/inf" if max_abs is None else f"NaN/inf or |w| > {max_abs:g}"
        raise NonFiniteWeightsError(
            f"{where}: {len(bad)} weight tensors hold {limit}: {listed}; training diverged, so this "
            "state is not saved"
        )


def fallback_hint(src: PathOrFile) -> str:
    if not isinstance(src, (str, os.PathLike)):
        return "Load an earlier checkpoint."
    prev = previous_good_checkpoint(src)
    if prev is None:
        return "No earlier valid checkpoint is beside it; start the run again."
    pointer = prev.parent / "latest"
    if pointer.is_file():  # a run's checkpoints/: --resume loads what the pointer names
        return (f"The previous valid checkpoint is {prev}: to resume from it, write {prev.name} into {pointer} "
                "and pass --resume again (or load it directly)")
    return f"The previous valid checkpoint is {prev}: load that one."


def verify_checkpoint(path: str | os.PathLike, max_abs: float | None = None) -> dict[str, Any]:
    """Read ``path`` and check it whole (archive, checksum, finite weights, with ``max_abs`` no
    weight beyond it); return the dict or raise ``CheckpointError``."""
    payload = read_checkpoint(path, hint=False)
    for k, v in payload["model"].items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            peak = float(v.detach().abs().amax())
            if not math.isfinite(peak) or (max_abs is not None and peak > max_abs):
                raise NonFiniteWeightsError(f"checkpoint {path}: weight {k} has max |w| {peak:.3g}")
    return payload


def previous_good_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``path``'s directory with a lower step than ``path`` (all of them
    when ``path`` is not a ``step_NNNNNN.pt``) that passes ``verify_checkpoint``; None if none."""
    path = Path(path)
    m = CHECKPOINT_RE.match(path.name)
    below = int(m.group(1)) if m else None
    for candidate in reversed(checkpoint_files(path.parent)):
        match = CHECKPOINT_RE.match(candidate.name)
        assert match is not None  # checkpoint_files lists only names CHECKPOINT_RE matches
        step = int(match.group(1))
        if (below is None or step < below) and candidate != path:
            try:
                verify_checkpoint(candidate)
            except CheckpointError:
                continue
            return candidate
    return None


def last_good_checkpoint(directory: str | os.PathLike, max_abs: float | None = None,
                         max_step: int | None = None) -> Path | None:
    """The newest ``step_NNNNNN.pt`` in ``directory`` that passes ``verify_checkpoint`` (intact,
    finite weights, none beyond ``max_abs``); None if there is none. The divergence message names it.
    ``max_step``: only checkpoints up to that step (a run resumed from an earlier checkpoint leaves
    the later ones of the continuation it rolled back; they are not this run's)."""
    for candidate in reversed(checkpoint_files(directory)):
        if max_step is not None and checkpoint_step(candidate) > max_step:
            continue
        try:
            verify_checkpoint(candidate, max_abs)
        except CheckpointError:
            continue
        return candidate
    return None

# ------------------------------------------------------- sharded (DCP) checkpoints of fsdp runs

SHARDED_FORMAT = "cs336-sharded-checkpoint"
SHARDED_VERSION = 1
SHARDED_META = "meta.pt"


def is_sharded_checkpoint(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and Path(path).is_dir()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(path, hint: bool = True) -> dict[str, Any]:
    """``meta.pt`` of a sharded checkpoint, with every DCP file's SHA-256 checked; ``hint``: name
    the previous valid checkpoint in errors."""
    path = Path(path)
    name = str(path)
    earlier = fallback_hint(path) if hint else "Use an earlier checkpoint."
    meta_file = path / SHARDED_META
    if not meta_file.is_file():
        raise CheckpointError(f"{name} is a directory but not a complete sharded checkpoint (no {SHARDED_META}; an "
                              f"interrupted save leaves such directories). {earlier}")
    try:
        meta = torch.load(meta_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{meta_file} is corrupt ({type(exc).__name__}: {exc}). {earlier}") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARDED_FORMAT or meta.get("version", 0) > SHARDED_VERSION:
        raise CheckpointError(f"{meta_file} is not a {SHARDED_FORMAT} version <= {SHARDED_VERSION} file")
    checksum = meta.get("checksum", {}).get("sha256")
    if checksum is None or payload_digest(meta) != checksum:
        raise CheckpointError(f"sharded checkpoint {name} is corrupt: {SHARDED_META} no longer matches its "
                              f"SHA-256. {earlier}")
    for fname, digest in meta["files"].items():
        f = path / fname
        if not f.is_file() or sha256_file(f) != digest:
            raise CheckpointError(f"sharded checkpoint {name} is corrupt: {fname} is missing or changed "
                                  f"since it was saved (SHA-256 mismatch). {earlier}")
    meta.setdefault("extra", {})
    return meta


def read_sharded(path, hint: bool = True) -> dict[str, Any]:
    """A sharded checkpoint consolidated in this process: the dict of ``read_checkpoint`` (keys
    iteration, model (whole tensors), optimizer None, model_config, rng, extra)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = read_meta(path, hint)
    metadata = FileSystemReader(str(path)).read_metadata()
    model = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(md, "size"):
            md = cast("TensorStorageMetadata", md)  # tensors have a size, bytes entries do not
            model[key[len("model."):]] = torch.empty(md.size, dtype=md.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": model}, checkpoint_id=str(path), no_dist=True)
    return {**meta, "model": model, "optimizer": None}
