"""Cross-entropy over given logits, and the fused LM head + cross-entropy.

``cross_entropy``: mean loss of (M, V) logits (memory-bound). ``linear_cross_entropy``: the loss
of ``h @ W.T`` for h (M, K) and W (V, K); the reference materializes the (M, V) logits, the
Triton path does not, and the matmul makes it compute-bound at model sizes. Providers: see
``_harness`` (native: ``F.cross_entropy``, and ``F.linear`` before it).
"""

import pytest
import torch

from _harness import DEVICE, DTYPE, OP_SHAPES, PASSES, PROVIDERS, provider_fn, skip_unavailable
from cs336 import nn_utils, ops

pytestmark = pytest.mark.bench

CE_SHAPES = OP_SHAPES["cross_entropy"]  # name: (rows M, vocab V, GPU only)
LCE_SHAPES = OP_SHAPES["linear_cross_entropy"]  # name: (rows M, hidden K, vocab V, GPU only)


def _targets(M: int, V: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, V, (M,), generator=gen).to(DEVICE)


@pytest.mark.parametrize("shape", list(CE_SHAPES))
@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cross_entropy(bench, peak, provider, which, shape):
    M, V, gpu_only = CE_SHAPES[shape]
    skip_unavailable(provider, gpu_only)
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (4 * torch.randn(M, V, generator=gen)).to(DEVICE, DTYPE).requires_grad_()
    targets = _targets(M, V, gen)
    forward = provider_fn(provider, lambda z: nn_utils.cross_entropy(z, targets),
                          lambda z: ops.cross_entropy(z, targets))
    bench.op("cross_entropy", provider, which, shape, forward, (logits,), peak, M=M, N=V)


@pytest.mark.parametrize("shape", list(LCE_SHAPES))
@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_cross_entropy(bench, peak, provider, which, shape):
    M, K, V, gpu_only = LCE_SHAPES[shape]
    skip_unavailable(provider, gpu_only)
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(M, K, generator=gen).to(DEVICE, DTYPE).requires_grad_()
    weight = (torch.randn(V, K, generator=gen) / K**0.5).to(DEVICE, DTYPE).requires_grad_()
    targets = _targets(M, V, gen)
    forward = provider_fn(provider, lambda h, w: ops.linear_cross_entropy_reference(h, w, targets),
                          lambda h, w: ops.linear_cross_entropy(h, w, targets))
    bench.op("linear_cross_entropy", provider, which, shape, forward, (h, weight), peak, M=M, N=V, K=K)
