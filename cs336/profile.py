"""Profile a few training steps with torch.profiler: a Chrome/Perfetto trace and a top-ops table.

    python -m cs336.profile [--model tinystories] [--d-model 128 --num-layers 2 ...] \
        [--batch-size 2] [--kernels auto|torch|native|triton] [--device auto|cpu|cuda] \
        [--wait 1 --warmup 1 --active 3] [--out profiles/<run>] [--row-limit 30]

Runs ``wait + warmup + active`` steps (zero_grad, loss forward, backward, AdamW step, each under
a ``record_function`` label) of a model built from a preset plus overrides, on random tokens,
inside ``torch.profiler.profile`` with ``schedule(wait, warmup, active)`` and
``record_shapes=True``. Writes ``<out>/step<N>.json`` (N = the step count when the active window
closed; open it in https://ui.perfetto.dev or chrome://tracing) and ``<out>/key_averages.txt``
(the top ops by self time, grouped by op name and input shapes), and prints the table. On CUDA
the steps run under ``torch.autocast(bfloat16)`` and the table is sorted by self device time.
``profile_steps`` is the reusable part (``train --profile`` can call it with its own step).
See profiles/README.md for reading the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, record_function

from cs336 import ops
from cs336.config import KERNEL_BACKENDS, MODEL_PRESETS, ConfigError, model_preset

_OVERRIDES = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff")


@dataclass(frozen=True)
class ProfileResult:
    traces: list[Path]
    """One Chrome trace per completed active window."""
    table_path: Path
    table: str


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def profile_steps(step_fn: Callable[[], object], out_dir: str | Path, wait: int = 1,
                  warmup: int = 1, active: int = 3, *, row_limit: int = 30,
                  sort_by: str | None = None) -> ProfileResult:
    """Call ``step_fn`` ``wait + warmup + active`` times under torch.profiler.

    The schedule skips ``wait`` steps, warms the profiler up for ``warmup`` steps and records
    ``active`` steps; then ``out_dir/step<N>.json`` (Chrome trace) and ``out_dir/key_averages.txt``
    (ops sorted by ``sort_by``, default self CUDA time when a GPU is present, self CPU time
    otherwise, grouped by input shape) are written atomically.
    """
    for name, value, low in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"profile {name} must be an integer >= {low}, got {value!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"profile output {out} exists and is not a directory; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = sort_by or ("self_device_time_total" if cuda else "self_cpu_time_total")
    traces: list[Path] = []
    tables: list[str] = []

    def on_trace_ready(prof: torch.profiler.profile) -> None:
        path = out / f"step{prof.step_num}.json"
        tmp = out / f".step{prof.step_num}.json.tmp"
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, path)
        traces.append(path)
        tables.append(prof.key_averages(group_by_input_shape=True).table(
            sort_by=sort_by, row_limit=row_limit, max_name_column_width=60,
            max_shapes_column_width=60))

    schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=True,
                                on_trace_ready=on_trace_ready) as prof:
        for _ in range(wait + warmup + active):
            step_fn()
            prof.step()
    table_path = out / "key_averages.txt"
    _write_text(table_path, tables[-1])
    return ProfileResult(traces, table_path, tables[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cs336.profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinystories", help=f"preset: {', '.join(MODEL_PRESETS)}")
    for name in _OVERRIDES:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"override the preset's {name}")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per step (default 2)")
    p.add_argument("--kernels", default="auto", help=f"kernel backend: {', '.join(KERNEL_BACKENDS)}")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--wait", type=int, default=1, help="steps before profiling (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="profiler warm-up steps (default 1)")
    p.add_argument("--active", "--steps", dest="active", type=int, default=3,
                   help="recorded steps (default 3)")
    p.add_argument("--out", default=None, help="output directory (default profiles/<model>-<time>)")
    p.add_argument("--row-limit", type=int, default=30, help="rows in the top-ops table")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}; valid choices: auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def make_train_step(args: argparse.Namespace) -> tuple[Callable[[], torch.Tensor], dict]:
    """A closure running one training step of the requested model, and a description of it."""
    from cs336.model import TransformerLM
    from cs336.optim import AdamW

    cfg = model_preset(args.model)
    changes = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    cfg = dataclasses.replace(cfg, kernels=args.kernels, **changes)
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be a positive integer, got {args.batch_size}")
    device = _device(args.device)
    ops.resolve_backend(cfg.kernels)  # a clear error now if the backend cannot run here
    torch.manual_seed(0)
    model = TransformerLM.from_config(cfg, device=device)
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.context_length + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) inputs and next-token targets
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def step() -> torch.Tensor:
        with record_function("zero_grad"):
            opt.zero_grad(set_to_none=True)
        with record_function("forward"), ops.use_backend(cfg.kernels), autocast:
            loss = model.loss(x, y)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"), ops.use_backend(cfg.kernels):
            opt.step()
        return loss.detach()

    return step, {"model": args.model, "device": str(device), **dataclasses.asdict(cfg),
                  "batch_size": args.batch_size}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        step, info = make_train_step(args)
        out = Path(args.out or f"profiles/{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        result = profile_steps(step, out, args.wait, args.warmup, args.active, row_limit=args.row_limit)
    except (ConfigError, ops.BackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(result.table)
    print(f"profiled {args.active} steps of {info['model']} (d_model={info['d_model']}, "
          f"layers={info['num_layers']}, batch {info['batch_size']} x {info['context_length']}, "
          f"kernels={info['kernels']}, {info['device']}): trace {result.traces[-1]}, "
          f"table {result.table_path}")


if __name__ == "__main__":
    main()
