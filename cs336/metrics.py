"""What a training run reports: the logging window, metrics.jsonl and wandb, the loss plot,
the final sample and the summary line.

``Window`` keeps the loss sum and the last gradient norm on the device between log lines, so
the loop reads them (one host sync) only at log steps, as nanoGPT's ``train.py`` does. A metrics
row goes to ``DIR/metrics.jsonl`` (``cs336.run_dir``, the one appender) and, with ``--wandb``,
to Weights & Biases (offline under DIR unless ``--train.wandb_mode=online``). ``finish`` writes
``loss.png`` (``cs336.plots``) and ``samples.txt``, then the one-line summary. Only rank 0
writes; the callers pass the other ranks nothing to write.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Literal, cast

import torch

from cs336 import distributed as dist_utils
from cs336.config import TrainConfig
from cs336.generate import generate_text
from cs336.plots import plot_losses
from cs336.run_dir import RunDir


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
        loss_sum, grad_norm = torch.stack([self.loss_sum, self.grad_norm.double()]).tolist()
        seconds = time.perf_counter() - self.start
        return loss_sum / self.steps, grad_norm, seconds, self.tokens / max(seconds, 1e-9)


def close_window(window: Window, state) -> dict:
    """Read the window (the log interval's host sync) into ``state``; the metrics row fields."""
    loss, grad_norm, seconds, tokens_per_s = window.read()
    state.train_loss, state.tokens_per_s = loss, tokens_per_s
    state.wallclock_s += seconds
    return {"train_loss": loss, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
            "wallclock_s": state.wallclock_s}


def log_metrics(rd: RunDir, wandb_run, info: dist_utils.DistInfo, row: dict) -> None:
    """One metrics line (rank 0): metrics.jsonl, and wandb when enabled."""
    if not info.is_main:
        return
    rd.append_metrics(row)
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


WandbMode = Literal["online", "offline", "disabled"]  # train.wandb_mode's choices


def init_wandb(cfg: TrainConfig, rd: RunDir):
    import wandb

    return wandb.init(project=cfg.train.wandb_project, group=cfg.train.wandb_group, name=rd.path.name,
                      dir=str(rd.path), mode=cast(WandbMode, cfg.train.wandb_mode), config=asdict(cfg))


def finish(cfg: TrainConfig, rd: RunDir, model, tokenizer, summary: dict, say) -> None:
    """Loss plot, final sample and the one-line summary (rank 0)."""
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
