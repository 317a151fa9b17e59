"""FlashAttention-2 forward and backward as Triton kernels (Dao 2023, arXiv:2307.08691).

Math, per batch-head, q (T_q, d), k and v (T_k, d), scale c = 1 / sqrt(d):

    S = c q k^T          L_i = logsumexp_j S_ij          P = exp(S - L)          O = P v
    dV = P^T dO          dP = dO v^T          D_i = sum_j P_ij dP_ij = rowsum(dO * O)_i
    dS = P * (dP - D)    dQ = c dS k          dK = c dS^T q

with causal masking (key j visible to query i iff j <= i; needs T_q == T_k) as -inf in S. The
forward keeps one (BLOCK_M, d) query tile in registers and streams key/value tiles through it
with the online softmax (Milakov & Gimelshein 2018): running row max m and sum l, rescaling the
accumulator by exp(m_old - m_new) as the max grows. Exponentials are base 2 with log2(e) folded
into the score scale (exp(x) = exp2(x log2 e)); L is stored in natural log. Nothing of size
(T_q, T_k) is ever written: the backward recomputes P tile by tile from L.

The backward is three kernels (FA2 section 3.2, and the structure of triton's tutorial
``06-fused-attention.py``; code written here): D = rowsum(dO * O); dK and dV, one program per key
tile iterating over query tiles; dQ, one program per query tile iterating over key tiles. No
atomics, at the price of computing S and dP twice. Causal tiles above the diagonal are skipped
by the loop bounds (never loaded); only the tiles that straddle the diagonal, and the last tile
of a length that is not a multiple of the tile, apply a mask.

HBM traffic per batch-head (ignoring re-reads of k, v or q by tiles: cache-resident at these
sizes): forward reads q, k, v and writes O and L; backward reads q, k, v, O, dO, L and writes
dQ, dK, dV and D. Saved for backward: q, k, v, O and L (fp32, (..., T_q)): O(T) memory.

Matmuls take the input dtype (fp32 with ``input_precision="ieee"``, no TF32) and accumulate in
fp32; P and dS are rounded to the input dtype before their matmuls, as in FA2. Any head dim up
to 128 is taken: tiles are a power of two >= 16 wide, and a narrower head (8, 48, 96) is
zero-padded on load (no effect on the dot products) and masked on store. Launch settings
come from ``attention_config`` (deterministic, no autotuning). Launchers are
``torch.library.triton_op`` custom ops with FLOP formulas for ``FlopCounterMode``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.utils.flop_counter import register_flop_formula

from kernels._common import KernelInputError, check_same_device, check_tensor, interpreted, launch

MAX_HEAD_DIM = 128  # widest head the launch settings are sized (and compile-checked) for
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b (+ acc) in fp32. UPCAST: multiply fp32 copies (exact for bf16 operands); used only
    under the CPU interpreter, whose tl.dot multiplies bf16 bit patterns as integers."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_tile(ptrs, row_ok, offs_d, D: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    """A (rows, HEAD_DIM) tile; with ROWS, rows where ``row_ok`` is False read 0; columns >= D
    (head dims padded to HEAD_DIM) read 0, which leaves every dot product unchanged."""
    if HEAD_DIM != D:
        if ROWS:
            return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    if ROWS:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _store_tile(ptrs, value, row_ok, offs_d, D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store the rows where ``row_ok`` and the columns < D of a (rows, HEAD_DIM) tile."""
    if HEAD_DIM != D:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    else:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, lo, hi, T_k, qk_scale,
               BLOCK_N: tl.constexpr, D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL_MASK: tl.constexpr,
               TAIL_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over key tiles [lo, hi) for one query tile; masks only where asked."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]  # (BLOCK_N, d)
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        k = _load_tile(k_ptrs, offs_n < T_k, offs_d, D, HEAD_DIM, TAIL_MASK)
        s = _dot(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if CAUSAL_MASK:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        if TAIL_MASK:
            s = tl.where(offs_n[None, :] < T_k, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs, offs_n < T_k, offs_d, D, HEAD_DIM, TAIL_MASK)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    o_ptr,  # (Z, H, T_q, d) output, dtype of q
    lse_ptr,  # (Z * H, T_q) fp32 output: logsumexp of each row of S (natural log)
    q_ptr,  # (Z, H, T_q, d) queries
    k_ptr,  # (Z, H, T_k, d) keys
    v_ptr,  # (Z, H, T_k, d) values
    stride_qz, stride_qh, stride_qt,  # q strides (last dim contiguous)
    stride_kz, stride_kh, stride_kt,  # k strides
    stride_vz, stride_vh, stride_vt,  # v strides
    stride_oz, stride_oh, stride_ot,  # o strides
    H,  # heads (second dim)
    T_q,  # queries per batch-head
    T_k,  # keys per batch-head
    qk_scale,  # log2(e) / sqrt(d)
    D: tl.constexpr,  # head dim d
    HEAD_DIM: tl.constexpr,  # tile width: d rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per inner step (divides BLOCK_M)
    CAUSAL: tl.constexpr,  # key j visible to query i iff j <= i (T_q == T_k)
    PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee": exact fp32 products)
    UPCAST: tl.constexpr,  # multiply fp32 copies (interpreter with bf16 only; see _dot)
):
    # Causal: the last query tiles have the most key tiles; schedule them first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    z, h = bh // H, bh % H
    q_base = q_ptr + z * stride_qz + h * stride_qh
    k_base = k_ptr + z * stride_kz + h * stride_kh
    v_base = v_ptr + z * stride_vz + h * stride_vh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T_q
    q = _load_tile(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], row_ok, offs_d, D, HEAD_DIM, True)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    if CAUSAL:
        # Keys below the tile's first query: all visible, no mask. Then the diagonal tiles.
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                   0, start_m, T_k, qk_scale, BLOCK_N, D, HEAD_DIM, False, False, PRECISION, UPCAST)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                   start_m, tl.minimum(start_m + BLOCK_M, T_k), T_k, qk_scale,
                                   BLOCK_N, D, HEAD_DIM, True, True, PRECISION, UPCAST)
    else:
        full = T_k - T_k % BLOCK_N
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                   0, full, T_k, qk_scale, BLOCK_N, D, HEAD_DIM, False, False, PRECISION, UPCAST)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                                   full, T_k, T_k, qk_scale, BLOCK_N, D, HEAD_DIM, False, True, PRECISION, UPCAST)
    o = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634  # back to natural log
    tl.store(lse_ptr + bh * T_q + offs_m, lse, mask=row_ok)
    o_ptrs = o_ptr + z * stride_oz + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    _store_tile(o_ptrs, o, row_ok, offs_d, D, HEAD_DIM)


class AttentionConfig(NamedTuple):
    """Launch settings. Forward: BLOCK_M queries x BLOCK_N keys. dK/dV kernel: BLOCK_N1 keys per
    program, BLOCK_M1 queries per step; dQ kernel: BLOCK_M2 queries per program, BLOCK_N2 keys
    per step. Each inner tile divides its program tile (the causal diagonal needs it)."""

    block_m: int
    block_n: int
    fwd_warps: int
    fwd_stages: int
    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    bwd_warps: int
    bwd_stages: int


_forced: list[AttentionConfig | None] = [None]


def attention_config(head_dim: int, dtype: torch.dtype, causal: bool) -> AttentionConfig:
    """Tiles and warps for one (head-dim tile width 16 / 32 / 64 / 128, dtype); chosen so the sm_80 /
    sm_90a compiles of every kernel use at most 255 registers per thread without spills and fit in
    shared memory (table in bench/RESULTS.md). ``causal`` does not change the tiles (the diagonal
    split works at any)."""
    if _forced[0] is not None:
        return _forced[0]
    if dtype == torch.float32:
        # fp32 operands take twice the registers of half-precision ones; narrower tiles. Measured
        # with kernels.gpu_check at T = 1000 (T not a multiple of 16): 64x16 forward tiles at
        # d = 128 spilled 160-184 B on sm_90a, 32x16 take 73-77 registers; the backward at
        # d <= 64 with 16x64 / 64x16 tiles and 4 warps left 8-24 B of stack, 16x32 / 32x16 at 8
        # warps and 2 stages take 64-80 registers and none.
        if head_dim <= 64:
            return AttentionConfig(64, 32, 8, 2, 16, 32, 32, 16, 8, 2)
        return AttentionConfig(32, 16, 8, 1, 16, 32, 32, 16, 8, 1)
    if head_dim <= 64:
        return AttentionConfig(128, 64, 8, 3, 32, 128, 128, 32, 8, 3)
    return AttentionConfig(128, 64, 8, 2, 32, 64, 64, 32, 8, 2)


@contextlib.contextmanager
def forced_config(config: AttentionConfig) -> Iterator[None]:
    """Use ``config`` for every launch inside the block (tests force small, multi-tile grids)."""
    previous = _forced[0]
    _forced[0] = config
    try:
        yield
    finally:
        _forced[0] = previous


def _tile_width(d: int) -> int:
    """Head-dim tile: d rounded up to a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(d))


def _dot_settings(dtype: torch.dtype) -> dict:
    """PRECISION: fp32 products exact (no TF32; ignored for bf16 / fp16 operands). UPCAST: see _dot."""
    return dict(PRECISION="ieee", UPCAST=interpreted() and dtype == torch.bfloat16)


@triton_op("cs336_kernels::flash_attention_fwd", mutates_args={})
def flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, L) for (Z, H, T_q, d) q and (Z, H, T_k, d) k, v with unit last-dim stride; L (Z, H, T_q) fp32."""
    Z, H, T_q, d = q.shape
    T_k = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((Z, H, T_q), dtype=torch.float32, device=q.device)
    if Z * H * T_q == 0:
        return o, lse
    cfg = attention_config(_tile_width(d), q.dtype, causal)
    grid = (triton.cdiv(T_q, cfg.block_m), Z * H)
    launch(_attn_fwd_kernel)[grid](
        o, lse, q, k, v,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, T_q, T_k, LOG2E / math.sqrt(d),
        D=d, HEAD_DIM=_tile_width(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, **_dot_settings(q.dtype),
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return o, lse


def attention_flops(batch_heads: int, t_q: int, t_k: int, head_dim: int, backward: bool = False) -> int:
    """Matmul FLOPs of attention as the reference computes it: forward S = q k^T and P v (2 x
    2 T_q T_k d each); backward dV, dP, dQ, dK (4 more). Causal masking is not subtracted and
    the backward's recomputation of S is not added, so the count matches the reference model's
    under FlopCounterMode (``cs336.flops``: training = 3 x forward)."""
    return (8 if backward else 4) * batch_heads * t_q * t_k * head_dim


@register_flop_formula(torch.ops.cs336_kernels.flash_attention_fwd, get_raw=True)
def _flash_attention_fwd_flops(q, k, v, causal, *, out_val=None) -> int:
    return attention_flops(q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3])


@triton.jit
def _attn_bwd_delta_kernel(
    delta_ptr,  # (Z * H, T_q) fp32 output: rowsum(dO * O)
    o_ptr,  # (Z, H, T_q, d) forward output
    do_ptr,  # (Z, H, T_q, d) upstream gradient
    stride_oz, stride_oh, stride_ot,  # o strides
    stride_dz, stride_dh, stride_dt,  # do strides
    H,  # heads
    T_q,  # queries per batch-head
    D: tl.constexpr,  # head dim d
    HEAD_DIM: tl.constexpr,  # tile width: d rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,  # rows per program
):
    bh = tl.program_id(1).to(tl.int64)
    z, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T_q
    o = _load_tile(o_ptr + z * stride_oz + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                   row_ok, offs_d, D, HEAD_DIM, True).to(tl.float32)
    do = _load_tile(do_ptr + z * stride_dz + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
                    row_ok, offs_d, D, HEAD_DIM, True).to(tl.float32)
    tl.store(delta_ptr + bh * T_q + offs_m, tl.sum(o * do, 1), mask=offs_m < T_q)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, stride_qt, stride_dt, lse_row, delta_row, offs_n, lo, hi, T_q,
                qk_scale, BLOCK_M: tl.constexpr, D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                TAIL_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), in transposed (key-major) form."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]  # (BLOCK_M, d)
        do_ptrs = do_base + offs_m[:, None] * stride_dt + offs_d[None, :]
        if TAIL_MASK:
            row_ok = offs_m < T_q
            lse = tl.load(lse_row + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_row + offs_m, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_row + offs_m)
            delta = tl.load(delta_row + offs_m)
        q = _load_tile(q_ptrs, offs_m < T_q, offs_d, D, HEAD_DIM, TAIL_MASK)
        do = _load_tile(do_ptrs, offs_m < T_q, offs_d, D, HEAD_DIM, TAIL_MASK)
        s_t = _dot(k, tl.trans(q), None, PRECISION, UPCAST) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        if CAUSAL_MASK:
            s_t = tl.where(offs_m[None, :] >= offs_n[:, None], s_t, float("-inf"))
        if TAIL_MASK:
            s_t = tl.where(offs_m[None, :] < T_q, s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :] * 1.4426950408889634)
        dv = _dot(p_t.to(do.dtype), do, dv, PRECISION, UPCAST)
        dp_t = _dot(v, tl.trans(do), None, PRECISION, UPCAST)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q.dtype), q, dk, PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    dk_ptr,  # (Z, H, T_k, d) output, dtype of k
    dv_ptr,  # (Z, H, T_k, d) output, dtype of v
    q_ptr,  # (Z, H, T_q, d) queries
    k_ptr,  # (Z, H, T_k, d) keys
    v_ptr,  # (Z, H, T_k, d) values
    do_ptr,  # (Z, H, T_q, d) upstream gradient
    lse_ptr,  # (Z * H, T_q) fp32 logsumexp from the forward
    delta_ptr,  # (Z * H, T_q) fp32 rowsum(dO * O)
    stride_qz, stride_qh, stride_qt,  # q strides
    stride_kz, stride_kh, stride_kt,  # k strides
    stride_vz, stride_vh, stride_vt,  # v strides
    stride_dz, stride_dh, stride_dt,  # do strides
    stride_dkz, stride_dkh, stride_dkt,  # dk strides
    stride_dvz, stride_dvh, stride_dvt,  # dv strides
    H,  # heads
    T_q,  # queries per batch-head
    T_k,  # keys per batch-head
    qk_scale,  # log2(e) / sqrt(d)
    sm_scale,  # 1 / sqrt(d)
    D: tl.constexpr,  # head dim d
    HEAD_DIM: tl.constexpr,  # tile width: d rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per inner step (divides BLOCK_N)
    BLOCK_N: tl.constexpr,  # key rows per program
    CAUSAL: tl.constexpr,  # key j visible to query i iff j <= i (T_q == T_k)
    PRECISION: tl.constexpr,  # tl.dot input_precision
    UPCAST: tl.constexpr,  # multiply fp32 copies (interpreter with bf16 only; see _dot)
):
    # Causal: the first key tiles see the most query tiles; schedule them first (pid 0 is).
    bh = tl.program_id(1).to(tl.int64)
    z, h = bh // H, bh % H
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T_k
    k = _load_tile(k_ptr + z * stride_kz + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                   col_ok, offs_d, D, HEAD_DIM, True)
    v = _load_tile(v_ptr + z * stride_vz + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                   col_ok, offs_d, D, HEAD_DIM, True)
    q_base = q_ptr + z * stride_qz + h * stride_qh
    do_base = do_ptr + z * stride_dz + h * stride_dh
    lse_row = lse_ptr + bh * T_q
    delta_row = delta_ptr + bh * T_q
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    lo = 0
    if CAUSAL:
        # Query tiles straddling the diagonal (masked); queries before start_n see none of these keys.
        lo = start_n + BLOCK_N
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, stride_qt, stride_dt, lse_row, delta_row, offs_n,
                             start_n, tl.minimum(lo, T_q), T_q, qk_scale, BLOCK_M, D, HEAD_DIM, True, True,
                             PRECISION, UPCAST)
    full = T_q - T_q % BLOCK_M
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, stride_qt, stride_dt, lse_row, delta_row, offs_n,
                         lo, full, T_q, qk_scale, BLOCK_M, D, HEAD_DIM, False, False, PRECISION, UPCAST)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, stride_qt, stride_dt, lse_row, delta_row, offs_n,
                         tl.maximum(lo, full), T_q, T_q, qk_scale, BLOCK_M, D, HEAD_DIM, False, True, PRECISION, UPCAST)
    dk_ptrs = dk_ptr + z * stride_dkz + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = dv_ptr + z * stride_dvz + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    _store_tile(dk_ptrs, dk * sm_scale, col_ok, offs_d, D, HEAD_DIM)
    _store_tile(dv_ptrs, dv, col_ok, offs_d, D, HEAD_DIM)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, lo, hi, T_k, qk_scale,
              BLOCK_N: tl.constexpr, D: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL_MASK: tl.constexpr,
              TAIL_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]  # (BLOCK_N, d)
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        k = _load_tile(k_ptrs, offs_n < T_k, offs_d, D, HEAD_DIM, TAIL_MASK)
        v = _load_tile(v_ptrs, offs_n < T_k, offs_d, D, HEAD_DIM, TAIL_MASK)
        s = _dot(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if CAUSAL_MASK:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        if TAIL_MASK:
            s = tl.where(offs_n[None, :] < T_k, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), None, PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PRECISION, UPCAST)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    dq_ptr,  # (Z, H, T_q, d) output, dtype of q
    q_ptr,  # (Z, H, T_q, d) queries
    k_ptr,  # (Z, H, T_k, d) keys
    v_ptr,  # (Z, H, T_k, d) values
    do_ptr,  # (Z, H, T_q, d) upstream gradient
    lse_ptr,  # (Z * H, T_q) fp32 logsumexp from the forward
    delta_ptr,  # (Z * H, T_q) fp32 rowsum(dO * O)
    stride_qz, stride_qh, stride_qt,  # q strides
    stride_kz, stride_kh, stride_kt,  # k strides
    stride_vz, stride_vh, stride_vt,  # v strides
    stride_dz, stride_dh, stride_dt,  # do strides
    stride_dqz, stride_dqh, stride_dqt,  # dq strides
    H,  # heads
    T_q,  # queries per batch-head
    T_k,  # keys per batch-head
    qk_scale,  # log2(e) / sqrt(d)
    sm_scale,  # 1 / sqrt(d)
    D: tl.constexpr,  # head dim d
    HEAD_DIM: tl.constexpr,  # tile width: d rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per inner step (divides BLOCK_M)
    CAUSAL: tl.constexpr,  # key j visible to query i iff j <= i (T_q == T_k)
    PRECISION: tl.constexpr,  # tl.dot input_precision
    UPCAST: tl.constexpr,  # multiply fp32 copies (interpreter with bf16 only; see _dot)
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    z, h = bh // H, bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T_q
    q = _load_tile(q_ptr + z * stride_qz + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                   row_ok, offs_d, D, HEAD_DIM, True)
    do = _load_tile(do_ptr + z * stride_dz + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
                    row_ok, offs_d, D, HEAD_DIM, True)
    lse2 = tl.load(lse_ptr + bh * T_q + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh * T_q + offs_m, mask=row_ok, other=0.0)
    k_base = k_ptr + z * stride_kz + h * stride_kh
    v_base = v_ptr + z * stride_vz + h * stride_vh
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    if CAUSAL:
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, 0, start_m, T_k,
                       qk_scale, BLOCK_N, D, HEAD_DIM, False, False, PRECISION, UPCAST)
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, start_m,
                       tl.minimum(start_m + BLOCK_M, T_k), T_k, qk_scale, BLOCK_N, D, HEAD_DIM, True, True,
                       PRECISION, UPCAST)
    else:
        full = T_k - T_k % BLOCK_N
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, 0, full, T_k,
                       qk_scale, BLOCK_N, D, HEAD_DIM, False, False, PRECISION, UPCAST)
        dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, full, T_k, T_k,
                       qk_scale, BLOCK_N, D, HEAD_DIM, False, True, PRECISION, UPCAST)
    dq_ptrs = dq_ptr + z * stride_dqz + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    _store_tile(dq_ptrs, dq * sm_scale, row_ok, offs_d, D, HEAD_DIM)


@triton_op("cs336_kernels::flash_attention_bwd", mutates_args={})
def flash_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) from (Z, H, T, d) tensors with unit last-dim stride and the forward's O and L."""
    Z, H, T_q, d = q.shape
    T_k = k.shape[2]
    dq = torch.empty_like(q)
    if Z * H == 0 or T_q == 0:
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty((Z, H, T_q), dtype=torch.float32, device=q.device)
    cfg = attention_config(_tile_width(d), q.dtype, causal)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    scales = (LOG2E / math.sqrt(d), 1.0 / math.sqrt(d))
    common = dict(D=d, HEAD_DIM=_tile_width(d), CAUSAL=causal, **_dot_settings(q.dtype), num_warps=cfg.bwd_warps,
                  num_stages=cfg.bwd_stages)
    launch(_attn_bwd_delta_kernel)[(triton.cdiv(T_q, cfg.block_m2), Z * H)](
        delta, o, do, *o.stride()[:3], *do.stride()[:3], H, T_q, D=d, HEAD_DIM=_tile_width(d), BLOCK_M=cfg.block_m2,
        num_warps=cfg.bwd_warps,
    )
    launch(_attn_bwd_dkdv_kernel)[(triton.cdiv(T_k, cfg.block_n1), Z * H)](
        dk, dv, q, k, v, do, lse, delta, *strides, *dk.stride()[:3], *dv.stride()[:3], H, T_q, T_k, *scales,
        BLOCK_M=cfg.block_m1, BLOCK_N=cfg.block_n1, **common,
    )
    launch(_attn_bwd_dq_kernel)[(triton.cdiv(T_q, cfg.block_m2), Z * H)](
        dq, q, k, v, do, lse, delta, *strides, *dq.stride()[:3], H, T_q, T_k, *scales,
        BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2, **common,
    )
    return dq, dk, dv


@register_flop_formula(torch.ops.cs336_kernels.flash_attention_bwd, get_raw=True)
def _flash_attention_bwd_flops(do, q, k, v, o, lse, causal, *, out_val=None) -> int:
    return attention_flops(q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3], backward=True)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """A (Z, H, T, d) view of (..., T, d) (a copy only for rank > 4 inputs that cannot be viewed,
    or a last dim that is not contiguous)."""
    if t.dim() == 2:
        t = t[None, None]
    elif t.dim() == 3:
        t = t[None]
    elif t.dim() > 4:
        t = t.reshape(-1, *t.shape[-3:])
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    op = "flash_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, op)
        if t.dim() < 2:
            raise KernelInputError(f"{op}: {name} must be (..., T, d), got shape {tuple(t.shape)}")
    check_same_device(op, q=q, k=k, v=v)
    if not q.dtype == k.dtype == v.dtype:
        raise KernelInputError(f"{op}: q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype")
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1]:
        raise KernelInputError(
            f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match; q must be "
            "(..., T_q, d) and k, v (..., T_k, d) with the same leading dims (no broadcasting) and k, v of "
            "equal length")
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise KernelInputError(f"{op}: head dims differ (q {d}, k {k.shape[-1]}, v {v.shape[-1]}); q, k and v "
                               "need the same last dim")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise KernelInputError(f"{op}: head dim {d} is not supported; the kernel takes d <= {MAX_HEAD_DIM} "
                               "(use more heads: d = d_model / num_heads) or the torch backend (--kernels torch)")
    if math.prod(q.shape[:-2]) > 65535:  # the batch-heads are the grid's second axis (CUDA limit)
        raise KernelInputError(f"{op}: {math.prod(q.shape[:-2])} batch x head slices exceed the kernel's "
                               "65535; split the batch into chunks")
    if k.shape[-2] == 0:
        raise KernelInputError(f"{op}: k and v have no keys (T_k = 0); attention needs at least one key")
    if causal and q.shape[-2] != k.shape[-2]:
        raise KernelInputError(f"{op}: causal attention needs as many queries as keys; got T_q={q.shape[-2]}, "
                               f"T_k={k.shape[-2]} (pass causal=False for cross-length attention)")


class FlashAttention(torch.autograd.Function):
    """``FlashAttention.apply(q, k, v, is_causal)``: q (..., T_q, d), k and v (..., T_k, d).

    Saves exactly q, k, v, O (q's shape) and L (fp32, q's leading dims: ``(..., T_q)``).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = True) -> torch.Tensor:
        _check_inputs(q, k, v, is_causal)
        o4, lse = flash_attention_fwd(_as_4d(q), _as_4d(k), _as_4d(v), bool(is_causal))
        o, lse = o4.reshape(q.shape), lse.reshape(q.shape[:-1])  # (..., T_q, d), (..., T_q)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.is_causal = bool(is_causal)
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        q4, k4, v4, o4 = _as_4d(q), _as_4d(k), _as_4d(v), _as_4d(o)
        lse4 = lse.reshape(q4.shape[:-1])  # (Z, H, T_q)
        dq, dk, dv = flash_attention_bwd(_as_4d(do.reshape(q.shape)), q4, k4, v4, o4, lse4, ctx.is_causal)
        return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v without materializing the scores; see ``FlashAttention``."""
    return FlashAttention.apply(q, k, v, causal)
