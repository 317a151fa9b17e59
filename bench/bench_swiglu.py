"""The SwiGLU gate silu(a) * b forward/backward: reference, native, torch.compile, the Triton kernel.

Memory-bound (fwd reads a, b and writes c; bwd reads a, b, dc and writes da, db); the W1/W3/W2
matmuls around the gate are not part of this op.
"""

import pytest
import torch

from _harness import DEVICE, DTYPE, OP_SHAPES, PASSES, PROVIDERS, provider_fn, skip_unavailable
from cs336 import ops

pytestmark = pytest.mark.bench

SHAPES = OP_SHAPES["swiglu"]  # name: (rows M, width N = d_ff, GPU only)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_swiglu(bench, peak, provider, which, shape):
    M, N, gpu_only = SHAPES[shape]
    skip_unavailable(provider, gpu_only)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(M, N, generator=gen).to(DEVICE, DTYPE).requires_grad_()
    b = torch.randn(M, N, generator=gen).to(DEVICE, DTYPE).requires_grad_()
    forward = provider_fn(provider, ops.swiglu_reference, ops.swiglu)
    bench.op("swiglu", provider, which, shape, forward, (a, b), peak, M=M, N=N)
