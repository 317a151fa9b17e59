"""Measured FLOPs (torch.utils.flop_counter.FlopCounterMode) of the real model against cs336.flops.

FlopCounterMode counts matmul-like ops only (mm, bmm, addmm, baddbmm, attention kernels), which
are exactly the terms of ``flops.forward_flops``; a forward+backward counts each matmul's two
gradient products, so it should measure ``flops.training_flops``. Full-size presets run on the
meta device (shapes only, no memory, no arithmetic); a small model also runs on real CPU tensors
so the meta path is not the only evidence.
"""

import dataclasses
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cs336 import flops, ops
from cs336.model import TransformerLM
from cs336.presets import MODEL_PRESETS, model_preset

REL = 0.01  # the bound; the counts agree exactly today


def _measure(model, tokens, backward: bool):
    with ops.use_backend("torch"), FlopCounterMode(display=False) as counter:
        if backward:
            model.loss(tokens, tokens).backward()
        else:
            model(tokens)
    return counter


CASES = [(name, 2, None) for name in MODEL_PRESETS] + [("gpt2-xl", 1, 16384)]


@pytest.mark.parametrize(("preset", "batch", "context"), CASES,
                         ids=[f"{p}-B{b}-T{t or 'ctx'}" for p, b, t in CASES])
def test_meta_presets_match_analytic(preset, batch, context):
    cfg = model_preset(preset)
    if context is not None:
        cfg = dataclasses.replace(cfg, context_length=context)
    model = TransformerLM.from_config(dataclasses.replace(cfg, kernels="torch"), device="meta")
    tokens = torch.zeros(batch, cfg.context_length, dtype=torch.long, device="meta")
    fwd = _measure(model, tokens, backward=False).get_total_flops()
    train = _measure(model, tokens, backward=True).get_total_flops()
    assert fwd == pytest.approx(flops.total_forward_flops(cfg, batch), rel=REL)
    assert train == pytest.approx(flops.training_flops(cfg, batch), rel=REL)


@pytest.mark.parametrize("ffn_type", ["swiglu", "silu"])
def test_real_small_model_by_component(ffn_type):
    cfg = dataclasses.replace(model_preset("tinystories"), d_model=64, num_heads=4, d_ff=96,
                              num_layers=2, vocab_size=257, context_length=32, ffn_type=ffn_type,
                              kernels="torch")
    torch.manual_seed(0)
    model = TransformerLM.from_config(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 32))
    counter = _measure(model, tokens, backward=False)
    analytic = flops.forward_flops(cfg, 3)
    by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}

    def block_total(suffix: str) -> int:
        # Module paths look like "TransformerLM.layers.0.attn.q_proj" (or, in some torch
        # versions, "TransformerBlock.attn.q_proj" summed over layers): add up every block's.
        return sum(v for k, v in by_module.items()
                   if re.search(rf"(layers\.\d+|^TransformerBlock)\.{re.escape(suffix)}$", k))

    qkv = sum(block_total(f"attn.{p}_proj") for p in "qkv")
    assert qkv == analytic["attn.qkv_proj"]
    assert block_total("attn.output_proj") == analytic["attn.output_proj"]
    projections = qkv + block_total("attn.output_proj")
    assert block_total("attn") - projections == analytic["attn.qk"] + analytic["attn.av"]
    for w in ("w1", "w2", "w3"):
        assert block_total(f"ffn.{w}") == analytic.get(f"ffn.{w}", 0)
    assert by_module["TransformerLM.lm_head"] == analytic["lm_head"]
    assert counter.get_total_flops() == sum(analytic.values())
    model.zero_grad()
    train = _measure(model, tokens, backward=True).get_total_flops()
    assert train == flops.training_flops(cfg, 3)
