"""Elementwise and loss functions of the CS336 "basics" model, written from tensor ops.

``silu``, ``softmax`` and ``cross_entropy`` are the reference definitions that ``cs336.ops`` (the
dispatch seam) and the Triton kernels are checked against; ``clip_gradients`` and
``gradient_norm`` serve the training loop. Nothing here uses ``torch.nn.functional`` (the
assignment asks for the definitions from scratch); the tests compare against it.

Deviations from torch.nn.functional, on purpose:
- ``cross_entropy`` computes in fp32 whatever the logits dtype and returns an fp32 scalar.
- ``softmax`` upcasts fp16/bf16 inputs to fp32 and returns the input dtype.
- ``clip_gradients`` follows the CS336 handout: when the global L2 norm exceeds ``max_l2_norm``
  every gradient is scaled by ``max_l2_norm / (norm + eps)``. It does this with a clamped factor
  instead of a Python ``if``, which gives the same result without a host-device sync
  (the factor is >= 1, clamped to 1, exactly when norm <= max_l2_norm).

Source: CS336 assignment 1 handout (Stanford, spring 2025), sections 3.4-3.5 and 4.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU / swish: x * sigmoid(x)."""
    return x * torch.sigmoid(x)


def _check_floating(x: torch.Tensor, op: str) -> None:
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op} needs a floating-point tensor, got dtype {x.dtype}; convert it with .float()")


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim``, stabilized by subtracting the maximum along that dim.

    Entries equal to -inf get probability 0. A slice that is -inf everywhere gives NaN, as in
    torch.softmax. Integer or bool input is a ``TypeError`` (as torch.softmax's): probabilities
    cast back to an integer dtype would all be 0.
    """
    _check_floating(x, "softmax")
    in_dtype = x.dtype
    if in_dtype in _LOW_PRECISION:
        x = x.to(torch.float32)
    shifted = x - x.amax(dim=dim, keepdim=True)
    exp = torch.exp(shifted)
    return (exp / exp.sum(dim=dim, keepdim=True)).to(in_dtype)


def scaled_dot_product_attention(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) V with any number of leading batch dims.

    Q: (..., n, d_k), K: (..., m, d_k), V: (..., m, d_v); mask: boolean, broadcastable to
    (..., n, m), True where query i may attend to key j. Returns (..., n, d_v). A query whose mask
    row is all False gets NaN (no key to attend to), as in torch.nn.functional.
    """
    d_k = Q.shape[-1]
    scores = (Q @ K.transpose(-2, -1)) / math.sqrt(d_k)  # (..., n, m)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return softmax(scores, dim=-1).to(V.dtype) @ V


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(softmax(x)) computed as x - logsumexp(x), in fp32 for fp16/bf16 inputs (floating x only)."""
    _check_floating(x, "log_softmax")
    if x.dtype in _LOW_PRECISION:
        x = x.to(torch.float32)
    x_max = x.amax(dim=dim, keepdim=True)
    shifted = x - x_max
    return shifted - torch.log(torch.exp(shifted).sum(dim=dim, keepdim=True))


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Logit soft-capping ``cap * tanh(logits / cap)`` (Gemma 2); ``cap=None`` returns ``logits``.

    ``cap`` must be a finite positive number: 0 would turn every logit into 0 (a uniform softmax),
    a negative cap is the positive one, inf gives NaN."""
    if cap is None:
        return logits
    check_loss_options(cap, 0.0, "softcap")
    return cap * torch.tanh(logits / cap)


def check_loss_options(logit_softcap: float | None, z_loss: float, op: str = "cross_entropy") -> None:
    """Raise ``ValueError`` unless ``logit_softcap`` is None or finite and > 0 and ``z_loss`` is finite
    and >= 0 (the same rule for every provider of the loss)."""
    if logit_softcap is not None and not 0 < logit_softcap < math.inf:
        raise ValueError(f"{op}: logit_softcap must be a finite number > 0, or None for no cap; got "
                         f"{logit_softcap!r}")
    if not 0 <= z_loss < math.inf:
        raise ValueError(f"{op}: z_loss must be a finite number >= 0 (0 turns it off); got {z_loss!r}")


def check_target_range(targets: torch.Tensor, num_classes: int, ignore_index: int, op: str = "cross_entropy") -> None:
    """Raise ``ValueError`` for a target outside [0, num_classes) that is not ``ignore_index``.

    ``torch._assert_async``, as the Triton loss: on the CPU it raises at once; on CUDA it is a
    device-side assert (as gather's or ``F.cross_entropy``'s own check), so no host read. Skipped
    while torch.compile traces.
    """
    if torch.compiler.is_compiling() or targets.numel() == 0:
        return
    ok = ((targets == ignore_index) | ((targets >= 0) & (targets < num_classes))).all()
    message = (f"{op}: a target id is outside [0, {num_classes}) and is not ignore_index={ignore_index}; "
               "check the data and vocab_size")
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        raise ValueError(message) from None


def check_cross_entropy_inputs(logits: torch.Tensor, targets: torch.Tensor, op: str = "cross_entropy") -> None:
    """Raise ``ValueError`` unless logits are (..., V) floats with V >= 1 and targets are (...) integer
    ids (shapes and dtypes only; the ids' range is not read, so no host sync)."""
    if logits.dim() == 0 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"{op}: logits shape {tuple(logits.shape)} needs targets of shape "
            f"{tuple(logits.shape[:-1])}, got {tuple(targets.shape)}"
            + (" (logits need a vocabulary dim)" if logits.dim() == 0 else "")
        )
    if not logits.dtype.is_floating_point:
        raise ValueError(f"{op}: logits must be floating point, got dtype {logits.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"{op}: targets must be integer class ids, got dtype {targets.dtype}; convert "
                         "whole-number ids with .long()")
    if logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits of shape {tuple(logits.shape)} have no classes (last dim 0)")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *,
                  logit_softcap: float | None = None, z_loss: float = 0.0) -> torch.Tensor:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits)``.

    logits: (..., V) of any float dtype; targets: (...) integer ids. Positions whose target equals
    ``ignore_index`` are excluded from the sum and from the count. The loss per position is
    ``logsumexp(logits) - logits[target]`` with the max subtracted first, computed in
    fp32, so logits of magnitude 1e4 neither overflow nor lose the answer. If every position is
    ignored the mean is over zero elements and the result is NaN (as torch.nn.functional).

    Recipe options (off by default): ``logit_softcap=C`` caps the fp32 logits to
    ``C * tanh(logits / C)`` first; ``z_loss=L`` adds ``L * logsumexp(logits)**2`` per position
    (PaLM, Chowdhery et al. 2022, section 5), averaged like the loss.

    ``ValueError`` for float or bool targets, logits without classes, a cap that is not finite and
    positive, a negative / non-finite z-loss (``check_cross_entropy_inputs``, ``check_loss_options``),
    or a target id outside [0, V) that is not ``ignore_index`` (``check_target_range``).
    """
    check_cross_entropy_inputs(logits, targets)
    check_loss_options(logit_softcap, z_loss)
    check_target_range(targets, logits.shape[-1], ignore_index)
    logits = softcap(logits.to(torch.float32), logit_softcap)
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    # The max is a constant shift (no gradient needed). Both terms are taken from the shifted
    # logits, so the large max cancels exactly instead of being added and subtracted again.
    row_max = logits.amax(dim=-1, keepdim=True).detach()
    shifted = logits - row_max
    lse = torch.log(torch.exp(shifted).sum(dim=-1))  # (...)
    target_logit = torch.gather(shifted, -1, safe_targets.unsqueeze(-1).long()).squeeze(-1)  # (...)
    per_position = lse - target_logit
    if z_loss:
        per_position = per_position + z_loss * (lse + row_max.squeeze(-1)) ** 2
    losses = torch.where(keep, per_position, torch.zeros_like(lse))
    return losses.sum() / keep.sum()


def _grads(params: Iterable[torch.Tensor | torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def gradient_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of all gradients (parameters without a gradient are skipped), fp32 scalar."""
    grads = _grads(params)
    if not grads:
        return torch.zeros(())
    norms = [g.detach().to(torch.float32).pow(2).sum() for g in grads]
    device = grads[0].device
    return torch.stack([n.to(device) for n in norms]).sum().sqrt()


@torch.no_grad()
def clip_gradients(params: Iterable[torch.nn.Parameter], max_l2_norm: float,
                   eps: float = 1e-6) -> torch.Tensor:
    """Scale all gradients in place so their global L2 norm is at most ``max_l2_norm``.

    Returns the norm measured before clipping (fp32 scalar tensor), for logging.
    """
    # ``not > 0`` so that NaN is refused too: a NaN bound turned every gradient into NaN.
    if not max_l2_norm > 0:
        raise ValueError(f"clip_gradients: max_l2_norm must be positive, got {max_l2_norm}")
    if not eps >= 0:  # norm + eps < 0 would flip the gradients' sign, = 0 divide by zero
        raise ValueError(f"clip_gradients: eps must be >= 0, got {eps}")
    params = list(params)
    total_norm = gradient_norm(params)
    grads = _grads(params)
    if grads:
        scale = torch.clamp(max_l2_norm / (total_norm + eps), max=1.0)
        for g in grads:
            g.mul_(scale.to(device=g.device, dtype=g.dtype))
    return total_norm
