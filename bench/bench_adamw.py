"""One AdamW step over a model's parameter list: reference loop, native, torch.compile, Triton.

Memory-bound: per parameter the step reads p, g, m, v and writes p, m, v (7 x 4 bytes in fp32).
The parameter lists have the shapes of real models (built on the meta device for the shapes,
then allocated on the benchmark device). native: ``torch._fused_adamw_`` with the decay after the
update (``cs336.ops.adamw_step_native_``).
"""

import dataclasses

import pytest
import torch

from _harness import DEVICE, PROVIDERS, cuda_sync, skip_unavailable
from cs336 import flops, ops
from cs336.model import TransformerLM
from cs336.presets import model_preset

pytestmark = pytest.mark.bench

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
# name: (model config, GPU only). tiny: 2 layers at d_model 128, vocab 1000.
MODELS = {
    "tiny": (dataclasses.replace(model_preset("tinystories"), vocab_size=1000, d_model=128,
                                 num_layers=2, num_heads=4, d_ff=344), False),
    "tinystories": (model_preset("tinystories"), False),
    "gpt2-small": (model_preset("gpt2-small"), True),
}


def _state(cfg):
    shapes = [p.shape for p in TransformerLM.from_config(cfg, device="meta").parameters()]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def tensors(scale):
        return [(scale * torch.randn(s, generator=gen)).to(DEVICE) for s in shapes]
    return tensors(1.0), tensors(1e-2), [torch.zeros(s, device=DEVICE) for s in shapes], \
        [torch.zeros(s, device=DEVICE) for s in shapes]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_adamw_step(bench, peak, provider, model):
    cfg, gpu_only = MODELS[model]
    skip_unavailable(provider, gpu_only)
    bench.provider = provider
    params, grads, exp_avgs, exp_avg_sqs = _state(cfg)
    numel = sum(p.numel() for p in params)
    if provider == "compile":
        torch._dynamo.reset()
        step_fn = torch.compile(ops.adamw_step_reference_)
    else:
        def step_fn(*lists, **kw):
            ops.adamw_step_(*lists, **kw, backend=provider)

    def target():
        step_fn(params, grads, exp_avgs, exp_avg_sqs, step=10, **HYPER)
        cuda_sync()

    cost = flops.op_cost("adamw", "fwd", M=numel, N=0)
    bench.record(op="adamw", provider=provider, shape=model, tensors=len(params), numel=numel,
                 dtype="torch.float32", analytic_flops=cost.flops, analytic_matmul_flops=0,
                 **{"pass": "step"})
    if provider == "torch":
        bench.record(measured_flops=bench.count_flops(target),
                     measured_flops_counts="matmul-like ops only (FlopCounterMode)")
    bench.rates(bench.time(target), peak, bytes_moved=cost.bytes, flops=cost.flops)
    assert all(bool(torch.isfinite(p).all()) for p in params)
