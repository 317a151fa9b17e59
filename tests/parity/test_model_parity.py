"""Whole-model parity: ``TransformerLM(kernels="triton" | "native")`` vs ``kernels="torch"`` on
shared weights.

Logits, ``model.loss`` and every parameter gradient must agree, and a few training steps on the
fused model with its provider's AdamW step (``ops.use_backend(provider)`` around ``AdamW.step``)
must track ``AdamW(fused=False)`` on the torch model. Tolerances: the fp32 defaults of
tests/parity/conftest.py, except parameters after several optimizer steps (``model_training``
entry there, with its reason).
"""

import copy

import pytest
import torch

from cs336 import ops
from cs336.model import TransformerLM
from cs336.optim import AdamW

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
PROVIDERS = pytest.mark.parametrize("provider", ["triton", "native"])
SMALL = dict(vocab_size=97, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48, rope_theta=10_000.0)


def twin_models(config, dtype=torch.float32, device=DEVICE, provider="triton"):
    reference = TransformerLM(**config, kernels="torch", device=device, dtype=dtype)
    with torch.no_grad():  # non-trivial norm weights, so the dweight paths are exercised
        for name, p in reference.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    fused = copy.deepcopy(reference)
    fused.kernels = provider
    return reference, fused


def batch(config, batch_size, device=DEVICE):
    V, T = config["vocab_size"], config["context_length"]
    tokens = torch.randint(0, V, (batch_size, T), device=device)
    targets = torch.randint(0, V, (batch_size, T), device=device)
    targets[torch.rand(batch_size, T, device=device) < 0.1] = IGNORE
    return tokens, targets


@PROVIDERS
def test_logits_loss_and_gradients_match(parity, provider):
    reference, fused = twin_models(SMALL, provider=provider)
    tokens, targets = batch(SMALL, 3)
    parity.assert_close(fused(tokens), reference(tokens), "model logits")
    loss_f = fused.loss(tokens, targets, IGNORE)
    loss_r = reference.loss(tokens, targets, IGNORE)
    parity.assert_close(loss_f, loss_r, "model.loss")
    loss_f.backward()
    loss_r.backward()
    grads_r = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None, f"no gradient for {name} on the {provider} path"
        parity.assert_close(p.grad, grads_r[name].grad, f"grad {name}")


@PROVIDERS
def test_training_steps_track_reference_optimizer(parity, provider):
    reference, fused = twin_models(SMALL, provider=provider)
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_r = AdamW(reference.parameters(), **hyper, fused=False)
    opt_f = AdamW(fused.parameters(), **hyper)  # fused=None: the step runs on the model's provider
    losses_r, losses_f = [], []
    for _ in range(4):
        tokens, targets = batch(SMALL, 2)
        for model, opt, losses in ((reference, opt_r, losses_r), (fused, opt_f, losses_f)):
            opt.zero_grad(set_to_none=True)
            loss = model.loss(tokens, targets, IGNORE)
            loss.backward()
            with ops.use_backend(model.kernels):
                opt.step()
            losses.append(loss.detach())
    parity.assert_close(torch.stack(losses_f), torch.stack(losses_r), "training losses")
    params_r = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        parity.assert_close(p, params_r[name], f"param {name} after 4 steps", op="model_training")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@PROVIDERS
def test_model_parity_cuda_gpt2_small_shapes(parity, provider):
    config = dict(vocab_size=50257, context_length=256, d_model=768, num_layers=2, num_heads=12, d_ff=3072,
                  rope_theta=10_000.0)
    reference, fused = twin_models(config, device="cuda", provider=provider)
    tokens, targets = batch(config, 4, device="cuda")
    loss_f = fused.loss(tokens, targets, IGNORE)
    loss_r = reference.loss(tokens, targets, IGNORE)
    parity.assert_close(loss_f, loss_r, "model.loss (cuda)")
    loss_f.backward()
    loss_r.backward()
    grads_r = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        parity.assert_close(p.grad, grads_r[name].grad, f"grad {name} (cuda)")
