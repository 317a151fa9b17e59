"""Sharded checkpoints of ``--train.parallel=fsdp`` runs: a ``torch.distributed.checkpoint`` (DCP)
directory per step, and the loaders that move weights between it and the single-file format.

Layout of ``checkpoints/step_NNNNNN.dcp/``: the DCP files (``.metadata`` plus one ``.distcp``
file per rank: model and AdamW state, keyed by parameter name, so DCP reshards them to any world
size on load) and ``meta.pt``, written by rank 0 in the single-file format of ``cs336.checkpoint``
without its ``model``/``optimizer`` entries: iteration, model config, RNG states, the trainer's
extras, and the SHA-256 of every DCP file, itself covered by the ``checksum`` entry.

``save_sharded`` writes into a hidden temporary directory beside the target, then renames it
(the caller then points ``latest`` at it), so a crash leaves the previous checkpoint in place.
``load_sharded_into`` restores model and optimizer, sharded (FSDP, collective) or whole (one
process, DDP); ``load_full_into`` loads a single-file checkpoint into an FSDP model.
``read_sharded`` consolidates a directory in one process (no process group needed) into the
dict ``cs336.checkpoint.read_checkpoint`` returns, which is how generate and export read it.
Everything loads with ``weights_only=True``. Source: torch.distributed.checkpoint.state_dict
(``get/set_model_state_dict``, ``get/set_optimizer_state_dict``), torchtitan's CheckpointManager.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cs336.checkpoint import _check_config, _check_loadable, _strip_prefixes, rng_state
from cs336.checkpoint_integrity import SHARDED_FORMAT as FORMAT
from cs336.checkpoint_integrity import SHARDED_META as META
from cs336.checkpoint_integrity import SHARDED_VERSION as VERSION
from cs336.checkpoint_integrity import (
    CheckpointError,
    is_sharded_checkpoint,
    payload_digest,
    read_meta,
    sha256_file,
    unwrap_model,
)
from cs336.fileio import atomic_open

__all__ = ["is_sharded_checkpoint", "load_full_into", "load_sharded_into", "read_meta", "save_sharded"]
SUFFIX = ".dcp"



def _state(model, optimizer, sharded: bool) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions()
    state: dict[str, Any] = {"model": get_model_state_dict(model, options=options)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
    return state


def save_sharded(model, optimizer, iteration: int, out: Path, is_main: bool, **extra: Any) -> None:
    """Every rank calls this: DCP writes each rank's shards, rank 0 the meta file (see above)."""
    import torch.distributed.checkpoint as dcp


    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    _check_loadable(extra, "extra")
    dcp.save(_state(model, optimizer, True), checkpoint_id=str(tmp))
    dist.barrier()
    if is_main:
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        config = getattr(model, "config", None)
        from dataclasses import asdict

        meta = {"format": FORMAT, "version": VERSION, "iteration": int(iteration),
                "model_config": asdict(config) if config is not None else None,
                "world_size": dist.get_world_size(), "rng": rng_state(), "extra": extra, "files": files}
        meta["checksum"] = {"sha256": payload_digest(meta)}
        with atomic_open(tmp / META, "wb") as fh:
            torch.save(meta, fh)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()


def load_sharded_into(path, model, optimizer, meta: dict | None = None) -> dict[str, Any]:
    """Restore ``model`` (and ``optimizer``) from a sharded checkpoint; returns its meta dict.
    Collective when the model is sharded (every rank calls it); otherwise one process reads the
    whole tensors. The model config is checked first (another shape gets a CheckpointError)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from cs336.parallel import is_sharded

    meta = read_meta(path) if meta is None else meta
    model = unwrap_model(model)
    _check_config(str(path), meta.get("model_config"), model)
    sharded = any(is_sharded(p) for p in model.parameters())
    state = _state(model, optimizer, sharded)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path), no_dist=not sharded)
    except Exception as exc:  # a key or shape the checkpoint lacks
        raise CheckpointError(f"sharded checkpoint {path} does not fit this model or optimizer "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return meta


def _fqn_optimizer_state(model, optimizer_state: dict) -> dict:
    """A ``torch.optim.Optimizer.state_dict()`` (integer parameter ids in ``model.parameters()``
    order) rekeyed by parameter name, the form ``set_optimizer_state_dict`` takes."""
    names = [n for n, _ in model.named_parameters()]
    state = {names[i]: v for i, v in optimizer_state["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_full_into(payload: dict, name: str, model, optimizer) -> None:
    """Load a single-file checkpoint dict (``read_checkpoint``) into a sharded model and optimizer:
    every rank keeps its shards of the whole tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict


    model = unwrap_model(model)
    _check_config(name, payload.get("model_config"), model)
    _check_names(name, _strip_prefixes(payload["model"]), model)
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, _strip_prefixes(payload["model"]), options=full)
    if optimizer is not None:
        if payload.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {name} holds no optimizer state; resume needs one written "
                                  "during training")
        set_optimizer_state_dict(model, optimizer, _fqn_optimizer_state(model, payload["optimizer"]),
                                 options=full)


def _check_names(name: str, state: dict, model) -> None:
    """The single-file loader's name and shape checks, against the model's unsharded shapes."""
    expected = {k: v.shape for k, v in model.state_dict().items()}  # a DTensor's shape is the global one
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"checkpoint {name} does not fit this model ({len(missing)} weights missing, "
                              f"{len(unexpected)} unexpected, {len(mismatched)} of another shape); it "
                              "belongs to a different architecture or size")
