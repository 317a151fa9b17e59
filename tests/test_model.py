"""cs336.model against an independent implementation written here with torch.nn.functional.

The reference uses F.embedding / F.linear / F.rms_norm / F.silu / F.scaled_dot_product_attention
and a complex-number RoPE (pairs (x[2k], x[2k+1]) as x[2k] + i x[2k+1], multiplied by
e^{i pos theta^(-2k/d)}), all on the same weights as the model under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from cs336 import ops
from cs336.config import ConfigError, ModelConfig
from cs336.model import (
    Embedding,
    Linear,
    MultiHeadSelfAttention,
    RMSNorm,
    RotaryPositionalEmbedding,
    SwiGLU,
    TransformerBlock,
    TransformerLM,
    scaled_dot_product_attention,
    silu,
    softmax,
)

FP32 = dict(rtol=1.3e-6, atol=1e-5)
# The LM stacks several matmuls and normalizations; summation order differs between the two
# implementations, so allow a few ulps more than a single op.
LM_TOL = dict(rtol=1e-5, atol=2e-5)

TINY = dict(vocab_size=37, context_length=12, d_model=16, num_layers=2, num_heads=4, d_ff=24,
            rope_theta=10_000.0)


def _close(actual, expected, **tol):
    tol = tol or FP32
    diff = (actual.double() - expected.double()).abs()
    torch.testing.assert_close(actual, expected, **tol,
                               msg=lambda m: f"{m}\nmax diff {diff.max():.3g}, mean {diff.mean():.3g}")


def ref_rope(x, positions, theta):
    """Complex-number RoPE: x (..., T, d), positions broadcastable to (..., T)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angles = positions.to(torch.float64)[..., None] * freqs  # (..., T, d/2)
    rot = torch.polar(torch.ones_like(angles), angles)
    xc = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (d // 2, 2)).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


def ref_attention(sd, prefix, x, num_heads, theta, positions):
    B, T, d = x.shape
    def heads(t):
        return t.view(B, T, num_heads, d // num_heads).transpose(1, 2)  # (B, H, T, dh)

    q = heads(F.linear(x, sd[prefix + "q_proj.weight"]))
    k = heads(F.linear(x, sd[prefix + "k_proj.weight"]))
    v = heads(F.linear(x, sd[prefix + "v_proj.weight"]))
    if theta is not None:
        q, k = ref_rope(q, positions, theta), ref_rope(k, positions, theta)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(out.transpose(1, 2).reshape(B, T, d), sd[prefix + "output_proj.weight"])


def ref_swiglu(sd, prefix, x):
    return F.linear(F.silu(F.linear(x, sd[prefix + "w1.weight"])) * F.linear(x, sd[prefix + "w3.weight"]),
                    sd[prefix + "w2.weight"])


def ref_lm(sd, cfg, ids, positions=None):
    """The standard pre-norm CS336 Transformer LM, from its state dict."""
    positions = torch.arange(ids.shape[-1]) if positions is None else positions
    def norm(t, name):
        return F.rms_norm(t, (cfg["d_model"],), sd[name], eps=1e-5)

    x = F.embedding(ids, sd["token_embeddings.weight"])
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        x = x + ref_attention(sd, p + "attn.", norm(x, p + "ln1.weight"), cfg["num_heads"],
                              cfg["rope_theta"], positions)
        x = x + ref_swiglu(sd, p + "ffn.", norm(x, p + "ln2.weight"))
    return F.linear(norm(x, "ln_final.weight"), sd["lm_head.weight"])


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = TransformerLM(**{**TINY, **overrides}, kernels="torch")
    # RMSNorm weights start at 1; perturb them so the test sees whether they are used.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _ids(batch=3, seq=TINY["context_length"], seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=g)


# ----------------------------------------------------------------------------------- layers

def test_linear_shape_and_init():
    torch.manual_seed(0)
    lin = Linear(300, 200)
    assert lin.weight.shape == (200, 300)
    std = math.sqrt(2 / 500)
    assert lin.weight.abs().max() <= 3 * std + 1e-7
    # A normal cut at +-3 sigma has std 0.9866 sigma; 60,000 samples pin it to ~0.5%.
    assert lin.weight.std().item() == pytest.approx(0.9866 * std, rel=0.02)
    x = torch.randn(2, 5, 300)
    _close(lin(x), F.linear(x, lin.weight))
    assert dict(lin.named_parameters()).keys() == {"weight"}


def test_embedding_lookup_and_init():
    torch.manual_seed(0)
    emb = Embedding(1000, 64)
    assert emb.weight.abs().max() <= 3.0
    assert emb.weight.std().item() == pytest.approx(0.9866, rel=0.02)
    ids = torch.tensor([[0, 5, 999], [5, 5, 1]])
    _close(emb(ids), F.embedding(ids, emb.weight))


def test_rmsnorm_matches_functional_and_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 32) * 5
    _close(norm(x), F.rms_norm(x, (32,), norm.weight, eps=1e-5))
    xb = x.to(torch.bfloat16)
    assert norm(xb).dtype == torch.bfloat16


def test_swiglu_matches_functional():
    torch.manual_seed(0)
    ffn = SwiGLU(16, 40)
    x = torch.randn(2, 7, 16)
    sd = {"w1.weight": ffn.w1.weight, "w2.weight": ffn.w2.weight, "w3.weight": ffn.w3.weight}
    _close(ffn(x), ref_swiglu(sd, "", x))
    assert ffn.w1.weight.shape == (40, 16) and ffn.w2.weight.shape == (16, 40)


def test_silu_and_softmax_are_exported():
    x = torch.randn(10)
    _close(silu(x), F.silu(x))
    _close(softmax(x, 0), torch.softmax(x, 0))


def test_rope_matches_explicit_pair_rotation():
    theta, d, T = 10_000.0, 8, 6
    rope = RotaryPositionalEmbedding(theta, d, max_seq_len=16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, T, d, generator=g)
    positions = torch.tensor([0, 1, 2, 7, 3, 15])
    out = rope(x, positions)
    expected = torch.empty_like(x)
    for t in range(T):
        for k in range(d // 2):
            angle = positions[t].item() * theta ** (-2 * k / d)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[:, t, 2 * k], x[:, t, 2 * k + 1]
            expected[:, t, 2 * k] = c * a - s * b
            expected[:, t, 2 * k + 1] = s * a + c * b
    _close(out, expected)
    # Rotation preserves each pair's norm; position 0 is the identity.
    _close(out.norm(dim=-1), x.norm(dim=-1))
    _close(out[:, 0], x[:, 0])


def test_rope_batch_dims_and_buffers():
    rope = RotaryPositionalEmbedding(500.0, 6, max_seq_len=10)
    assert rope.state_dict() == {}  # cos/sin are non-persistent
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, 6, generator=g)  # (B, H1, H2, T, d)
    positions = torch.randint(0, 10, (2, 1, 1, 5), generator=g)
    _close(rope(x, positions), ref_rope(x, positions, 500.0))
    with pytest.raises(ValueError, match="even"):
        RotaryPositionalEmbedding(500.0, 5, 10)


def _rope_even_odd(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """The handout's formula on even/odd slices, fp32 tables from float64 angles."""
    d = x.shape[-1]
    inv_freq = theta ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., T, d/2)
    cos, sin = angles.cos().float(), angles.sin().float()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_pair_swap_equals_even_odd_formula_bitwise(dtype):
    """The module's pair-swap rotation (x * cos + swap(x) * sin) gives the even/odd formula's
    values bit for bit, for default positions (None, a table slice), explicit ones and per-row
    ones, on a transposed-heads view as attention passes it; gradients agree to fp32 rounding."""
    rope = RotaryPositionalEmbedding(10_000.0, 16, max_seq_len=32)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 20, 4, 16, generator=g).to(dtype)  # (B, T, H, d)
    weights = torch.randn(2, 4, 20, 16, generator=g).to(dtype)
    for positions in (None, torch.arange(20), torch.randint(0, 32, (2, 1, 20), generator=g)):
        x, x_ref = base.clone().requires_grad_(), base.clone().requires_grad_()
        out = rope(x.transpose(1, 2), positions)  # (B, H, T, d), a strided view
        ref = _rope_even_odd(x_ref.transpose(1, 2), torch.arange(20) if positions is None else positions, 10_000.0)
        assert out.dtype == dtype
        assert torch.equal(out, ref)
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
        (grad_ref,) = torch.autograd.grad((ref * weights).sum(), x_ref)
        _close(grad.float(), grad_ref.float())
    assert rope.state_dict() == {}  # the tables are non-persistent buffers


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_scaled_dot_product_attention_matches_functional(batch):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(*batch, 5, 8, generator=g)
    k = torch.randn(*batch, 7, 8, generator=g)
    v = torch.randn(*batch, 7, 4, generator=g)
    mask = torch.rand(*batch, 5, 7, generator=g) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    _close(scaled_dot_product_attention(q, k, v, mask),
           F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    _close(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("with_rope", [True, False])
def test_multihead_self_attention_matches_functional(with_rope):
    torch.manual_seed(3)
    kwargs = dict(max_seq_len=16, theta=100.0) if with_rope else {}
    attn = MultiHeadSelfAttention(16, 4, **kwargs)
    assert set(attn.state_dict()) == {"q_proj.weight", "k_proj.weight", "v_proj.weight",
                                      "output_proj.weight"}
    x = torch.randn(2, 9, 16)
    positions = torch.arange(9) + 3
    sd = {k: v for k, v in attn.state_dict().items()}
    expected = ref_attention(sd, "", x, 4, 100.0 if with_rope else None, positions)
    _close(attn(x, positions), expected)


# ------------------------------------------------------------------------------- the LM

def test_state_dict_names_and_shapes():
    model = _model()
    sd = model.state_dict()
    d, dff, V = TINY["d_model"], TINY["d_ff"], TINY["vocab_size"]
    expected = {"token_embeddings.weight": (V, d), "ln_final.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(TINY["num_layers"]):
        for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
            expected[f"layers.{i}.attn.{name}.weight"] = (d, d)
        expected[f"layers.{i}.ln1.weight"] = (d,)
        expected[f"layers.{i}.ln2.weight"] = (d,)
        expected[f"layers.{i}.ffn.w1.weight"] = (dff, d)
        expected[f"layers.{i}.ffn.w3.weight"] = (dff, d)
        expected[f"layers.{i}.ffn.w2.weight"] = (d, dff)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    n = sum(math.prod(s) for s in expected.values())
    assert model.num_parameters() == n
    assert model.num_parameters(exclude_embeddings=True) == n - V * d


def test_logits_and_gradients_match_reference():
    model = _model()
    ids = _ids()
    logits = model(ids)
    assert logits.shape == (3, TINY["context_length"], TINY["vocab_size"])
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    expected = ref_lm(ref_params, TINY, ids)
    _close(logits, expected, **LM_TOL)

    # Gradients of an arbitrary scalar of the logits, for every parameter.
    weights = torch.randn_like(expected)
    (logits * weights).sum().backward()
    (expected * weights).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        _close(p.grad, ref_params[name].grad, **LM_TOL)


def test_loss_matches_functional_cross_entropy():
    model = _model()
    ids, targets = _ids(seed=4), _ids(seed=5)
    targets[0, :3] = -100
    loss = model.loss(ids, targets)
    ref_params = {k: v.detach().clone() for k, v in model.named_parameters()}
    logits = ref_lm(ref_params, TINY, ids)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    _close(loss, expected, **LM_TOL)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_explicit_positions_and_extra_batch_dims():
    model = _model()
    ids = _ids(batch=4, seq=6).view(2, 2, 6)
    positions = torch.tensor([2, 3, 4, 5, 6, 7])
    out = model(ids, positions)
    ref_params = {k: v.detach() for k, v in model.named_parameters()}
    expected = ref_lm(ref_params, TINY, ids.view(4, 6), positions).view(2, 2, 6, -1)
    _close(out, expected, **LM_TOL)
    # Positions matter: shifting them changes the logits.
    assert not torch.allclose(out, model(ids))


def test_causality_prefix_logits_unchanged():
    model = _model()
    ids = _ids(batch=2)
    full = model(ids)
    for t in (1, 5, 11):
        _close(model(ids[:, :t]), full[:, :t], **LM_TOL)
    # Changing a later token leaves the earlier logits alone but changes its own.
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % TINY["vocab_size"]
    out = model(changed)
    _close(out[:, :7], full[:, :7], **LM_TOL)
    assert not torch.allclose(out[:, 7], full[:, 7])


def test_too_long_input_names_both_lengths():
    model = _model()
    with pytest.raises(ValueError, match=r"13 tokens.*context_length is 12"):
        model(_ids(seq=13))
    with pytest.raises(ValueError, match="token_positions"):
        model(_ids(seq=4), torch.tensor([0, 1, 2, 12]))


def test_from_config_and_config_attribute():
    cfg = ModelConfig(**TINY, kernels="torch")
    torch.manual_seed(0)
    model = TransformerLM.from_config(cfg)
    assert model.config == cfg and model.kernels == "torch"
    built = TransformerLM(**TINY, kernels="torch")
    assert {k: v.shape for k, v in built.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    model.kernels = "auto"
    assert model.config.kernels == "auto"
    with pytest.raises(ConfigError, match="divisible"):
        TransformerLM(**{**TINY, "num_heads": 5})
    with pytest.raises(ConfigError, match="ffn_type"):
        TransformerLM(**TINY, ffn_type="relu")
    with pytest.raises(ValueError, match="kernels"):
        model.kernels = "cuda"


def test_forward_runs_under_the_model_backend(monkeypatch):
    """The model's kernels setting is in force during its forward, whatever the global one."""
    seen = []
    original = ops.rms_norm

    def spy(x, weight, eps=1e-5):
        seen.append(ops.get_backend())
        return original(x, weight, eps)

    monkeypatch.setattr(ops, "rms_norm", spy)
    model = _model()
    ops.set_backend("auto")
    try:
        model(_ids(batch=1, seq=4))
    finally:
        ops.set_backend("auto")
    assert seen and set(seen) == {"torch"}
    assert ops.get_backend() == "auto"


def test_transformer_block_pre_norm_matches_reference():
    torch.manual_seed(6)
    block = TransformerBlock(16, 4, 24, max_seq_len=12, theta=1000.0)
    x = torch.randn(2, 10, 16)
    sd = block.state_dict()
    def norm(t, name):
        return F.rms_norm(t, (16,), sd[name], eps=1e-5)

    positions = torch.arange(10)
    h = x + ref_attention(sd, "attn.", norm(x, "ln1.weight"), 4, 1000.0, positions)
    expected = h + ref_swiglu(sd, "ffn.", norm(h, "ln2.weight"))
    _close(block(x), expected, **LM_TOL)


def test_low_precision_forward_runs():
    torch.manual_seed(0)
    model = TransformerLM(**TINY, kernels="torch", dtype=torch.bfloat16)
    logits = model(_ids(batch=2, seq=8))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    loss = model.loss(_ids(batch=2, seq=8), _ids(batch=2, seq=8, seed=9))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.skipif(not ops.backend_available("triton"),
                    reason="Triton kernels cannot run here (no CUDA and no TRITON_INTERPRET)")
def test_triton_backend_gives_the_same_loss_and_gradients():
    """The model keeps every backend choice inside ops calls: switching ``kernels`` to triton
    changes nothing beyond float rounding (per-op parity is in tests/parity)."""
    model = _model()
    ids, targets = _ids(batch=2, seq=8, seed=7), _ids(batch=2, seq=8, seed=8)
    losses, grads = [], []
    for backend in ("torch", "triton"):
        model.kernels = backend
        model.zero_grad()
        loss = model.loss(ids, targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    _close(losses[1], losses[0], **LM_TOL)
    for g_triton, g_torch in zip(grads[1], grads[0], strict=True):
        _close(g_triton, g_torch, **LM_TOL)


# ----------------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("ablation", [{}, {"use_post_norm": True}, {"remove_rope": True},
                                      {"remove_rmsnorm": True}, {"ffn_type": "silu"}])
def test_kv_cache_chunks_give_the_full_forward_logits(ablation):
    """Prefill 5 tokens, then 1, 1, then 5 at once (a mask with an offset): the logits equal one
    forward over all 12, for every ablation."""
    model = _model(**ablation)
    ids = _ids(batch=2)
    full = model(ids)
    cache = model.new_kv_cache(2)
    chunks = [model(ids[:, a:b], kv_cache=cache) for a, b in ((0, 5), (5, 6), (6, 7), (7, 12))]
    assert cache.length == 12
    _close(torch.cat(chunks, dim=1), full, **LM_TOL)


def test_kv_cache_left_padded_rows_equal_each_row_alone():
    model = _model()
    ids = _ids(batch=3, seq=9)
    pads = [0, 3, 5]
    padded = ids.clone()
    for b, p in enumerate(pads):
        padded[b, :p] = 0
    cache = model.new_kv_cache(3, left_pad=pads)
    prefill = model(padded[:, :7], kv_cache=cache)  # (3, 7, V)
    step = model(padded[:, 7:9], kv_cache=cache)  # two more columns through the offset mask
    assert torch.isfinite(prefill).all()  # padding queries attend to themselves: no NaN
    for b, p in enumerate(pads):
        alone = model(ids[b:b + 1, p:9])[0]  # (9 - p, V)
        _close(prefill[b, p:], alone[:7 - p], **LM_TOL)
        _close(step[b], alone[7 - p:], **LM_TOL)
    assert cache.positions(1)[:, 0].tolist() == [9, 6, 4]


def test_kv_cache_keep_rows_and_reset():
    model = _model()
    ids = _ids(batch=3, seq=6)
    cache = model.new_kv_cache(3, left_pad=[0, 2, 1])
    model(ids[:, :5], kv_cache=cache)
    cache.keep_rows([2, 0])
    assert cache.batch_size == 2 and cache.left_pad.tolist() == [1, 0]
    out = model(ids[[2, 0], 5:6], kv_cache=cache)
    _close(out[0, 0], model(ids[2:3, 1:6])[0, -1], **LM_TOL)
    _close(out[1, 0], model(ids[0:1, :6])[0, -1], **LM_TOL)
    cache.reset()
    assert cache.length == 0 and not cache.padded


def test_kv_cache_errors_name_the_limit():
    model = _model()
    cache = model.new_kv_cache(2)
    model(_ids(batch=2, seq=10), kv_cache=cache)
    with pytest.raises(ValueError, match="holds 10 of 12 positions and cannot take 3"):
        model(_ids(batch=2, seq=3), kv_cache=cache)
    assert cache.length == 10  # the refused call left the cache as it was
    with pytest.raises(ValueError, match=r"batch=2"):
        model(_ids(batch=3, seq=1), kv_cache=cache)
    with pytest.raises(ValueError, match="left_pad"):
        model.new_kv_cache(2, left_pad=[0, -1])
