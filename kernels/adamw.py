"""One AdamW step over many tensors in one Triton launch per dtype group (multi-tensor apply).

Math (the CS336 handout's Algorithm 2, exactly as ``cs336.ops.adamw_step_reference_``), per
element in fp32, with the bias corrections folded into the step size on the host:

    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    a_t = lr sqrt(1 - b2^t) / (1 - b1^t)
    p <- p - a_t m / (sqrt(v) + eps)      then      p <- p - lr wd p   (decay on the updated p)

m, v and the intermediate p are rounded to their storage dtypes where the reference rounds them,
so fp32 runs track the reference to a few ulps.

HBM traffic for n parameters: reads 4n (p, g, m, v), writes 3n (p, m, v); no other pass.

Multi-tensor layout: the tensors of one (p, g, m, v) dtype combination are cut into blocks of
BLOCK_SIZE elements; one program per block. A small int64 table on the device holds, per tensor,
the addresses of p, g, m, v, its first block and its size; each program finds its tensor by a
binary search over the first-block column (log2(T) scalar loads). The table is cached by the
tensors' addresses (``_pointer_table``): rebuilt only when they change, without a stream sync. Same idea as PyTorch's
``_foreach`` / apex ``multi_tensor_apply``, written here with pointer tables instead of
per-launch argument structs.

Registered with ``torch.library.custom_op`` (opaque to torch.compile), not ``triton_op``: the
pointer table is built from ``data_ptr()``, which the fake tensors used for tracing do not have.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels._common import KernelInputError, check_tensor

# Elements per program: 1024 at 8 warps (4 per thread); each program reads 4 and writes 3 vectors.
# Measured with ``python -m kernels.gpu_check``: 40 registers (48 warps/SM) on sm_80 and sm_90a;
# at 4 warps (8 per thread) sm_90a took 96 registers (20 warps/SM), sm_80 63 (32 warps/SM).
BLOCK_SIZE = 1024
NUM_WARPS = 8

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 x rounded to nearest-even in DTYPE, returned as fp32 (exactly representable in DTYPE).

    bf16 is rounded with integer ops because Triton's CPU interpreter truncates fp32 -> bf16
    casts; on a GPU this equals ``x.to(tl.bfloat16)``. NaN and inf are preserved.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _adamw_kernel(
    table_ptr,  # (T, 4) int64: addresses of p, g, m, v of each tensor
    first_block_ptr,  # (T + 1,) int64: index of each tensor's first block; last entry = total
    numel_ptr,  # (T,) int64: elements of each tensor
    T,  # number of tensors
    step_size,  # lr * sqrt(1 - b2^t) / (1 - b1^t)
    beta1,  # b1
    beta2,  # b2
    one_minus_beta1,  # 1 - b1, computed on the host in double precision
    one_minus_beta2,  # 1 - b2
    eps,  # added to sqrt(v)
    decay,  # lr * weight_decay
    LOG_T: tl.constexpr,  # binary-search steps: bit length of T
    P_DTYPE: tl.constexpr,  # storage dtypes of p, g, m, v
    G_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0).to(tl.int64)
    # Largest t with first_block[t] <= pid (tensors with no blocks are never found).
    lo = tl.zeros((), dtype=tl.int64)
    # Not T.to(tl.int64): on a GPU, T == 1 (a one-tensor group) arrives as a compile-time
    # constant (Triton specializes ints equal to 1), a Python int without .to.
    hi = lo + T
    for _ in tl.static_range(LOG_T):
        mid = (lo + hi) // 2
        go_right = tl.load(first_block_ptr + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    t = lo
    p_ptr = tl.load(table_ptr + 4 * t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(table_ptr + 4 * t + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(table_ptr + 4 * t + 2).to(tl.pointer_type(M_DTYPE))
    v_ptr = tl.load(table_ptr + 4 * t + 3).to(tl.pointer_type(V_DTYPE))
    offs = (pid - tl.load(first_block_ptr + t)) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < tl.load(numel_ptr + t)

    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = _round(tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32), M_DTYPE)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Round wherever the reference's tensor ops round (no-ops for fp32 state), so half-precision
    # state and parameters follow the same trajectory.
    m = _round(_round(beta1 * m, M_DTYPE) + one_minus_beta1 * g, M_DTYPE)
    v = _round(_round(beta2 * v, V_DTYPE) + one_minus_beta2 * g * g, V_DTYPE)
    denom = _round(_round(tl.sqrt_rn(v), V_DTYPE) + eps, V_DTYPE)
    update = _round(step_size * _round(tl.div_rn(m, denom), M_DTYPE), M_DTYPE)
    p = _round(p - _round(update, P_DTYPE), P_DTYPE)
    p = _round(p - _round(p * decay, P_DTYPE), P_DTYPE)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(M_DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(V_DTYPE), mask=mask)


# Device pointer tables by content: (device, addresses, numels) -> (meta tensor, total blocks).
_TABLES: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()
_MAX_TABLES = 16  # a few optimizer groups, each with its bf16/fp32 splits


def _pointer_table(params, grads, exp_avgs, exp_avg_sqs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(addresses (T, 4), first blocks (T + 1,), numels (T,), total blocks) on the tensors' device.

    Built once per set of addresses and reused while they stay the same (a group whose gradients
    are reallocated at the same addresses each step, as the caching allocator does, hits); a
    rebuild is one copy from pinned memory, asynchronous on CUDA (no stream sync).
    """
    device = params[0].device
    addresses = tuple(t.data_ptr() for group in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)
                      for t in group)
    numels = tuple(p.numel() for p in params)
    key = (device, addresses, numels)
    hit = _TABLES.get(key)
    if hit is None:
        first = [0]
        for n in numels:
            first.append(first[-1] + triton.cdiv(n, BLOCK_SIZE))
        # One host-to-device copy: [addresses (4T) | first blocks (T + 1) | numels (T)].
        host = torch.tensor(list(addresses) + first + list(numels), dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        hit = (host.to(device, non_blocking=True), first[-1])
        _TABLES[key] = hit
        while len(_TABLES) > _MAX_TABLES:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    meta, blocks = hit
    T = len(params)
    return meta[: 4 * T], meta[4 * T: 5 * T + 1], meta[5 * T + 1:], blocks


@torch.library.custom_op("cs336_kernels::adamw_step_", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def _adamw_group_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], step_size: float, beta1: float, beta2: float,
                  eps: float, decay: float) -> None:
    """Launch the kernel over contiguous tensors sharing one device and one dtype combination."""
    T = len(params)
    table, first_block, numel, blocks = _pointer_table(params, grads, exp_avgs, exp_avg_sqs)
    _adamw_kernel[(blocks,)](
        table, first_block, numel, T,
        step_size, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, decay,
        LOG_T=T.bit_length(),
        P_DTYPE=_TL_DTYPES[params[0].dtype], G_DTYPE=_TL_DTYPES[grads[0].dtype],
        M_DTYPE=_TL_DTYPES[exp_avgs[0].dtype], V_DTYPE=_TL_DTYPES[exp_avg_sqs[0].dtype],
        BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS,
    )


@_adamw_group_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, step_size, beta1, beta2, eps, decay) -> None:
    return None


def _check(params, grads, exp_avgs, exp_avg_sqs) -> None:
    lengths = {len(params), len(grads), len(exp_avgs), len(exp_avg_sqs)}
    if len(lengths) != 1:
        raise KernelInputError(
            f"adamw_step_: params, grads, exp_avgs, exp_avg_sqs must have equal lengths, got "
            f"{len(params)}, {len(grads)}, {len(exp_avgs)}, {len(exp_avg_sqs)}"
        )
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        for name, t in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            check_tensor(t, f"{name} {i}", "adamw_step_")
            if t.shape != p.shape or t.device != p.device:
                raise KernelInputError(
                    f"adamw_step_: {name} {i} has shape {tuple(t.shape)} on {t.device}; it must "
                    f"match param {i}: {tuple(p.shape)} on {p.device}"
                )


@torch.no_grad()
def adamw_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step in place on ``params``, ``exp_avgs``, ``exp_avg_sqs`` (``step`` from 1).

    Non-contiguous tensors are updated through contiguous copies written back afterwards.
    """
    _check(params, grads, exp_avgs, exp_avg_sqs)
    if step < 1:
        raise KernelInputError(f"adamw_step_: step counts from 1, got {step}")
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    step_size = lr * bias_correction2 ** 0.5 / bias_correction1
    groups: dict[tuple, list[list[torch.Tensor]]] = {}
    write_back: list[tuple[torch.Tensor, torch.Tensor]] = []
    for quad in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if quad[0].numel() == 0:
            continue
        key = (quad[0].device,) + tuple(t.dtype for t in quad)
        lists = groups.setdefault(key, [[], [], [], []])
        for i, t in enumerate(quad):
            if not t.is_contiguous():
                c = t.contiguous()
                if i != 1:
                    write_back.append((t, c))
                t = c
            lists[i].append(t)
    for p, g, m, v in groups.values():
        _adamw_group_(p, g, m, v, step_size, beta1, beta2, eps, lr * weight_decay)
    for original, copy in write_back:
        original.copy_(copy)
