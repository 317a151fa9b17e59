"""Backend selection at the seam (cs336.ops) and the kernels' custom-op registration."""

import os
import subprocess
import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cs336 import ops

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")


@NO_CUDA
def test_triton_without_cuda_or_interpreter_explains_what_to_do(tmp_path):
    code = (
        "import torch\n"
        "from cs336 import ops\n"
        "try:\n"
        "    ops.resolve_backend('triton')\n"
        "except ops.BackendError as exc:\n"
        "    print('ERROR:', exc)\n"
        "with ops.use_backend('triton'):\n"
        "    try:\n"
        "        ops.rms_norm(torch.ones(2, 4), torch.ones(4))\n"
        "    except ops.BackendError as exc:\n"
        "        print('SEAM:', exc)\n"
        "print('AUTO:', ops.resolve_backend('auto'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ERROR: --kernels triton needs a CUDA device" in out
    assert "TRITON_INTERPRET=1" in out and "--kernels native" in out
    assert "SEAM: --kernels triton needs a CUDA device" in out
    assert "AUTO: native" in out


@NO_CUDA
def test_auto_resolves_to_native_on_cpu():
    assert ops.resolve_backend("auto") == "native"
    with ops.use_backend("auto"):
        assert ops.resolve_backend() == "native"


def test_auto_resolves_to_triton_where_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ops.resolve_backend("auto") == "triton"
    monkeypatch.setitem(sys.modules, "kernels", None)  # CUDA but no importable kernels: native
    assert ops.resolve_backend("auto") == "native"


def test_unknown_backend_is_rejected():
    expected = "unknown kernel backend 'cuda'; valid choices: auto, torch, native, triton"
    with pytest.raises(ops.BackendError, match=expected):
        ops.set_backend("cuda")
    with pytest.raises(ops.BackendError, match="unknown kernel backend"):
        with ops.use_backend("fast"):
            pass
    assert ops.get_backend() in ops.BACKENDS


def test_wrong_kernels_package_is_named(monkeypatch):
    fake = types.ModuleType("kernels")
    fake.__file__ = "/site-packages/kernels/__init__.py"
    fake.get_kernel = lambda name: None  # the HF hub package's entry point, not ours
    monkeypatch.setitem(sys.modules, "kernels", fake)
    with pytest.raises(ops.BackendError, match="not cs336-kernels' package.*pip uninstall kernels"):
        ops.resolve_backend("triton")
    if not torch.cuda.is_available():
        assert ops.resolve_backend("auto") == "native"


def test_missing_kernels_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "kernels", None)  # makes `import kernels` raise ImportError
    with pytest.raises(ops.BackendError, match="cannot import the cs336 'kernels' package.*pip install -e"):
        ops.resolve_backend("triton")


SEAM_CALLS = {
    "rms_norm": lambda: ops.rms_norm(torch.randn(3, 8), torch.ones(8)),
    "swiglu": lambda: ops.swiglu(torch.randn(3, 8), torch.randn(3, 8)),
    "cross_entropy": lambda: ops.cross_entropy(torch.randn(3, 8), torch.tensor([1, 2, 3])),
    "linear_cross_entropy": lambda: ops.linear_cross_entropy(
        torch.randn(3, 4), torch.randn(8, 4), torch.tensor([1, 2, 3])),
    "adamw_step_": lambda: ops.adamw_step_(
        [torch.zeros(4)], [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)],
        step=1, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0),
}
# Per op: (kernels module, native function, reference function as (module, name)).
IMPLEMENTATIONS = {
    "rms_norm": ("rms_norm", "rms_norm_native", (ops, "rms_norm_reference")),
    "swiglu": ("swiglu", "swiglu_native", (ops, "swiglu_reference")),
    "cross_entropy": ("cross_entropy", "cross_entropy_native", (ops.nn_utils, "cross_entropy")),
    "linear_cross_entropy": ("cross_entropy", "linear_cross_entropy_native",
                             (ops, "linear_cross_entropy_reference")),
    "adamw_step_": ("adamw", "adamw_step_native_", (ops, "adamw_step_reference_")),
}


def _spy(monkeypatch, owner, attr, label, calls):
    real = getattr(owner, attr)

    def spy(*args, **kwargs):
        calls.append(label)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, spy)


@pytest.mark.parametrize("name", list(SEAM_CALLS))
def test_seam_dispatches_to_the_selected_backend(monkeypatch, name):
    kernel_module, native_name, (ref_owner, ref_name) = IMPLEMENTATIONS[name]
    calls = []
    _spy(monkeypatch, __import__(f"kernels.{kernel_module}", fromlist=[name]), name, "triton", calls)
    _spy(monkeypatch, ops, native_name, "native", calls)
    _spy(monkeypatch, ref_owner, ref_name, "torch", calls)
    for backend in ("torch", "native", "triton"):
        calls.clear()
        with ops.use_backend(backend):
            SEAM_CALLS[name]()
        assert calls == [backend], f"{name} under {backend} ran {calls}"


def test_attention_dispatches_native_to_sdpa(monkeypatch):
    calls = []
    _spy(monkeypatch, ops.F, "scaled_dot_product_attention", "sdpa", calls)
    q, k, v = (torch.randn(2, 5, 8) for _ in range(3))
    with ops.use_backend("torch"):
        ops.attention(q, k, v)
    assert calls == []
    with ops.use_backend("native"):
        ops.attention(q, k, v)
    assert calls == ["sdpa"]


def test_kernels_are_registered_custom_ops():
    import kernels.adamw
    import kernels.cross_entropy
    import kernels.rms_norm
    import kernels.swiglu  # noqa: F401  (importing registers the ops)

    names = ["rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd", "cross_entropy_fwd",
             "cross_entropy_bwd", "linear_cross_entropy_fwd", "adamw_step_"]
    for name in names:
        assert hasattr(torch.ops.cs336_kernels, name), name


def test_flop_counter_sees_the_fused_lm_head():
    from kernels.cross_entropy import linear_cross_entropy

    M, C, V = 12, 16, 40
    h = torch.randn(M, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        linear_cross_entropy(h, w, torch.randint(0, V, (M,)), chunk_rows=5).backward()
    # Forward logits, then grad_h and grad_W, each 2*M*C*V.
    assert counter.get_total_flops() == 6 * M * C * V
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        linear_cross_entropy(h, w, torch.randint(0, V, (M,)))
    assert counter.get_total_flops() == 2 * M * C * V


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_torch_compile_traces_the_kernels():
    # torch.compile needs real CUDA: under TRITON_INTERPRET=1 its fake-tensor tracing of
    # wrap_triton calls tries to read data pointers and fails.
    from kernels.rms_norm import rms_norm
    from kernels.swiglu import swiglu

    def f(x, w, b):
        return swiglu(rms_norm(x, w, 1e-5), b)

    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    w = torch.randn(256, device="cuda", requires_grad=True)
    b = torch.randn(64, 256, device="cuda")
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, w, b)
    torch.testing.assert_close(out, f(x, w, b))
    out.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_launch_wraps_only_compiled_kernels():
    # torch 2.11's wrap_triton rejects the interpreter's kernels; an interpreted launch runs bare.
    from triton.runtime.jit import JITFunction

    from kernels import rms_norm
    from kernels._common import interpreted, launch

    kernel = rms_norm._rms_norm_fwd_kernel
    assert isinstance(kernel, JITFunction) != interpreted()
    assert (launch(kernel) is kernel) == interpreted()
