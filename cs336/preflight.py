"""Everything a training run checks before it does any work, each check written once.

- Paths: ``existing_file`` / ``existing_dir`` / ``writable_dir`` (one flag, one path) and
  ``check_text_file`` (exists, readable, not empty), composed by ``check_paths(cfg)``.
- ``check_tokenizer_fits(n_ids, vocab_size)``: the one test, and the one message, that a
  tokenizer's ids all index the model's embedding (preflight, data preparation, decoding).
- ``check_memory(cfg, device, micro_batch, world_size)``: per-rank training memory as
  ``cs336.memory`` counts it for the run's provider and parallel mode, against the device's total.
- ``resume_conflicts`` / ``RESUME_MAY_CHANGE``: what a ``--resume`` may change; and
  ``open_run_dir``: rank 0 claims and locks the run directory and verifies the checkpoint to
  resume from, all ranks learn the outcome, so a corrupt checkpoint stops the run before data work.
Why one room: a check placed where its failure would first surface got written again by the next
caller (two text-path checks, three tokenizer-size checks); here a caller composes them. The run
directory itself (layout, marker, lock) is ``cs336.run_dir``; what happens on each refusal is the
README's "What happens when".
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import cast

from cs336 import distributed as dist_utils
from cs336 import ops
from cs336.checkpoint import check_model_config
from cs336.checkpoint_integrity import CheckpointError, is_sharded_checkpoint, read_checkpoint
from cs336.config import ConfigError, TrainConfig
from cs336.hardware import device_memory
from cs336.memory import per_rank_memory
from cs336.run_dir import (
    RunDir,
    RunDirError,
    RunDirRefused,
    RunLock,
    claim_run_dir,
    is_run_dir,
    link_latest,
    new_run_dir,
)

RESUME_MAY_CHANGE = (
    "model.kernels",
    "train.out_dir", "train.max_steps", "train.eval_interval", "train.eval_batches", "train.log_interval",
    "train.checkpoint_interval", "train.keep_last", "train.device", "train.autocast", "train.tf32",
    "train.compile", "train.threads", "train.parallel", "train.activation_checkpointing", "train.wandb",
    "train.wandb_mode", "train.wandb_project",
    "train.wandb_group", "train.profile", "train.sample_prompt", "train.sample_tokens",
    "train.sample_temperature", "train.sample_top_p", "train.progress", "train.grad_accum_steps",
    "train.diverge_loss_factor", "train.diverge_grad_norm", "train.diverge_max_weight",
    "data.data_dir", "data.dataset_base_url",
)
"""Dotted fields a resumed run may set differently from its config.json. Every ``optim`` field
may change too (e.g. a lower learning rate after divergence, as its message advises): the
trainer re-applies the resolved config's hyperparameters after loading the optimizer state."""
RESUME_FIXED = ("optim.name",)
"""``optim`` fields a resume cannot apply (the checkpoint's optimizer state belongs to another
optimizer), refused like the fields outside ``RESUME_MAY_CHANGE``."""


class FlagError(ConfigError):
    """A command-line or config value that cannot work; the message names the flag and the fix."""


def existing_file(flag: str, path) -> Path:
    p = Path(path)
    if p.is_dir():
        raise FlagError(f"{flag} {p} is a directory; pass a file")
    if p.exists() and not p.is_file():
        raise FlagError(f"{flag} {p} is not a regular file (a device, pipe or socket, which can be endless); "
                        "pass a file")
    if not p.is_file():
        raise FlagError(f"{flag} {p} does not exist; check the path")
    if not os.access(p, os.R_OK):
        raise FlagError(f"{flag} {p} is not readable (permissions); fix them or pass another file")
    return p


def existing_dir(flag: str, path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FlagError(f"{flag} {p} is not an existing directory; check the path")
    return p


def writable_dir(flag: str, path) -> Path:
    """``path`` is a directory this process can create files in, or can be created."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FlagError(f"{flag} {p} is a file; pass a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        cause = "a read-only file system" if read_only else "permissions"
        raise FlagError(f"{flag} {p}: cannot write in {probe} ({cause}); pass another directory")
    return p


def check_text_file(flag: str, path) -> Path:
    """A readable, non-empty text input."""
    p = existing_file(flag, path)
    if p.stat().st_size == 0:
        raise FlagError(f"{flag} {p} is empty; pass a file with text in it")
    return p


def check_paths(cfg: TrainConfig) -> None:
    """Every input path of the config exists and is readable; every output directory is writable."""
    d = cfg.data
    for flag, path in (("--train-text", d.train_text), ("--valid-text", d.valid_text)):
        if path is not None:
            check_text_file(flag, path)
    for flag, path in (("--data.train_tokens", d.train_tokens), ("--data.valid_tokens", d.valid_tokens)):
        if path is not None:
            existing_file(flag, path)
    if d.tokenizer_dir is not None:
        src = existing_dir("--data.tokenizer_dir", d.tokenizer_dir)
        for name in ("vocab.json", "merges.txt"):
            existing_file(f"--data.tokenizer_dir ({name})", src / name)
    if cfg.train.out_dir is not None:
        writable_dir("--out-dir", cfg.train.out_dir)
    if d.source in ("tinystories", "owt"):
        writable_dir("--data.data_dir", d.data_dir)


def check_tokenizer_fits(n_ids: int, vocab_size: int, *, tokenizer: str = "the tokenizer",
                         model: str = "the model", fix: str | None = None) -> None:
    """Refuse a tokenizer whose ids ``0..n_ids-1`` do not all index the ``vocab_size`` embedding
    rows. ``fix`` replaces the default advice (resize the model), e.g. for a model already trained."""
    if n_ids > vocab_size:
        fix = fix or f"set --model.vocab_size={n_ids} or use a tokenizer with at most {vocab_size} ids"
        raise ConfigError(f"{tokenizer} has {n_ids} token ids but {model} has {vocab_size} embedding rows "
                          f"(model.vocab_size); {fix}")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: int | None) -> None:
    """Refuse a ``train.threads`` above the CPUs this process may use: each is an OpenMP thread
    (20,000 of them crash the process in libgomp; hundreds on a few cores only slow every step)."""
    cpus = usable_cpus()
    if threads is not None and threads > cpus:
        raise FlagError(f"--train.threads={threads} exceeds the {cpus} CPUs this process may use; pass at most "
                        f"{cpus}, or leave it out for torch's default")


def check_memory(cfg: TrainConfig, device, micro_batch: int, world_size: int = 1) -> None:
    """Refuse a model and micro-batch whose per-rank training memory (``cs336.memory``: fp32
    parameters, gradients, AdamW m and v, sharded under fsdp, and the activations that the run's
    provider really keeps) exceeds the device's total: it would fail after data preparation."""
    total = device_memory(device)
    if total is None:
        return
    memory = per_rank_memory(cfg.model, micro_batch, cfg.context_length,
                             provider=ops.resolve_backend(cfg.model.kernels), autocast=cfg.train.autocast,
                             checkpointing=cfg.train.activation_checkpointing, parallel=cfg.train.parallel,
                             world_size=world_size)
    need = sum(memory.values())
    if need <= total:
        return
    fixed = sum(v for k, v in memory.items() if not k.startswith("activations."))
    raise ConfigError(
        f"training this model needs about {need / 1e9:.3g} GB ({fixed / 1e9:.3g} GB for parameters, "
        f"gradients and AdamW state, the rest for the activations of {micro_batch} sequences of "
        f"{cfg.context_length} tokens) but {device} has {total / 1e9:.3g} GB; lower --model.d_model, "
        "--model.num_layers or --model.vocab_size, or the batch (--batch-size, --train.grad_accum_steps), "
        "or add --train.activation_checkpointing=full or --train.parallel=fsdp")


def preflight(cfg: TrainConfig, device=None, micro_batch: int | None = None, world_size: int = 1) -> None:
    """Fail now on what would otherwise fail only after data preparation or after training:
    paths, the memory, the final sample's prompt, the wandb package. (A ``--data.tokenizer_dir``
    is checked against the model where it is loaded, once, in ``cs336.prepare``, before encoding.)"""
    check_paths(cfg)
    check_threads(cfg.train.threads)
    if device is not None and micro_batch is not None:
        check_memory(cfg, device, micro_batch, world_size)
    if cfg.train.sample_tokens > 0 and not cfg.train.sample_prompt:
        raise ConfigError("train.sample_prompt is empty; the final sample needs a prompt: pass "
                          "--train.sample_prompt=TEXT or --train.sample_tokens=0")
    if cfg.train.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb needs the wandb package, which is not installed; pip install wandb "
                          "or drop --wandb")


def config_conflicts(saved: dict, requested: dict, *, allowed: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """``"section.field: saved X, requested Y"`` for each leaf where two nested config dicts
    differ, except the dotted names in ``allowed``."""
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


def resume_conflicts(saved: dict, requested: dict) -> list[str]:
    """``config_conflicts`` of two config dicts, less what a resume may change."""
    optim = {**saved.get("optim", {}), **requested.get("optim", {})}
    allowed = RESUME_MAY_CHANGE + tuple(f"optim.{k}" for k in optim if f"optim.{k}" not in RESUME_FIXED)
    return config_conflicts(saved, requested, allowed=allowed)


def check_resume_payload(cfg: TrainConfig, path: Path, payload: dict) -> None:
    """The checkpoint a resume would load (``payload``, as read from ``path``) fits the run: its
    model settings are the config's, and a single file holds the optimizer state and the batch
    sampler a run continues with. Checked before data preparation, not after it."""
    check_model_config(str(path), payload["model_config"], cfg.model)
    if is_sharded_checkpoint(path):  # consolidated without its optimizer; the shards hold it
        return
    if payload["optimizer"] is None:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state, so the run cannot continue from "
                              "it; resume from a checkpoint written by python -m cs336.train, or start a new run")
    if "data_rng" not in payload["extra"]:
        raise CheckpointError(f"{path} has no batch-sampler state (it was not written by python -m cs336.train), "
                              "so the run cannot continue exactly; start a new run and load its weights instead")


def _open_on_main(cfg: TrainConfig, resume: bool) -> tuple[Path, Path | None, RunLock, dict | None]:
    out = cfg.train.out_dir
    if resume:
        assert out is not None  # open_run_dir refuses --resume without --out-dir
        if not is_run_dir(out):
            raise RunDirError(f"--resume: {out} is not a run directory of python -m cs336.train; pass the "
                              "--out-dir of an earlier run")
        path = Path(out)
    else:
        path = claim_run_dir(out) if out is not None else new_run_dir()
    lock = RunLock(path).acquire()
    try:
        rd = RunDir(path)
        latest = rd.latest_checkpoint() if rd.checkpoints.is_dir() else None
        if resume and latest is None:
            raise RunDirError(f"--resume: {rd.checkpoints} has no checkpoint to resume from; drop --resume "
                              "to start a new run there")
        if not resume and rd.checkpoint_files():
            raise RunDirError(f"{rd.path} already holds checkpoints; pass --resume to continue that run or "
                              "choose a new --out-dir")
        # resume: latest is set (checked above); a corrupt file names the previous valid one
        payload = read_checkpoint(cast(Path, latest)) if resume else None
        if payload is not None:
            check_resume_payload(cfg, cast(Path, latest), payload)
        if payload is not None and int(payload["iteration"]) > cfg.train.max_steps:
            raise FlagError(f"--resume: {latest} is at step {int(payload['iteration'])}, past "
                            f"--train.max_steps={cfg.train.max_steps}, so there is nothing to train and the run's "
                            f"config.json would contradict its checkpoints; pass --max-steps of at least "
                            f"{int(payload['iteration'])}")
        if out is None or Path(out).resolve().parent == Path("runs").resolve():
            link_latest(path)
    except BaseException:
        lock.release()
        raise
    return path, latest, lock, payload


def open_run_dir(cfg: TrainConfig, resume: bool, info: dist_utils.DistInfo
                 ) -> tuple[RunDir, Path | None, RunLock | None, dict | None]:
    """(run directory, latest checkpoint when resuming, the lock rank 0 holds, and on rank 0 that
    checkpoint's dict as read and verified here, so the resume does not read it again)."""
    if resume and cfg.train.out_dir is None:
        raise ConfigError("--resume needs the run directory: pass --out-dir DIR")
    outcome: tuple[str | None, str | None, str | None] | None
    lock, payload, error, outcome = None, None, None, None
    if info.is_main:
        try:
            main_path, main_latest, lock, payload = _open_on_main(cfg, resume)
            outcome = (str(main_path), None if main_latest is None else str(main_latest), None)
        except Exception as exc:  # every rank must learn of it, or the others wait forever
            error = exc
            outcome = (None, None, str(exc))
    if info.enabled:
        outcome = dist_utils.broadcast_object(outcome, info)
    if error is not None:
        raise error
    assert outcome is not None  # set on rank 0, broadcast to the others
    path, latest, message = outcome
    if message is not None:  # another rank: the same error, printed by rank 0 only
        raise RunDirRefused(message)
    assert path is not None  # no error: rank 0 sent its path
    return RunDir(path), None if latest is None else Path(latest), lock, payload
