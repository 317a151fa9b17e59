"""The dispatch seam: the one place that chooses reference PyTorch or fused Triton kernels.

Model and optimizer code call only the functions here (``rms_norm``, ``swiglu``, ``attention``,
``cross_entropy``, ``linear_cross_entropy``, ``adamw_step_``); no other file branches on the
backend. The torch branch is the definition; the Triton branch (package ``kernels``) must match it
forward and backward (tests/parity).

Backends: ``torch``, ``triton``, or ``auto`` (Triton where a CUDA device is present, torch
elsewhere). Select one with ``set_backend(name)`` or, scoped, ``with use_backend(name): ...``;
``TransformerLM(kernels=...)`` uses the latter around its forward pass. Triton kernels run on the
CPU only under ``TRITON_INTERPRET=1`` (slowly; that is how parity is tested without a GPU).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Sequence

import torch

from cs336 import nn_utils

BACKENDS = ("auto", "torch", "triton")

_backend = "auto"


class BackendError(RuntimeError):
    """The requested kernel backend cannot run here; the message says why and what to do."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"unknown kernel backend {name!r}; valid choices: {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide backend (``auto``, ``torch`` or ``triton``)."""
    global _backend
    _backend = _check_name(name)


def get_backend() -> str:
    """The backend as set (possibly ``auto``); see ``resolve_backend`` for the effective one."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Scoped backend override; ``None`` leaves the current one in place."""
    global _backend
    if name is None:
        yield
        return
    previous = _backend
    _backend = _check_name(name)
    try:
        yield
    finally:
        _backend = previous


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(name: str | None = None) -> str:
    """Map ``auto`` to ``triton`` (CUDA present) or ``torch``; check that ``triton`` can run."""
    name = _check_name(name or _backend)
    if name == "auto":
        return "triton" if torch.cuda.is_available() and _kernels_importable() else "torch"
    if name == "triton":
        if not torch.cuda.is_available() and not triton_interpreted():
            raise BackendError(
                "--kernels triton needs a CUDA device, and none is visible. Either run on a GPU, "
                "set TRITON_INTERPRET=1 to run the Triton kernels on the CPU (slow; for testing), "
                "or use --kernels auto / torch to run the reference PyTorch path."
            )
        _kernels_module("rms_norm")  # raises a clear error if triton or our package is missing
    return name


def backend_available(name: str) -> bool:
    """Whether ``resolve_backend(name)`` succeeds here (e.g. ``triton``: CUDA or the interpreter)."""
    try:
        resolve_backend(name)
    except BackendError:
        return False
    return True


def _kernels_importable() -> bool:
    try:
        _kernels_module("rms_norm")
    except BackendError:
        return False
    return True


def _kernels_module(name: str):
    try:
        package = importlib.import_module("kernels")
    except ImportError as exc:
        raise BackendError(f"cannot import the cs336 'kernels' package ({exc}); reinstall with "
                           "`pip install -e .` from the project root") from None
    if not getattr(package, "CS336_KERNELS", False):
        raise BackendError(
            f"'import kernels' resolved to {getattr(package, '__file__', package)!r}, which is not "
            "cs336-kernels' package (PyPI has an unrelated 'kernels' hub package). Uninstall it "
            "(`pip uninstall kernels`) or run from the cs336-kernels project root."
        )
    try:
        return importlib.import_module(f"kernels.{name}")
    except ImportError as exc:
        raise BackendError(f"the Triton kernels cannot be imported ({exc}); install triton "
                           "(`pip install triton`) or use --kernels torch") from None


def _use_triton(*tensors: torch.Tensor) -> bool:
    backend = resolve_backend()
    if backend != "triton":
        return False
    for t in tensors:
        if t.device.type != "cuda" and not triton_interpreted():
            raise BackendError(
                f"Triton kernels got a tensor on {t.device}; move the model and data to a CUDA "
                "device, set TRITON_INTERPRET=1 for CPU testing, or use --kernels torch"
            )
    return True


# ---------------------------------------------------------------------------------------------
# Reference definitions (the torch branch). Kept here so both branches sit side by side.
# ---------------------------------------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x**2, -1) + eps) * weight, computed in fp32, returned in x.dtype."""
    in_dtype = x.dtype
    x32 = x.to(torch.float32)
    inv_rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (x32 * inv_rms * weight.to(torch.float32)).to(in_dtype)


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The SwiGLU gate silu(a) * b (the w1/w3 projections stay outside)."""
    return nn_utils.silu(a) * b


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (the CS336 ``scaled_dot_product_attention``), causal if asked.

    q: (..., T_q, d), k and v: (..., T_k, d). ``causal`` lets query i see keys j <= i and needs
    T_q == T_k.
    """
    mask = None
    if causal:
        t_q, t_k = q.shape[-2], k.shape[-2]
        if t_q != t_k:
            raise ValueError(f"causal attention needs as many queries as keys; got T_q={t_q}, "
                             f"T_k={t_k} (pass causal=False for cross-length attention)")
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril()  # (T, T)
    return nn_utils.scaled_dot_product_attention(q, k, v, mask)


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100) -> torch.Tensor:
    """cross_entropy(h @ weight.T, targets): the LM head followed by the mean token loss."""
    return nn_utils.cross_entropy(h @ weight.t(), targets, ignore_index=ignore_index)


@torch.no_grad()
def adamw_step_reference_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                          exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                          step: int, lr: float, beta1: float, beta2: float, eps: float,
                          weight_decay: float) -> None:
    """One AdamW step in place, the CS336 handout's Algorithm 2 (``step`` counts from 1).

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;  a_t = lr sqrt(1-b2^t) / (1-b1^t);
    p <- p - a_t m / (sqrt(v) + eps);  p <- p - lr * wd * p.
    """
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    step_size = lr * bias_correction2 ** 0.5 / bias_correction1
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        g = g.to(m.dtype)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        update = m / (v.sqrt() + eps)
        p.sub_((step_size * update).to(p.dtype))
        p.sub_(p * (lr * weight_decay))


# ---------------------------------------------------------------------------------------------
# The seam.
# ---------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    if _use_triton(x, weight):
        return _kernels_module("rms_norm").rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _use_triton(a, b):
        return _kernels_module("swiglu").swiglu(a, b)
    return swiglu_reference(a, b)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (..., T, d) inputs; Triton: FlashAttention-2, no (T, T) tensor."""
    if _use_triton(q, k, v):
        return _kernels_module("attention").flash_attention(q, k, v, causal)
    return attention_reference(q, k, v, causal)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean softmax cross-entropy over all positions whose target is not ``ignore_index``."""
    if _use_triton(logits):
        return _kernels_module("cross_entropy").cross_entropy(logits, targets, ignore_index)
    return nn_utils.cross_entropy(logits, targets, ignore_index=ignore_index)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T``; the Triton path never materializes all logits."""
    if _use_triton(h, weight):
        return _kernels_module("cross_entropy").linear_cross_entropy(h, weight, targets, ignore_index)
    return linear_cross_entropy_reference(h, weight, targets, ignore_index)


def adamw_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                step: int, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, backend: str | None = None) -> None:
    """One in-place AdamW step over lists of tensors (see ``adamw_step_reference_``)."""
    kwargs = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    with use_backend(backend):
        if params and _use_triton(*params):
            _kernels_module("adamw").adamw_step_(params, grads, exp_avgs, exp_avg_sqs, **kwargs)
            return
    adamw_step_reference_(params, grads, exp_avgs, exp_avg_sqs, **kwargs)
