"""The main job: train a Transformer LM end to end and sample from it.

    python -m cs336.train                                  # embedded corpus, CPU, minutes
    python -m cs336.train --out-dir runs/a --max-steps 2000 --optim.lr=1e-3
    python -m cs336.train --out-dir runs/a --resume        # continue exactly where it stopped
    python -m cs336.train --preset tinystories --train-text TS-train.txt --valid-text TS-valid.txt
    python -m cs336.train --preset tinystories --dataset tinystories   # downloads the files
    torchrun --nproc_per_node=8 -m cs336.train --preset tinystories --dataset tinystories

Steps: prepare data (generate or download the corpus, train the BPE tokenizer, encode train and
valid text; ``cs336.prepare``), build the model and AdamW, then per step: cosine learning rate,
a random batch, forward/backward (bf16 autocast optional), gradient clipping, optimizer step.
Every ``eval_interval`` steps it measures the validation loss on the first ``eval_batches``
batches of the valid file; every ``checkpoint_interval`` steps it writes a checkpoint. At the end
it plots ``loss.png``, prints a sample and a one-line summary. ``cs336.run_dir`` describes the
run directory. ``--profile`` records the first five steps with ``cs336.profile.profile_steps``
(trace and op table in ``DIR/profile``); ``--wandb`` logs the metrics to Weights & Biases
(offline files under DIR unless ``--train.wandb_mode=online``).

Exact resume: a checkpoint holds model, optimizer, step, the batch sampler's generator state and
the process RNG states, so a resumed run draws the same batches and reaches the same losses as
one that never stopped. SIGINT/SIGTERM finish the current step, save a checkpoint and return
normally (exit status 0). A non-finite loss stops the run before the optimizer step with
``TrainingDiverged``; nothing is saved after it, so the last checkpoint is the last good state.

Data parallel: under torchrun every rank draws the same global batch and trains on its own rows
(``cs336.distributed``); rank 0 prepares data and writes every file.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import signal
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from tqdm import tqdm

from cs336 import distributed as dist_utils
from cs336.checkpoint import CheckpointError, load_checkpoint_full, restore_rng_state, save_checkpoint
from cs336.cli import add_config_arguments, config_from_args, overrides_from_args
from cs336.config import ConfigError, TrainConfig, apply_overrides, load_config
from cs336.data import TokenFileError, get_batch, iter_batches
from cs336.datasets import DatasetError
from cs336.model import TransformerLM
from cs336.nn_utils import clip_gradients
from cs336.ops import BackendError, resolve_backend, use_backend
from cs336.optim import AdamW, lr_cosine_schedule
from cs336.prepare import prepare_data
from cs336.run_dir import RunDir, RunDirError
from cs336.tokenizer.gpt2_files import TokenizerFileError


PROFILE_STEPS = 5
"""Steps recorded by --profile at the start of the run: 1 skipped, 1 warm-up, 3 traced."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``.summary`` holds the run summary up to that point."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class _LossModule(torch.nn.Module):
    """forward(x, y) = model.loss(x, y), so DistributedDataParallel wraps the loss computation."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


class _StopRequest:
    """Records SIGINT/SIGTERM while installed (main thread only) instead of raising."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay with the caller
            self._previous.clear()
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is visible; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device='mps' but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def _default_out_dir() -> Path:
    return Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


@torch.no_grad()
def evaluate(model, valid, cfg: TrainConfig, device, autocast, info) -> float:
    """Mean loss over the first ``eval_batches`` sequential batches of the valid tokens."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    batches = iter_batches(valid, cfg.train.batch_size, cfg.context_length, device,
                           max_batches=cfg.train.eval_batches)
    for i, (x, y) in enumerate(batches):
        if i % info.world_size != info.rank:
            continue
        with autocast():
            loss = model.loss(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    if info.enabled:
        torch.distributed.all_reduce(total)
    model.train()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _summary(rd: RunDir, steps, tracker: dict) -> dict:
    return {"run_dir": str(rd.path), "steps": steps, "final_train_loss": tracker.get("train_loss"),
            "final_val_loss": tracker.get("val_loss"), "best_val_loss": tracker.get("best_val_loss"),
            "tokens_per_s": tracker.get("tokens_per_s"), "wallclock_s": tracker.get("wallclock_s", 0.0)}


def run(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Train per ``cfg``; returns the summary dict (see the module docstring)."""
    device = resolve_device(cfg.train.device)
    info = dist_utils.init_distributed(device.type)
    try:
        return _run(cfg, resume, device, info)
    finally:
        dist_utils.shutdown(info)


def _run(cfg: TrainConfig, resume: bool, device: torch.device, info: dist_utils.DistInfo) -> dict:
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    rows = dist_utils.rank_rows(cfg.train.batch_size, info)
    if resume and cfg.train.out_dir is None:
        raise ConfigError("--resume needs the run directory: pass --out-dir DIR")
    out = dist_utils.broadcast_object(str(cfg.train.out_dir or _default_out_dir()), info)
    rd = RunDir(out)
    latest = rd.latest_checkpoint() if rd.checkpoints.is_dir() else None
    if resume and latest is None:
        raise RunDirError(f"--resume: {rd.checkpoints} has no checkpoint to resume from; drop --resume "
                          "to start a new run there")
    if not resume and rd.checkpoint_files():
        raise RunDirError(f"{rd.path} already holds checkpoints; pass --resume to continue that run or "
                          "choose a new --out-dir")
    # Fail on an unusable kernel backend before any data is generated or encoded.
    resolve_backend(cfg.model.kernels)
    if cfg.optim.fused:
        resolve_backend("triton")
    say = (lambda msg: tqdm.write(msg)) if info.is_main else (lambda msg: None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    if info.is_main:
        rd.create()
        rd.write_config(cfg)
    say(f"config: {json.dumps(asdict(cfg))}")
    say(f"run directory: {rd.path}  device: {device}  ranks: {info.world_size}")

    train_tokens, valid_tokens, tokenizer = prepare_data(cfg, rd, info, say)
    torch.manual_seed(cfg.train.seed)
    model = TransformerLM.from_config(cfg.model, device=device)
    opt = AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                weight_decay=cfg.optim.weight_decay, fused=cfg.optim.fused)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    tracker: dict = {"best_val_loss": None, "wallclock_s": 0.0}
    start = 0
    if resume:
        start = _restore(latest, model, opt, gen, tracker)
        say(f"resumed from {latest} at step {start}")
        if info.is_main:
            rd.truncate_metrics(start)
    step_fn = _LossModule(model)
    if cfg.train.compile:
        step_fn = torch.compile(step_fn)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        step_fn = DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None)
    dtype = torch.bfloat16 if cfg.train.autocast == "bf16" else None

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def log(row: dict) -> None:
        if info.is_main:
            rd.append_metrics(row)
            if wandb_run is not None:
                wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    wandb_run = _init_wandb(cfg, rd) if cfg.train.wandb and info.is_main else None
    max_steps, ctx, B = cfg.train.max_steps, cfg.context_length, cfg.train.batch_size
    cycle = cfg.optim.cosine_cycle_iters or max_steps
    warmup = min(cfg.optim.warmup_iters, cycle)

    def checkpoint(step: int) -> None:
        if info.is_main:
            path = rd.checkpoint_path(step)
            save_checkpoint(model, opt, step, path, config=json.loads(rd.config_file.read_text()),
                            data_rng=gen.get_state(), tracker=dict(tracker))
            rd.mark_latest(path, cfg.train.keep_last)
        dist_utils.barrier(info)

    def do_eval(step: int, row: dict) -> None:
        val = evaluate(model, valid_tokens, cfg, device, autocast, info)
        tracker["val_loss"] = val
        if math.isfinite(val) and (tracker["best_val_loss"] is None or val < tracker["best_val_loss"]):
            tracker["best_val_loss"] = val
        row.update(val_loss=val, perplexity=math.exp(min(val, 50.0)))
        say(f"step {step}: val loss {val:.4f}")

    if start == 0:
        row = {"step": 0, "wallclock_s": 0.0}
        do_eval(0, row)
        log(row)
    window = {"t": time.perf_counter(), "loss": 0.0, "n": 0, "tokens": 0}
    done = {"step": start, "stopped_by": None}
    bar = tqdm(total=max_steps, initial=start, disable=not (cfg.train.progress and info.is_main),
               desc="train", unit="step", dynamic_ncols=True)

    def step_once(it: int, stop: _StopRequest) -> bool:
        """Optimizer step ``it`` (0-based) with its logging and checkpoint; True means stop."""
        lr = lr_cosine_schedule(it, cfg.optim.lr, cfg.optim.floor_lr, warmup, cycle)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_tokens, B, ctx, device, generator=gen)
        with autocast():
            loss = step_fn(x[rows], y[rows])
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(clip_gradients(params, clip))
        loss_value = float(dist_utils.mean_across_ranks(loss.float(), info))
        if not math.isfinite(loss_value):
            bar.close()
            tracker["train_loss"] = loss_value
            last = rd.latest_checkpoint() if info.is_main else None
            raise TrainingDiverged(
                f"loss became {loss_value} at step {it + 1} (lr {lr:.3g}, grad norm {grad_norm:.3g}); "
                f"stopped before the optimizer step. Last good checkpoint: {last or 'none'}. "
                "Lower --optim.lr, raise --optim.warmup_iters, or use --train.autocast=none.",
                _summary(rd, it, tracker))
        with use_backend(cfg.model.kernels):  # AdamW(fused=None) runs on the model's backend
            opt.step()
        opt.zero_grad(set_to_none=True)
        step = done["step"] = it + 1
        window["loss"] += loss_value
        window["n"] += 1
        window["tokens"] += B * ctx
        bar.update(1)
        is_eval = step % cfg.train.eval_interval == 0 or step == max_steps
        stop_now = dist_utils.any_rank(stop.signal is not None, info, device)
        if step % cfg.train.log_interval == 0 or is_eval or stop_now:
            now = time.perf_counter()
            tracker["wallclock_s"] += now - window["t"]
            tracker["train_loss"] = window["loss"] / window["n"]
            tracker["tokens_per_s"] = window["tokens"] / max(now - window["t"], 1e-9)
            row = {"step": step, "train_loss": tracker["train_loss"], "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tracker["tokens_per_s"], "wallclock_s": tracker["wallclock_s"]}
            if is_eval:
                do_eval(step, row)
            log(row)
            bar.set_postfix(loss=f"{tracker['train_loss']:.3f}")
            window.update(t=time.perf_counter(), loss=0.0, n=0, tokens=0)
        if step % cfg.train.checkpoint_interval == 0 or step == max_steps or stop_now:
            checkpoint(step)
        if stop_now:
            done["stopped_by"] = stop.signal or signal.SIGTERM
            say(f"stopped by signal {done['stopped_by']} at step {step}; checkpoint saved, continue "
                f"with --out-dir {rd.path} --resume")
        return stop_now

    with _StopRequest() as stop:
        its = iter(range(start, max_steps))
        stopped = False
        if cfg.train.profile and info.is_main and max_steps - start >= PROFILE_STEPS:
            from cs336.profile import profile_steps

            flags = []
            def profiled() -> None:
                if not any(flags):
                    flags.append(step_once(next(its), stop))

            result = profile_steps(profiled, rd.path / "profile", wait=1, warmup=1, active=PROFILE_STEPS - 2)
            stopped = any(flags)
            say(f"profile of steps {start + 3}-{start + PROFILE_STEPS}: {result.traces[-1]}, {result.table_path}")
        for it in its:
            if stopped or step_once(it, stop):
                break
    bar.close()
    summary = _summary(rd, done["step"], tracker)
    summary["interrupted"] = done["stopped_by"] is not None
    if info.is_main:
        _finish(cfg, rd, model, tokenizer, summary, say)
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        wandb_run.finish()
    return summary


def _restore(path: Path, model, opt, gen: torch.Generator, tracker: dict) -> int:
    """Load ``path`` into model and optimizer, restore the RNGs and the sampler; return its step."""
    state = load_checkpoint_full(path, model, opt)
    extra = state["extra"]
    if "data_rng" not in extra:
        raise CheckpointError(f"{path} has no batch-sampler state (it was not written by "
                              "python -m cs336.train), so the run cannot continue exactly; start a new "
                              "run and load its weights instead")
    gen.set_state(extra["data_rng"])
    tracker.update(extra.get("tracker", {}))
    restore_rng_state(state)
    return int(state["iteration"])


def _init_wandb(cfg: TrainConfig, rd: RunDir):
    import wandb

    return wandb.init(project=cfg.train.wandb_project, group=cfg.train.wandb_group, name=rd.path.name,
                      dir=str(rd.path), mode=cfg.train.wandb_mode, config=asdict(cfg))


def _finish(cfg: TrainConfig, rd: RunDir, model, tokenizer, summary: dict, say) -> None:
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

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    say(f"done: {summary['steps']} steps, train loss {fmt(summary['final_train_loss'])}, val loss "
        f"{fmt(summary['final_val_loss'])} (best {fmt(summary['best_val_loss'])}), "
        f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, {summary['wallclock_s']:.1f} s -> {rd.path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cs336.train", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [--resume] [--preset NAME] [--config FILE] "
                                      "[--section.field=VALUE ...]  (--help lists every field)",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir from its latest checkpoint (its config.json is "
                        "the base; flags such as --max-steps apply on top)")
    add_config_arguments(p)
    return p


def config_for(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a command line (for --resume: the run's config.json plus the flags)."""
    if not args.resume:
        return config_from_args(args)
    overrides = overrides_from_args(args)
    out = next((o.split("=", 1)[1] for o in overrides if o.startswith("train.out_dir=")), None)
    if out is None:
        raise ConfigError("--resume needs the run directory: pass --out-dir DIR")
    if args.preset:
        raise ConfigError("--resume takes its config from DIR/config.json; drop --preset")
    cfg = RunDir(out).read_config()
    if args.config:
        cfg = load_config(args.config, cfg)
    return apply_overrides(cfg, overrides)


def _reject_unknown(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """argparse's error for unknown flags, with the closest valid flags suggested."""
    flags = [opt for action in parser._actions for opt in action.option_strings]
    hints = []
    for arg in unknown:
        close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=3)
        hints.append(f"{arg} (did you mean {' / '.join(close)}?)" if close else arg)
    parser.error("unknown arguments: " + ", ".join(hints))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _reject_unknown(parser, unknown)
    try:
        run(config_for(args), resume=args.resume)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except (ConfigError, CheckpointError, TokenFileError, DatasetError, BackendError, RunDirError,
            TokenizerFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    main()
