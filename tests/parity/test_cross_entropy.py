"""Cross-entropy and linear-cross-entropy providers (Triton kernels, native ``F.cross_entropy``)
vs the reference definitions.

References: ``cs336.nn_utils.cross_entropy`` (mean over non-ignored targets, fp32) and
``cs336.ops.linear_cross_entropy_reference`` (``h @ W.T`` then that loss).
"""

import pytest
import torch

from cs336 import ops
from cs336.nn_utils import cross_entropy as cross_entropy_reference
from cs336.ops import cross_entropy_native, linear_cross_entropy_native, linear_cross_entropy_reference
from kernels._common import KernelInputError, max_block_size
from kernels.cross_entropy import cross_entropy, linear_cross_entropy

CE_IMPLS = {"triton": cross_entropy, "native": cross_entropy_native}
# (provider, block cap): the Triton kernel with one block per row and with a vocab loop.
CE_VARIANTS = [("triton", None), ("triton", 32), ("native", None)]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100

# (leading shape, vocab): ranks 2-4 of logits (1-3 of targets); vocab not a power of two.
CASES = [((11,), 123), ((3, 7), 250), ((2, 3, 5), 97)]


def make_targets(lead, V, ignore_fraction=0.2):
    targets = torch.randint(0, V, lead, device=DEVICE)
    ignored = torch.rand(lead, device=DEVICE) < ignore_fraction
    targets[ignored] = IGNORE
    targets.view(-1)[0] = 0  # at least one valid target
    return targets


def run_ce(parity, logits, targets, block_cap=None, grad_scale=1.7, provider="triton"):
    lk = parity.leaf(logits)
    g = torch.tensor(grad_scale, device=logits.device)
    with max_block_size(block_cap or 65536):
        loss = CE_IMPLS[provider](lk, targets, IGNORE)
        loss.backward(g)
    lr = parity.leaf(logits, torch.float32)
    loss_r = cross_entropy_reference(lr, targets, ignore_index=IGNORE)
    loss_r.backward(g)
    assert loss.dtype == torch.float32 and loss.shape == ()
    parity.assert_close(loss, loss_r, "cross_entropy loss", dtype=torch.float32)
    assert lk.grad.dtype == logits.dtype
    parity.assert_close(lk.grad, lr.grad, "cross_entropy dlogits", dtype=logits.dtype)


@pytest.mark.parametrize("lead,V", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("provider,block_cap", CE_VARIANTS, ids=["triton_one_block", "triton_vocab_loop", "native"])
def test_cross_entropy_matches_reference(parity, lead, V, dtype, provider, block_cap):
    logits = (4 * torch.randn(*lead, V, device=DEVICE)).to(dtype)
    run_ce(parity, logits, make_targets(lead, V), block_cap, provider=provider)


@pytest.mark.parametrize("provider", list(CE_IMPLS))
def test_cross_entropy_large_logits_and_ignored_rows(parity, provider):
    # Logits of size 1e4: the max must be subtracted; ignored rows get exactly zero gradient.
    logits = 1e4 + torch.randn(9, 300, device=DEVICE)
    targets = make_targets((9,), 300, ignore_fraction=0.5)
    run_ce(parity, logits, targets, block_cap=64, provider=provider)
    lk = parity.leaf(logits)
    CE_IMPLS[provider](lk, targets, IGNORE).backward()
    assert torch.equal(lk.grad[targets == IGNORE], torch.zeros_like(lk.grad[targets == IGNORE]))


@pytest.mark.parametrize("provider", list(CE_IMPLS))
def test_cross_entropy_all_ignored_is_nan_with_zero_grad(provider):
    logits = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    targets = torch.full((4,), IGNORE, device=DEVICE)
    loss = CE_IMPLS[provider](logits, targets, IGNORE)
    assert torch.isnan(loss) and torch.isnan(cross_entropy_reference(logits, targets, ignore_index=IGNORE))
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("provider", list(CE_IMPLS))
def test_cross_entropy_non_contiguous_and_int32_targets(parity, provider):
    logits = torch.randn(130, 6, device=DEVICE).t()  # (6, 130) transposed view
    targets = make_targets((6,), 130).to(torch.int32)
    run_ce(parity, logits, targets, provider=provider)


def test_native_cross_entropy_rejects_mismatched_targets():
    with pytest.raises(ValueError, match="needs targets of shape \\(4,\\)"):
        cross_entropy_native(torch.randn(4, 10, device=DEVICE), torch.zeros(5, dtype=torch.long, device=DEVICE))


def test_cross_entropy_rejects_bad_inputs():
    logits = torch.randn(4, 10, device=DEVICE)
    # On CUDA a bad target id is a device-side assert (as in F.cross_entropy), which ends the
    # process's CUDA context: test_bad_target_is_a_device_assert_on_cuda runs it in a subprocess.
    if DEVICE == "cpu":
        with pytest.raises(KernelInputError, match="outside \\[0, 10\\)"):
            cross_entropy(logits, torch.tensor([1, 2, 10, 3], device=DEVICE), IGNORE)
    with pytest.raises(KernelInputError, match="needs targets of shape \\(4,\\)"):
        cross_entropy(logits, torch.zeros(5, dtype=torch.long, device=DEVICE), IGNORE)
    with pytest.raises(KernelInputError, match="integer class ids"):
        cross_entropy(logits, torch.zeros(4, device=DEVICE), IGNORE)
    with pytest.raises(KernelInputError, match="dtype float64"):
        cross_entropy(logits.double(), torch.zeros(4, dtype=torch.long, device=DEVICE), IGNORE)


def run_lce(parity, h, weight, targets, chunk_rows, provider="triton"):
    hk, wk = parity.leaf(h), parity.leaf(weight)
    if provider == "native":
        loss = linear_cross_entropy_native(hk, wk, targets, IGNORE)
    else:
        loss = linear_cross_entropy(hk, wk, targets, IGNORE, chunk_rows=chunk_rows)
    g = torch.tensor(0.6, device=h.device)
    loss.backward(g)
    # The unfused path in fp32 is the definition.
    hr, wr = parity.leaf(h, torch.float32), parity.leaf(weight, torch.float32)
    loss_r = linear_cross_entropy_reference(hr, wr, targets, IGNORE)
    loss_r.backward(g)
    op = "linear_cross_entropy"
    parity.assert_close(loss, loss_r, "linear_cross_entropy loss", dtype=h.dtype, op=op)
    parity.assert_close(hk.grad, hr.grad, "linear_cross_entropy dh", dtype=h.dtype, op=op)
    parity.assert_close(wk.grad, wr.grad, "linear_cross_entropy dweight", dtype=h.dtype, op=op)


@pytest.mark.parametrize("lead", [(13,), (3, 7), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("provider,chunk_rows", [("triton", None), ("triton", 5), ("native", None)],
                         ids=["triton_default_chunk", "triton_chunk5", "native"])
def test_linear_cross_entropy_matches_unfused(parity, lead, dtype, provider, chunk_rows):
    C, V = 24, 203
    h = torch.randn(*lead, C, device=DEVICE).to(dtype)
    weight = (torch.randn(V, C, device=DEVICE) / C**0.5).to(dtype)
    run_lce(parity, h, weight, make_targets(lead, V), chunk_rows, provider)


def test_linear_cross_entropy_without_grad_and_weight_only_grad(parity):
    h = torch.randn(10, 16, device=DEVICE)
    weight = torch.randn(50, 16, device=DEVICE)
    targets = make_targets((10,), 50)
    with torch.no_grad():
        loss = linear_cross_entropy(h, weight, targets, IGNORE, chunk_rows=3)
    parity.assert_close(loss, linear_cross_entropy_reference(h, weight, targets, IGNORE), "no-grad loss",
                        op="linear_cross_entropy")
    wk = parity.leaf(weight)
    linear_cross_entropy(h, wk, targets, IGNORE, chunk_rows=4).backward()
    wr = parity.leaf(weight)
    linear_cross_entropy_reference(h, wr, targets, IGNORE).backward()
    parity.assert_close(wk.grad, wr.grad, "dweight only", op="linear_cross_entropy")


def test_linear_cross_entropy_rejects_bad_inputs():
    h = torch.randn(4, 8, device=DEVICE)
    targets = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(KernelInputError, match="must be \\(vocab, 8\\)"):
        linear_cross_entropy(h, torch.randn(10, 7, device=DEVICE), targets)
    with pytest.raises(KernelInputError, match="h's dtype"):
        linear_cross_entropy(h, torch.randn(10, 8, device=DEVICE).bfloat16(), targets)
    if DEVICE == "cpu":
        with pytest.raises(KernelInputError, match="outside \\[0, 10\\)"):
            linear_cross_entropy(h, torch.randn(10, 8, device=DEVICE), targets - 1)


def test_linear_cross_entropy_chunk_rows_and_featureless_h(parity):
    # chunk_rows=2.5 failed deep in the custom op's schema ("Expected a value of type 'int'"), and an h
    # with no features (C = 0) divided by zero while choosing the chunk; the reference gives log V.
    h = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(10, 8, device=DEVICE)
    targets = torch.tensor([1, 2, IGNORE, 3], device=DEVICE)
    for bad in (2.5, 0, True):
        with pytest.raises(KernelInputError, match="chunk_rows must be an integer >= 1"):
            linear_cross_entropy(h, w, targets, IGNORE, chunk_rows=bad)
    h0, w0 = torch.zeros(4, 0, device=DEVICE), torch.zeros(10, 0, device=DEVICE)
    parity.assert_close(linear_cross_entropy(h0, w0, targets, IGNORE), linear_cross_entropy_reference(h0, w0, targets),
                        "linear_cross_entropy with C = 0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_target_is_a_device_assert_on_cuda():
    import subprocess
    import sys

    code = ("import torch; from kernels.cross_entropy import cross_entropy; "
            "t = torch.tensor([1, 2, 10, 3], device='cuda'); "
            "cross_entropy(torch.randn(4, 10, device='cuda'), t); torch.cuda.synchronize()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "assert" in proc.stderr.lower(), proc.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_cuda_large(parity, dtype):
    V = 50257
    logits = (3 * torch.randn(4, 1024, V, device="cuda")).to(dtype)
    h = torch.randn(4, 512, 768, device="cuda").to(dtype)
    weight = (torch.randn(V, 768, device="cuda") / 768**0.5).to(dtype)
    for provider in ("triton", "native"):
        run_ce(parity, logits, make_targets((4, 1024), V), provider=provider)
        run_lce(parity, h, weight, make_targets((4, 512), V), chunk_rows=None, provider=provider)


# Recipe options: logit soft-cap (C tanh(z / C)) and z-loss (L logsumexp^2), alone and together,
# on every provider, forward and backward, against the reference definition in fp32.
RECIPE = [(30.0, 0.0), (None, 1e-2), (15.0, 1e-3)]
RECIPE_IDS = ["softcap", "z_loss", "softcap+z_loss"]


def _ce_provider(provider):
    return {"triton": cross_entropy, "native": cross_entropy_native,
            "torch": lambda *a, **k: cross_entropy_reference(*a, **k)}[provider]


@pytest.mark.parametrize("softcap,z_loss", RECIPE, ids=RECIPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("provider,block_cap", [("triton", None), ("triton", 32), ("native", None)],
                         ids=["triton_one_block", "triton_vocab_loop", "native"])
def test_cross_entropy_recipe_options_match_reference(parity, softcap, z_loss, dtype, provider, block_cap):
    lead, V = (3, 7), 250
    logits = (20 * torch.randn(*lead, V, device=DEVICE)).to(dtype)  # large enough for the cap to bend
    targets = make_targets(lead, V)
    g = torch.tensor(1.3, device=DEVICE)
    lk = parity.leaf(logits)
    with max_block_size(block_cap or 65536):
        loss = _ce_provider(provider)(lk, targets, IGNORE, logit_softcap=softcap, z_loss=z_loss)
        loss.backward(g)
    lr = parity.leaf(logits, torch.float32)
    loss_r = cross_entropy_reference(lr, targets, ignore_index=IGNORE, logit_softcap=softcap, z_loss=z_loss)
    loss_r.backward(g)
    parity.assert_close(loss, loss_r, "recipe cross_entropy loss", dtype=torch.float32)
    parity.assert_close(lk.grad, lr.grad, "recipe cross_entropy dlogits", dtype=dtype)
    assert torch.equal(lk.grad[targets == IGNORE], torch.zeros_like(lk.grad[targets == IGNORE]))


def test_reference_recipe_options_are_their_definitions():
    # Independent of the implementation: torch.tanh / torch.logsumexp on explicit formulas.
    logits = 10 * torch.randn(6, 40, dtype=torch.float64)
    targets = torch.randint(0, 40, (6,))
    capped = 5.0 * torch.tanh(logits / 5.0)
    lse = torch.logsumexp(capped, dim=-1)
    expected = (lse - capped[torch.arange(6), targets]).mean() + 0.1 * (lse ** 2).mean()
    got = cross_entropy_reference(logits, targets, logit_softcap=5.0, z_loss=0.1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    plain = cross_entropy_reference(logits, targets)
    assert not torch.allclose(got.double(), plain.double())  # the options change the loss


@pytest.mark.parametrize("softcap,z_loss", RECIPE, ids=RECIPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("provider,chunk_rows", [("triton", None), ("triton", 5), ("native", None)],
                         ids=["triton_default_chunk", "triton_chunk5", "native"])
def test_linear_cross_entropy_recipe_options_match_unfused(parity, softcap, z_loss, dtype, provider, chunk_rows):
    C, V, lead = 24, 203, (3, 7)
    h = (3 * torch.randn(*lead, C, device=DEVICE)).to(dtype)
    weight = (3 * torch.randn(V, C, device=DEVICE) / C**0.5).to(dtype)
    targets = make_targets(lead, V)
    kwargs = dict(logit_softcap=softcap, z_loss=z_loss)
    hk, wk = parity.leaf(h), parity.leaf(weight)
    if provider == "native":
        loss = linear_cross_entropy_native(hk, wk, targets, IGNORE, **kwargs)
    else:
        loss = linear_cross_entropy(hk, wk, targets, IGNORE, chunk_rows=chunk_rows, **kwargs)
    g = torch.tensor(0.6, device=DEVICE)
    loss.backward(g)
    hr, wr = parity.leaf(h, torch.float32), parity.leaf(weight, torch.float32)
    loss_r = linear_cross_entropy_reference(hr, wr, targets, IGNORE, **kwargs)
    loss_r.backward(g)
    op = "linear_cross_entropy"
    parity.assert_close(loss, loss_r, "recipe linear_cross_entropy loss", dtype=dtype, op=op)
    parity.assert_close(hk.grad, hr.grad, "recipe linear_cross_entropy dh", dtype=dtype, op=op)
    parity.assert_close(wk.grad, wr.grad, "recipe linear_cross_entropy dweight", dtype=dtype, op=op)


LOSS_PROVIDERS = {
    "reference": (cross_entropy_reference, linear_cross_entropy_reference),
    "native": (cross_entropy_native, linear_cross_entropy_native),
    "triton": (cross_entropy, linear_cross_entropy),
}
BAD_RECIPE = [({"logit_softcap": 0.0}, "logit_softcap must be a finite number > 0"),
              ({"logit_softcap": -1.0}, "logit_softcap must be a finite number > 0"),
              ({"logit_softcap": float("inf")}, "logit_softcap must be a finite number > 0"),
              ({"logit_softcap": float("nan")}, "logit_softcap must be a finite number > 0"),
              ({"z_loss": -0.1}, "z_loss must be a finite number >= 0"),
              ({"z_loss": float("nan")}, "z_loss must be a finite number >= 0"),
              ({"z_loss": float("inf")}, "z_loss must be a finite number >= 0")]


@pytest.mark.parametrize("provider", list(LOSS_PROVIDERS))
def test_recipe_options_reject_bad_values(provider):
    # The reference and native losses took logit_softcap=0 (every logit capped to 0: the loss of a
    # uniform softmax, log V), a negative cap (read as its absolute value), inf / nan (NaN loss) and
    # a negative or NaN z-loss; Triton took a cap of inf (NaN) and z_loss=inf. Now all refuse them.
    ce, lce = LOSS_PROVIDERS[provider]
    logits = torch.randn(4, 10, device=DEVICE)
    targets = torch.zeros(4, dtype=torch.long, device=DEVICE)
    for kwargs, message in BAD_RECIPE:
        with pytest.raises(ValueError, match=message):
            ce(logits, targets, IGNORE, **kwargs)
        with pytest.raises(ValueError, match=message):
            lce(logits, torch.randn(5, 10, device=DEVICE), targets, IGNORE, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_seam_linear_cross_entropy_checks_the_lm_head(backend):
    # Mixed h / weight dtypes or a weight of the wrong shape failed inside the reference's matmul or
    # F.linear ("expected m1 and m2 to have the same dtype", "mat1 and mat2 shapes cannot be
    # multiplied", "t() expects a tensor with <= 2 dimensions"); Triton named the weight.
    if not ops.backend_available(backend):
        pytest.skip(f"backend {backend} cannot run here")
    h = torch.randn(4, 8, device=DEVICE)
    targets = torch.tensor([1, 2, IGNORE, 3], device=DEVICE)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="cast them to one dtype"):
            ops.linear_cross_entropy(h.bfloat16(), torch.randn(10, 8, device=DEVICE), targets)
        for w in (torch.randn(10, 7, device=DEVICE), torch.randn(1, 10, 8, device=DEVICE)):
            with pytest.raises(ValueError, match="must be \\(vocab, 8\\)"):
                ops.linear_cross_entropy(h, w, targets)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):  # autocast casts both: allowed
            assert torch.isfinite(ops.linear_cross_entropy(h.bfloat16(), torch.randn(10, 8, device=DEVICE), targets))


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA a bad target is a device-side assert (see the CUDA test)")
@pytest.mark.parametrize("provider", list(LOSS_PROVIDERS))
def test_out_of_range_targets_are_one_value_error_on_every_provider(provider):
    # The reference failed inside gather ("RuntimeError: index 10 is out of bounds for dimension 1
    # with size 10"), native with F.cross_entropy's IndexError; Triton raised its ValueError.
    ce, lce = LOSS_PROVIDERS[provider]
    logits = torch.randn(4, 10, device=DEVICE)
    for bad in (10, -1, -7):
        targets = torch.tensor([1, IGNORE, bad, 3], device=DEVICE)
        with pytest.raises(ValueError, match="outside \\[0, 10\\) and is not ignore_index=-100"):
            ce(logits, targets, IGNORE)
        with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
            lce(torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE), targets, IGNORE)
    assert torch.isfinite(ce(logits, torch.tensor([1, IGNORE, 9, 0], device=DEVICE), IGNORE))


@pytest.mark.parametrize("provider", list(LOSS_PROVIDERS))
def test_cross_entropy_rejects_non_integer_targets_and_empty_vocab(provider):
    # The reference and native losses cast float targets with .long() (1.7 read as class 1) and bool
    # targets to 0/1; logits with no classes gave an amax or reshape error; 0-d logits gave 0.0.
    ce, lce = LOSS_PROVIDERS[provider]
    logits = torch.randn(4, 10, device=DEVICE)
    for targets in (torch.tensor([0.0, 1.7, 2.0, 3.0], device=DEVICE), torch.tensor([True, False] * 2, device=DEVICE)):
        with pytest.raises(ValueError, match="integer class ids"):
            ce(logits, targets, IGNORE)
    with pytest.raises(ValueError, match="no classes"):
        ce(torch.randn(2, 0, device=DEVICE), torch.full((2,), IGNORE, device=DEVICE), IGNORE)
    with pytest.raises(ValueError, match="no classes"):
        lce(torch.randn(2, 8, device=DEVICE), torch.randn(0, 8, device=DEVICE), torch.full((2,), IGNORE, device=DEVICE),
            IGNORE)
    with pytest.raises(ValueError, match="needs targets of shape"):
        ce(torch.randn((), device=DEVICE), torch.tensor(0, device=DEVICE), IGNORE)
