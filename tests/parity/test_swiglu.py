"""SwiGLU gate providers (Triton kernel, native ``F.silu(a) * b``) vs ``cs336.ops.swiglu_reference``,
forward and backward."""

import pytest
import torch

from cs336.ops import swiglu_native, swiglu_reference
from kernels._common import KernelInputError
from kernels.swiglu import BLOCK_SIZE, swiglu

IMPLS = {"triton": swiglu, "native": swiglu_native}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Ranks 1-4; sizes not a multiple of the 1024-element block (and one smaller than a block).
SHAPES = [(1000,), (3, 1367), (5, 7, 123), (2, 3, 5, 37)]


def run_both(parity, a, b, provider="triton"):
    dc = parity.random_like_grad(a)
    ak, bk = parity.leaf(a), parity.leaf(b)
    c = IMPLS[provider](ak, bk)
    assert c.dtype == a.dtype and c.shape == a.shape
    c.backward(dc)
    ar, br = parity.leaf(a, torch.float32), parity.leaf(b, torch.float32)
    swiglu_reference(ar, br).backward(dc.to(torch.float32))
    cr = swiglu_reference(ar.detach(), br.detach())
    parity.assert_close(c, cr, "swiglu out", dtype=a.dtype)
    parity.assert_close(ak.grad, ar.grad, "swiglu da", dtype=a.dtype)
    parity.assert_close(bk.grad, br.grad, "swiglu db", dtype=a.dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("provider", list(IMPLS))
def test_swiglu_matches_reference(parity, shape, dtype, provider):
    a = (3 * torch.randn(shape, device=DEVICE)).to(dtype)  # wide range: silu's tails and middle
    b = torch.randn(shape, device=DEVICE).to(dtype)
    run_both(parity, a, b, provider)


def test_swiglu_spans_several_blocks(parity):
    n = 3 * BLOCK_SIZE + 17
    run_both(parity, torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE))


@pytest.mark.parametrize("provider", list(IMPLS))
def test_swiglu_non_contiguous(parity, provider):
    a = torch.randn(40, 33, device=DEVICE).t()  # (33, 40), transposed view
    b = torch.randn(33, 80, device=DEVICE)[:, ::2]  # (33, 40), strided slice
    assert not a.is_contiguous() and not b.is_contiguous()
    run_both(parity, a, b, provider)


# sigmoid(-1e4) overflows exp() to inf in the interpreter's numpy; the result (0) is correct.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("provider", list(IMPLS))
def test_swiglu_extreme_inputs(parity, provider):
    a = torch.tensor([-1e4, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e4], device=DEVICE)
    run_both(parity, a, torch.linspace(-2, 2, a.numel(), device=DEVICE), provider)


@pytest.mark.parametrize("a_dtype,b_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                             (torch.float32, torch.float16)], ids=str)
def test_native_swiglu_mixed_dtypes_take_the_reference_dtype(parity, a_dtype, b_dtype):
    # Native rounded the result to a's dtype (bf16 a, fp32 b: bf16), where the reference promotes
    # (fp32): the two providers disagreed on the dtype and lost b's precision.
    a = torch.randn(5, 7, device=DEVICE).to(a_dtype)
    b = torch.randn(5, 7, device=DEVICE).to(b_dtype)
    expected = swiglu_reference(a.float(), b.float())
    out_dtype = swiglu_reference(a, b).dtype
    got = swiglu_native(a, b)
    assert got.dtype == out_dtype == torch.promote_types(a_dtype, b_dtype)
    parity.assert_close(got, expected.to(out_dtype), "native swiglu, mixed dtypes", dtype=out_dtype)


def test_swiglu_rejects_bad_inputs():
    x = torch.ones(8, device=DEVICE)
    with pytest.raises(KernelInputError, match="dtype float64"):
        swiglu(x.double(), x.double())
    with pytest.raises(KernelInputError, match="same shape and dtype"):
        swiglu(x, torch.ones(4, device=DEVICE))
    with pytest.raises(KernelInputError, match="same shape and dtype"):
        swiglu(x, x.bfloat16())
    with pytest.raises(KernelInputError, match="is on meta"):
        swiglu(torch.ones(8, device="meta"), torch.ones(8, device="meta"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("shape", [(8, 1024, 5461), (16_777_217,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("provider", list(IMPLS))
def test_swiglu_cuda_large(parity, shape, dtype, provider):
    run_both(parity, torch.randn(shape, device="cuda").to(dtype), torch.randn(shape, device="cuda").to(dtype),
             provider)
