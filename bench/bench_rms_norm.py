"""RMSNorm forward/backward: reference, native ``F.rms_norm``, torch.compile and the Triton kernel.

Memory-bound: the figure to watch is GB/s against the device bandwidth (``cs336.flops.op_cost``
gives the minimal bytes: fwd reads x and w and writes y; bwd reads x, w, dy and writes dx, dw).
"""

import pytest
import torch

from _harness import DEVICE, DTYPE, OP_SHAPES, PASSES, PROVIDERS, provider_fn, skip_unavailable
from cs336 import ops

pytestmark = pytest.mark.bench

EPS = 1e-5
SHAPES = OP_SHAPES["rms_norm"]  # name: (rows M, width N, GPU only)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rms_norm(bench, peak, provider, which, shape):
    M, N, gpu_only = SHAPES[shape]
    skip_unavailable(provider, gpu_only)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, N, generator=gen).to(DEVICE, DTYPE).requires_grad_()
    w = (1 + 0.1 * torch.randn(N, generator=gen)).to(DEVICE, DTYPE).requires_grad_()
    forward = provider_fn(provider, lambda x, w: ops.rms_norm_reference(x, w, EPS),
                          lambda x, w: ops.rms_norm(x, w, EPS))
    bench.op("rms_norm", provider, which, shape, forward, (x, w), peak, M=M, N=N)
