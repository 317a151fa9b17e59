"""RMSNorm providers (Triton kernel, native ``F.rms_norm``) vs ``cs336.ops.rms_norm_reference``,
forward and backward.

Under TRITON_INTERPRET=1 on the CPU (tests/conftest.py) and, marked ``gpu``, with real CUDA.
"""

import pytest
import torch

from cs336 import ops
from cs336.ops import rms_norm_native, rms_norm_reference
from kernels._common import KernelInputError, max_block_size
from kernels.rms_norm import rms_norm

IMPLS = {"triton": rms_norm, "native": rms_norm_native}
# (provider, block cap): the Triton kernel with one block per row and with a column loop.
VARIANTS = [("triton", None), ("triton", 32), ("native", None)]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5

# Every rank the op accepts; widths that are not powers of two; rows not a multiple of anything.
SHAPES = [(123,), (37, 123), (5, 7, 96), (2, 3, 5, 67)]


def run_both(parity, x, weight, block_cap=None, provider="triton"):
    """Forward + backward through a provider and the fp32 reference; compare y, dx, dweight."""
    impl = IMPLS[provider]
    dy = parity.random_like_grad(x)
    xk, wk = parity.leaf(x), parity.leaf(weight)
    if block_cap is None:
        y = impl(xk, wk, EPS)
    else:
        with max_block_size(block_cap):
            y = impl(xk, wk, EPS)
    assert y.dtype == x.dtype and y.shape == x.shape
    if block_cap is None:
        y.backward(dy)
    else:
        with max_block_size(block_cap):
            y.backward(dy)
    xr, wr = parity.leaf(x, torch.float32), parity.leaf(weight, torch.float32)
    yr = rms_norm_reference(xr, wr, EPS)
    yr.backward(dy.to(torch.float32))
    parity.assert_close(y, yr, "rms_norm y", dtype=x.dtype)
    parity.assert_close(xk.grad, xr.grad, "rms_norm dx", dtype=x.dtype)
    assert wk.grad.dtype == weight.dtype
    parity.assert_close(wk.grad, wr.grad, "rms_norm dweight", dtype=weight.dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("provider,block_cap", VARIANTS, ids=["triton_one_block", "triton_column_loop", "native"])
def test_rms_norm_matches_reference(parity, shape, dtype, provider, block_cap):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    run_both(parity, x, weight, block_cap, provider)


@pytest.mark.parametrize("provider", list(IMPLS))
def test_rms_norm_wide_row_and_large_values(parity, provider):
    # d_model = 16K: one block forward, column blocks backward on triton
    # (kernels.rms_norm.BWD_PER_THREAD); values of size 1e3 so mean(x**2) is large.
    x = 1e3 * torch.randn(3, 16384, device=DEVICE)
    run_both(parity, x, torch.randn(16384, device=DEVICE), provider=provider)


@pytest.mark.parametrize("provider", list(IMPLS))
def test_rms_norm_non_contiguous_and_mixed_dtypes(parity, provider):
    x = torch.randn(2, 75, 9, device=DEVICE).transpose(1, 2)  # (2, 9, 75), not contiguous
    assert not x.is_contiguous()
    run_both(parity, x, torch.randn(75, device=DEVICE), provider=provider)
    # bf16 activations with an fp32 weight: y in bf16, dweight in fp32.
    run_both(parity, torch.randn(6, 40, device=DEVICE).bfloat16(), torch.randn(40, device=DEVICE),
             provider=provider)


def test_rms_norm_more_rows_than_programs(parity):
    # The backward's persistent grid gives each program several rows; 203 rows is not a multiple.
    run_both(parity, torch.randn(7, 29, 24, device=DEVICE), torch.randn(24, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_rms_norm_rejects_unsupported_dtype(dtype):
    x = torch.ones(4, 8, dtype=dtype, device=DEVICE)
    with pytest.raises(KernelInputError, match="supports float32, bfloat16, float16"):
        rms_norm(x, torch.ones(8, dtype=dtype, device=DEVICE), EPS)


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_rms_norm_seam_checks_inputs_on_every_backend(backend):
    # The torch backend broadcast a (1,) or (1, N) weight (one gain for every column, or a gain per
    # row), returned int64 for integer x and 1.0 for a 0-d x; native and Triton raised torch's or
    # the kernel's own errors instead; a negative eps gave NaN everywhere. Now one ValueError.
    if not ops.backend_available(backend):
        pytest.skip(f"backend {backend} cannot run here")
    x = torch.randn(3, 4, device=DEVICE)
    bad = [((x, torch.ones(1, device=DEVICE), 1e-5), "weight must be 1-D with length"),
           ((x, torch.ones(1, 4, device=DEVICE), 1e-5), "weight must be 1-D with length"),
           ((x, torch.ones(3, 4, device=DEVICE), 1e-5), "weight must be 1-D with length"),
           ((torch.tensor(2.0, device=DEVICE), torch.ones((), device=DEVICE), 1e-5), "weight must be 1-D"),
           ((torch.ones(3, 4, dtype=torch.long, device=DEVICE), torch.ones(4, device=DEVICE), 1e-5),
            "must be floating point"),
           ((x, torch.ones(4, device=DEVICE), -1.0), "eps must be >= 0"),
           ((x, torch.ones(4, device=DEVICE), float("nan")), "eps must be >= 0")]
    with ops.use_backend(backend):
        for args, message in bad:
            with pytest.raises(ValueError, match=message):
                ops.rms_norm(*args)


@pytest.mark.parametrize("provider", list(IMPLS))
def test_rms_norm_empty_last_dim(provider):
    # Triton failed with "cannot reshape tensor of 0 elements" on x of shape (3, 0); the reference
    # returns an empty (3, 0) result with an empty weight gradient.
    x = torch.randn(3, 0, device=DEVICE, requires_grad=True)
    w = torch.ones(0, device=DEVICE, requires_grad=True)
    y = IMPLS[provider](x, w, 1e-5)
    assert y.shape == (3, 0) and rms_norm_reference(x, w, 1e-5).shape == (3, 0)
    y.sum().backward()
    assert x.grad.shape == (3, 0) and w.grad.shape == (0,)


def test_rms_norm_rejects_bad_device_and_shape():
    with pytest.raises(KernelInputError, match="is on meta"):
        rms_norm(torch.ones(2, 8, device="meta"), torch.ones(8, device="meta"), EPS)
    with pytest.raises(KernelInputError, match=r"length x.shape\[-1\]"):
        rms_norm(torch.ones(2, 8, device=DEVICE), torch.ones(7, device=DEVICE), EPS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("shape", [(4, 2048, 4096), (8192, 1600), (64, 65536), (3, 100_003)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("provider", list(IMPLS))
def test_rms_norm_cuda_large(parity, shape, dtype, provider):
    x = torch.randn(shape, device="cuda").to(dtype)
    run_both(parity, x, torch.randn(shape[-1], device="cuda").to(dtype), provider=provider)
