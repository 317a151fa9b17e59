"""cs336.nn_utils against torch.nn.functional / torch.nn.utils (allowed in tests)."""

import pytest
import torch
import torch.nn.functional as F

from cs336.nn_utils import clip_gradients, cross_entropy, gradient_norm, log_softmax, silu, softmax


def _close(actual, expected, rtol=1.3e-6, atol=1e-5):
    diff = (actual.double() - expected.double()).abs()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{m}\nmax diff {diff.max():.3g}, mean {diff.mean():.3g}")


def test_silu_matches_functional():
    x = torch.linspace(-20, 20, 1001)
    _close(silu(x), F.silu(x))


@pytest.mark.parametrize("shape,dim", [((7,), -1), ((3, 5, 11), -1), ((3, 5, 11), 1), ((4, 6), 0)])
def test_softmax_matches_torch(shape, dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    _close(softmax(x, dim=dim), torch.softmax(x, dim=dim))
    _close(log_softmax(x, dim=dim), torch.log_softmax(x, dim=dim))


def test_softmax_is_stable_for_large_inputs():
    x = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [1000.0, 1000.0, 1000.0]])
    out = softmax(x)
    assert torch.isfinite(out).all()
    _close(out, torch.softmax(x, dim=-1))
    # Shifting every entry by a constant leaves softmax unchanged.
    _close(softmax(x[:1] + 123.0), out[:1])


def test_softmax_gives_zero_to_masked_entries():
    x = torch.tensor([1.0, float("-inf"), 2.0])
    out = softmax(x)
    assert out[1] == 0
    _close(out.sum(), torch.tensor(1.0))


def test_softmax_low_precision_returns_input_dtype():
    x = torch.randn(4, 33, dtype=torch.bfloat16)
    out = softmax(x)
    assert out.dtype == torch.bfloat16
    _close(out.float(), torch.softmax(x.float(), -1), rtol=1.6e-2, atol=1e-3)


@pytest.mark.parametrize("scale", [1.0, 1e4])
@pytest.mark.parametrize("shape", [(8, 17), (2, 5, 17), (2, 3, 4, 9)])
def test_cross_entropy_matches_functional(shape, scale):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(shape, generator=g) * scale).requires_grad_()
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    ours = cross_entropy(logits, targets)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, shape[-1]), targets.reshape(-1))
    assert torch.isfinite(ours)
    # At scale 1e4 the loss itself is ~1e4: fp32 carries ~1e-3 absolute there, relative 1e-6.
    _close(ours, ref)
    ours.backward()
    ref.backward()
    _close(logits.grad, ref_logits.grad)


def test_cross_entropy_large_logits_exact_value():
    # Two classes 1e4 apart: loss for the winner is ~0, for the loser ~1e4 (log(1 + e^-1e4) ~ 0).
    logits = torch.tensor([[1e4, 0.0], [1e4, 0.0]])
    assert cross_entropy(logits, torch.tensor([0, 0])).item() == pytest.approx(0.0, abs=1e-6)
    assert cross_entropy(logits, torch.tensor([1, 1])).item() == pytest.approx(1e4, rel=1e-6)
    # Mean of one of each.
    assert cross_entropy(logits, torch.tensor([0, 1])).item() == pytest.approx(5e3, rel=1e-6)


def test_cross_entropy_ignore_index():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 10, generator=g, requires_grad=True)
    targets = torch.randint(0, 10, (3, 6), generator=g)
    targets[0, :4] = -100
    targets[2, 5] = -100
    ours = cross_entropy(logits, targets)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, 10), targets.reshape(-1), ignore_index=-100)
    _close(ours, ref)
    ours.backward()
    ref.backward()
    _close(logits.grad, ref_logits.grad)
    assert (logits.grad[0, :4] == 0).all()
    # A custom ignore value.
    mask_value = cross_entropy(logits.detach(), torch.where(targets == -100, -1, targets), ignore_index=-1)
    _close(mask_value, ref.detach())


def test_cross_entropy_low_precision_is_computed_in_fp32():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 50, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 50, (16,), generator=g)
    ours = cross_entropy(logits, targets)
    assert ours.dtype == torch.float32
    _close(ours, F.cross_entropy(logits.float(), targets))


def test_cross_entropy_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="targets of shape"):
        cross_entropy(torch.zeros(4, 5), torch.zeros(3, dtype=torch.long))


def test_softmax_refuses_integer_input():
    # softmax(tensor([1, 2, 3])) returned tensor([0, 0, 0]): the probabilities were cast back to int64.
    for x in (torch.tensor([1, 2, 3]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match="needs a floating-point tensor"):
            softmax(x)
        with pytest.raises(TypeError, match="needs a floating-point tensor"):
            log_softmax(x)
    assert softmax(torch.tensor([1.0, 1.0])).tolist() == [0.5, 0.5]


def _params_with_grads(seed, scale):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(5, 3), (7,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale
    params.append(torch.nn.Parameter(torch.randn(4, generator=g)))  # no grad: skipped
    return params


@pytest.mark.parametrize("scale,max_norm", [(10.0, 1.0), (0.01, 1.0), (1.0, 3.0)])
def test_clip_gradients_matches_torch(scale, max_norm):
    ours = _params_with_grads(4, scale)
    ref = _params_with_grads(4, scale)
    norm = clip_gradients(ours, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_([p for p in ref if p.grad is not None], max_norm)
    _close(norm, ref_norm)
    for p, q in zip(ours[:3], ref[:3], strict=True):
        _close(p.grad, q.grad)
    assert ours[3].grad is None
    after = gradient_norm(ours)
    if norm > max_norm:
        assert after.item() == pytest.approx(max_norm, rel=1e-5)
    else:
        _close(after, norm)


def test_gradient_norm_definition():
    params = _params_with_grads(5, 1.0)
    expected = torch.cat([p.grad.flatten() for p in params[:3]]).norm()
    _close(gradient_norm(params), expected)
    assert gradient_norm([torch.nn.Parameter(torch.ones(2))]).item() == 0.0


def test_clip_gradients_rejects_nan_max_and_negative_eps():
    # max_l2_norm=nan passed the `<= 0` check and turned every gradient into NaN; a negative eps
    # below the norm flipped every gradient's sign (3-4-5 grads, eps=-6: scale 1 / (5 - 6) = -1).
    params = _params_with_grads(7, 1.0)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    with pytest.raises(ValueError, match="max_l2_norm must be positive"):
        clip_gradients(params, float("nan"))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        clip_gradients(params, 1.0, eps=-6.0)
    assert all(b is None or torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))


def test_clip_gradients_rejects_nonpositive_max():
    with pytest.raises(ValueError, match="max_l2_norm"):
        clip_gradients(_params_with_grads(6, 1.0), 0.0)
