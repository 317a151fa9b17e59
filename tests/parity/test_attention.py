"""FlashAttention-2 Triton kernel vs ``cs336.ops.attention_reference``: O, L, dQ, dK, dV.

Under TRITON_INTERPRET=1 on the CPU (tests/conftest.py) and, marked ``gpu``, with real CUDA. The
reference runs in fp32 on the upcast inputs; L's reference is logsumexp of the scaled scores.
Small shapes run at the launch settings the kernel really picks (one or two tiles) and under a
forced small config (``forced_config``) so that several tiles, the unmasked off-diagonal loops
and the tails are all exercised at interpreter-friendly sizes.
"""

import contextlib
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cs336 import ops
from kernels import attention as flash
from kernels._common import KernelInputError
from kernels.attention import AttentionConfig, FlashAttention, attention_flops, forced_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Inner tiles of 16 and program tiles of 32: several of each at T of ~60.
SMALL = AttentionConfig(32, 16, 4, 1, 16, 32, 32, 16, 4, 1)

# id: (q shape, k/v shape, causal, config or None for the kernel's own choice)
CASES = {
    "4d-causal-T37-d16": ((2, 3, 37, 16), (2, 3, 37, 16), True, None),
    "4d-cross-Tq45-Tk70-d32": ((2, 2, 45, 32), (2, 2, 70, 32), False, None),
    "3d-causal-T61-d64-tiles": ((2, 61, 64), (2, 61, 64), True, SMALL),
    "3d-cross-Tq40-Tk75-d32-tiles": ((2, 40, 32), (2, 75, 32), False, SMALL),
    "4d-causal-T1-d64": ((2, 2, 1, 64), (2, 2, 1, 64), True, None),
    "4d-causal-T130-d128": ((1, 1, 130, 128), (1, 1, 130, 128), True, None),
    # Head dims that are not a tile width: zero-padded to 16 and 64.
    "4d-causal-T33-d8": ((2, 2, 33, 8), (2, 2, 33, 8), True, None),
    "3d-cross-Tq20-Tk45-d48-tiles": ((2, 20, 48), (2, 45, 48), False, SMALL),
}


def reference_lse(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """logsumexp over keys of q k^T / sqrt(d) (causally masked), fp32: shape (..., T_q)."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (..., T_q, T_k)
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(scores, dim=-1)


def run_both(parity, q, k, v, causal, config=None):
    """Forward + backward through the kernel and the fp32 reference; compare O, L and grads."""
    dtype = q.dtype
    do = parity.random_like_grad(q)
    qk, kk, vk = parity.leaf(q), parity.leaf(k), parity.leaf(v)
    ctx = forced_config(config) if config is not None else contextlib.nullcontext()
    with ctx:
        o = FlashAttention.apply(qk, kk, vk, causal)
        o.backward(do)
        _, lse = flash.flash_attention_fwd(*(flash._as_4d(t.detach()) for t in (q, k, v)), causal)
    assert o.dtype == dtype and o.shape == q.shape
    qr, kr, vr = (parity.leaf(t, torch.float32) for t in (q, k, v))
    orf = ops.attention_reference(qr, kr, vr, causal)
    orf.backward(do.to(torch.float32))
    parity.assert_close(o, orf, "attention O", dtype=dtype, op="attention")
    parity.assert_close(lse.reshape(q.shape[:-1]), reference_lse(q, k, causal), "attention L",
                        dtype=torch.float32)
    for name, got, want in (("dQ", qk.grad, qr.grad), ("dK", kk.grad, kr.grad), ("dV", vk.grad, vr.grad)):
        assert got.dtype == dtype and got.shape == want.shape
        parity.assert_close(got, want, f"attention {name}", dtype=dtype, op="attention")


def _inputs(q_shape, k_shape, dtype, device=DEVICE):
    q = torch.randn(q_shape, device=device).to(dtype)
    k = torch.randn(k_shape, device=device).to(dtype)
    v = torch.randn(k_shape, device=device).to(dtype)
    return q, k, v


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_matches_reference(parity, case, dtype):
    q_shape, k_shape, causal, config = CASES[case]
    run_both(parity, *_inputs(q_shape, k_shape, dtype), causal, config)


def test_attention_strided_heads_like_the_model(parity):
    # MultiHeadSelfAttention hands over (B, H, T, d) views of (B, T, H, d) projections.
    x = torch.randn(2, 29, 3, 2, 32, device=DEVICE)  # (B, T, {q,k,v}, H, d)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, d), not contiguous
    assert not q.is_contiguous()
    run_both(parity, q, k, v, True, SMALL)


def test_attention_five_dims_and_peaked_scores(parity):
    # Rank 5, and scores of standard deviation 4 (q scaled by 4): row maxima move by several
    # units from one key tile to the next, so the online rescaling matters.
    q, k, v = _inputs((2, 1, 2, 40, 16), (2, 1, 2, 40, 16), torch.float32)
    run_both(parity, 4 * q, k, v, True, SMALL)


def test_seam_uses_the_kernel_on_the_triton_backend(monkeypatch):
    calls = []
    real = flash.flash_attention_fwd

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(flash, "flash_attention_fwd", counting)
    q, k, v = _inputs((2, 2, 20, 16), (2, 2, 20, 16), torch.float32)
    with ops.use_backend("triton"):
        out = ops.attention(q, k, v, causal=True)
    assert calls == [torch.Size([2, 2, 20, 16])]
    with ops.use_backend("torch"):
        torch.testing.assert_close(out, ops.attention(q, k, v, causal=True), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


def _saved_bytes(fn, *inputs) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes and shapes of every tensor autograd saves while running ``fn(*inputs)``."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    # Tensors that share storage (views of one input) are counted once.
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(storages.values()), [tuple(t.shape) for t in saved]


def test_saved_tensors_grow_linearly_in_T():
    def measure(fn, T):
        q, k, v = (t.requires_grad_() for t in _inputs((1, 1, T, 16), (1, 1, T, 16), torch.float32))
        return _saved_bytes(fn, q, k, v, True)

    # Large tiles only to keep the interpreter quick; the saved tensors do not depend on them.
    with forced_config(AttentionConfig(256, 128, 4, 1, 128, 256, 256, 128, 4, 1)):
        flash_1k, _ = measure(FlashAttention.apply, 1024)
        flash_2k, shapes_2k = measure(FlashAttention.apply, 2048)
    assert flash_2k == 2 * flash_1k, (flash_1k, flash_2k, shapes_2k)
    assert all(2048 * 2048 > math.prod(s) for s in shapes_2k)
    # q, k, v and O (T x 16 fp32 each) plus L (T fp32): nothing else.
    assert flash_2k == (4 * 2048 * 16 + 2048) * 4
    # The check can fail: the reference saves (T, T) tensors (scores, probabilities).
    ref_1k, _ = measure(ops.attention_reference, 1024)
    assert ref_1k > 2 * 1024 * 1024 * 4


@pytest.mark.parametrize("shape", [(40, 16), (2, 40, 16), (2, 3, 40, 16), (2, 1, 3, 40, 16)], ids=str)
def test_saved_tensors_are_q_k_v_o_and_l_in_the_input_dims(shape):
    q, k, v = (t.requires_grad_() for t in _inputs(shape, shape, torch.float32))
    _, shapes = _saved_bytes(FlashAttention.apply, q, k, v, True)
    assert shapes == [shape, shape, shape, shape, shape[:-1]]
    out = FlashAttention.apply(q, k, v, True)
    saved = out.grad_fn.saved_tensors
    assert [t.data_ptr() for t in saved[:3]] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]  # no copies
    assert saved[4].dtype == torch.float32 and saved[4].shape == shape[:-1]


def _warm_up(fn, *args) -> None:
    """One call outside FlopCounterMode: with torch 2.13 on the CPU the first call of a
    ``triton_op`` in a process is not counted (measured; later calls are)."""
    fn(*args).sum().backward()


def test_flop_counter_counts_the_attention_matmuls():
    q, k, v = (t.requires_grad_() for t in _inputs((2, 3, 40, 32), (2, 3, 40, 32), torch.float32))
    _warm_up(FlashAttention.apply, q, k, v, True)
    counts = {}
    for name, fn in (("flash", FlashAttention.apply), ("reference", ops.attention_reference)):
        with FlopCounterMode(display=False) as fwd:
            out = fn(q, k, v, True)
        with FlopCounterMode(display=False) as bwd:
            out.sum().backward()
        counts[name] = (fwd.get_total_flops(), bwd.get_total_flops())
    expected = (attention_flops(6, 40, 40, 32), attention_flops(6, 40, 40, 32, backward=True))
    assert expected == (4 * 6 * 40 * 40 * 32, 8 * 6 * 40 * 40 * 32)
    assert counts["flash"] == counts["reference"] == expected


def test_model_flops_on_the_triton_backend_match_the_analytic_count():
    from cs336 import flops
    from cs336.config import ModelConfig
    from cs336.model import TransformerLM

    cfg = ModelConfig(vocab_size=97, context_length=24, d_model=32, num_layers=2, num_heads=2, d_ff=48,
                      kernels="triton")
    model = TransformerLM.from_config(cfg)  # its forward runs under the triton backend
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    _warm_up(model.loss, tokens, tokens)
    with FlopCounterMode(display=False) as counter:
        model.loss(tokens, tokens).backward()
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert by_op["cs336_kernels.flash_attention_fwd"] == flops.forward_flops(cfg, 2)["attn.qk"] * 2
    assert counter.get_total_flops() == flops.training_flops(cfg, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(q=(2, 8, 16), k=(2, 8, 32), v=(2, 8, 32)), "head dims differ"),
    (dict(q=(2, 8, 16), k=(2, 8, 16), v=(2, 9, 16)), "do not match"),
    (dict(q=(2, 8, 16), k=(3, 8, 16), v=(3, 8, 16)), "same leading dims"),
    (dict(q=(2, 8, 256), k=(2, 8, 256), v=(2, 8, 256)), "head dim 256 is not supported"),
    (dict(q=(2, 8, 16), k=(2, 9, 16), v=(2, 9, 16), causal=True), "causal=False for cross-length"),
    (dict(q=(2, 8, 16), k=(2, 0, 16), v=(2, 0, 16), causal=False), "at least one key"),
    (dict(q=(16,), k=(16,), v=(16,)), r"must be \(\.\.\., T, d\)"),
    (dict(q=(65536, 1, 16), k=(65536, 1, 16), v=(65536, 1, 16)), "split the batch"),
])
def test_attention_rejects_bad_shapes(kwargs, message):
    causal = kwargs.get("causal", False)
    q, k, v = (torch.randn(kwargs[n], device=DEVICE) for n in "qkv")
    with pytest.raises(KernelInputError, match=message):
        FlashAttention.apply(q, k, v, causal)


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_attention_seam_checks_inputs_on_every_backend(backend):
    # With no keys the reference raised amax's IndexError and native (SDPA) returned zeros for every
    # query; causal=None ran as non-causal on torch and Triton and was a TypeError on native.
    if not ops.backend_available(backend):
        pytest.skip(f"backend {backend} cannot run here")
    q = torch.randn(1, 3, 8, device=DEVICE)
    empty = torch.randn(1, 0, 8, device=DEVICE)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="hold no keys"):
            ops.attention(q, empty, empty, causal=False)
        with pytest.raises(ValueError, match="hold no keys"):
            ops.attention(empty, empty, empty, causal=True)
        with pytest.raises(TypeError, match="causal must be True or False"):
            ops.attention(q, q, q, causal=None)
        with pytest.raises(ValueError, match="must be a \\(..., T, d\\) tensor"):
            ops.attention(torch.randn(8, device=DEVICE), q, q)


def test_attention_rejects_bad_dtype_and_device(monkeypatch):
    x = torch.randn(2, 8, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(KernelInputError, match="supports float32, bfloat16, float16"):
        FlashAttention.apply(x, x, x, True)
    y = torch.randn(2, 8, 16, device=DEVICE)
    with pytest.raises(KernelInputError, match="cast them to one dtype"):
        FlashAttention.apply(y, y.half(), y, True)
    m = torch.empty(2, 8, 16, device="meta")
    with pytest.raises(KernelInputError, match="is on meta"):
        FlashAttention.apply(m, m, m, True)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(KernelInputError, match="needs a CUDA tensor"):
            FlashAttention.apply(y, y, y, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_gpu_shapes(parity, d, dtype, causal):
    # Several full tiles plus a tail at the kernel's own launch settings.
    run_both(parity, *_inputs((2, 4, 1000, d), (2, 4, 1000, d), dtype), causal)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_attention_gpu_cross_length(parity):
    run_both(parity, *_inputs((2, 4, 333, 64), (2, 4, 1517, 64), torch.bfloat16), False)
