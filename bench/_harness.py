"""The benchmark harness: devices, providers, shapes, timing and the derived rates.

Imported by the ``bench_*`` modules (``from _harness import ...``; pytest puts bench/ on the path)
and by ``kernels_vs_ceiling.py``; ``conftest.py`` holds only the pytest fixtures built on it.

Providers (``PROVIDERS``): the seam's backends ``torch`` (the CS336 reference definitions),
``native`` (PyTorch's fused ops) and ``triton`` (the fused kernels; CUDA only, because on the CPU
they run only under ``TRITON_INTERPRET=1``, which times the interpreter), plus ``compile``
(``torch.compile`` of the reference). ``OP_SHAPES`` are the op shapes every benchmark uses; shapes
marked GPU-only are skipped on the CPU so a CPU run of the suite ends in minutes.

``Bench`` times one callable with ``benchmark.pedantic`` (warm-up rounds first; CUDA synchronized
inside the callable through ``cuda_sync``), counts its FLOPs with ``FlopCounterMode`` and derives
GB/s, FLOP/s and MFU from the median time and ``cs336.flops.op_cost``. ``peak`` is the device's
entry in ``cs336.hardware`` on CUDA; on the CPU it is measured in the session and labelled so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cs336 import flops, hardware, ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
PROVIDERS = ("torch", "native", "compile", "triton")
PASSES = ("fwd", "bwd", "fwd+bwd")
# Low-precision training dtype on GPU; fp32 on the CPU, where bf16 matmuls are not the fast path.
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
# pedantic() settings: (warm-up rounds, timed rounds, calls per round when no setup is needed).
ROUNDS = (5, 30, 10) if ON_CUDA else (1, 5, 1)


def cuda_sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def skip_unavailable(provider: str, gpu_only_shape: bool = False) -> None:
    """Skip with the true reason when ``provider`` or the shape cannot be measured here."""
    if provider == "triton" and not ON_CUDA:
        pytest.skip("no CUDA device: Triton kernels run on the CPU only under TRITON_INTERPRET=1, "
                    "which would time the interpreter, not the kernel")
    if gpu_only_shape and not ON_CUDA:
        pytest.skip("shape sized for a GPU; the CPU run keeps to the small shapes")


def provider_fn(provider: str, reference: Callable, seam: Callable) -> Callable:
    """The forward callable for ``provider``: the seam under that backend (``torch``, ``native``,
    ``triton``), or for ``compile`` the compiled reference."""
    if provider == "compile":
        torch._dynamo.reset()  # a fresh cache, so no earlier test's graphs hit the recompile limit
        return torch.compile(reference)

    def run(*args):
        with ops.use_backend(provider):
            return seam(*args)
    return run


# Op shapes, name -> dims + (GPU only,). rms_norm / swiglu: (rows M, width N); small is a
# TinyStories batch of 16 x 256 tokens at d_model 512 (d_ff 1344 for the gate).
# cross_entropy: (rows M, vocab V); small: 8 x 256 tokens, vocab 10,000.
# linear_cross_entropy: (rows M, hidden K, vocab V); large: 8 x 1024 GPT-2-small tokens.
OP_SHAPES: dict[str, dict[str, tuple]] = {
    "rms_norm": {"tiny": (64, 256, False), "small": (4096, 512, False), "large": (16384, 4096, True)},
    "swiglu": {"tiny": (64, 256, False), "small": (4096, 1344, False), "large": (16384, 11008, True)},
    "cross_entropy": {"tiny": (64, 1000, False), "small": (2048, 10_000, False), "large": (8192, 50_257, True)},
    "linear_cross_entropy": {"tiny": (64, 64, 1000, False), "small": (1024, 512, 10_000, False),
                             "large": (8192, 768, 50_257, True)},
}


def shapes_for(op: str, on_gpu: bool = ON_CUDA) -> dict[str, tuple]:
    """``OP_SHAPES[op]`` without the GPU-only flag, keeping GPU-only shapes only when ``on_gpu``."""
    return {name: dims[:-1] for name, dims in OP_SHAPES[op].items() if on_gpu or not dims[-1]}


@dataclass
class Bench:
    benchmark: object
    provider: str = "torch"

    def record(self, **info) -> None:
        self.benchmark.extra_info.update(info)

    def checked(self, fn: Callable, *args):
        """Call ``fn``; for the compile provider a failure to compile becomes a skip naming it."""
        try:
            return fn(*args)
        except Exception as exc:
            if self.provider != "compile":
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            pytest.skip(f"torch.compile fails here: {type(exc).__name__}: {first}")

    def time(self, target: Callable, setup: Callable | None = None, *,
             rounds: tuple[int, int] | None = None) -> float | None:
        """Median seconds of ``target`` (``setup`` runs untimed before each call when given);
        None when timing is disabled (``--benchmark-disable``). ``rounds`` = (warm-up, timed)
        overrides ``ROUNDS``."""
        warmup, timed, iterations = ROUNDS
        if rounds is not None:
            warmup, timed = rounds
        self.checked(lambda: self.benchmark.pedantic(
            target, setup=setup, rounds=timed, warmup_rounds=warmup,
            iterations=1 if setup else iterations))
        stats = getattr(self.benchmark, "stats", None)
        return None if stats is None else stats.stats.median

    @staticmethod
    def count_flops(target: Callable, setup: Callable | None = None) -> int:
        """FLOPs that FlopCounterMode sees in one call (matmul-like ops only)."""
        args = setup()[0] if setup else ()
        with FlopCounterMode(display=False) as counter:
            target(*args)
        return counter.get_total_flops()

    def rates(self, seconds: float | None, peak: hardware.Peak | None, *,
              bytes_moved: int | None = None, flops: int | None = None, mfu: bool = False) -> None:
        """Record GB/s and FLOP/s for the median time; with ``mfu`` also flops / peak FLOP/s."""
        if bytes_moved is not None:
            self.record(bytes_moved=bytes_moved)
        if seconds is None or seconds <= 0:
            return
        self.record(median_s=seconds)
        if peak is not None:
            self.record(peak_flops=peak.flops, peak_bandwidth=peak.bandwidth, peak_source=peak.label)
        if bytes_moved is not None:
            self.record(gbps=bytes_moved / seconds / 1e9)
            if peak is not None:
                self.record(bandwidth_fraction=bytes_moved / seconds / peak.bandwidth)
        if flops is not None:
            self.record(achieved_flops_per_s=flops / seconds)
            if mfu and peak is not None:
                self.record(mfu=flops / seconds / peak.flops)

    def prepare(self, forward: Callable, inputs: Sequence[torch.Tensor], which: str):
        """(target, setup) for timing ``forward(*inputs)`` in pass ``which``.

        fwd: the forward with autograd recording, as in training. bwd: the forward runs in
        ``setup`` (untimed) and the target computes the input gradients with
        ``torch.autograd.grad``. fwd+bwd: both in the target. The output gradient is drawn once.
        """
        leaves = [t for t in inputs if t.requires_grad]
        grad_out = torch.randn_like(self.checked(forward, *inputs))

        def fwd():
            out = forward(*inputs)
            cuda_sync()
            return out

        def bwd(out):
            grads = torch.autograd.grad(out, leaves, grad_out)
            cuda_sync()
            return grads

        def setup():
            out = forward(*inputs)
            cuda_sync()
            return (out,), {}

        if which == "fwd":
            return fwd, None
        if which == "bwd":
            return bwd, setup
        return (lambda: bwd(forward(*inputs))), None

    def op(self, op: str, provider: str, which: str, shape: str, forward: Callable,
           inputs: Sequence[torch.Tensor], peak: hardware.Peak, **dims) -> None:
        """Time one op/provider/pass/shape and record its analytic and measured costs."""
        self.provider = provider
        target, setup = self.prepare(forward, inputs, which)
        cost = flops.op_cost(op, which, element_bytes=inputs[0].element_size(), **dims)
        self.record(op=op, provider=provider, shape=shape, **{"pass": which}, dtype=str(inputs[0].dtype),
                    analytic_flops=cost.flops, analytic_matmul_flops=cost.matmul_flops, **dims)
        if provider == "torch":
            self.record(measured_flops=self.count_flops(target, setup),
                        measured_flops_counts="matmul-like ops only (FlopCounterMode)")
        self.rates(self.time(target, setup), peak, bytes_moved=cost.bytes, flops=cost.flops)
