"""Multi-tensor AdamW providers (Triton kernel, native ``torch._foreach_*`` step) vs
``cs336.ops.adamw_step_reference_`` over several steps."""

import pytest
import torch

from cs336 import ops
from cs336.ops import adamw_step_native_, adamw_step_reference_
from kernels._common import KernelInputError
from kernels.adamw import BLOCK_SIZE, adamw_step_

IMPLS = {"triton": adamw_step_, "native": adamw_step_native_}
PROVIDERS = pytest.mark.parametrize("provider", list(IMPLS))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)

# Tensors of many sizes: scalars, smaller than a block, a block boundary +- 1, several blocks,
# an empty one, and ranks 0-4.
SHAPES = [(), (1,), (5,), (BLOCK_SIZE - 1,), (BLOCK_SIZE + 1,), (37, 29), (0,), (3, 4, 5), (2, 3, 4, 5),
          (3 * BLOCK_SIZE + 7,)]


def make_state(shapes, p_dtype, state_dtype):
    params = [torch.randn(s, device=DEVICE).to(p_dtype) for s in shapes]
    exp_avgs = [torch.zeros(s, device=DEVICE, dtype=state_dtype) for s in shapes]
    exp_avg_sqs = [torch.zeros(s, device=DEVICE, dtype=state_dtype) for s in shapes]
    return params, exp_avgs, exp_avg_sqs


def clone_all(tensors):
    return [t.clone() for t in tensors]


def run_steps(parity, p_dtype, state_dtype, steps, shapes=SHAPES, hyper=HYPER, op=None, provider="triton"):
    params, ms, vs = make_state(shapes, p_dtype, state_dtype)
    ref_params, ref_ms, ref_vs = clone_all(params), clone_all(ms), clone_all(vs)
    for step in range(1, steps + 1):
        grads = [torch.randn(p.shape, device=DEVICE).to(p_dtype) for p in params]
        IMPLS[provider](params, grads, ms, vs, step=step, **hyper)
        adamw_step_reference_(ref_params, grads, ref_ms, ref_vs, step=step, **hyper)
    if op is not None:
        # A loosened entry scales atol by max|expected|: take that over all tensors together, so
        # a one-element tensor whose m cancels is held to the scale of the whole state.
        def flat(ts):
            return torch.cat([t.reshape(-1).float() for t in ts])

        parity.assert_close(flat(ms), flat(ref_ms), "adamw exp_avg (all tensors)", dtype=state_dtype, op=op)
        parity.assert_close(flat(vs), flat(ref_vs), "adamw exp_avg_sq (all tensors)", dtype=state_dtype, op=op)
        parity.assert_close(flat(params), flat(ref_params), "adamw params (all tensors)", dtype=p_dtype, op=op)
        return params
    for i in range(len(params)):
        shape = tuple(params[i].shape)
        parity.assert_close(ms[i], ref_ms[i], f"adamw exp_avg {i} {shape}", dtype=state_dtype)
        parity.assert_close(vs[i], ref_vs[i], f"adamw exp_avg_sq {i} {shape}", dtype=state_dtype)
        parity.assert_close(params[i], ref_params[i], f"adamw param {i} {shape} after {steps} steps", dtype=p_dtype)
    return params


@PROVIDERS
def test_adamw_fp32_tracks_reference_over_steps(parity, provider):
    params = run_steps(parity, torch.float32, torch.float32, steps=5, provider=provider)
    assert all(p.isfinite().all() for p in params)


@pytest.mark.parametrize("p_dtype", [torch.bfloat16, torch.float16], ids=str)
@PROVIDERS
def test_adamw_half_params_fp32_state_track_reference(parity, p_dtype, provider):
    run_steps(parity, p_dtype, torch.float32, steps=3, op="adamw_half_params", provider=provider)


@PROVIDERS
def test_adamw_bf16_state(parity, provider):
    run_steps(parity, torch.bfloat16, torch.bfloat16, steps=3, op="adamw_bf16_state", provider=provider)


@pytest.mark.parametrize("p_dtype,state_dtype,op", [
    (torch.float32, torch.float32, None),
    (torch.bfloat16, torch.float32, "adamw_half_params"),
    (torch.float16, torch.float32, "adamw_half_params"),
    (torch.bfloat16, torch.bfloat16, "adamw_bf16_state"),
], ids=["fp32", "bf16_fp32_state", "fp16_fp32_state", "bf16_state"])
@PROVIDERS
def test_adamw_one_tensor_group(parity, p_dtype, state_dtype, op, provider):
    # A dtype group of exactly one tensor: on a GPU its tensor count T == 1 is compiled as a
    # constant (kernels.gpu_check compiles this case for sm_80 and sm_90a; tests/test_gpu_check.py).
    run_steps(parity, p_dtype, state_dtype, steps=2, shapes=[(37, 29)], op=op, provider=provider)


@PROVIDERS
def test_adamw_one_scalar_group(parity, provider):
    # One 0-d tensor: T == 1 and a single element (fp32; a lone bf16 m can cancel, see LOOSE).
    run_steps(parity, torch.float32, torch.float32, steps=3, shapes=[()], provider=provider)


@PROVIDERS
def test_adamw_mixed_dtype_groups_in_one_call(parity, provider):
    # Tensors of different dtypes are grouped into one launch per dtype combination.
    p32, p16 = torch.randn(50, device=DEVICE), torch.randn(30, device=DEVICE).bfloat16()
    params = [p32, p16]
    ms = [torch.zeros_like(p32), torch.zeros(30, device=DEVICE)]
    vs = [torch.zeros_like(p32), torch.zeros(30, device=DEVICE)]
    ref = clone_all(params), clone_all(ms), clone_all(vs)
    grads = [torch.randn_like(p32), torch.randn(30, device=DEVICE).bfloat16()]
    IMPLS[provider](params, grads, ms, vs, step=1, **HYPER)
    adamw_step_reference_(*ref[:1], grads, *ref[1:], step=1, **HYPER)
    names = ["p32", "p16", "m32", "m16", "v32", "v16"]
    for a, b, name in zip(params + ms + vs, ref[0] + ref[1] + ref[2], names, strict=True):
        parity.assert_close(a, b, f"adamw mixed {name}")


@PROVIDERS
def test_adamw_decay_applies_to_updated_param(parity, provider):
    # With a zero gradient, m = v = 0 and the update is 0: p becomes p * (1 - lr * wd) exactly.
    p = torch.randn(100, device=DEVICE)
    expected = p - p * (HYPER["lr"] * HYPER["weight_decay"])
    IMPLS[provider]([p], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)], step=1, **HYPER)
    parity.assert_close(p, expected, "adamw decay-only step")


@PROVIDERS
def test_adamw_decay_follows_the_update(parity, provider):
    # One step with eps = 0 and a gradient of +-1: the update is a_1 * sign(g) = lr * sign(g), and
    # Algorithm 2 decays the updated weight, (p - lr sign(g)) (1 - lr wd); torch.optim.AdamW's
    # order (decay first) would give p (1 - lr wd) - lr sign(g).
    hyper = {**HYPER, "eps": 0.0}
    p = torch.tensor([1.0, -2.0, 0.5], device=DEVICE)
    g = torch.tensor([1.0, -1.0, 1.0], device=DEVICE)
    lr, wd = hyper["lr"], hyper["weight_decay"]
    expected = (p - lr * g) * (1 - lr * wd)
    IMPLS[provider]([p], [g], [torch.zeros_like(p)], [torch.zeros_like(p)], step=1, **hyper)
    parity.assert_close(p, expected, "adamw decay after the update")


@PROVIDERS
def test_adamw_non_contiguous_tensors_are_updated_in_place(parity, provider):
    base = torch.randn(40, 30, device=DEVICE)
    p = base.t()  # (30, 40) transposed view of base
    m, v = torch.zeros(40, 30, device=DEVICE).t(), torch.zeros(40, 30, device=DEVICE).t()
    ref_p, ref_m, ref_v = p.clone(), m.clone(), v.clone()
    g = torch.randn(30, 40, device=DEVICE)
    IMPLS[provider]([p], [g], [m], [v], step=3, **HYPER)
    adamw_step_reference_([ref_p], [g], [ref_m], [ref_v], step=3, **HYPER)
    parity.assert_close(base.t(), ref_p, "adamw non-contiguous param (through its base)")
    parity.assert_close(m, ref_m, "adamw non-contiguous exp_avg")
    parity.assert_close(v, ref_v, "adamw non-contiguous exp_avg_sq")


def test_adamw_rejects_bad_inputs():
    p = torch.zeros(4, device=DEVICE)
    with pytest.raises(KernelInputError, match="equal lengths"):
        adamw_step_([p], [], [p.clone()], [p.clone()], step=1, **HYPER)
    with pytest.raises(KernelInputError, match="must match param 0"):
        adamw_step_([p], [torch.zeros(5, device=DEVICE)], [p.clone()], [p.clone()], step=1, **HYPER)
    with pytest.raises(KernelInputError, match="dtype float64"):
        adamw_step_([p.double()], [p.double()], [p.double()], [p.double()], step=1, **HYPER)
    with pytest.raises(KernelInputError, match="step counts from 1"):
        adamw_step_([p], [p.clone()], [p.clone()], [p.clone()], step=0, **HYPER)


def _bad_adamw_calls():
    """(what, call arguments, message) for inputs no provider can step correctly."""
    def args(p=None, g=None, m=None, v=None, **hyper):
        p = torch.ones(3, 2, device=DEVICE) if p is None else p
        return ([p], [torch.ones(p.shape, device=DEVICE) if g is None else g],
                [torch.zeros(p.shape, device=DEVICE) if m is None else m],
                [torch.zeros(p.shape, device=DEVICE) if v is None else v], {**dict(HYPER, step=1), **hyper})
    return [
        ("short grad", args(g=torch.ones(5, device=DEVICE)), "grad 0 has shape"),
        ("broadcast grad", args(g=torch.ones(2, device=DEVICE)), "grad 0 has shape"),
        ("exp_avg shape", args(m=torch.zeros(6, device=DEVICE)), "exp_avg 0 has shape"),
        ("integer param", args(p=torch.ones(3, dtype=torch.long, device=DEVICE)), "param 0 has dtype"),
        ("step 0", args(step=0), "step must be an integer >= 1"),
        ("negative step", args(step=-1), "step must be an integer >= 1"),
        ("fractional step", args(step=1.5), "step must be an integer >= 1"),
        ("beta1 = 1", args(beta1=1.0), "beta1 must lie in"),
        ("beta2 > 1", args(beta2=1.5), "beta2 must lie in"),
        ("nan lr", args(lr=float("nan")), "lr must be >= 0"),
        ("negative eps", args(eps=-1e-8), "eps must be >= 0"),
    ]


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_adamw_seam_rejects_bad_inputs_on_every_backend(backend):
    # The native provider used to read past a short gradient or only the first row of a broadcast
    # one (torch._fused_adamw_), leave an integer param unchanged, and every provider accepted a
    # step of 0 / -1 / 1.5 (a ZeroDivisionError or complex bias correction) or beta1 = 1.
    if not ops.backend_available(backend):
        pytest.skip(f"backend {backend} cannot run here")
    for what, (params, grads, ms, vs, hyper), message in _bad_adamw_calls():
        before = params[0].clone()
        with pytest.raises(ValueError, match=message):
            ops.adamw_step_(params, grads, ms, vs, backend=backend, **hyper)
        assert torch.equal(params[0], before), f"{what}: the param changed before the error"
    with pytest.raises(ValueError, match="equal lengths"):
        ops.adamw_step_([torch.ones(2)], [], [], [], step=1, backend=backend, **HYPER)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@PROVIDERS
def test_adamw_cuda_many_tensors(parity, provider):
    shapes = [(768, 768)] * 24 + [(768,)] * 48 + [(50257, 768), (3, 5), ()]
    run_steps(parity, torch.float32, torch.float32, steps=10, shapes=shapes, provider=provider)
    run_steps(parity, torch.bfloat16, torch.float32, steps=1, shapes=shapes, provider=provider)


def test_adamw_pointer_table_is_built_once_per_set_of_addresses(parity, monkeypatch):
    from kernels import adamw

    monkeypatch.setattr(adamw, "_TABLES", type(adamw._TABLES)())
    built = []
    real_tensor = torch.tensor
    monkeypatch.setattr(adamw.torch, "tensor", lambda *a, **k: (built.append(1), real_tensor(*a, **k))[1])
    params, ms, vs = make_state([(5,), (BLOCK_SIZE + 3,)], torch.float32, torch.float32)
    grads = [torch.randn(p.shape, device=DEVICE) for p in params]
    ref = clone_all(params), clone_all(ms), clone_all(vs)
    for step in (1, 2, 3):
        adamw_step_(params, grads, ms, vs, step=step, **HYPER)
        adamw_step_reference_(*ref[:1], grads, *ref[1:], step=step, **HYPER)
    assert len(built) == 1 and len(adamw._TABLES) == 1
    params[1].data = params[1].data.clone()  # new storage: the table is rebuilt, then reused
    for step in (4, 5):
        adamw_step_(params, grads, ms, vs, step=step, **HYPER)
        adamw_step_reference_(*ref[:1], grads, *ref[1:], step=step, **HYPER)
    assert len(built) == 2 and len(adamw._TABLES) == 2
    for i, (p, r) in enumerate(zip(params, ref[0], strict=True)):
        parity.assert_close(p, r, f"adamw param {i} after a rebuilt table", dtype=torch.float32)
