"""AdamW and the cosine learning-rate schedule of CS336 assignment 1 (section 4).

``AdamW`` is a ``torch.optim.Optimizer`` whose update is the handout's Algorithm 2 (Loshchilov &
Hutter 2019, "Decoupled Weight Decay Regularization"):

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    a_t = lr sqrt(1 - b2^t) / (1 - b1^t)
    p <- p - a_t m / (sqrt(v) + eps);   p <- p - lr * weight_decay * p

The arithmetic lives behind the dispatch seam (``cs336.ops.adamw_step_``): each step hands every
param group's tensors to it as lists, so the Triton backend updates them in one fused kernel per
dtype and the native one in a few ``torch._foreach_*`` calls. ``fused=None`` follows the seam's
backend in force when ``step()`` runs (the trainer and ``cs336.profile`` step inside
``ops.use_backend(model kernels)``, so it is the model's backend); ``True`` forces Triton,
``False`` the reference.

Deviation from ``torch.optim.AdamW``: torch decays the weights before the Adam update
(``p *= 1 - lr*wd`` first), the handout after it; the two differ by a term of order
lr^2 * wd per step. The step counter is a Python int in ``state["step"]`` (checkpointable with
``weights_only=True``); ``exp_avg``/``exp_avg_sq`` have the parameter's dtype. Sharded (FSDP) parameters keep DTensor
moments, and the step runs on each rank's local shards (``cs336.parallel.local``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

from cs336 import ops
from cs336.parallel import local


class AdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay (handout Algorithm 2); see the module docstring."""

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, fused: bool | None = None):
        if not lr >= 0.0:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must lie in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"AdamW: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay}")
        if fused not in (None, True, False):
            raise ValueError(f"AdamW: fused must be None, True or False, got {fused!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)
        super().__init__(params, defaults)

    @staticmethod
    def _backend(fused: bool | None) -> str | None:
        return None if fused is None else ("triton" if fused else "torch")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Parameters skipped in earlier steps (no grad) have smaller step counts, so bucket
            # by count: each bucket is one call with one bias correction.
            buckets: dict[int, tuple[list, list, list, list]] = defaultdict(lambda: ([], [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = int(state["step"]) + 1
                params, grads, exp_avgs, exp_avg_sqs = buckets[state["step"]]
                # Under FSDP the tensors are DTensors: every backend steps this rank's shards.
                params.append(local(p))
                grads.append(local(p.grad))
                exp_avgs.append(local(state["exp_avg"]))
                exp_avg_sqs.append(local(state["exp_avg_sq"]))
            beta1, beta2 = group["betas"]
            for t, (params, grads, exp_avgs, exp_avg_sqs) in buckets.items():
                ops.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, step=t, lr=group["lr"],
                                beta1=beta1, beta2=beta2, eps=group["eps"],
                                weight_decay=group["weight_decay"],
                                backend=self._backend(group["fused"]))
        return loss


def lr_cosine_schedule(it: int, max_lr: float, min_lr: float, warmup_iters: int,
                       cosine_cycle_iters: int) -> float:
    """Learning rate at iteration ``it`` (handout section 4.4).

    Linear warm-up ``it / warmup_iters * max_lr`` for ``it < warmup_iters``; cosine decay from
    ``max_lr`` to ``min_lr`` for ``warmup_iters <= it <= cosine_cycle_iters``; ``min_lr`` after.
    """
    if warmup_iters < 0 or cosine_cycle_iters < warmup_iters:
        raise ValueError(
            f"lr_cosine_schedule needs 0 <= warmup_iters <= cosine_cycle_iters, got "
            f"warmup_iters={warmup_iters}, cosine_cycle_iters={cosine_cycle_iters}"
        )
    if it < warmup_iters:
        return it / warmup_iters * max_lr
    if it > cosine_cycle_iters:
        return min_lr
    if cosine_cycle_iters == warmup_iters:  # no decay phase: the single point is the peak
        return max_lr
    progress = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(progress * math.pi)) * (max_lr - min_lr)
