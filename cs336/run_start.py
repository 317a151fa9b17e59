"""Starting a training run safely: what it is doing (for an interruption), the run directory's
claim and lock, the resume checks, and the checks that must come before any work.

- ``Stage``: the trainer records what it is doing ("preparing data in DIR/data", "training") and
  what is kept; ``python -m cs336.train`` prints ``stage.report()`` as its one line when SIGINT
  or SIGTERM ends the run outside the training loop (the loop itself saves a checkpoint and
  returns normally).
- ``open_run_dir(cfg, resume, info)``: rank 0 creates or claims the directory
  (``cs336.run_guard``: ``new_run_dir("runs")`` without ``--out-dir``, else ``claim_run_dir``,
  which refuses an ordinary non-empty directory), takes its ``RunLock`` for the whole run (a
  second run in the same directory fails at once naming the holder), checks that a new run
  finds no checkpoints and that ``--resume`` finds an intact one (checksum verified, so a
  corrupt checkpoint is refused naming the previous valid one before any data work). The
  outcome is broadcast, so under DDP every rank raises the same error (only rank 0 prints it).
- ``resume_conflicts(saved, requested)``: the fields a ``--resume`` may not change (model shape,
  data, seed, batch and context length); checked before anything is written.
- ``preflight(cfg)``: checks that would otherwise fail only after data preparation or after
  training (input paths, the final sample's prompt, the wandb package, a tokenizer directory
  too large for the model), made before any file is written.
"""

from __future__ import annotations

from pathlib import Path

from cs336 import distributed as dist_utils
from cs336.config import ConfigError, TrainConfig
from cs336.run_dir import RunDir, RunDirError
from cs336.run_guard import RunDirRefused, RunLock, claim_run_dir, config_conflicts, is_run_dir, new_run_dir

RESUME_MAY_CHANGE = (
    "model.kernels",
    "train.out_dir", "train.max_steps", "train.eval_interval", "train.eval_batches", "train.log_interval",
    "train.checkpoint_interval", "train.keep_last", "train.device", "train.autocast", "train.tf32",
    "train.compile", "train.threads", "train.wandb", "train.wandb_mode", "train.wandb_project",
    "train.wandb_group", "train.profile", "train.sample_prompt", "train.sample_tokens",
    "train.sample_temperature", "train.sample_top_p", "train.progress", "train.grad_accum_steps",
    "train.diverge_loss_factor", "train.diverge_grad_norm", "train.diverge_max_weight",
    "data.data_dir", "data.dataset_base_url",
)
"""Dotted fields a resumed run may set differently from its config.json; the whole ``optim``
section may change too (e.g. a lower learning rate after divergence, as its message advises)."""


class Stage:
    """What the run is doing and what is kept, for the one-line interruption report."""

    def __init__(self) -> None:
        self.doing = "checking the configuration"
        self.kept = "nothing was written"

    def set(self, doing: str, kept: str) -> None:
        self.doing, self.kept = doing, kept

    def report(self) -> str:
        return f"stopped while {self.doing}; {self.kept}"


def resume_conflicts(saved: dict, requested: dict) -> list[str]:
    """``config_conflicts`` of two config dicts, the fields a resume may change left out."""
    allowed = RESUME_MAY_CHANGE + tuple(f"optim.{k}" for k in {**saved.get("optim", {}), **requested.get("optim", {})})
    return config_conflicts(saved, requested, allowed=allowed)


def _open_on_main(cfg: TrainConfig, resume: bool) -> tuple[Path, Path | None, RunLock, dict | None]:
    out = cfg.train.out_dir
    if resume:
        if out is None or not is_run_dir(out):  # (open_run_dir refuses a resume without --out-dir)
            raise RunDirError(f"--resume: {out} is not a run directory of python -m cs336.train; pass the "
                              "--out-dir of an earlier run")
        path = Path(out)
    else:
        path = claim_run_dir(out) if out is not None else new_run_dir("runs")
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
        payload = None
        if resume and latest is not None:
            from cs336.checkpoint import read_checkpoint

            payload = read_checkpoint(latest)  # checksum and archive; a corrupt file names the previous valid one
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
    lock, payload, error = None, None, None
    outcome: tuple[str | None, str | None, str | None] | None = None  # (path, latest, error message)
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
    assert path is not None
    return RunDir(path), None if latest is None else Path(latest), lock, payload


def check_paths(cfg: TrainConfig) -> None:
    """Every input path of the config exists and is readable (``cs336.validate``)."""
    from cs336.validate import existing_dir, existing_file, writable_dir

    d = cfg.data
    for flag, path in (("--train-text", d.train_text), ("--valid-text", d.valid_text),
                       ("--data.train_tokens", d.train_tokens), ("--data.valid_tokens", d.valid_tokens)):
        if path is not None:
            existing_file(flag, path)
    for flag, path in (("--train-text", d.train_text), ("--valid-text", d.valid_text)):
        if path is not None and Path(path).stat().st_size == 0:
            raise ConfigError(f"{flag} {path} is empty; pass a file with text in it")
    if d.tokenizer_dir is not None:
        src = existing_dir("--data.tokenizer_dir", d.tokenizer_dir)
        for name in ("vocab.json", "merges.txt"):
            existing_file(f"--data.tokenizer_dir ({name})", src / name)
    if cfg.train.out_dir is not None:
        writable_dir("--out-dir", cfg.train.out_dir)
    if d.source in ("tinystories", "owt"):
        writable_dir("--data.data_dir", d.data_dir)


def device_memory(device) -> int | None:
    """Total memory of ``device`` in bytes (CPU: physical RAM); None when unknown."""
    import os

    import torch

    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


def check_memory(cfg: TrainConfig, device, micro_batch: int) -> None:
    """Refuse a model and micro-batch whose training memory (``cs336.flops.training_memory``:
    fp32 parameters, gradients, AdamW m and v, saved activations) exceeds the device's total
    memory: the run would fail allocating, after data preparation."""
    from cs336.flops import training_memory

    total = device_memory(device)
    if total is None:
        return
    act_bytes = 2 if cfg.train.autocast == "bf16" else 4
    memory = training_memory(cfg.model, micro_batch, cfg.context_length, act_bytes=act_bytes)
    need = sum(memory.values())
    if need <= total:
        return
    fixed = sum(v for k, v in memory.items() if not k.startswith("activations."))
    raise ConfigError(
        f"training this model needs about {need / 1e9:.3g} GB ({fixed / 1e9:.3g} GB for parameters, "
        f"gradients and AdamW state, the rest for the activations of {micro_batch} sequences of "
        f"{cfg.context_length} tokens) but {device} has {total / 1e9:.3g} GB; lower --model.d_model, "
        "--model.num_layers or --model.vocab_size, or the batch (--batch-size, --train.grad_accum_steps)")


def preflight(cfg: TrainConfig, device=None, micro_batch: int | None = None) -> None:
    """Fail now on what would otherwise fail only after all the training work, or after data
    preparation: input paths, the final sample's prompt, the wandb package, a tokenizer
    directory with more ids than the model has rows, a model too large for the device."""
    check_paths(cfg)
    if device is not None and micro_batch is not None:
        check_memory(cfg, device, micro_batch)
    if cfg.train.sample_tokens > 0 and not cfg.train.sample_prompt:
        raise ConfigError("train.sample_prompt is empty; the final sample needs a prompt: pass "
                          "--train.sample_prompt=TEXT or --train.sample_tokens=0")
    if cfg.train.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("--wandb needs the wandb package, which is not installed; pip install wandb "
                              "or drop --wandb")
    if cfg.data.tokenizer_dir is not None:
        from cs336.run_guard import check_tokenizer_fits_model
        from cs336.tokenizer.gpt2_files import load_vocab_merges

        src = Path(cfg.data.tokenizer_dir)
        vocab, _ = load_vocab_merges(src / "vocab.json", src / "merges.txt")
        known = set(vocab.values())
        n = max(vocab) + 1 + sum(t.encode() not in known for t in cfg.data.special_tokens)
        try:
            check_tokenizer_fits_model(n, cfg.model.vocab_size, tokenizer=f"the tokenizer in {src}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
