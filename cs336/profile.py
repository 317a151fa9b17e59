"""Profile a few training steps with torch.profiler: a Chrome/Perfetto trace and a top-ops table.

    python -m cs336.profile [--model tinystories|gpt2-small|...] [--model.d_model=128 ...] \
        [--batch-size 2] [--kernels BACKEND] [--device auto|cpu|cuda|mps] \
        [--wait 1 --warmup 1 --active 3] [--out-dir profiles/<run>] [--row-limit 30]

The model and batch come from the same flags as ``python -m cs336.train`` (``cs336.cli``; the
default preset here is ``profile``: the TinyStories model, 2 sequences per step). Runs
``wait + warmup + active`` steps (zero_grad, loss forward and backward per micro-batch of
``--train.grad_accum_steps``, gradient clipping, AdamW step, each under a ``record_function``
label; the optimizer step runs under the model's kernel backend; ``--train.activation_checkpointing``,
``--train.z_loss`` and ``--train.compile`` apply as in training, ``--train.parallel=fsdp`` is refused) on random
tokens, inside ``torch.profiler.profile`` with ``schedule(wait, warmup, active)`` and
``record_shapes=True``. Writes ``<out>/step<N>.json`` (N = the step count when the active window
closed; open it in https://ui.perfetto.dev or chrome://tracing) and ``<out>/key_averages.txt``
(the top ops by self time, grouped by op name and input shapes), and prints the table. On CUDA
the table is sorted by self device time. ``--train.autocast=bf16`` profiles the mixed-precision
step, as it trains.
``StepProfiler`` is the reusable part: a context manager whose ``step()`` the caller's own loop
calls (``train --profile`` does); ``profile_steps`` drives it with a step function. See
profiles/README.md for reading the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cs336.cli import add_config_arguments, config_from_args, parse_args, positive_int
from cs336.config import ConfigError, TrainConfig, check_positive
from cs336.fileio import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ProfileResult:
    traces: list[Path]
    """One Chrome trace per completed active window."""
    table_path: Path
    table: str


class StepProfiler:
    """``with StepProfiler(out_dir, wait, warmup, active) as prof:`` then ``prof.step()`` after each
    step of the caller's loop. The schedule skips ``wait`` steps, warms the profiler up for
    ``warmup`` steps and records ``active`` steps; the profiler stops after them (later ``step()``
    calls do nothing). ``out_dir/step<N>.json`` (Chrome trace) and ``out_dir/key_averages.txt``
    (ops sorted by ``sort_by``, default self CUDA time when a GPU is present, self CPU time
    otherwise, grouped by input shape) are written atomically; ``result`` is set once the window
    is recorded (None if the loop ended first)."""

    def __init__(self, out_dir: str | Path, wait: int = 1, warmup: int = 1, active: int = 3, *,
                 row_limit: int = 30, sort_by: str | None = None):
        check_positive("profile wait", wait, allow_zero=True)
        check_positive("profile warmup", warmup, allow_zero=True)
        check_positive("profile active", active)
        check_positive("profile row_limit", row_limit)  # 0 printed an empty table, < 0 every row
        self.out = Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"profile output {self.out} exists and is not a directory; pass another --out-dir")
        self.total = wait + warmup + active
        self.steps = 0
        self.row_limit = row_limit
        import torch
        from torch.profiler import ProfilerActivity

        cuda = torch.cuda.is_available()
        self.sort_by = sort_by or ("self_device_time_total" if cuda else "self_cpu_time_total")
        self.traces: list[Path] = []
        self.result: ProfileResult | None = None
        self._table: str | None = None
        self._prof = torch.profiler.profile(
            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            record_shapes=True, on_trace_ready=self._on_trace_ready)
        self._running = False

    def _on_trace_ready(self, prof: torch.profiler.profile) -> None:
        path = self.out / f"step{prof.step_num}.json"
        with tempfile.TemporaryDirectory() as tmp:  # export_chrome_trace only writes to a path
            prof.export_chrome_trace(str(Path(tmp) / path.name))
            atomic_write_bytes(path, (Path(tmp) / path.name).read_bytes())
        self.traces.append(path)
        self._table = prof.key_averages(group_by_input_shape=True).table(
            sort_by=self.sort_by, row_limit=self.row_limit, max_name_column_width=60,
            max_shapes_column_width=60)

    def __enter__(self) -> StepProfiler:
        self.out.mkdir(parents=True, exist_ok=True)
        self._prof.__enter__()
        self._running = True
        return self

    def step(self) -> None:
        if not self._running:
            return
        self._prof.step()
        self.steps += 1
        if self.steps == self.total:
            self._stop()

    def _stop(self) -> None:
        self._running = False
        self._prof.__exit__(None, None, None)
        if self._table is not None:
            table_path = self.out / "key_averages.txt"
            atomic_write_text(table_path, self._table)
            self.result = ProfileResult(self.traces, table_path, self._table)

    def __exit__(self, *exc) -> None:
        if self._running:
            self._stop()


def profile_steps(step_fn: Callable[[], object], out_dir: str | Path, wait: int = 1,
                  warmup: int = 1, active: int = 3, *, row_limit: int = 30,
                  sort_by: str | None = None) -> ProfileResult:
    """Call ``step_fn`` ``wait + warmup + active`` times under a ``StepProfiler``."""
    with StepProfiler(out_dir, wait, warmup, active, row_limit=row_limit, sort_by=sort_by) as prof:
        for _ in range(prof.total):
            step_fn()
            prof.step()
    assert prof.result is not None  # set when the last active step's trace was written
    return prof.result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cs336.profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_argument_group("profiler")
    group.add_argument("--wait", type=int, default=1, help="steps before profiling (default 1)")
    group.add_argument("--warmup", type=int, default=1, help="profiler warm-up steps (default 1)")
    group.add_argument("--active", "--steps", dest="active", type=int, default=3,
                       help="recorded steps (default 3)")
    group.add_argument("--row-limit", type=positive_int, default=30, help="rows in the top-ops table")
    add_config_arguments(p, default_preset="profile")
    return p


def make_train_step(cfg: TrainConfig) -> tuple[Callable[[], torch.Tensor], dict]:
    """A closure running one training step of ``cfg``'s model on random tokens, as the trainer
    runs it (activation checkpointing, z-loss, ``torch.compile``, the micro-batches of
    ``train.grad_accum_steps``, gradient clipping), and a description."""
    import torch
    from torch.profiler import record_function

    from cs336 import ops, parallel
    from cs336.distributed import micro_batches
    from cs336.hardware import autocast_for, resolve_device
    from cs336.model import TransformerLM
    from cs336.nn_utils import clip_gradients
    from cs336.optim import build_optimizer
    from cs336.preflight import check_memory

    if cfg.train.parallel == "fsdp":
        raise ConfigError("--train.parallel=fsdp shards the model over torchrun ranks, and the profile runs one "
                          "process; drop the flag to profile the same step unsharded")
    device = resolve_device(cfg.train.device)
    ops.resolve_backend(cfg.model.kernels)  # a clear error now if the backend cannot run here
    B, T = cfg.train.batch_size, cfg.context_length
    micro = micro_batches(slice(0, B), cfg.train.grad_accum_steps)
    check_memory(cfg, device, B // len(micro))  # as train does: refuse, not swap or OOM-kill
    torch.manual_seed(cfg.train.seed)
    model = TransformerLM.from_config(cfg.model, device=device)
    parallel.apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    opt = build_optimizer(model, cfg.optim)
    tokens = torch.randint(0, cfg.model.vocab_size, (B, T + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) inputs and next-token targets
    autocast = autocast_for(cfg.train.autocast, device)
    z_loss = cfg.train.z_loss

    def loss_of(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return model.loss(xb, yb, z_loss=z_loss) if z_loss else model.loss(xb, yb)

    loss_fn = torch.compile(loss_of) if cfg.train.compile else loss_of
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")

    def step() -> torch.Tensor:
        with record_function("zero_grad"):
            opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for rows in micro:
            with record_function("forward"), ops.use_backend(cfg.model.kernels), autocast:
                loss = loss_fn(x[rows], y[rows]) / len(micro)
            with record_function("backward"):
                loss.backward()
            total += loss.detach().float()
        with record_function("clip_gradients"):
            clip_gradients([p for p in model.parameters() if p.grad is not None], clip)
        with record_function("optimizer"), ops.use_backend(cfg.model.kernels):
            opt.step()
        return total

    return step, {"device": str(device), **dataclasses.asdict(cfg.model), "batch_size": B,
                  "seq_len": T}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parse_args(parser, argv)
    from cs336 import ops
    from cs336.cli import run_cli

    def body() -> None:
        cfg = config_from_args(args)
        step, info = make_train_step(cfg)
        name = args.model or args.preset or args.default_preset
        out = Path(cfg.train.out_dir or f"profiles/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        result = profile_steps(step, out, args.wait, args.warmup, args.active, row_limit=args.row_limit)
        print(result.table)
        print(f"profiled {args.active} steps (d_model={info['d_model']}, layers={info['num_layers']}, "
              f"batch {info['batch_size']} x {info['seq_len']}, kernels={info['kernels']}, "
              f"{info['device']}): trace {result.traces[-1]}, table {result.table_path}")

    run_cli(body, user_errors=(ConfigError, ops.BackendError),
            on_interrupt=lambda: "the profile is incomplete; traces already written are kept")


if __name__ == "__main__":
    main()
