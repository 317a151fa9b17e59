"""Activation checkpointing (full, selective) gives the losses and gradients of none, on every
provider and precision, and keeps the state-dict names."""

import pytest
import torch

from cs336.config import ModelConfig
from cs336.model import TransformerLM
from cs336.parallel import apply_activation_checkpointing, checkpointed_blocks

CFG = dict(vocab_size=64, context_length=16, d_model=32, num_layers=3, num_heads=2, d_ff=48)


def _loss_and_grads(kernels: str, mode: str, autocast: bool):
    torch.manual_seed(0)
    model = TransformerLM.from_config(ModelConfig(**CFG, kernels=kernels))
    names = list(model.state_dict())
    assert apply_activation_checkpointing(model, mode) == checkpointed_blocks(3, mode)
    assert list(model.state_dict()) == names
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (2, 16), generator=g)
    y = torch.randint(0, 64, (2, 16), generator=g)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = model.loss(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernels", ["torch", "native", "triton"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_matches_none(kernels, mode, autocast):
    ref_loss, ref_grads = _loss_and_grads(kernels, "none", autocast)
    loss, grads = _loss_and_grads(kernels, mode, autocast)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)  # the same forward, recomputed
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_selective_is_every_other_block():
    assert checkpointed_blocks(5, "selective") == [0, 2, 4]
    assert checkpointed_blocks(5, "full") == [0, 1, 2, 3, 4]
    assert checkpointed_blocks(5, "none") == []
