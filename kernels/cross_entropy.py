"""Softmax cross-entropy (mean over non-ignored targets) and a fused, chunked LM-head + loss.

Math, per row x of V logits with target t (rows with t == ignore_index contribute nothing):

    m = max(x)        S = sum(exp(x - m))        loss = log(S) + (m - x[t])
    loss_mean = sum(loss) / n_valid               dL/dx = (exp(x - m - log S) - onehot(t)) * g / n_valid

with g the upstream gradient. The row maximum and sum are computed online over vocab blocks
(one program per row; Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"),
all in fp32; the loss keeps ``m - x[t]`` apart from ``log S`` so logits of size 1e4 lose nothing.

HBM traffic, M rows of V logits: forward reads M*V, writes 3*M fp32 (loss, m, log S); backward
reads M*V and writes M*V gradients in the logits' dtype. No fp32 copy of the logits is made.

``linear_cross_entropy(h, W, targets)`` is the LM head ``h @ W.T`` followed by the loss, chunked
over tokens so that only one chunk of logits exists at a time (Liger-Kernel's
``fused_linear_cross_entropy``, whose approach this follows; code written here): per chunk,
logits = h_c @ W.T (cuBLAS); the kernel computes the loss and overwrites the chunk's logits with
their gradient in place; then grad_h_c = grad_logits @ W and grad_W += grad_logits.T @ h_c. The
gradients are computed in the forward and scaled by the upstream gradient in the backward.
grad_W accumulates across chunks in W's dtype (one rounding per chunk in bf16, as Liger). Per
chunk the kernel reads the logits twice (log-sum-exp, then gradient) and overwrites them once.

Recipe options, constexpr branches (off: the kernels are the plain loss): soft-capping reads each
logit as ``z = C tanh(x / C)`` (so m, S and the loss are those of z; dz/dx = 1 - (z / C)^2
scales the gradient), and z-loss adds ``L (m + log S)^2`` per row, whose gradient adds
``2 L (m + log S) softmax(z)`` (PaLM). tanh is ``2 sigmoid(2y) - 1``.

The public functions check that every target id is in [0, V) or ignore_index with
``torch._assert_async`` (no host read; on CUDA a device-side assert, as ``F.cross_entropy``'s).
Under autocast the fused op runs its matmuls in the autocast dtype, as ``F.linear`` would.
Launchers are ``torch.library.triton_op`` custom ops; the fused op carries a FLOP formula so
``FlopCounterMode`` counts its three matmuls.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.utils.flop_counter import register_flop_formula

from kernels._common import (
    SUPPORTED_DTYPES,
    KernelInputError,
    calculate_settings,
    check_same_device,
    check_tensor,
    launch,
)

# Vocab columns per block: 4096 fp32 is 16 KB of registers per program at 8 warps (16 per thread).
MAX_VOCAB_BLOCK = 4096
# Smallest token chunk of the fused LM head + loss: keeps each chunk matmul large enough for cuBLAS.
MIN_CHUNK_ROWS = 256


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """softcap * tanh(x / softcap) with HAS_SOFTCAP, else x (fp32)."""
    if HAS_SOFTCAP:
        x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
    return x


@triton.jit
def _ce_grad(z, is_target, m, log_s, scale, softcap, z_loss, HAS_SOFTCAP: tl.constexpr,
             HAS_Z_LOSS: tl.constexpr):
    """d loss / d x for capped logits z of a row: (softmax (1 + 2 L lse) - onehot) (1 - (z/C)^2) scale."""
    p = tl.exp(z - m - log_s)
    if HAS_Z_LOSS:
        p = p * (1.0 + 2.0 * z_loss * (m + log_s))
    g = (p - tl.where(is_target, 1.0, 0.0)) * scale
    if HAS_SOFTCAP:
        t = z / softcap
        g = g * (1.0 - t * t)
    return g


@triton.jit
def _ce_fwd_kernel(
    logits_ptr,  # (M, V) logits; with WRITE_GRAD overwritten in place by the gradient
    row_stride,  # elements between consecutive rows of logits
    targets_ptr,  # (M,) int64 target ids
    loss_ptr,  # (M,) fp32 output: per-row loss, 0 where the target is ignored
    max_ptr,  # (M,) fp32 output: row maximum m
    logsum_ptr,  # (M,) fp32 output: log(sum(exp(x - m)))
    n_valid_ptr,  # () int64: number of non-ignored targets (read only with WRITE_GRAD)
    V,  # vocabulary size (row length)
    ignore_index,  # target value that marks an ignored row
    softcap,  # fp32 soft-cap C (read only with HAS_SOFTCAP)
    z_loss,  # fp32 z-loss weight L (read only with HAS_Z_LOSS)
    BLOCK_SIZE: tl.constexpr,  # vocab columns per block
    WRITE_GRAD: tl.constexpr,  # also write (softmax - onehot) / n_valid over the logits
    HAS_SOFTCAP: tl.constexpr,  # logits read as C tanh(x / C)
    HAS_Z_LOSS: tl.constexpr,  # loss + L (log-sum-exp)^2
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK_SIZE)
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_SIZE):
        c = start + cols
        x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            x = tl.where(c < V, _capped(x, softcap, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    log_s = tl.log(s)
    x_t = _capped(tl.load(base + target, mask=valid, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
    row_loss = log_s + (m - x_t)
    if HAS_Z_LOSS:
        row_loss += z_loss * (m + log_s) * (m + log_s)
    tl.store(loss_ptr + row, tl.where(valid, row_loss, 0.0))
    tl.store(max_ptr + row, m)
    tl.store(logsum_ptr + row, log_s)
    if WRITE_GRAD:
        n_valid = tl.maximum(tl.load(n_valid_ptr), 1).to(tl.float32)
        scale = tl.where(valid, 1.0 / n_valid, 0.0)
        for start in range(0, V, BLOCK_SIZE):
            c = start + cols
            mask = c < V
            x = _capped(tl.load(base + c, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            g = _ce_grad(x, c == target, m, log_s, scale, softcap, z_loss, HAS_SOFTCAP, HAS_Z_LOSS)
            tl.store(base + c, g.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_bwd_kernel(
    dlogits_ptr,  # (M, V) output, dtype of logits
    logits_ptr,  # (M, V) forward logits
    row_stride,  # elements between consecutive rows of logits and dlogits
    targets_ptr,  # (M,) int64 target ids
    max_ptr,  # (M,) fp32 row maxima from the forward
    logsum_ptr,  # (M,) fp32 log-sum-exp minus the maximum, from the forward
    grad_ptr,  # () upstream gradient of the mean loss
    n_valid_ptr,  # () int64 number of non-ignored targets
    V,  # vocabulary size
    ignore_index,  # target value that marks an ignored row
    softcap,  # fp32 soft-cap C (read only with HAS_SOFTCAP)
    z_loss,  # fp32 z-loss weight L (read only with HAS_Z_LOSS)
    BLOCK_SIZE: tl.constexpr,  # vocab columns per block
    HAS_SOFTCAP: tl.constexpr,  # logits read as C tanh(x / C)
    HAS_Z_LOSS: tl.constexpr,  # loss + L (log-sum-exp)^2
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    m = tl.load(max_ptr + row)
    log_s = tl.load(logsum_ptr + row)
    n_valid = tl.maximum(tl.load(n_valid_ptr), 1).to(tl.float32)
    grad = tl.load(grad_ptr).to(tl.float32)
    scale = tl.where(target != ignore_index, grad / n_valid, 0.0)
    cols = tl.arange(0, BLOCK_SIZE)
    for start in range(0, V, BLOCK_SIZE):
        c = start + cols
        mask = c < V
        x = tl.load(logits_ptr + row * row_stride + c, mask=mask, other=0.0).to(tl.float32)
        z = _capped(x, softcap, HAS_SOFTCAP)
        g = _ce_grad(z, c == target, m, log_s, scale, softcap, z_loss, HAS_SOFTCAP, HAS_Z_LOSS)
        tl.store(dlogits_ptr + row * row_stride + c, g.to(dlogits_ptr.dtype.element_ty), mask=mask)


def _launch_fwd(logits: torch.Tensor, targets: torch.Tensor, n_valid: torch.Tensor, ignore_index: int,
                write_grad: bool, softcap: float = 0.0,
                z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, V = logits.shape
    loss = torch.empty(M, dtype=torch.float32, device=logits.device)
    row_max = torch.empty_like(loss)
    logsum = torch.empty_like(loss)
    if M:
        block, num_warps = calculate_settings(min(V, MAX_VOCAB_BLOCK))
        launch(_ce_fwd_kernel)[(M,)](
            logits, V, targets, loss, row_max, logsum, n_valid, V, ignore_index, softcap, z_loss,
            BLOCK_SIZE=block, WRITE_GRAD=write_grad, HAS_SOFTCAP=softcap > 0, HAS_Z_LOSS=z_loss > 0,
            num_warps=num_warps,
        )
    return loss, row_max, logsum


@triton_op("cs336_kernels::cross_entropy_fwd", mutates_args={})
def cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: float = 0.0,
                      z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, row max, row log-sum, n_valid) for contiguous (M, V) logits, (M,) int64 targets;
    ``softcap`` / ``z_loss`` > 0 turn the recipe options on (max and log-sum are of the capped logits)."""
    n_valid = (targets != ignore_index).sum()
    loss, row_max, logsum = _launch_fwd(logits, targets, n_valid, ignore_index, write_grad=False,
                                        softcap=softcap, z_loss=z_loss)
    return loss.sum() / n_valid, row_max, logsum, n_valid


@triton_op("cs336_kernels::cross_entropy_bwd", mutates_args={})
def cross_entropy_bwd(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, row_max: torch.Tensor,
                      logsum: torch.Tensor, n_valid: torch.Tensor, ignore_index: int, softcap: float = 0.0,
                      z_loss: float = 0.0) -> torch.Tensor:
    """Gradient of the mean loss w.r.t. (M, V) logits, in the logits' dtype."""
    M, V = logits.shape
    dlogits = torch.empty_like(logits)
    if M:
        block, num_warps = calculate_settings(min(V, MAX_VOCAB_BLOCK))
        launch(_ce_bwd_kernel)[(M,)](
            dlogits, logits, V, targets, row_max, logsum, grad, n_valid, V, ignore_index, softcap, z_loss,
            BLOCK_SIZE=block, HAS_SOFTCAP=softcap > 0, HAS_Z_LOSS=z_loss > 0, num_warps=num_warps,
        )
    return dlogits


def default_chunk_rows(M: int, V: int, C: int) -> int:
    """Token rows per chunk: a chunk of logits about the size of h, at least MIN_CHUNK_ROWS rows."""
    rows = triton.next_power_of_2(triton.cdiv(M, triton.cdiv(V, max(C, 1))))  # C = 0: h has no features
    return max(1, min(M, max(rows, MIN_CHUNK_ROWS)))


@triton_op("cs336_kernels::linear_cross_entropy_fwd", mutates_args={})
def linear_cross_entropy_fwd(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             chunk_rows: int, with_grad: bool, softcap: float = 0.0,
                             z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, grad_h, grad_weight) of cross_entropy(h @ weight.T) for (M, C) h, (V, C) weight.

    The gradients are those of the mean loss (upstream gradient 1); without ``with_grad`` they
    are empty tensors.
    """
    M = h.shape[0]
    n_valid = (targets != ignore_index).sum()
    loss = torch.empty(M, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if with_grad else h.new_empty(0)
    grad_w = torch.zeros_like(weight) if with_grad else weight.new_empty(0)
    for start in range(0, M, chunk_rows):
        end = min(start + chunk_rows, M)
        h_c = h[start:end]  # (m, C)
        logits = h_c @ weight.t()  # (m, V); overwritten by its gradient when with_grad
        loss_c, _, _ = _launch_fwd(logits, targets[start:end], n_valid, ignore_index, write_grad=with_grad,
                                   softcap=softcap, z_loss=z_loss)
        loss[start:end] = loss_c
        if with_grad:
            torch.mm(logits, weight, out=grad_h[start:end])
            grad_w.addmm_(logits.t(), h_c)
    return loss.sum() / n_valid, grad_h, grad_w


@register_flop_formula(torch.ops.cs336_kernels.linear_cross_entropy_fwd, get_raw=True)
def _linear_cross_entropy_flops(h, weight, targets, ignore_index, chunk_rows, with_grad, softcap=0.0, z_loss=0.0,
                                *, out_val=None) -> int:
    """Matmul FLOPs of the op for FlopCounterMode: logits, plus grad_h and grad_W with the grads."""
    M, C = h.shape
    V = weight.shape[0]
    return (6 if with_grad else 2) * M * C * V


def _flatten(logits_or_h: torch.Tensor, targets: torch.Tensor, op: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous (M, last) view of the input and (M,) int64 targets, after validation."""
    check_tensor(logits_or_h, name, op)
    if logits_or_h.dim() == 0 or logits_or_h.shape[:-1] != targets.shape:
        raise KernelInputError(f"{op}: {name} of shape {tuple(logits_or_h.shape)} needs targets of shape "
                               f"{tuple(logits_or_h.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise KernelInputError(f"{op}: targets must be integer class ids, got dtype {targets.dtype}")
    check_same_device(op, **{name: logits_or_h, "targets": targets})
    if name == "logits" and logits_or_h.shape[-1] == 0:
        raise KernelInputError(f"{op}: logits of shape {tuple(logits_or_h.shape)} have no classes (last dim 0)")
    # An explicit row count: view(-1, 0) cannot infer it for an empty last dim.
    flat = logits_or_h.contiguous().view(targets.numel(), logits_or_h.shape[-1])  # (M, V) or (M, C)
    return flat, targets.reshape(-1).to(torch.int64).contiguous()  # (M,)


def _check_target_range(targets: torch.Tensor, V: int, ignore_index: int, op: str) -> None:
    """Fail on a target outside [0, V) that is not ``ignore_index``, without a host read.

    ``torch._assert_async``: on the CPU it raises here (re-raised as KernelInputError); on CUDA it
    is a device-side assert, as ``F.cross_entropy``'s own check is there. Skipped while
    torch.compile traces.
    """
    if torch.compiler.is_compiling() or targets.numel() == 0:
        return
    ok = ((targets == ignore_index) | ((targets >= 0) & (targets < V))).all()
    message = (f"{op}: a target id is outside [0, {V}) and is not ignore_index={ignore_index}; "
               "check the data and vocab_size")
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        raise KernelInputError(message) from None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives matmuls on ``device`` (None when autocast is off there)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: float = 0.0,
                z_loss: float = 0.0) -> torch.Tensor:
        loss, row_max, logsum, n_valid = cross_entropy_fwd(logits2, targets, ignore_index, softcap, z_loss)
        ctx.save_for_backward(logits2, targets, row_max, logsum, n_valid)
        ctx.ignore_index, ctx.softcap, ctx.z_loss = ignore_index, softcap, z_loss
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits2, targets, row_max, logsum, n_valid = ctx.saved_tensors
        dlogits = cross_entropy_bwd(grad.contiguous(), logits2, targets, row_max, logsum, n_valid, ctx.ignore_index,
                                    ctx.softcap, ctx.z_loss)
        return dlogits, None, None, None, None


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h2: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk_rows: int, with_grad: bool, softcap: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
        loss, grad_h, grad_w = linear_cross_entropy_fwd(h2, weight, targets, ignore_index, chunk_rows, with_grad,
                                                        softcap, z_loss)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        grad = grad.to(grad_h.dtype)
        dh = grad_h * grad if ctx.needs_input_grad[0] else None
        dw = grad_w * grad if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None, None


def _recipe_args(op: str, logit_softcap: float | None, z_loss: float) -> tuple[float, float]:
    """(softcap, z_loss) as the launchers take them: 0.0 for an option that is off."""
    if logit_softcap is not None and not 0 < logit_softcap < math.inf:
        raise KernelInputError(f"{op}: logit_softcap must be a finite number > 0, or None for no cap; got "
                               f"{logit_softcap!r}")
    if not 0 <= z_loss < math.inf:
        raise KernelInputError(f"{op}: z_loss must be a finite number >= 0 (0 turns it off); got {z_loss!r}")
    return float(logit_softcap or 0.0), float(z_loss)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *,
                  logit_softcap: float | None = None, z_loss: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of (..., V) logits against (...) integer targets, fp32 scalar (with the
    recipe's soft-cap and z-loss when given)."""
    logits2, targets1 = _flatten(logits, targets, "cross_entropy", "logits")
    _check_target_range(targets1, logits2.shape[1], ignore_index, "cross_entropy")
    softcap, z = _recipe_args("cross_entropy", logit_softcap, z_loss)
    return CrossEntropyFunction.apply(logits2, targets1, ignore_index, softcap, z)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_rows: int | None = None, *, logit_softcap: float | None = None,
                         z_loss: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` without materializing all (tokens x vocab) logits.

    ``chunk_rows`` sets the token rows per chunk (default: ``default_chunk_rows``); ``logit_softcap``
    and ``z_loss`` as in ``cross_entropy``.
    """
    amp_dtype = _autocast_dtype(h.device) if isinstance(h, torch.Tensor) else None
    if amp_dtype is not None:
        # As F.linear under autocast: the matmuls take the autocast dtype (the casts carry the
        # gradients back to h's and weight's own dtypes); the op runs with autocast off, so the
        # logits, grad_h and grad_W chunks all have that one dtype.
        def cast(t):
            return t.to(amp_dtype) if isinstance(t, torch.Tensor) and t.dtype in SUPPORTED_DTYPES else t
        with torch.autocast(h.device.type, enabled=False):
            return linear_cross_entropy(cast(h), cast(weight), targets, ignore_index, chunk_rows,
                                        logit_softcap=logit_softcap, z_loss=z_loss)
    h2, targets1 = _flatten(h, targets, "linear_cross_entropy", "h")
    check_tensor(weight, "weight", "linear_cross_entropy")
    check_same_device("linear_cross_entropy", h=h, weight=weight)
    if weight.dim() != 2 or weight.shape[1] != h.shape[-1] or weight.dtype != h.dtype:
        raise KernelInputError(
            f"linear_cross_entropy: weight {tuple(weight.shape)} {weight.dtype} must be (vocab, "
            f"{h.shape[-1]}) with h's dtype {h.dtype}"
        )
    V = weight.shape[0]
    if V == 0:
        raise KernelInputError("linear_cross_entropy: weight has no rows (vocab size 0), so the logits have "
                               "no classes")
    _check_target_range(targets1, V, ignore_index, "linear_cross_entropy")

    M, C = h2.shape
    rows = chunk_rows if chunk_rows is not None else default_chunk_rows(M, V, C)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise KernelInputError(f"linear_cross_entropy: chunk_rows must be an integer >= 1 (or None), got {rows!r}")
    # Under no_grad (evaluation) the chunks compute the loss only.
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    softcap, z = _recipe_args("linear_cross_entropy", logit_softcap, z_loss)
    return LinearCrossEntropyFunction.apply(h2, weight.contiguous(), targets1, ignore_index, rows, with_grad,
                                            softcap, z)
