"""AdamW, Muon and the cosine / warmup-stable-decay schedules of CS336 assignment 1 (section 4).

``AdamW`` is the handout's Algorithm 2 (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"):

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    a_t = lr sqrt(1 - b2^t) / (1 - b1^t)
    p <- p - a_t m / (sqrt(v) + eps);   p <- p - lr * weight_decay * p

Deviation from ``torch.optim.AdamW``: torch decays before the update, the handout after it (a
difference of order lr^2 * wd per step); ``state["step"]`` is a Python int (``weights_only=True``).
The arithmetic is ``cs336.ops.adamw_step_``, on the seam's backend at ``step()`` (``fused=None``;
``True`` forces Triton, ``False`` the reference), on each rank's local shards under FSDP. ``Muon``
(Keller Jordan 2024) adds ``use_muon=True`` groups: Nesterov momentum, quintic Newton-Schulz in bf16,
RMS matched to AdamW by ``0.2 sqrt(max(d_out, d_in))`` (Liu et al. 2025, arXiv 2502.16982), decoupled
decay, sharded gradients gathered whole. Moments keep the parameter's dtype. ``build_optimizer`` is
the one constructor; ``schedule_lr`` / ``set_group_lrs`` set rates.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, cast

import torch

from cs336 import ops
from cs336.config import DECAY_SHAPES
from cs336.parallel import local

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


class AdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay (handout Algorithm 2); see the module docstring."""

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, fused: bool | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
        self._check_hyperparameters(defaults)
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults)

    @staticmethod
    def _check_hyperparameters(group: dict) -> None:
        """Raise ``ValueError`` for a group value the update cannot use (defaults and each group)."""
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"AdamW: betas must be two numbers in [0, 1), got {betas!r}")
        for name in ("lr", "eps", "weight_decay"):
            if not group[name] >= 0.0:
                raise ValueError(f"AdamW: {name} must be >= 0, got {group[name]!r}")
        if group["fused"] not in (None, True, False):
            raise ValueError(f"AdamW: fused must be None, True or False, got {group['fused']!r}")

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group`` (the constructor adds its groups with it too),
        with the group's own values (or the defaults) checked as the constructor's arguments."""
        self._check_hyperparameters({**self.defaults, **param_group})
        if "betas" in param_group:
            param_group["betas"] = tuple(param_group["betas"])
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, then every moment checked against its param's
        shape once, here, so the per-step update need not check its lists (torch casts the loaded
        state to each param's dtype and device but keeps the saved shapes)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in enumerate(params):  # i: the state dict's param index
            for key in ("exp_avg", "exp_avg_sq"):
                moment = self.state.get(p, {}).get(key)
                if moment is not None and moment.shape != p.shape:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {key} of param {i} has shape "
                                     f"{tuple(moment.shape)} but the param is {tuple(p.shape)}; the state "
                                     "belongs to another model")

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
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        """The AdamW update of one param group."""
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
            try:
                ops.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, step=t, lr=group["lr"],
                                beta1=beta1, beta2=beta2, eps=group["eps"],
                                weight_decay=group["weight_decay"],
                                backend=self._backend(group["fused"]), check_tensors=False)
            except ops.BackendError as exc:
                if group["fused"] is not True:
                    raise
                # The seam's advice is about the --kernels flag, which did not choose this kernel.
                reason = str(exc).split(". ")[0].rstrip(".").replace("--kernels triton", "the Triton backend")
                raise ops.BackendError(
                    f"AdamW(fused=True) (optim.fused=true) asks for the Triton AdamW kernel, which cannot run "
                    f"here ({reason}). Run on a CUDA device (TRITON_INTERPRET=1 runs it on the CPU, slowly), "
                    "leave fused=None to follow the kernel backend, or set fused=False for the reference step."
                ) from None


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
    _check_iteration("lr_cosine_schedule", it)
    if it < warmup_iters:
        return it / warmup_iters * max_lr
    if it > cosine_cycle_iters:
        return min_lr
    if cosine_cycle_iters == warmup_iters:  # no decay phase: the single point is the peak
        return max_lr
    progress = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(progress * math.pi)) * (max_lr - min_lr)


# ---------------------------------------------------------------------------------------------
# Warmup-stable-decay schedule, and the rates of every param group.
# ---------------------------------------------------------------------------------------------

def lr_wsd_schedule(it: int, max_lr: float, min_lr: float, warmup_iters: int, decay_start: int,
                    total_iters: int, shape: str = "linear") -> float:
    """Warmup-stable-decay (Hagele et al. 2024, arXiv 2405.18392): linear warm-up to ``max_lr``,
    constant until ``decay_start``, then down to ``min_lr`` at ``total_iters``, linearly or as
    ``1 - sqrt(progress)`` (``shape="1-sqrt"``); ``min_lr`` after."""
    if not 0 <= warmup_iters <= decay_start <= total_iters:
        raise ValueError(f"lr_wsd_schedule needs 0 <= warmup_iters <= decay_start <= total_iters, got "
                         f"{warmup_iters}, {decay_start}, {total_iters}")
    if shape not in DECAY_SHAPES:  # checked at every step, not only once the decay has begun
        raise ValueError(f"lr_wsd_schedule: shape={shape!r}; valid choices: {', '.join(DECAY_SHAPES)}")
    _check_iteration("lr_wsd_schedule", it)
    if it < warmup_iters:
        return it / warmup_iters * max_lr
    if it < decay_start:
        return max_lr
    if it >= total_iters:
        return min_lr
    progress = (it - decay_start) / (total_iters - decay_start)
    if shape == "linear":
        return max_lr - (max_lr - min_lr) * progress
    return min_lr + (max_lr - min_lr) * (1.0 - math.sqrt(progress))  # "1-sqrt"


def _check_iteration(fn: str, it: int) -> None:
    """Refuse a negative iteration: the warm-up line would give a negative rate (or divide by a
    warm-up of 0)."""
    if not it >= 0:
        raise ValueError(f"{fn}: it (the iteration) must be >= 0, got {it!r}")


def schedule_lr(cfg, step: int, max_steps: int) -> float:
    """AdamW's learning rate at optimizer step ``step`` (0-based) of a ``max_steps`` run under
    ``cfg`` (an ``OptimConfig``): the handout's cosine, or warmup-stable-decay."""
    if cfg.schedule == "wsd":
        decay_start = max_steps - round(cfg.decay_frac * max_steps)
        warmup = min(cfg.warmup_iters, decay_start)
        return lr_wsd_schedule(step, cfg.lr, cfg.floor_lr, warmup, decay_start, max_steps, cfg.decay_shape)
    cycle = cfg.cosine_cycle_iters or max_steps
    return lr_cosine_schedule(step, cfg.lr, cfg.floor_lr, min(cfg.warmup_iters, cycle), cycle)


def set_group_lrs(opt: torch.optim.Optimizer, cfg, lr: float) -> None:
    """Set every group's ``lr``: ``lr`` for AdamW groups, and for Muon groups the same schedule
    scaled to ``cfg.muon_lr`` (``lr * muon_lr / cfg.lr``)."""
    muon_lr = lr * (cfg.muon_lr if cfg.muon_lr is not None else cfg.lr) / cfg.lr
    for group in opt.param_groups:
        group["lr"] = muon_lr if group.get("use_muon") else lr


# ---------------------------------------------------------------------------------------------
# Muon.
# ---------------------------------------------------------------------------------------------

# Quintic Newton-Schulz coefficients (Keller Jordan 2024): chosen to push every singular value
# of the normalized matrix into about [0.7, 1.2] within 5 steps, not to converge to exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Update scale 0.2 * sqrt(max(d_out, d_in)): an orthogonal (m, n) matrix has RMS 1/sqrt(max(m, n)),
# and AdamW's update RMS is about 0.2 (arXiv 2502.16982, section 2.2), so Muon can use AdamW's lr.
MUON_RMS = 0.2


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T (2-D), by ``steps`` quintic Newton-Schulz iterations in
    bf16: X <- a X + (b A + c A^2) X with A = X X^T, after X = g / ||g||_F. Returns bf16."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the wide orientation: A is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = x @ x.mT  # (m, m), m = min(d_out, d_in)
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.mT if transposed else x


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a (possibly sharded DTensor) tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(update: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``update`` (a whole matrix) laid out as ``p``: for a DTensor, this rank's shard of it
    (every rank computed the same whole update, so no communication is needed)."""
    if not hasattr(p, "device_mesh"):
        return update
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(update, p.device_mesh, cast("DTensor", p).placements, src_data_rank=None)


class Muon(AdamW):
    """Muon for the param groups with ``use_muon=True``, AdamW for the others (one optimizer, so
    one state dict; ``save_checkpoint`` stores the momentum buffers like AdamW's moments).

    A Muon group's step, per matrix W with gradient G (momentum mu, rate lr, decay wd):
        B <- mu B + (1 - mu) G;  N = mu B + (1 - mu) G   (Nesterov)
        W <- W (1 - lr wd) - lr * 0.2 sqrt(max(d_out, d_in)) * NewtonSchulz(N)
    Group keys are plain values (``lr``, ``momentum``, ``ns_steps``, ``weight_decay``), so they can
    be re-set after a resume like AdamW's. Under DDP every rank holds the whole averaged gradient
    and orthogonalizes the whole matrix; under FSDP the gradient DTensor is gathered with
    ``full_tensor()`` first and only the local shard of the update is applied.
    """

    def __init__(self, params: Iterable[dict], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, fused: bool | None = None,
                 momentum: float = 0.95, ns_steps: int = 5):
        # Set before the base constructor, which adds the groups through add_param_group.
        self._muon_defaults = dict(use_muon=False, momentum=momentum, ns_steps=ns_steps)
        self._check_muon_group(self._muon_defaults, [])
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)

    @staticmethod
    def _check_muon_group(group: dict, params: list) -> None:
        mu, steps = group["momentum"], group["ns_steps"]
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"Muon: momentum must lie in [0, 1), got {mu!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Muon: ns_steps must be an integer >= 1, got {steps!r}")
        if group["use_muon"]:
            shapes = [tuple(p.shape) for p in params if p.dim() != 2]
            if shapes:
                raise ValueError(f"Muon: use_muon groups take 2-D weight matrices only, got shapes {shapes}; "
                                 "put other parameters in a group with use_muon=False (AdamW)")

    def add_param_group(self, param_group: dict) -> None:
        """A group with Muon's keys (``use_muon``, ``momentum``, ``ns_steps``) filled from the
        constructor's values and checked, whether given to the constructor or added later."""
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            param_group["params"] = [params]
        elif not isinstance(params, set):  # a set is left to the base class, which refuses it
            param_group["params"] = list(params)  # a generator would be spent by the check
        for key, value in self._muon_defaults.items():
            param_group.setdefault(key, value)
        self._check_muon_group(param_group, list(param_group["params"]))
        super().add_param_group(param_group)

    def _step_group(self, group: dict) -> None:
        if not group["use_muon"]:
            super()._step_group(group)
            return
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            g = p.grad.to(buf.dtype)
            buf.lerp_(g, 1.0 - mu)
            nesterov = g.lerp(buf, mu)
            update = newton_schulz(_full(nesterov), group["ns_steps"])
            update = update.to(p.dtype) * (MUON_RMS * math.sqrt(max(p.shape[-2], p.shape[-1])))
            if wd:
                p.mul_(1.0 - lr * wd)
            p.add_(_like(update, p), alpha=-lr)


def muon_param_names(model: torch.nn.Module) -> list[str]:
    """The Muon-trained weights: the blocks' 2-D matrices (q, k, v, output, w1, w2, w3)."""
    return [name for name, p in model.named_parameters() if p.dim() == 2 and "layers" in name.split(".")]


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` (an ``OptimConfig``) over ``model``'s parameters: ``AdamW`` over
    all of them, or (``cfg.name == "muon"``) ``Muon`` with one Muon group (the blocks' matrices,
    rate ``muon_lr``) and one AdamW group (embeddings, LM head, norm gains, rate ``lr``)."""
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=cfg.fused)
    if cfg.name == "adamw":
        return AdamW(model.parameters(), **kwargs)
    hidden = set(muon_param_names(model))
    named = list(model.named_parameters())
    muon = [p for n, p in named if n in hidden]
    rest = [p for n, p in named if n not in hidden]
    muon_lr = cfg.muon_lr if cfg.muon_lr is not None else cfg.lr
    groups = [{"params": muon, "use_muon": True, "lr": muon_lr}, {"params": rest, "use_muon": False}]
    return Muon(groups, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps, **kwargs)
