"""A full training step (zero_grad, loss forward, backward, AdamW step) of real model shapes.

Providers: ``torch`` (reference model and optimizer), ``compile`` (``torch.compile`` of the loss
computation, reference optimizer) and ``triton`` (fused kernels and the fused AdamW; CUDA only).
On CUDA the step runs under ``torch.autocast(bfloat16)`` with fp32 parameters; on the CPU in fp32.
Recorded: tokens/s, analytic training FLOPs (``cs336.flops.training_flops``: 3 x the forward
matmuls), FLOPs measured by FlopCounterMode on the torch provider, and MFU = analytic FLOPs per
second / peak (the dense-BF16 table on CUDA, an in-session fp32 matmul on the CPU).
"""

import contextlib
import dataclasses

import pytest
import torch
from conftest import DEVICE, ON_CUDA, cuda_sync, skip_unavailable

from cs336 import flops, ops
from cs336.config import model_preset
from cs336.model import TransformerLM
from cs336.optim import AdamW

pytestmark = pytest.mark.bench

PROVIDERS = ("torch", "compile", "triton")
# (warm-up, timed) steps: a CPU step of the TinyStories shape takes seconds.
STEP_ROUNDS = (3, 20) if ON_CUDA else (1, 3)
# name: (model config, batch on CPU, batch on CUDA, GPU only).
MODELS = {
    "tiny": (dataclasses.replace(model_preset("tinystories"), vocab_size=1000, d_model=128,
                                 num_layers=2, num_heads=4, d_ff=344, context_length=64), 4, 32, False),
    "tinystories": (model_preset("tinystories"), 2, 32, False),
    "gpt2-small": (model_preset("gpt2-small"), 1, 8, True),
}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(bench, peak, provider, model):
    cfg, cpu_batch, cuda_batch, gpu_only = MODELS[model]
    skip_unavailable(provider, gpu_only)
    bench.provider = provider
    batch = cuda_batch if ON_CUDA else cpu_batch
    backend = "triton" if provider == "triton" else "torch"
    torch.manual_seed(0)
    net = TransformerLM.from_config(dataclasses.replace(cfg, kernels=backend), device=DEVICE)
    opt = AdamW(net.parameters(), lr=1e-4, weight_decay=0.1, fused=provider == "triton")
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), device=DEVICE)
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) inputs and next-token targets
    if provider == "compile":
        torch._dynamo.reset()
    loss_fn = torch.compile(net.loss) if provider == "compile" else net.loss

    def autocast():
        if ON_CUDA:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        with ops.use_backend(backend), autocast():
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        cuda_sync()
        losses.append(loss.detach())

    analytic = flops.training_flops(cfg, batch)
    bench.record(op="train_step", provider=provider, shape=model, batch_size=batch,
                 seq_len=cfg.context_length, params=flops.num_params(cfg), analytic_flops=analytic,
                 dtype="autocast bf16, fp32 params" if ON_CUDA else "torch.float32",
                 **{"pass": "step"})
    if provider == "torch":
        bench.record(measured_flops=bench.count_flops(step),
                     measured_flops_counts="matmul-like ops only (FlopCounterMode)")
    seconds = bench.time(step, rounds=STEP_ROUNDS)
    bench.rates(seconds, peak, flops=analytic, mfu=True)
    if seconds:
        bench.record(tokens_per_s=batch * cfg.context_length / seconds)
    assert all(bool(torch.isfinite(v)) for v in losses)
