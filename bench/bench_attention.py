"""Attention softmax(q k^T / sqrt(d)) v: reference, torch.compile, PyTorch SDPA and FlashAttention-2.

Providers: ``torch`` (``ops.attention_reference``, the CS336 definition: it materializes the
(T, T) scores), ``native`` (the seam's native provider: SDPA with its default backend choice),
``compile`` (torch.compile of the reference), ``sdpa``
(``torch.nn.functional.scaled_dot_product_attention``; on CUDA restricted to its FlashAttention
backend, the comparison the issue asks for) and ``triton`` (``kernels/attention.py`` through the
seam). Passes: ``fwd`` and ``fwd+bwd`` (the training cost).

FLOPs: ``analytic_flops`` counts the matmuls as the reference computes them, as ``cs336.flops``
and FlopCounterMode do: 4 B H T_q T_k d forward, 3x that forward + backward, with causal masking
not subtracted. ``analytic_causal_flops`` counts only the visible (query, key) pairs, T (T + 1)
/ 2 of T^2, the convention of the FlashAttention papers' causal TFLOP/s; its rate is in
``achieved_causal_flops_per_s``.

The ``leaderboard`` shape is the CS336 assignment-2 leaderboard's: batch 1, T = 16384, d_model
1024 in 16 heads of 64, bf16, causal, forward + backward (best published entry 4.03 ms on one
H100; this project's goal: under 4.0 ms, and at least SDPA's FlashAttention at T >= 4096).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from _harness import DEVICE, DTYPE, ON_CUDA, provider_fn
from cs336 import ops

pytestmark = pytest.mark.bench

PROVIDERS = ("torch", "native", "compile", "sdpa", "triton")
PASSES = ("fwd", "fwd+bwd")
# name: (batch B, heads H, length T, head dim d, GPU only). small: a TinyStories batch (8 x 256
# tokens, d_model 512 in 16 heads). leaderboard: see the module docstring. All causal.
SHAPES = {
    "tiny": (1, 2, 64, 16, False),
    "small": (8, 16, 256, 32, False),
    "T4096": (4, 16, 4096, 64, True),
    "T8192": (2, 16, 8192, 64, True),
    "T4096-d128": (4, 8, 4096, 128, True),
    "leaderboard": (1, 16, 16384, 64, True),
}


def _skip_unavailable(provider: str, shape: str, gpu_only: bool) -> None:
    if gpu_only and not ON_CUDA:
        pytest.skip("shape sized for a GPU; the CPU run keeps to the small shapes")
    if provider == "triton" and not ON_CUDA:
        if not ops.triton_interpreted():
            pytest.skip("no CUDA device: the Triton kernel runs on the CPU only under TRITON_INTERPRET=1")
        if shape != "tiny":
            pytest.skip("TRITON_INTERPRET=1 times the interpreter, not the kernel; only the tiny shape "
                        "runs, as a smoke check")


def _sdpa():
    """SDPA restricted to its FlashAttention backend on CUDA (its default choice on the CPU)."""
    if not ON_CUDA:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def _forward(provider: str):
    if provider == "sdpa":
        def run(q, k, v):
            with _sdpa():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return run
    return provider_fn(provider, lambda q, k, v: ops.attention_reference(q, k, v, True),
                       lambda q, k, v: ops.attention(q, k, v, causal=True))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention(bench, peak, provider, which, shape):
    B, H, T, d, gpu_only = SHAPES[shape]
    _skip_unavailable(provider, shape, gpu_only)
    dtype = torch.bfloat16 if shape == "leaderboard" else DTYPE
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, generator=gen).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    bench.provider = provider
    fwd_flops = 4 * B * H * T * T * d
    causal_fraction = (T + 1) / (2 * T)
    flops = fwd_flops if which == "fwd" else 3 * fwd_flops
    bench.record(op="attention", provider=provider, shape=shape, **{"pass": which}, dtype=str(dtype),
                 B=B, H=H, T=T, d=d, causal=True, analytic_flops=flops,
                 analytic_causal_flops=int(flops * causal_fraction))
    try:
        target, setup = bench.prepare(_forward(provider), (q, k, v), which)
        if provider == "torch":
            bench.record(measured_flops=bench.count_flops(target, setup),
                         measured_flops_counts="matmul-like ops only (FlopCounterMode)")
        seconds = bench.time(target, setup)
    except torch.OutOfMemoryError:
        pytest.skip(f"out of memory: {provider} materializes (B, H, T, T) = ({B}, {H}, {T}, {T}) "
                    "score tensors at this shape")
    bench.rates(seconds, peak, flops=flops, mfu=True)
    if seconds:
        bench.record(achieved_causal_flops_per_s=flops * causal_fraction / seconds, median_ms=seconds * 1e3)
