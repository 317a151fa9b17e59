"""RMSNorm forward and backward as Triton kernels.

Math, per row x of length N (d_model), in fp32 whatever the input dtype:

    rstd = 1 / sqrt(mean(x**2) + eps)            y = x * rstd * w
    xhat = x * rstd                               c = sum(w * dy * xhat) / N
    dx   = rstd * (w * dy - xhat * c)             dw = sum over rows of dy * xhat

HBM traffic for M rows: forward reads M*N (x) + N (w), writes M*N (y) + M (rstd); backward
reads 2*M*N (x, dy) + N + M, writes M*N (dx) + P*N (per-program dw partial sums, P programs,
P ~ 2 x SM count), then ``torch.sum`` reduces the P partial rows into dw. A row wider than the
block (forward N > 16384, backward N > 8192: see FWD_PER_THREAD / BWD_PER_THREAD; or a forced
small block in tests) is processed in column blocks: the forward then reads x twice, the backward
reads x and dy twice and read-modify-writes its partial dw row once per row it owns (the second
reads come soon after the first, mostly from L2).

Structure after Liger-Kernel ``ops/rms_norm.py`` and triton ``python/tutorials/05-layer-norm.py``
(persistent backward grid with partial dw rows); code written here. Each launcher is registered
as a PyTorch custom op with ``torch.library.triton_op`` so torch.compile and FlopCounterMode see
it; the autograd.Function ties forward and backward together.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels._common import (
    KernelInputError,
    calculate_settings,
    check_same_device,
    check_tensor,
    launch,
    num_programs,
)

# Launch settings, measured with ``python -m kernels.gpu_check --full`` (sm_80 and sm_90a, fp32 /
# bf16 / fp16, d_model 512..65536; table in bench/RESULTS.md). A row is held in one block at the
# fewest elements per thread of PER_THREAD that covers it (at most 32 warps); wider rows loop over
# blocks of LOOP_BLOCK columns at PER_THREAD[0] per thread.
# - forward (x and w live): 25-36 registers at 8 or 16 per thread (64 warps/SM), so one block up
#   to 16384 columns; at 32 per thread 60-63 registers, and a 65536 block at 32 warps spilled.
# - backward (x, dy, w and the dw partial live): 4 per thread takes 32 registers (64 warps/SM) up
#   to 4096 columns; an 8192 row at 8 per thread 52-60 registers (32 warps/SM). At 16 per thread
#   a 4096 row took 106-125 registers (16 warps/SM) and a 16384 row spilled 170 B (half
#   precision) to 1.1 KB (fp32) per thread. The loop spills at 8 per thread on sm_80 (16 B, bf16)
#   and at 4096 columns / 32 warps on sm_90a (8 B, fp32, one row per program); 2048 columns at 16
#   warps: 32-44 registers, no spill.
FWD_PER_THREAD, FWD_LOOP_BLOCK = (8, 16), 8192
BWD_PER_THREAD, BWD_LOOP_BLOCK = (4, 8), 2048


def _settings(N: int, per_thread: tuple[int, ...], loop_block: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for rows of N columns: see FWD_PER_THREAD / BWD_PER_THREAD."""
    for pt in per_thread:
        block, num_warps = calculate_settings(N, pt)
        if N <= block:
            return block, num_warps
    return calculate_settings(min(N, loop_block), per_thread[0])


@triton.jit
def _rms_norm_fwd_kernel(
    y_ptr,  # (M, N) output, dtype of x
    x_ptr,  # (M, N) input rows
    w_ptr,  # (N,) weight
    rstd_ptr,  # (M,) fp32 output: 1 / rms of each row
    row_stride,  # elements between consecutive rows of x and y
    N,  # row length
    eps,  # added to mean(x**2)
    BLOCK_SIZE: tl.constexpr,  # columns per block (power of two)
    ONE_BLOCK: tl.constexpr,  # N <= BLOCK_SIZE: the row stays in registers
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * row_stride
    y_row = y_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_SIZE)
    if ONE_BLOCK:
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
        for start in range(0, N, BLOCK_SIZE):
            c = start + cols
            x = tl.load(x_row + c, mask=c < N, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK_SIZE):
            c = start + cols
            mask = c < N
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dx_ptr,  # (M, N) output, dtype of x
    dy_ptr,  # (M, N) upstream gradient
    x_ptr,  # (M, N) forward input
    w_ptr,  # (N,) weight
    rstd_ptr,  # (M,) fp32, saved by the forward
    dw_partial_ptr,  # (P, N) fp32 output: this program's sum of dy * xhat over its rows
    row_stride,  # elements between consecutive rows of x, dy, dx
    M,  # number of rows
    N,  # row length
    rows_per_program,  # rows owned by each program (a contiguous range)
    BLOCK_SIZE: tl.constexpr,  # columns per block (power of two)
    ONE_BLOCK: tl.constexpr,  # N <= BLOCK_SIZE: w and the dw partial stay in registers
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_SIZE)
    dw_row = dw_partial_ptr + pid * N
    if ONE_BLOCK:
        mask = cols < N
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(x_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            wdy = w * dy
            c = tl.sum(wdy * xhat, axis=0) / N
            dx = (wdy - xhat * c) * rstd
            tl.store(dx_ptr + row * row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
        tl.store(dw_row + cols, dw_acc, mask=mask)
    else:
        # dw_partial is zero-initialized by the launcher in this mode.
        for row in range(row_start, row_end):
            rstd = tl.load(rstd_ptr + row)
            dot = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
            for start in range(0, N, BLOCK_SIZE):
                c = start + cols
                mask = c < N
                x = tl.load(x_ptr + row * row_stride + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * row_stride + c, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
                dot += w * dy * x
            c_row = tl.sum(dot, axis=0) * rstd / N
            for start in range(0, N, BLOCK_SIZE):
                c = start + cols
                mask = c < N
                x = tl.load(x_ptr + row * row_stride + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * row_stride + c, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd
                dx = (w * dy - xhat * c_row) * rstd
                tl.store(dx_ptr + row * row_stride + c, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                partial = tl.load(dw_row + c, mask=mask, other=0.0)
                tl.store(dw_row + c, partial + dy * xhat, mask=mask)


@triton_op("cs336_kernels::rms_norm_fwd", mutates_args={})
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for contiguous ``x`` of shape (..., N) and ``weight`` of shape (N,)."""
    N = x.shape[-1]
    M = math.prod(x.shape[:-1])
    x2 = x.view(M, N)  # (M, N); view(-1, N) cannot infer M when N == 0
    y = torch.empty_like(x)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return y, rstd
    block, num_warps = _settings(N, FWD_PER_THREAD, FWD_LOOP_BLOCK)
    launch(_rms_norm_fwd_kernel)[(M,)](
        y, x2, weight, rstd, N, N, eps,
        BLOCK_SIZE=block, ONE_BLOCK=N <= block, num_warps=num_warps,
    )
    return y, rstd


@triton_op("cs336_kernels::rms_norm_bwd", mutates_args={})
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) from contiguous ``dy`` and the forward's ``x``, ``weight``, ``rstd``."""
    N = x.shape[-1]
    M = math.prod(x.shape[:-1])
    x2 = x.view(M, N)  # (M, N)
    dx = torch.empty_like(x)
    if M == 0 or N == 0:
        return dx, torch.zeros_like(weight)
    block, num_warps = _settings(N, BWD_PER_THREAD, BWD_LOOP_BLOCK)
    one_block = N <= block
    programs = num_programs(x.device, M)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)
    alloc = torch.empty if one_block else torch.zeros
    dw_partial = alloc((programs, N), dtype=torch.float32, device=x.device)  # (P, N)
    launch(_rms_norm_bwd_kernel)[(programs,)](
        dx, dy, x2, weight, rstd, dw_partial, N, M, N, rows_per_program,
        BLOCK_SIZE=block, ONE_BLOCK=one_block, num_warps=num_warps,
    )
    return dx, dw_partial.sum(dim=0).to(weight.dtype)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_tensor(x, "x", "rms_norm")
    check_tensor(weight, "weight", "rms_norm")
    check_same_device("rms_norm", x=x, weight=weight)
    if x.dim() == 0 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise KernelInputError(
            f"rms_norm: weight of shape {tuple(weight.shape)} does not match x of shape "
            f"{tuple(x.shape)}; weight must be 1-D with length x.shape[-1]"
        )


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        _check_inputs(x, weight)
        x = x.contiguous()
        weight = weight.contiguous()
        y, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_bwd(dy.contiguous(), x, weight, rstd)
        return dx, dweight, None


rms_norm = RMSNormFunction.apply
