"""The SwiGLU gate ``silu(a) * b`` and its backward as elementwise Triton kernels.

Math, elementwise in fp32 (s = sigmoid(a)):

    c  = a * s * b
    da = dc * b * s * (1 + a * (1 - s))          db = dc * a * s

HBM traffic for n elements: forward reads 2n (a, b) and writes n (c); backward reads 3n (dc, a,
b) and writes 2n (da, db). The w1/w3/w2 matmuls of the feed-forward network stay in cuBLAS.

After Liger-Kernel ``ops/swiglu.py`` (v0.5.2), which recomputes silu(a) in the backward instead
of saving it; code written here. Inputs of any shape are flattened (non-contiguous ones copied
to contiguous first). Launchers are ``torch.library.triton_op`` custom ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from kernels._common import KernelInputError, check_same_device, check_tensor, launch

# Elements per program: 1024 keeps 8 elements per thread at 4 warps, enough to saturate HBM.
BLOCK_SIZE = 1024
NUM_WARPS = 4


@triton.jit
def _swiglu_fwd_kernel(
    c_ptr,  # (n,) output, dtype of a
    a_ptr,  # (n,) gate input (w1 x)
    b_ptr,  # (n,) linear input (w3 x)
    n,  # number of elements
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = a * tl.sigmoid(a) * b
    tl.store(c_ptr + offs, c.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    da_ptr,  # (n,) output, dtype of a
    db_ptr,  # (n,) output, dtype of b
    dc_ptr,  # (n,) upstream gradient
    a_ptr,  # (n,) forward gate input
    b_ptr,  # (n,) forward linear input
    n,  # number of elements
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    dc = tl.load(dc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    da = dc * b * s * (1.0 + a * (1.0 - s))
    db = dc * silu
    tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=mask)


@triton_op("cs336_kernels::swiglu_fwd", mutates_args={})
def swiglu_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for contiguous ``a`` and ``b`` of one shape and dtype."""
    c = torch.empty_like(a)
    n = a.numel()
    if n:
        launch(_swiglu_fwd_kernel)[(triton.cdiv(n, BLOCK_SIZE),)](
            c, a, b, n, BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)
    return c


@triton_op("cs336_kernels::swiglu_bwd", mutates_args={})
def swiglu_bwd(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) from contiguous ``dc`` and the forward's ``a``, ``b``."""
    da = torch.empty_like(a)
    db = torch.empty_like(b)
    n = a.numel()
    if n:
        launch(_swiglu_bwd_kernel)[(triton.cdiv(n, BLOCK_SIZE),)](
            da, db, dc, a, b, n, BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)
    return da, db


def _check_inputs(a: torch.Tensor, b: torch.Tensor) -> None:
    check_tensor(a, "a", "swiglu")
    check_tensor(b, "b", "swiglu")
    check_same_device("swiglu", a=a, b=b)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise KernelInputError(
            f"swiglu: a {tuple(a.shape)} {a.dtype} and b {tuple(b.shape)} {b.dtype} must have the "
            "same shape and dtype (the kernel does not broadcast or promote)"
        )


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _check_inputs(a, b)
        a = a.contiguous()
        b = b.contiguous()
        ctx.save_for_backward(a, b)
        return swiglu_fwd(a, b)

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        a, b = ctx.saved_tensors
        return swiglu_bwd(dc.contiguous(), a, b)


swiglu = SwiGLUFunction.apply
