"""Native attention (``F.scaled_dot_product_attention``) vs ``cs336.ops.attention_reference``.

Forward and backward on the same inputs, the reference computed in fp32 on upcast inputs; every
rank the seam accepts (..., T, d), causal and not, head dims and lengths that are not powers of
two. The Triton attention kernel has its own file (test_attention.py).
"""

import pytest
import torch

from cs336.ops import attention_native, attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (leading dims, T, d): rank 2 to 4 of q/k/v.
SHAPES = [((), 7, 16), ((3,), 33, 8), ((2, 3), 17, 24), ((1, 4), 65, 64)]


def run_both(parity, q, k, v, causal):
    do = parity.random_like_grad(q)
    qn, kn, vn = parity.leaf(q), parity.leaf(k), parity.leaf(v)
    out = attention_native(qn, kn, vn, causal)
    assert out.dtype == q.dtype and out.shape == q.shape
    out.backward(do)
    qr, kr, vr = (parity.leaf(t, torch.float32) for t in (q, k, v))
    ref = attention_reference(qr, kr, vr, causal)
    ref.backward(do.to(torch.float32))
    parity.assert_close(out, ref, "attention out", dtype=q.dtype, op="attention")
    for name, a, r in (("dq", qn, qr), ("dk", kn, kr), ("dv", vn, vr)):
        parity.assert_close(a.grad, r.grad, f"attention {name}", dtype=q.dtype, op="attention")


@pytest.mark.parametrize("lead,T,d", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_native_attention_matches_reference(parity, lead, T, d, dtype, causal):
    q, k, v = (torch.randn(*lead, T, d, device=DEVICE).to(dtype) for _ in range(3))
    run_both(parity, q, k, v, causal)


def test_native_attention_large_scores_and_non_contiguous(parity):
    # Scores of size ~1e2 (a peaked softmax) and q/k/v as head-split views of one projection.
    qkv = 4 * torch.randn(2, 19, 3 * 4 * 16, device=DEVICE)
    q, k, v = (t.unflatten(-1, (4, 16)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (2, 4, 19, 16)
    assert not q.is_contiguous()
    run_both(parity, q, k, v, causal=True)


def test_native_attention_causal_needs_equal_lengths():
    q, k = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="T_q=3, T_k=5"):
        attention_native(q, k, k, causal=True)
    assert attention_native(q, k, k, causal=False).shape == (2, 3, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_attention_cuda_gpt2_shapes(parity, dtype):
    q, k, v = (torch.randn(4, 12, 1024, 64, device="cuda").to(dtype) for _ in range(3))
    run_both(parity, q, k, v, causal=True)
