"""The CS336 handout's experiments, one command each.

    python -m cs336.experiments sgd-toy [--lrs 1e1,1e2,1e3] [--steps 10] [--seed 0]
    python -m cs336.experiments list
    python -m cs336.experiments run lr|batch|norm|rope|ffn [--out DIR] [--set key=value ...]

``sgd-toy`` is the learning-rate toy of the handout (section 4.2): a 10x10 weight tensor drawn as
``5 * randn`` (seeded), loss ``mean(w ** 2)``, and plain SGD whose step decays as
``lr / sqrt(t + 1)``; it prints the loss at every step for each learning rate. The gradient of
the loss is ``2 w / 100``, so one step multiplies w by ``1 - lr / (50 sqrt(t + 1))``: lr 1e1
shrinks w slowly, 1e2 flips it at t = 0 and then converges fast, and 1e3 multiplies |w| by 19 at
the first step and diverges.

``run NAME`` runs one of the named small-scale sweeps recorded in EXPERIMENTS.md through
``cs336.sweep`` (a grid over one config field on the default config, at a scale that fits a
2-core CPU); ``list`` prints them with their grids.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Sequence

import torch


class SGD(torch.optim.Optimizer):
    """SGD with the handout's decaying step: ``p <- p - lr / sqrt(t + 1) * grad``, t counted per
    parameter from 0."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3) -> None:
        if not lr >= 0:
            raise ValueError(f"SGD learning rate must be non-negative, got {lr!r}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                t = state.get("t", 0)
                p.add_(p.grad, alpha=-lr / math.sqrt(t + 1))
                state["t"] = t + 1
        return loss


def sgd_toy(lr: float, steps: int = 10, seed: int = 0) -> list[float]:
    """Loss before each of ``steps`` SGD steps on ``mean(w ** 2)``, w = 5 * randn(10, 10)."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.nn.Parameter(5 * torch.randn((10, 10), generator=generator))
    optimizer = SGD([weights], lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (weights**2).mean()
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
    return losses


def format_sgd_toy(results: dict[float, list[float]]) -> str:
    """A table: one row per step, one column per learning rate."""
    lrs = list(results)
    steps = max(len(v) for v in results.values())
    header = ["step"] + [f"lr={lr:g}" for lr in lrs]
    rows = [[str(t)] + [f"{results[lr][t]:.4g}" for lr in lrs] for t in range(steps)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header, *rows])


def _parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lrs {text!r}: expected comma-separated numbers, e.g. --lrs 1e1,1e2,1e3") from None
    if not lrs or any(not (lr >= 0 and math.isfinite(lr)) for lr in lrs):
        raise argparse.ArgumentTypeError(f"--lrs {text!r}: expected non-negative finite numbers")
    return lrs


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cs336.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("sgd-toy", help="the handout's SGD learning-rate toy")
    toy.add_argument("--lrs", type=_parse_lrs, default=[1e1, 1e2, 1e3],
                     help="comma-separated learning rates (default 1e1,1e2,1e3)")
    toy.add_argument("--steps", type=_positive_int, default=10, help="SGD steps (default 10)")
    toy.add_argument("--seed", type=int, default=0, help="seed for the initial weights (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "sgd-toy":
        results = {lr: sgd_toy(lr, args.steps, args.seed) for lr in args.lrs}
        print(format_sgd_toy(results))
        verdicts = []
        for lr, losses in results.items():
            if not all(math.isfinite(v) for v in losses) or losses[-1] > losses[0]:
                verdicts.append(f"lr={lr:g} diverges")
            else:
                verdicts.append(f"lr={lr:g} {losses[0]:.3g} -> {losses[-1]:.3g}")
        print("summary: " + "; ".join(verdicts))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
