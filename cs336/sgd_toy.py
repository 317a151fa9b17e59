"""The handout's learning-rate toy (problem learning_rate_tuning) for ``python -m cs336.experiments
sgd-toy``: plain SGD whose step decays as ``lr / sqrt(t + 1)`` on ``mean(w ** 2)``.

Kept apart from ``cs336.experiments`` so that the command line imports torch only when the toy
runs. The analysis of the three learning rates is in the ``cs336.experiments`` docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class SGD(torch.optim.Optimizer):
    """SGD with the handout's decaying step: ``p <- p - lr / sqrt(t + 1) * grad``, t counted per
    parameter from 0."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3) -> None:
        if not lr >= 0:
            raise ValueError(f"SGD learning rate must be non-negative, got {lr!r}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]  # torch's overloads, in one signature
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
