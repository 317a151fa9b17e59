"""The ablation switches of TransformerLM (handout section 7.3): each one against a small explicit
reference written here, plus a property that shows the switch does what its name says."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from cs336.model import TransformerBlock, TransformerLM

BASE = dict(vocab_size=31, context_length=10, d_model=24, num_layers=2, num_heads=3, d_ff=40,
            rope_theta=500.0)
TOL = dict(rtol=1e-5, atol=2e-5)

SWITCHES = {
    "default": {},
    "remove_rmsnorm": dict(remove_rmsnorm=True),
    "use_post_norm": dict(use_post_norm=True),
    "remove_rope": dict(remove_rope=True),
    "ffn_silu": dict(ffn_type="silu", d_ff=60),
    "all": dict(remove_rmsnorm=True, use_post_norm=True, remove_rope=True, ffn_type="silu"),
}


def _close(actual, expected, name=""):
    """fp32 comparison; the absolute part scales with the tensor's size, since without norms
    activations and gradients reach ~1e2 and summation-order rounding grows with them."""
    scale = max(1.0, expected.abs().max().item())
    diff = (actual - expected).abs()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-5 * scale,
                               msg=lambda m: f"{name}: {m}\nmax diff {diff.max():.3g}, mean {diff.mean():.3g}")


def reference_logits(sd, cfg, ids):
    """The CS336 LM with its switches, written out: explicit RMSNorm and per-pair RoPE rotation,
    F.scaled_dot_product_attention for the causal attention."""
    d, H = cfg["d_model"], cfg["num_heads"]
    dh = d // H
    T = ids.shape[-1]

    def norm(x, name):
        if cfg.get("remove_rmsnorm"):
            return x
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * sd[name]

    def rope(x):  # (B, H, T, dh)
        if cfg.get("remove_rope"):
            return x
        k = torch.arange(dh // 2, dtype=torch.float64)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * cfg["rope_theta"] ** (-2 * k / dh)
        cos, sin = angle.cos().float(), angle.sin().float()
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def attn(x, p):
        B = x.shape[0]
        def split(t):
            return t.view(B, T, H, dh).transpose(1, 2)

        q, k, v = (split(x @ sd[f"{p}attn.{n}_proj.weight"].T) for n in "qkv")
        out = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        return out.transpose(1, 2).reshape(B, T, d) @ sd[f"{p}attn.output_proj.weight"].T

    def ffn(x, p):
        gate = F.silu(x @ sd[f"{p}ffn.w1.weight"].T)
        if cfg.get("ffn_type", "swiglu") == "swiglu":
            gate = gate * (x @ sd[f"{p}ffn.w3.weight"].T)
        return gate @ sd[f"{p}ffn.w2.weight"].T

    x = sd["token_embeddings.weight"][ids]
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        if cfg.get("use_post_norm"):
            z = norm(x + attn(x, p), p + "ln1.weight")
            x = norm(z + ffn(z, p), p + "ln2.weight")
        else:
            h = x + attn(norm(x, p + "ln1.weight"), p)
            x = h + ffn(norm(h, p + "ln2.weight"), p)
    return norm(x, "ln_final.weight") @ sd["lm_head.weight"].T


def _model(**switches):
    torch.manual_seed(0)
    model = TransformerLM(**{**BASE, **switches}, kernels="torch")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in name or name.startswith("ln"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def _ids(batch=2, seq=10, seed=1):
    return torch.randint(0, BASE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(SWITCHES))
def test_switch_matches_explicit_reference(name):
    switches = SWITCHES[name]
    model = _model(**switches)
    ids = _ids()
    logits = model(ids)
    sd = {k: v.detach().clone().requires_grad_() for k, v in model.state_dict().items()}
    expected = reference_logits(sd, {**BASE, **switches}, ids)
    _close(logits, expected, "logits")
    w = torch.randn_like(expected)
    (logits * w).sum().backward()
    (expected * w).sum().backward()
    for k, p in model.named_parameters():
        _close(p.grad, sd[k].grad, k)


def test_switches_change_the_forward_pass():
    """Every switch that keeps the parameter names gives different logits on the same weights."""
    ids = _ids()
    base = _model()
    reference = base(ids)
    for switches in (dict(use_post_norm=True), dict(remove_rope=True)):
        other = TransformerLM(**BASE, **switches, kernels="torch")
        other.load_state_dict(base.state_dict())
        assert not torch.allclose(other(ids), reference, atol=1e-3), switches


def test_state_dict_keys_per_switch():
    default = set(_model().state_dict())
    assert set(_model(use_post_norm=True).state_dict()) == default
    assert set(_model(remove_rope=True).state_dict()) == default
    no_norm = set(_model(remove_rmsnorm=True).state_dict())
    assert default - no_norm == {"layers.0.ln1.weight", "layers.0.ln2.weight", "layers.1.ln1.weight",
                                 "layers.1.ln2.weight", "ln_final.weight"}
    silu = set(_model(ffn_type="silu").state_dict())
    assert default - silu == {"layers.0.ffn.w3.weight", "layers.1.ffn.w3.weight"}
    assert not silu - default and not no_norm - default


def test_silu_ffn_with_4x_width_matches_swiglu_parameter_count():
    # SwiGLU: 3 * d * d_ff with d_ff = 8/3 d; SiLU: 2 * d * d_ff with d_ff = 4 d; both 8 d^2.
    d = 24
    swiglu = TransformerLM(**{**BASE, "d_ff": 8 * d // 3})
    silu = TransformerLM(**{**BASE, "d_ff": 4 * d, "ffn_type": "silu"})
    assert swiglu.num_parameters() == silu.num_parameters()


def test_nope_is_blind_to_prefix_order_and_rope_is_not():
    """Without positions, one layer of causal attention at the last step sees the previous tokens
    as a set, so permuting them leaves the last logits unchanged; with RoPE it changes them.
    (From the second layer on, the earlier positions' states depend on their own prefixes.)"""
    ids = _ids(batch=1, seq=8, seed=3)
    perm = torch.cat([torch.randperm(7, generator=torch.Generator().manual_seed(4)), torch.tensor([7])])
    assert not torch.equal(perm, torch.arange(8))
    nope = _model(remove_rope=True, num_layers=1)
    torch.testing.assert_close(nope(ids[:, perm])[:, -1], nope(ids)[:, -1], **TOL)
    rope = _model(num_layers=1)
    assert not torch.allclose(rope(ids[:, perm])[:, -1], rope(ids)[:, -1], atol=1e-3)


def test_post_norm_block_output_is_normalized():
    """With unit norm weights, a post-norm block ends in RMSNorm: every output row has RMS 1
    (up to eps); a pre-norm block's output is a raw residual sum."""
    torch.manual_seed(5)
    x = torch.randn(2, 6, 24) * 3
    post = TransformerBlock(24, 3, 40, max_seq_len=10, theta=500.0, use_post_norm=True)
    rms = post(x).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)
    pre = TransformerBlock(24, 3, 40, max_seq_len=10, theta=500.0)
    assert (pre(x).pow(2).mean(-1).sqrt() - 1).abs().max() > 0.5


def test_remove_rmsnorm_leaves_the_residual_scale_alone():
    """RMSNorm is scale invariant (norm(10 x) == norm(x)); with remove_rmsnorm every norm slot,
    the final one included, passes the scale through, so the logits scale with it."""
    ids = _ids(batch=1)
    normed, bare = _model(), _model(remove_rmsnorm=True)
    x = normed.token_embeddings(ids)
    for ln in (normed.layers[0].ln1, normed.layers[1].ln2, normed.ln_final):
        torch.testing.assert_close(ln(10 * x), ln(x), **TOL)
    for ln in (bare.layers[0].ln1, bare.layers[1].ln2, bare.ln_final):
        torch.testing.assert_close(ln(10 * x), 10 * x)
    # With all block weights zero the model is linear in its embeddings: lm_head(emb).
    linear = TransformerLM(**{**BASE, "num_layers": 1}, remove_rmsnorm=True, kernels="torch")
    with torch.no_grad():
        for p in linear.layers.parameters():
            p.zero_()
    torch.testing.assert_close(linear(ids), linear.token_embeddings(ids) @ linear.lm_head.weight.T, **TOL)


@pytest.mark.parametrize("combo", list(itertools.product([False, True], repeat=3)))
def test_every_combination_runs_and_trains(combo):
    remove_rmsnorm, use_post_norm, remove_rope = combo
    model = _model(remove_rmsnorm=remove_rmsnorm, use_post_norm=use_post_norm, remove_rope=remove_rope)
    ids = _ids(batch=2, seq=6)
    loss = model.loss(ids, _ids(batch=2, seq=6, seed=9))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
