"""The training loop of ``python -m cs336.train``: state, one step, evaluation, saving.

``train`` reads top to bottom: the checks before work (``cs336.preflight``), the run directory, the
data (``cs336.prepare``), a ``Trainer`` (model, the optimizer of ``cs336.optim.build_optimizer``,
batch sampler, loss wrapper), the checkpoint when resuming, then the loop: learning rate,
``forward_backward`` (gradient accumulation over ``train.grad_accum_steps`` micro-batches,
``no_sync`` on all but the last under DDP), ``check_step``, the optimizer step under the model's
kernel backend, and at interval boundaries the metrics (``cs336.metrics``), evaluation and ``save``.
It follows nanoGPT's ``train.py`` (a plain loop, values read from the device only when logged) and
torchtitan's split of concerns (a trainer object, the profiler a context manager the loop steps).
Host syncs, on every provider: one per step (loss and gradient norm in one ``tolist()`` for
``DivergenceGuard``), one per log line, one per checkpoint (``check_weights``). A resume re-applies
the resolved config's optimizer hyperparameters after loading the optimizer state, so every accepted
``--optim.*`` change takes effect.
"""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from tqdm import tqdm

from cs336 import distributed as dist_utils
from cs336 import ops, parallel
from cs336.checkpoint import (
    CheckpointError,
    NonFiniteWeightsError,
    check_weights,
    load_checkpoint_full,
    read_checkpoint,
    restore_rng_state,
    write_checkpoint,
)
from cs336.config import TrainConfig
from cs336.config_io import changed_fields, config_to_dict
from cs336.data import get_batch, iter_batches
from cs336.divergence import Diverged, DivergenceGuard, recovery_advice
from cs336.hardware import autocast_for, resolve_device
from cs336.interrupt import Stage, StopRequest
from cs336.metrics import Window, close_window, finish, init_wandb, log_metrics
from cs336.model import TransformerLM
from cs336.nn_utils import clip_gradients
from cs336.optim import build_optimizer, schedule_lr, set_group_lrs
from cs336.plots import record_resume
from cs336.preflight import open_run_dir, preflight
from cs336.prepare import SourceTokenizer, prepare_data, source_tokenizer
from cs336.profile import StepProfiler
from cs336.run_dir import RunDir
from cs336.sharded_checkpoint import is_sharded_checkpoint, load_full_into, load_sharded_into, save_sharded

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

PROFILE_STEPS = 5
"""Steps recorded by --profile at the start of the run: 1 skipped, 1 warm-up, 3 traced."""


class TrainingDiverged(RuntimeError):
    """The run stopped as diverged (a non-finite or spiking loss, an exploding gradient norm, or
    weights that may not be saved); ``.summary`` holds the run summary up to that point."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


@dataclass
class TrainState:
    """What the loop knows about the run; saved in every checkpoint (``tracker``) and restored."""

    step: int = 0
    """Optimizer steps done."""
    train_loss: float | None = None
    """Mean train loss of the last logging window."""
    val_loss: float | None = None
    best_val_loss: float | None = None
    tokens_per_s: float | None = None
    """Training throughput of the last logging window."""
    wallclock_s: float = 0.0
    """Seconds spent in training steps, evaluations excluded (summed over resumes)."""
    stopped_by: int | None = None
    """The signal that stopped the run, if one did (not saved)."""
    guard: dict | None = None
    """The divergence guard's running loss mean (``DivergenceGuard.state_dict``)."""

    def tracker(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("step", "stopped_by")}

    def summary(self, rd: RunDir) -> dict:
        return {"run_dir": str(rd.path), "steps": self.step, "final_train_loss": self.train_loss,
                "final_val_loss": self.val_loss, "best_val_loss": self.best_val_loss,
                "tokens_per_s": self.tokens_per_s, "wallclock_s": self.wallclock_s}


class LossModule(torch.nn.Module):
    """forward(x, y) = model.loss(x, y) (with the run's z-loss), so DistributedDataParallel wraps
    the loss computation."""

    def __init__(self, model: TransformerLM, z_loss: float = 0.0):
        super().__init__()
        self.model = model
        self.z_loss = z_loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.z_loss:
            return self.model.loss(x, y, z_loss=self.z_loss)
        return self.model.loss(x, y)


class Trainer:
    """Model, optimizer, batch sampler and loss wrapper of one run, with the step functions."""

    def __init__(self, cfg: TrainConfig, rd: RunDir, device: torch.device, info: dist_utils.DistInfo,
                 train_tokens, valid_tokens):
        self.cfg, self.rd, self.device, self.info = cfg, rd, device, info
        self.config_dict = config_to_dict(cfg)
        self.train_tokens, self.valid_tokens = train_tokens, valid_tokens
        rows = dist_utils.rank_rows(cfg.train.batch_size, info)
        self.micro_batches = dist_utils.micro_batches(rows, cfg.train.grad_accum_steps)
        torch.manual_seed(cfg.train.seed)
        self.model = TransformerLM.from_config(cfg.model, device=device)
        parallel.apply_activation_checkpointing(self.model, cfg.train.activation_checkpointing)
        self.fsdp = info.enabled and cfg.train.parallel == "fsdp"
        if self.fsdp:
            parallel.shard_model(self.model, device, cfg.train.autocast)
        self.opt = build_optimizer(self.model, cfg.optim)
        self.gen = torch.Generator().manual_seed(cfg.train.seed)
        step_fn: torch.nn.Module = LossModule(self.model, cfg.train.z_loss)
        if cfg.train.compile:
            step_fn = cast(torch.nn.Module, torch.compile(step_fn))  # a compiled Module is an OptimizedModule
        if info.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            step_fn = DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None)
        self.step_fn = step_fn
        self.clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")

    def autocast(self):
        return autocast_for(self.cfg.train.autocast, self.device)

    def set_lr(self, step: int) -> float:
        """The schedule's (cosine or wsd) learning rate for optimizer step ``step`` (0-based),
        applied to every param group (Muon's scaled to optim.muon_lr); returns AdamW's."""
        lr = schedule_lr(self.cfg.optim, step, self.cfg.train.max_steps)
        set_group_lrs(self.opt, self.cfg.optim, lr)
        return lr

    def forward_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of one optimizer-step batch, clipped; (mean loss over ranks' batch, grad norm),
        both device tensors. Under DDP the loss is summed across ranks and divided by their count."""
        x, y = get_batch(self.train_tokens, self.cfg.train.batch_size, self.cfg.context_length,
                         self.device, generator=self.gen)
        n = len(self.micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        for i, rows in enumerate(self.micro_batches):
            sync = i == n - 1 or not self.info.enabled
            if self.fsdp:
                context = parallel.micro_batch(self.model, last=i == n - 1)
            else:
                ddp = cast("DistributedDataParallel", self.step_fn)  # not sync: only under DDP
                context = contextlib.nullcontext() if sync else ddp.no_sync()
            with context:
                with self.autocast():
                    loss = self.step_fn(x[rows], y[rows]) / n
                loss.backward()
            loss_sum += loss.detach().float()
        clip = parallel.clip_global if self.fsdp else clip_gradients
        grad_norm = clip([p for p in self.model.parameters() if p.grad is not None], self.clip)
        return dist_utils.mean_across_ranks(loss_sum, self.info), grad_norm

    def optimizer_step(self) -> None:
        with ops.use_backend(self.cfg.model.kernels):
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first ``eval_batches`` sequential batches of the valid tokens."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        batches = iter_batches(self.valid_tokens, self.cfg.train.batch_size, self.cfg.context_length,
                               self.device, max_batches=self.cfg.train.eval_batches)
        for i, (x, y) in enumerate(batches):
            counted = True
            if self.fsdp:  # every rank joins every forward (its all-gathers): its rows of each batch
                xs, ys = (t.tensor_split(self.info.world_size) for t in (x, y))
                counted = ys[self.info.rank].shape[0] > 0  # a short last batch: run row 0, uncounted
                x, y = (xs[self.info.rank], ys[self.info.rank]) if counted else (x[:1], y[:1])
            elif i % self.info.world_size != self.info.rank:
                continue
            with self.autocast():
                loss = self.model.loss(x, y)
            if counted:
                total[0] += loss.double() * y.numel()
                total[1] += y.numel()
        if self.info.enabled:
            torch.distributed.all_reduce(total)
        self.model.train()
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    def save(self, state: TrainState, guard: DivergenceGuard | None = None) -> None:
        """Checkpoint of step ``state.step`` (rank 0 writes; every rank waits for it). Weights that
        are non-finite or beyond ``train.diverge_max_weight`` are never saved: every rank checks
        its (identical) copy, once, and raises TrainingDiverged."""
        try:
            check_weights(self.model, self.cfg.train.diverge_max_weight, where=f"step {state.step}",
                          reduce=parallel.max_across_ranks if self.fsdp else None)
        except NonFiniteWeightsError as exc:
            main_guard = guard if self.info.is_main else None
            advice = main_guard.advice(state.step) if main_guard is not None else recovery_advice(None, None)
            raise TrainingDiverged(f"training diverged: {exc}. {advice}", state.summary(self.rd)) from None
        if guard is not None:
            state.guard = guard.state_dict()
        if self.fsdp:  # every rank writes its shards
            path = self.rd.checkpoint_path(state.step, sharded=True)
            save_sharded(self.model, self.opt, state.step, path, self.info.is_main,
                         config=self.config_dict if self.info.is_main else None,
                         data_rng=self.gen.get_state(), tracker=state.tracker())
            if self.info.is_main:
                self.rd.mark_latest(path, self.cfg.train.keep_last)
        elif self.info.is_main:
            path = self.rd.checkpoint_path(state.step)
            write_checkpoint(self.model, self.opt, state.step, path,
                             {"config": self.config_dict, "data_rng": self.gen.get_state(),
                              "tracker": state.tracker()})
            self.rd.mark_latest(path, self.cfg.train.keep_last)
        dist_utils.barrier(self.info)

    def restore(self, path: Path, payload: dict | None = None) -> TrainState:
        """Load ``path`` (or ``payload``, its dict already read) into model and optimizer, restore
        the RNGs and the sampler."""
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        if is_sharded_checkpoint(path):  # DCP reshards to this run's ranks (or loads whole tensors)
            ckpt = load_sharded_into(path, self.model, self.opt)
        elif self.fsdp:
            ckpt = payload if payload is not None else read_checkpoint(path)
            load_full_into(ckpt, str(path), self.model, self.opt)
        else:
            ckpt = load_checkpoint_full(path, self.model, self.opt, payload=payload)
        # load_state_dict restored the saved param groups; the resolved config's values win
        # (every optimizer hyperparameter the builder set, for any optimizer it builds).
        for group, values in zip(self.opt.param_groups, hyper, strict=True):
            group.update(values)
        extra = ckpt["extra"]
        if "data_rng" not in extra:
            raise CheckpointError(f"{path} has no batch-sampler state (it was not written by "
                                  "python -m cs336.train), so the run cannot continue exactly; start a "
                                  "new run and load its weights instead")
        self.gen.set_state(extra["data_rng"])
        restore_rng_state(ckpt)
        known = {f.name for f in fields(TrainState)}
        saved = {k: v for k, v in extra.get("tracker", {}).items() if k in known}
        state = TrainState(step=int(ckpt["iteration"]), **saved)
        ckpt.clear()  # the model and optimizer hold copies now; callers may still hold this dict
        if payload is not None:  # a sharded checkpoint's consolidated copy (DCP loaded its own)
            payload.clear()
        return state


def check_step(state: TrainState, trainer: Trainer, loss: torch.Tensor, grad_norm: torch.Tensor,
               lr: float, guard: DivergenceGuard) -> None:
    """The per-step check, before the optimizer step: loss and gradient norm are read in one host
    sync (ranks agree, both values are reduced) and given to ``guard``, which raises on a
    non-finite value, a loss spike or an exploding gradient norm; that becomes TrainingDiverged
    naming the last checkpoint whose weights are intact and finite."""
    loss_v, norm_v = torch.stack([loss.detach().float(), grad_norm.detach().float()]).tolist()
    try:
        guard.check(state.step + 1, loss_v, norm_v)
    except Diverged as exc:
        state.train_loss = loss_v
        bf16 = " (or with --train.autocast=none)" if trainer.cfg.train.autocast == "bf16" else ""
        raise TrainingDiverged(f"{exc}{bf16}. At that step: lr {lr:.3g}, gradient norm {norm_v:.3g}",
                               state.summary(trainer.rd)) from None


def profiler_for(cfg: TrainConfig, rd: RunDir, start: int, info: dist_utils.DistInfo):
    """A StepProfiler over the first PROFILE_STEPS steps with --profile (rank 0), else a no-op."""
    if not (cfg.train.profile and info.is_main and cfg.train.max_steps - start >= PROFILE_STEPS):
        return contextlib.nullcontext(None)
    return StepProfiler(rd.path / "profile", wait=1, warmup=1, active=PROFILE_STEPS - 2)


def run(cfg: TrainConfig, *, resume: bool = False, stage: Stage | None = None) -> dict:
    """Train per ``cfg``; returns the summary dict (see the module docstring). ``stage`` is kept
    up to date with what the run is doing (``cs336.interrupt.Stage``)."""
    device = resolve_device(cfg.train.device)
    info = dist_utils.init_distributed(device.type)
    try:
        return train(cfg, resume, device, info, stage or Stage())
    finally:
        dist_utils.shutdown(info)


def train(cfg: TrainConfig, resume: bool, device: torch.device, info: dist_utils.DistInfo,
          stage: Stage) -> dict:
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    # Fail on a batch the ranks and micro-batches cannot split, an unusable kernel backend, or
    # anything else that would fail later, before anything is written.
    micro = dist_utils.micro_batches(dist_utils.rank_rows(cfg.train.batch_size, info), cfg.train.grad_accum_steps)
    if cfg.train.parallel == "fsdp":
        parallel.check_fsdp_launch(info.world_size)
    ops.resolve_backend(cfg.model.kernels)
    if cfg.optim.fused:
        ops.resolve_backend("triton")
    preflight(cfg, device, micro[0].stop - micro[0].start, info.world_size)
    source = source_tokenizer(cfg)  # every rank, so every rank raises the same error
    rd, latest, lock, payload = open_run_dir(cfg, resume, info)
    try:
        return train_in(cfg, resume, device, info, stage, rd, latest, payload, source)
    finally:
        if lock is not None:
            lock.release()


def train_in(cfg: TrainConfig, resume: bool, device: torch.device, info: dist_utils.DistInfo, stage: Stage,
             rd: RunDir, latest: Path | None, payload: dict | None = None,
             source: SourceTokenizer | None = None) -> dict:
    """The run in the opened, locked run directory ``rd``; ``payload``: ``latest`` as already read;
    ``source``: the ``data.tokenizer_dir`` as already read."""
    say = tqdm.write if info.is_main else (lambda msg: None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    kept = (f"the checkpoints in {rd.checkpoints} are unchanged" if resume else
            f"no checkpoint was written yet; the run directory {rd.path} is kept")
    if info.is_main:
        rd.create()
        if not resume:  # a resume writes its config only once its checkpoint has loaded
            rd.write_config(cfg)
    changed = [f for f in changed_fields(cfg) if not f.startswith("train.out_dir=")]  # on the next line
    say(f"config (full: {rd.config_file}): {' '.join(changed) if changed else 'the defaults'}")
    say(f"run directory: {rd.path}  device: {device}  ranks: {info.world_size}")
    say(f"to continue this run if it stops: python -m cs336.train --out-dir {rd.path} --resume")

    stage.set(f"preparing data in {rd.data}", f"{kept}; finished files are kept and partial ones removed, "
              "so the same command continues the preparation")
    train_tokens, valid_tokens, tokenizer = prepare_data(cfg, rd, info, say, source)
    stage.set("building the model", kept)
    trainer = Trainer(cfg, rd, device, info, train_tokens, valid_tokens)
    guard = DivergenceGuard(spike_factor=cfg.train.diverge_loss_factor, max_grad_norm=cfg.train.diverge_grad_norm,
                            checkpoints_dir=rd.checkpoints if info.is_main else None,
                            max_abs_weight=cfg.train.diverge_max_weight)
    state = TrainState()
    if resume:
        assert latest is not None  # open_run_dir refuses a resume without a checkpoint
        state = trainer.restore(latest, payload)
        if state.guard:
            guard.load_state_dict(state.guard)
        say(f"resumed from {latest} at step {state.step}")
        if info.is_main:
            rd.write_config(cfg)
            rd.truncate_metrics(state.step)
            record_resume(rd.path, state.step, state.wallclock_s)  # marked on loss.png
    wandb_run = init_wandb(cfg, rd) if cfg.train.wandb and info.is_main else None
    stage.set("evaluating before training", kept)
    if state.step == 0:
        log_metrics(rd, wandb_run, info, {"step": 0, "wallclock_s": 0.0, **evaluate(trainer, state, say)})

    max_steps, tokens_per_step = cfg.train.max_steps, cfg.train.batch_size * cfg.context_length
    bar = tqdm(total=max_steps, initial=state.step, disable=not (cfg.train.progress and info.is_main),
               desc="train", unit="step", dynamic_ncols=True)
    window = Window(device)
    with StopRequest() as stop, profiler_for(cfg, rd, state.step, info) as profiler:
        while state.step < max_steps:
            lr = trainer.set_lr(state.step)
            loss, grad_norm = trainer.forward_backward()
            check_step(state, trainer, loss, grad_norm, lr, guard)
            trainer.optimizer_step()
            state.step += 1
            window.add(loss, grad_norm, tokens_per_step)
            bar.update(1)
            if profiler is not None:
                profiler.step()

            step = state.step
            is_eval = step % cfg.train.eval_interval == 0 or step == max_steps
            is_log = step % cfg.train.log_interval == 0 or is_eval
            stop_now = (is_log or not info.enabled) and dist_utils.any_rank(stop.signal is not None, info, device)
            if is_log or stop_now:
                row = {"step": step, **close_window(window, state), "lr": lr}
                if is_eval:
                    row.update(evaluate(trainer, state, say))
                log_metrics(rd, wandb_run, info, row)
                bar.set_postfix(loss=f"{state.train_loss:.3f}")
                window = Window(device)
            if step % cfg.train.checkpoint_interval == 0 or step == max_steps or stop_now:
                trainer.save(state, guard)
            if stop_now:
                state.stopped_by = stop.signal or signal.SIGTERM
                say(f"stopped by signal {state.stopped_by} at step {step}; checkpoint saved, continue "
                    f"with --out-dir {rd.path} --resume")
                break
    bar.close()
    last = rd.latest_checkpoint() if info.is_main else None
    stage.set("writing the loss plot and the final sample", f"the checkpoint {last} is saved")
    if profiler is not None and profiler.result is not None:
        say(f"profile of steps 3-{PROFILE_STEPS} of this run: {profiler.result.traces[-1]}, "
            f"{profiler.result.table_path}")
    summary = {**state.summary(rd), "interrupted": state.stopped_by is not None,
               "stop_signal": None if state.stopped_by is None else signal.Signals(state.stopped_by).name}
    model: torch.nn.Module | None = trainer.model
    if trainer.fsdp and cfg.train.sample_tokens > 0 and not summary["interrupted"]:
        model = parallel.full_model_copy(trainer.model, info.is_main)  # the sample runs on rank 0 alone
    if info.is_main:
        finish(cfg, rd, model, tokenizer, summary, say)
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        wandb_run.finish()
    return summary


def evaluate(trainer: Trainer, state: TrainState, say) -> dict:
    """Validation loss into ``state`` (best so far too); the metrics row fields."""
    val = trainer.evaluate()
    state.val_loss = val
    if math.isfinite(val) and (state.best_val_loss is None or val < state.best_val_loss):
        state.best_val_loss = val
    say(f"step {state.step}: val loss {val:.4f}")
    return {"val_loss": val, "perplexity": math.exp(min(val, 50.0))}
