"""The training loop of ``python -m cs336.train``: state, one step, evaluation, logging, saving.

Read ``train`` from top to bottom: open the run directory, prepare the data, build a
``Trainer`` (model, AdamW, batch sampler, loss wrapper), restore a checkpoint when resuming, then
the loop: learning rate, ``train_step``, the per-step check, and at interval boundaries
``log_metrics`` / ``evaluate`` / ``save``. The structure follows nanoGPT's ``train.py`` (a plain
loop, values read from the device only when logged) with torchtitan's separation of concerns
(a trainer object owning model and optimizer, the profiler a context manager the loop steps).

One step (``Trainer.train_step``): sample the optimizer-step batch of ``train.batch_size``
sequences (every rank draws the same global batch and keeps its rows, ``cs336.distributed``),
split this rank's rows into ``train.grad_accum_steps`` micro-batches, forward and backward each
with its loss divided by the number of micro-batches (so the gradients add up to those of the
whole batch; under DDP only the last micro-batch all-reduces, the others run in ``no_sync``), clip
the gradient norm, check the loss, then the AdamW step under the model's kernel backend
(``ops.use_backend(cfg.model.kernels)``, so ``AdamW(fused=None)`` follows the model).

Host synchronization: one per step, reading the loss and the gradient norm together (one
``tolist()`` of a stacked pair) for the divergence check (``cs336.divergence.DivergenceGuard``: a
non-finite value, a loss spike against the running mean, or a gradient norm above
``train.diverge_grad_norm`` stops the run with ``TrainingDiverged`` before the optimizer step,
naming the last checkpoint whose weights are intact and finite). Before each save the weights
are checked (``check_weights``, one more sync at checkpoint steps): non-finite weights or weights
beyond ``train.diverge_max_weight`` are never written. The per-step loss and gradient norm are
otherwise kept on the device and read every ``log_interval`` steps. Under DDP the step's loss is
summed across ranks on the device (one all-reduce per step, no extra host sync), and the stop
request of SIGINT/SIGTERM is reduced across ranks at log steps only; a single process checks it
every step.

Hook points: ``cs336.run_start.open_run_dir`` opens, claims and locks the run directory;
``check_step`` is the per-step check on the loss and gradient norm; ``Stage`` (updated as the run
moves from data preparation to training to the final sample) feeds the interruption report.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cs336 import distributed as dist_utils
from cs336 import ops
from cs336.checkpoint import CheckpointError, load_checkpoint_full, restore_rng_state, save_checkpoint
from cs336.checkpoint_integrity import NonFiniteWeightsError, check_weights
from cs336.config import TrainConfig
from cs336.data import get_batch, iter_batches
from cs336.divergence import Diverged, DivergenceGuard
from cs336.hardware import resolve_device
from cs336.interrupt import StopRequest
from cs336.model import TransformerLM
from cs336.nn_utils import clip_gradients
from cs336.optim import AdamW, lr_cosine_schedule
from cs336.prepare import prepare_data
from cs336.run_dir import RunDir
from cs336.run_start import Stage, open_run_dir, preflight

PROFILE_STEPS = 5
"""Steps recorded by --profile at the start of the run: 1 skipped, 1 warm-up, 3 traced."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``.summary`` holds the run summary up to that point."""

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


class Window:
    """Sums over the steps since the last log line, kept on the device until ``read``."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.steps = 0
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int) -> None:
        self.loss_sum += loss
        self.grad_norm = grad_norm
        self.steps += 1
        self.tokens += tokens

    def read(self) -> tuple[float, float, float, float]:
        """(mean loss, last grad norm, seconds, tokens/s) of the window (a host sync)."""
        seconds = time.perf_counter() - self.start
        return (float(self.loss_sum) / self.steps, float(self.grad_norm), seconds,
                self.tokens / max(seconds, 1e-9))


class LossModule(torch.nn.Module):
    """forward(x, y) = model.loss(x, y), so DistributedDataParallel wraps the loss computation."""

    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


class Trainer:
    """Model, optimizer, batch sampler and loss wrapper of one run, with the step functions."""

    def __init__(self, cfg: TrainConfig, rd: RunDir, device: torch.device, info: dist_utils.DistInfo,
                 train_tokens, valid_tokens):
        self.cfg, self.rd, self.device, self.info = cfg, rd, device, info
        self.train_tokens, self.valid_tokens = train_tokens, valid_tokens
        rows = dist_utils.rank_rows(cfg.train.batch_size, info)
        self.micro_batches = dist_utils.micro_batches(rows, cfg.train.grad_accum_steps)
        torch.manual_seed(cfg.train.seed)
        self.model = TransformerLM.from_config(cfg.model, device=device)
        self.opt = AdamW(self.model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                         eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=cfg.optim.fused)
        self.gen = torch.Generator().manual_seed(cfg.train.seed)
        step_fn: Any = LossModule(self.model)  # then maybe torch.compile'd and wrapped in DDP
        if cfg.train.compile:
            step_fn = torch.compile(step_fn)
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            step_fn = DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None)
        self.step_fn = step_fn
        self.dtype = torch.bfloat16 if cfg.train.autocast == "bf16" else None
        self.clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        self.cycle = cfg.optim.cosine_cycle_iters or cfg.train.max_steps
        self.warmup = min(cfg.optim.warmup_iters, self.cycle)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def set_lr(self, step: int) -> float:
        """The cosine schedule's learning rate for optimizer step ``step`` (0-based), applied."""
        lr = lr_cosine_schedule(step, self.cfg.optim.lr, self.cfg.optim.floor_lr, self.warmup, self.cycle)
        for group in self.opt.param_groups:
            group["lr"] = lr
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
            with contextlib.nullcontext() if sync else self.step_fn.no_sync():
                with self.autocast():
                    loss = self.step_fn(x[rows], y[rows]) / n
                loss.backward()
            loss_sum += loss.detach().float()
        grad_norm = clip_gradients([p for p in self.model.parameters() if p.grad is not None], self.clip)
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
            if i % self.info.world_size != self.info.rank:
                continue
            with self.autocast():
                loss = self.model.loss(x, y)
            total[0] += loss.double() * y.numel()
            total[1] += y.numel()
        if self.info.enabled:
            torch.distributed.all_reduce(total)
        self.model.train()
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    def save(self, state: TrainState, guard: DivergenceGuard | None = None) -> None:
        """Checkpoint of step ``state.step`` (rank 0 writes; every rank waits for it). Weights that
        are non-finite or beyond ``train.diverge_max_weight`` are never saved: every rank checks
        its (identical) copy and raises TrainingDiverged."""
        try:
            check_weights(self.model, self.cfg.train.diverge_max_weight, where=f"step {state.step}")
        except NonFiniteWeightsError as exc:
            last = guard.last_good() if guard is not None and self.info.is_main else None
            where = f"Last good checkpoint: {last}" if last is not None else "No good checkpoint exists yet"
            raise TrainingDiverged(f"training diverged: {exc}. {where}", state.summary(self.rd)) from None
        if guard is not None:
            state.guard = guard.state_dict()
        if self.info.is_main:
            path = self.rd.checkpoint_path(state.step)
            save_checkpoint(self.model, self.opt, state.step, path,
                            config=json.loads(self.rd.config_file.read_text()),
                            data_rng=self.gen.get_state(), tracker=state.tracker())
            self.rd.mark_latest(path, self.cfg.train.keep_last)
        dist_utils.barrier(self.info)

    def restore(self, path: Path, payload: dict | None = None) -> TrainState:
        """Load ``path`` (or ``payload``, its dict already read) into model and optimizer, restore
        the RNGs and the sampler."""
        ckpt = load_checkpoint_full(path, self.model, self.opt, payload=payload)
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
    from cs336.profile import StepProfiler

    return StepProfiler(rd.path / "profile", wait=1, warmup=1, active=PROFILE_STEPS - 2)


def run(cfg: TrainConfig, *, resume: bool = False, stage: Stage | None = None) -> dict:
    """Train per ``cfg``; returns the summary dict (see the module docstring). ``stage`` is kept
    up to date with what the run is doing (``cs336.run_start.Stage``)."""
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
    ops.resolve_backend(cfg.model.kernels)
    if cfg.optim.fused:
        ops.resolve_backend("triton")
    preflight(cfg, device, micro[0].stop - micro[0].start)
    rd, latest, lock, payload = open_run_dir(cfg, resume, info)
    try:
        return train_in(cfg, resume, device, info, stage, rd, latest, payload)
    finally:
        if lock is not None:
            lock.release()


def train_in(cfg: TrainConfig, resume: bool, device: torch.device, info: dist_utils.DistInfo, stage: Stage,
             rd: RunDir, latest: Path | None, payload: dict | None = None) -> dict:
    """The run in the opened, locked run directory ``rd``; ``payload``: ``latest`` as already read."""
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
    say(f"config: {json.dumps(asdict(cfg))}")
    say(f"run directory: {rd.path}  device: {device}  ranks: {info.world_size}")

    stage.set(f"preparing data in {rd.data}", f"{kept}; finished files are kept and partial ones removed, "
              "so the same command continues the preparation")
    train_tokens, valid_tokens, tokenizer = prepare_data(cfg, rd, info, say)
    stage.set("building the model", kept)
    trainer = Trainer(cfg, rd, device, info, train_tokens, valid_tokens)
    guard = DivergenceGuard(spike_factor=cfg.train.diverge_loss_factor, max_grad_norm=cfg.train.diverge_grad_norm,
                            checkpoints_dir=rd.checkpoints if info.is_main else None,
                            max_abs_weight=cfg.train.diverge_max_weight)
    state = TrainState()
    if resume:
        assert latest is not None  # open_run_dir refuses a resume with no checkpoint
        state = trainer.restore(latest, payload)
        if state.guard:
            guard.load_state_dict(state.guard)
        say(f"resumed from {latest} at step {state.step}")
        if info.is_main:
            rd.write_config(cfg)
            rd.truncate_metrics(state.step)
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
    summary = {**state.summary(rd), "interrupted": state.stopped_by is not None}
    if info.is_main:
        finish(cfg, rd, trainer.model, tokenizer, summary, say)
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        wandb_run.finish()
    return summary


def close_window(window: Window, state: TrainState) -> dict:
    """Read the window (the log interval's host sync) into ``state``; the metrics row fields."""
    loss, grad_norm, seconds, tokens_per_s = window.read()
    state.train_loss, state.tokens_per_s = loss, tokens_per_s
    state.wallclock_s += seconds
    return {"train_loss": loss, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
            "wallclock_s": state.wallclock_s}


def evaluate(trainer: Trainer, state: TrainState, say) -> dict:
    """Validation loss into ``state`` (best so far too); the metrics row fields."""
    val = trainer.evaluate()
    state.val_loss = val
    if math.isfinite(val) and (state.best_val_loss is None or val < state.best_val_loss):
        state.best_val_loss = val
    say(f"step {state.step}: val loss {val:.4f}")
    return {"val_loss": val, "perplexity": math.exp(min(val, 50.0))}


def log_metrics(rd: RunDir, wandb_run, info: dist_utils.DistInfo, row: dict) -> None:
    """One metrics line (rank 0): metrics.jsonl, and wandb when enabled."""
    if not info.is_main:
        return
    rd.append_metrics(row)
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def init_wandb(cfg: TrainConfig, rd: RunDir):
    import wandb

    return wandb.init(project=cfg.train.wandb_project, group=cfg.train.wandb_group, name=rd.path.name,
                      dir=str(rd.path), mode=cfg.train.wandb_mode,  # type: ignore[arg-type]  # a checked choice
                      config=asdict(cfg))


def finish(cfg: TrainConfig, rd: RunDir, model, tokenizer, summary: dict, say) -> None:
    """Loss plot, final sample and the one-line summary (rank 0)."""
    from cs336.generate import generate_text
    from cs336.plots import plot_losses

    if rd.metrics_file.is_file():
        plot_losses(rd.metrics_file, rd.plot_file, title=rd.path.name)
    if cfg.train.sample_tokens > 0 and not summary["interrupted"]:
        text = generate_text(model, tokenizer, cfg.train.sample_prompt, cfg.train.sample_tokens,
                             temperature=cfg.train.sample_temperature, top_p=cfg.train.sample_top_p,
                             seed=cfg.train.seed)
        with open(rd.samples_file, "a", encoding="utf-8") as fh:
            fh.write(f"=== step {summary['steps']} (T={cfg.train.sample_temperature}, "
                     f"top-p={cfg.train.sample_top_p}) ===\n{text}\n\n")
        say(f"sample:\n{text}\n")
    say(f"done: {summary['steps']} steps, train loss {_fmt(summary['final_train_loss'])}, val loss "
        f"{_fmt(summary['final_val_loss'])} (best {_fmt(summary['best_val_loss'])}), "
        f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, {summary['wallclock_s']:.1f} s -> {rd.path}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
