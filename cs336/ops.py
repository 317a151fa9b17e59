"""The dispatch seam: the one place that chooses how RMSNorm, SwiGLU, attention, the loss and AdamW run.

Model and optimizer code call only ``rms_norm``, ``swiglu``, ``attention``, ``cross_entropy``,
``linear_cross_entropy`` and ``adamw_step_``; no other file branches on the backend. Providers:
``torch``, the CS336 definitions from tensor ops (the ``*_reference`` functions here and in
``cs336.nn_utils``), which every other provider must match forward and backward (tests/parity);
``native``, PyTorch's fused ops (SDPA, ``F.rms_norm``, ``F.silu(a) * b``, ``F.cross_entropy``, a
``torch._foreach_*`` AdamW in Algorithm 2's order), with half-precision inputs upcast to fp32 where the
reference computes in fp32 so the result is rounded once; ``triton``, the ``kernels`` package registered
as custom ops (on the CPU only under ``TRITON_INTERPRET=1``); ``auto``, ``triton`` where CUDA is present
and the kernels import, else ``native``. Select with ``set_backend(name)`` or ``with use_backend(name)``.
Source: nanochat ``flash_attention.py`` (one resolved backend, an explicit override for tests).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cs336 import nn_utils
from cs336.config import KERNEL_BACKENDS as BACKENDS  # defined there: building a config needs no torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)

_backend = "auto"


class BackendError(RuntimeError):
    """The requested kernel backend cannot run here; the message says why and what to do."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"unknown kernel backend {name!r}; valid choices: {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide backend (one of ``BACKENDS``)."""
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
    """Map ``auto`` to ``triton`` (CUDA present) or ``native``; check that ``triton`` can run."""
    name = _check_name(name or _backend)
    if name == "auto":
        return "triton" if torch.cuda.is_available() and _kernels_importable() else "native"
    if name == "triton":
        if not torch.cuda.is_available() and not triton_interpreted():
            raise BackendError(
                "--kernels triton needs a CUDA device, and none is visible. Either run on a GPU, "
                "set TRITON_INTERPRET=1 to run the Triton kernels on the CPU (slow; for testing), "
                "or use --kernels native (PyTorch's fused ops) / torch (the reference definitions)."
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
                           "(`pip install triton`) or use --kernels native") from None


def _provider(*tensors: torch.Tensor) -> str:
    """The effective provider for a call on ``tensors``: ``torch``, ``native`` or ``triton``."""
    backend = resolve_backend()
    if backend == "triton":
        for t in tensors:
            if t.device.type != "cuda" and not triton_interpreted():
                raise BackendError(
                    f"Triton kernels got a tensor on {t.device}; move the model and data to a CUDA "
                    "device, set TRITON_INTERPRET=1 for CPU testing, or use --kernels native"
                )
    return backend


def _fp32_if_half(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32) if t.dtype in _LOW_PRECISION else t


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
        _check_causal(q, k)
        t_q, t_k = q.shape[-2], k.shape[-2]
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril()  # (T, T)
    return nn_utils.scaled_dot_product_attention(q, k, v, mask)


def _check_causal(q: torch.Tensor, k: torch.Tensor) -> None:
    t_q, t_k = q.shape[-2], k.shape[-2]
    if t_q != t_k:
        raise ValueError(f"causal attention needs as many queries as keys; got T_q={t_q}, "
                         f"T_k={t_k} (pass causal=False for cross-length attention)")


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100, *, logit_softcap: float | None = None,
                                   z_loss: float = 0.0) -> torch.Tensor:
    """cross_entropy(h @ weight.T, targets): the LM head followed by the mean token loss."""
    return nn_utils.cross_entropy(h @ weight.t(), targets, ignore_index=ignore_index,
                                  logit_softcap=logit_softcap, z_loss=z_loss)


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
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        g = g.to(m.dtype)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        update = m / (v.sqrt() + eps)
        p.sub_((step_size * update).to(p.dtype))
        p.sub_(p * (lr * weight_decay))


# ---------------------------------------------------------------------------------------------
# Native definitions (the native branch): PyTorch's fused operations, held to the references.
# ---------------------------------------------------------------------------------------------

def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm`` in fp32 (half inputs upcast, as the reference), returned in x.dtype."""
    x32, w32 = _fp32_if_half(x), _fp32_if_half(weight)
    return F.rms_norm(x32, (x.shape[-1],), w32.to(x32.dtype), eps).to(x.dtype)


def swiglu_native(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``F.silu(a) * b``; fp16/bf16 inputs computed in fp32 and rounded once, to the dtype the
    reference returns (a and b promoted: bf16 a with fp32 b gives fp32)."""
    return (F.silu(_fp32_if_half(a)) * _fp32_if_half(b)).to(torch.result_type(a, b))


def attention_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (scale 1/sqrt(d), top-left causal mask when asked)."""
    if causal:
        _check_causal(q, k)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def cross_entropy_native(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *,
                         logit_softcap: float | None = None, z_loss: float = 0.0) -> torch.Tensor:
    """``F.cross_entropy`` over flattened positions in fp32: the mean over non-ignored targets.
    Soft-cap: ``torch.tanh`` on the fp32 logits; z-loss: ``torch.logsumexp`` of them."""
    nn_utils.check_cross_entropy_inputs(logits, targets)
    nn_utils.check_loss_options(logit_softcap, z_loss)
    if not targets.is_cuda:  # on CUDA F.cross_entropy's own device-side assert does it, at no extra launch
        nn_utils.check_target_range(targets, logits.shape[-1], ignore_index)
    flat = logits.reshape(-1, logits.shape[-1]).to(torch.float32)  # (N, V)
    flat = nn_utils.softcap(flat, logit_softcap)
    flat_targets = targets.reshape(-1).long()
    loss = F.cross_entropy(flat, flat_targets, ignore_index=ignore_index)
    if z_loss:
        keep = flat_targets != ignore_index
        lse = torch.logsumexp(flat, dim=-1)  # (N,)
        loss = loss + z_loss * torch.where(keep, lse.square(), torch.zeros_like(lse)).sum() / keep.sum()
    return loss


def linear_cross_entropy_native(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                ignore_index: int = -100, *, logit_softcap: float | None = None,
                                z_loss: float = 0.0) -> torch.Tensor:
    """``F.linear`` (the LM head) then ``cross_entropy_native``; the logits are materialized."""
    return cross_entropy_native(F.linear(h, weight), targets, ignore_index, logit_softcap=logit_softcap,
                                z_loss=z_loss)


@torch.no_grad()
def adamw_step_native_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                       step: int, lr: float, beta1: float, beta2: float, eps: float,
                       weight_decay: float) -> None:
    """``adamw_step_reference_`` with PyTorch's multi-tensor AdamW kernels, in Algorithm 2's order.

    Tensors are grouped by device and dtypes. A group whose tensors share one dtype and are
    contiguous goes through ``torch._fused_adamw_`` (one pass over memory on the CPU and CUDA),
    whose arguments are chosen so that its update is Algorithm 2's. With bc_i = 1 - b_i^t, that
    kernel computes ``m <- m + (1-b1)(g - m)`` (= b1 m + (1-b1) g), ``v <- b2 v + (1-b2) g^2``,
    ``p <- p (1 - lr' wd')`` (torch decays first), then
    ``p <- p - (lr' / bc1) m / (sqrt(v) / sqrt(bc2) + eps')``. Algorithm 2 decays after the update:
    ``p <- (p - a_t u)(1 - c)`` with ``u = m / (sqrt(v) + eps)``, ``a_t = lr sqrt(bc2) / bc1`` and
    ``c = lr wd``, i.e. ``p (1 - c) - a_t (1 - c) u``. Passing ``eps' = eps / sqrt(bc2)`` makes the
    kernel's denominator ``(sqrt(v) + eps) / sqrt(bc2)``, so its step is ``lr' sqrt(bc2) / bc1 u``;
    ``lr' = lr (1 - c)`` makes that ``a_t (1 - c) u``, and ``wd' = wd / (1 - c)`` keeps
    ``lr' wd' = c``. The two agree up to rounding (tests/parity). Other groups (mixed dtypes,
    non-contiguous views, or ``c >= 1``) use ``torch._foreach_*`` ops in the reference's order.
    """
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    step_size = lr * bias_correction2 ** 0.5 / bias_correction1
    groups: dict[tuple, tuple[list, list, list, list]] = {}
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        key = (p.device, p.dtype, g.dtype, m.dtype, v.dtype,
               all(t.is_contiguous() for t in (p, g, m, v)))
        for bucket, t in zip(groups.setdefault(key, ([], [], [], [])), (p, g, m, v), strict=True):
            bucket.append(t)
    for (device, p_dtype, g_dtype, m_dtype, v_dtype, contiguous), (ps, gs, ms, vs) in groups.items():
        decay = lr * weight_decay
        if (contiguous and p_dtype == g_dtype == m_dtype == v_dtype and device.type in ("cpu", "cuda")
                and decay < 1.0):
            steps = [torch.full((), float(step), dtype=torch.float32, device=device)] * len(ps)
            torch._fused_adamw_(ps, gs, ms, vs, [], steps, lr=lr * (1.0 - decay), beta1=beta1, beta2=beta2,
                                weight_decay=weight_decay / (1.0 - decay), eps=eps / bias_correction2 ** 0.5,
                                amsgrad=False, maximize=False)
            continue
        if g_dtype != m_dtype:
            gs = [g.to(m_dtype) for g in gs]
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, gs, alpha=1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, eps)
        updates = torch._foreach_div(ms, denom)
        torch._foreach_mul_(updates, step_size)
        torch._foreach_sub_(ps, [u.to(p_dtype) for u in updates])
        if weight_decay != 0.0:
            torch._foreach_add_(ps, ps, alpha=-decay)


# ---------------------------------------------------------------------------------------------
# The seam.
# ---------------------------------------------------------------------------------------------

def _check_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """The inputs every RMSNorm provider takes: floating x of rank >= 1, a 1-D weight of length
    x.shape[-1] (the reference would broadcast a (1,) or (M, N) weight), eps >= 0."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        raise TypeError(f"rms_norm: x and weight must be tensors, got {type(x).__name__}, {type(weight).__name__}")
    if not (x.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise ValueError(f"rms_norm: x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} does not match x of shape "
                         f"{tuple(x.shape)}; weight must be 1-D with length x.shape[-1]")
    if not eps >= 0:
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x / sqrt(mean(x**2, -1) + eps) * weight (``rms_norm_reference``), checked the same for every
    backend (``_check_rms_norm``)."""
    _check_rms_norm(x, weight, eps)
    provider = _provider(x, weight)
    if provider == "triton":
        return _kernels_module("rms_norm").rms_norm(x, weight, eps)
    if provider == "native":
        return rms_norm_native(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    provider = _provider(a, b)
    if provider == "triton":
        return _kernels_module("swiglu").swiglu(a, b)
    if provider == "native":
        return swiglu_native(a, b)
    return swiglu_reference(a, b)


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """What every attention provider needs: (..., T, d) tensors, at least one key, a bool ``causal``."""
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be True or False, got {causal!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"attention: {name} must be a (..., T, d) tensor, got {shape}")
    if k.shape[-2] == 0 or v.shape[-2] == 0:
        # The reference failed in amax, SDPA returned zeros: a query with no key has no softmax.
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} hold no keys (T_k = 0); "
                         "attention needs at least one key")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (..., T, d) inputs; Triton: FlashAttention-2, no (T, T) tensor.
    Inputs are checked the same for every backend (``_check_attention``)."""
    _check_attention(q, k, v, causal)
    provider = _provider(q, k, v)
    if provider == "triton":
        return _kernels_module("attention").flash_attention(q, k, v, causal)
    if provider == "native":
        return attention_native(q, k, v, causal)
    return attention_reference(q, k, v, causal)


def _recipe_kwargs(logit_softcap: float | None, z_loss: float) -> dict:
    """The loss's recipe options, passed on only when set (the default call is unchanged)."""
    kwargs = {}
    if logit_softcap is not None:
        kwargs["logit_softcap"] = float(logit_softcap)
    if z_loss:
        kwargs["z_loss"] = float(z_loss)
    return kwargs


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *,
                  logit_softcap: float | None = None, z_loss: float = 0.0) -> torch.Tensor:
    """Mean softmax cross-entropy over all positions whose target is not ``ignore_index``;
    ``logit_softcap`` and ``z_loss`` as in ``nn_utils.cross_entropy``."""
    provider = _provider(logits)
    kwargs = _recipe_kwargs(logit_softcap, z_loss)
    if provider == "triton":
        return _kernels_module("cross_entropy").cross_entropy(logits, targets, ignore_index, **kwargs)
    if provider == "native":
        return cross_entropy_native(logits, targets, ignore_index, **kwargs)
    return nn_utils.cross_entropy(logits, targets, ignore_index=ignore_index, **kwargs)


def _check_lm_head(h: torch.Tensor, weight: torch.Tensor) -> None:
    """The LM head every provider takes: a (V, C) weight for (..., C) h, one dtype unless autocast
    casts both (the reference's matmul and F.linear fail on mixed dtypes deep inside)."""
    if not (isinstance(h, torch.Tensor) and isinstance(weight, torch.Tensor)):
        raise TypeError(f"linear_cross_entropy: h and weight must be tensors, got {type(h).__name__}, "
                        f"{type(weight).__name__}")
    if h.dim() == 0 or weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight of shape {tuple(weight.shape)} must be (vocab, "
                         f"{h.shape[-1] if h.dim() else '?'}) for h of shape {tuple(h.shape)}")
    autocast = h.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(h.device.type)
    if h.dtype != weight.dtype and not autocast:
        raise ValueError(f"linear_cross_entropy: h is {h.dtype} and weight {weight.dtype}; cast them to one "
                         "dtype (or run under torch.autocast)")


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, *, logit_softcap: float | None = None,
                         z_loss: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T``; the Triton path never materializes all logits.
    ``weight`` must be (vocab, h.shape[-1]) of h's dtype (any dtypes under autocast)."""
    _check_lm_head(h, weight)
    provider = _provider(h, weight)
    kwargs = _recipe_kwargs(logit_softcap, z_loss)
    if provider == "triton":
        return _kernels_module("cross_entropy").linear_cross_entropy(h, weight, targets, ignore_index, **kwargs)
    if provider == "native":
        return linear_cross_entropy_native(h, weight, targets, ignore_index, **kwargs)
    return linear_cross_entropy_reference(h, weight, targets, ignore_index, **kwargs)


def check_adamw_inputs(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                       step: int, lr: float, beta1: float, beta2: float, eps: float,
                       weight_decay: float, check_tensors: bool = True) -> None:
    """Raise ``ValueError`` / ``TypeError`` for an AdamW step that no provider can compute right.

    Every provider needs four lists of one length, each grad and moment a floating-point tensor
    of its param's shape on its param's device (PyTorch's fused kernel would otherwise read past a
    short gradient or leave an integer param untouched, the reference would broadcast a grad), an
    integer ``step >= 1`` (the bias corrections divide by ``1 - beta1 ** step``), betas in
    [0, 1) and ``lr``, ``eps``, ``weight_decay`` >= 0. Shapes and dtypes only: no tensor is read.
    ``check_tensors=False`` leaves out the per-tensor loop (about 5 us per tensor).
    """
    lengths = (len(params), len(grads), len(exp_avgs), len(exp_avg_sqs))
    if len(set(lengths)) != 1:
        raise ValueError("adamw_step_: params, grads, exp_avgs and exp_avg_sqs must have equal lengths, got "
                         + ", ".join(map(str, lengths)))
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"adamw_step_: step must be an integer >= 1 (it counts from 1), got {step!r}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"adamw_step_: {name} must lie in [0, 1), got {beta!r}")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not value >= 0.0:
            raise ValueError(f"adamw_step_: {name} must be >= 0, got {value!r}")
    if not check_tensors:
        return
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        for name, t in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"adamw_step_: {name} {i} must be a torch.Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise ValueError(f"adamw_step_: {name} {i} has dtype {t.dtype}; AdamW needs floating-point "
                                 "params, grads and moments")
            if t.shape != p.shape or t.device != p.device:
                raise ValueError(f"adamw_step_: {name} {i} has shape {tuple(t.shape)} on {t.device}; it must "
                                 f"match param {i}: {tuple(p.shape)} on {p.device}")


def adamw_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                step: int, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, backend: str | None = None, check_tensors: bool = True) -> None:
    """One in-place AdamW step over lists of tensors (see ``adamw_step_reference_``); the inputs
    are checked first (``check_adamw_inputs``), the same for every backend. ``check_tensors=False``
    is for a caller whose lists are consistent by construction (``cs336.optim.AdamW``: grads that
    autograd shaped, moments checked against their params when loaded), off the per-step path."""
    kwargs: dict[str, Any] = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, **kwargs, check_tensors=check_tensors)
    if not params:
        return
    with use_backend(backend):
        provider = _provider(*params)
    if provider == "triton":
        _kernels_module("adamw").adamw_step_(params, grads, exp_avgs, exp_avg_sqs, **kwargs)
    elif provider == "native":
        adamw_step_native_(params, grads, exp_avgs, exp_avg_sqs, **kwargs)
    else:
        adamw_step_reference_(params, grads, exp_avgs, exp_avg_sqs, **kwargs)
