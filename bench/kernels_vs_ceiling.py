"""Each Triton kernel against the other providers of the seam, torch.compile, Liger-Kernel and
the copy-bandwidth ceiling.

    python bench/kernels_vs_ceiling.py --out bench/RESULTS-kernels.md
    python bench/kernels_vs_ceiling.py --out r.md --dtype fp32 --providers triton,torch

Needs a CUDA device. For every kernel (RMSNorm, SwiGLU gate, cross-entropy, fused linear
cross-entropy, AdamW) and pass (fwd, bwd; fwd+bwd for the fused LM head, one step for AdamW) it
times, with ``triton.testing.do_bench`` (median), the providers of ``bench/_harness.py``:
``triton`` (this package's kernel), ``torch`` (the eager reference definition), ``native``
(PyTorch's fused op, ``cs336.ops``' native branch) and ``compile`` (``torch.compile`` of the
reference), plus ``liger`` (Liger-Kernel's Triton op) where the ``liger_kernel`` package is
installed (it is not a dependency; a failing Liger call is reported in the row, not fatal).
Shapes are the ``small`` and ``large`` entries of ``_harness.OP_SHAPES`` (AdamW: the parameter
tensors of the GPT-2-small ``TransformerLM``). The ceiling is the device-to-device copy bandwidth
measured in the same run (``dst.copy_(src)`` of 1 GiB: read + write). GB/s counts the bytes the
op must move at minimum, ``cs336.flops.op_cost`` (each input read once, each output written
once), so every provider is credited with the same bytes and the GB/s ratio equals the speed
ratio. Writes a markdown table (atomically, ``cs336.fileio``).

``--smoke`` runs the ``tiny`` shapes on whatever device is present (the CPU needs
TRITON_INTERPRET=1) with a wall-clock timer, to check the script end to end; its numbers are not
measurements.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: the shared harness

from _harness import shapes_for  # noqa: E402
from cs336 import flops, ops  # noqa: E402
from cs336.fileio import atomic_write_text  # noqa: E402
from cs336.presets import model_preset  # noqa: E402

PROVIDERS = ("triton", "torch", "native", "compile", "liger")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Row:
    kernel: str
    pass_: str
    shape: str
    provider: str
    bytes_moved: int
    ms: float | None = None
    peak_mib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


class Timer:
    """do_bench on CUDA; a wall-clock median in smoke runs."""

    def __init__(self, smoke: bool, device: torch.device):
        self.smoke = smoke
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.smoke:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated above the current level while ``fn`` runs once (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth(device: torch.device, timer: Timer, smoke: bool) -> float:
    """GB/s of dst.copy_(src) (bytes read + bytes written)."""
    n = (2**20 if smoke else 2**28)  # fp32 elements: 4 MiB in smoke runs, 1 GiB otherwise
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def grad_fn(out: torch.Tensor, inputs: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], object]:
    """A callable running the backward of an already-computed ``out`` (graph retained)."""
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def compiled(fn: Callable) -> Callable:
    """torch.compile of ``fn``; no ``torch._dynamo.reset()`` between ops (each op is its own
    function, so its graphs are cached apart, and a reset would recompile the others)."""
    return torch.compile(fn)


# Called with every row as soon as it is measured (bench/gpu_steps.py appends it to its JSONL).
SINKS: list[Callable[[Row], None]] = []


def emit(rows: list, *new: Row) -> None:
    """Append ``new`` to ``rows`` and hand each to the SINKS."""
    for row in new:
        rows.append(row)
        for sink in SINKS:
            sink(row)


def liger_op(name: str) -> Callable | None:
    """Liger-Kernel's op for ``name`` (called as ``f(*inputs)``), or None where not installed."""
    try:
        if name == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-5)
        if name == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return LigerSiLUMulFunction.apply
        if name == "cross_entropy":
            from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

            return lambda z, t: _first(LigerCrossEntropyFunction.apply(z, t))
        if name == "linear_cross_entropy":
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            return lambda h, w, t: _first(LigerFusedLinearCrossEntropyFunction.apply(h, w, t))
    except ImportError:
        return None
    return None


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def implementations(name: str, providers: list[str]) -> dict[str, Callable]:
    """provider -> callable for op ``name`` (the seam's functions under each backend)."""
    seam = {"rms_norm": lambda x, w: ops.rms_norm(x, w, 1e-5), "swiglu": ops.swiglu,
            "cross_entropy": ops.cross_entropy, "linear_cross_entropy": ops.linear_cross_entropy}[name]
    reference = {"rms_norm": lambda x, w: ops.rms_norm_reference(x, w, 1e-5), "swiglu": ops.swiglu_reference,
                 "cross_entropy": ops.nn_utils.cross_entropy,
                 "linear_cross_entropy": ops.linear_cross_entropy_reference}[name]
    fns: dict[str, Callable] = {}
    for provider in providers:
        if provider in ("triton", "torch", "native"):
            fns[provider] = (lambda backend: lambda *a: _under(backend, seam, *a))(provider)
        elif provider == "compile":
            fns[provider] = compiled(reference)
        elif provider == "liger" and liger_op(name) is not None:
            fns[provider] = liger_op(name)
    return fns


def _under(backend: str, fn: Callable, *args):
    with ops.use_backend(backend):
        return fn(*args)


def _error(exc: Exception) -> str:
    return f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]}"


def op_shapes(name: str, smoke: bool) -> dict[str, tuple]:
    """The benchmark suite's shapes for ``name``: tiny in smoke runs, otherwise the rest."""
    shapes = shapes_for(name, on_gpu=True)
    return {"tiny": shapes["tiny"]} if smoke else {k: v for k, v in shapes.items() if k != "tiny"}


def bench_elementwise(name, providers, dtype, device, timer, smoke):
    """fwd and bwd rows for RMSNorm or the SwiGLU gate (every input gets a gradient)."""
    rows = []
    es = torch.finfo(dtype).bits // 8
    for M, N in op_shapes(name, smoke).values():
        def make():
            if name == "rms_norm":
                return [torch.randn(M, N, device=device, dtype=dtype, requires_grad=True),
                        torch.randn(N, device=device, dtype=dtype, requires_grad=True)]
            return [torch.randn(M, N, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]

        fwd_bytes = flops.op_cost(name, "fwd", M=M, N=N, element_bytes=es).bytes
        bwd_bytes = flops.op_cost(name, "bwd", M=M, N=N, element_bytes=es).bytes
        for provider, fn in implementations(name, providers).items():
            inputs = make()
            fwd = Row(name, "fwd", f"{M}x{N}", provider, fwd_bytes)
            bwd = Row(name, "bwd", f"{M}x{N}", provider, bwd_bytes)
            try:
                with torch.no_grad():
                    fwd.ms = timer(lambda: fn(*inputs))
                out = fn(*inputs)
                bwd.ms = timer(grad_fn(out, [t for t in inputs if t.requires_grad], torch.randn_like(out)))
            except Exception as exc:  # a provider that fails is reported, not fatal
                fwd.note = bwd.note = _error(exc)
            emit(rows, fwd, bwd)
    return rows


def bench_rms_norm(providers, dtype, device, timer, smoke):
    return bench_elementwise("rms_norm", providers, dtype, device, timer, smoke)


def bench_swiglu(providers, dtype, device, timer, smoke):
    return bench_elementwise("swiglu", providers, dtype, device, timer, smoke)


def bench_cross_entropy(providers, dtype, device, timer, smoke):
    rows = []
    es = torch.finfo(dtype).bits // 8
    for M, V in op_shapes("cross_entropy", smoke).values():
        targets = torch.randint(0, V, (M,), device=device)
        for provider, fn in implementations("cross_entropy", providers).items():
            logits = torch.randn(M, V, device=device, dtype=dtype, requires_grad=True)
            fwd = Row("cross_entropy", "fwd", f"{M}x{V}", provider,
                      flops.op_cost("cross_entropy", "fwd", M=M, N=V, element_bytes=es).bytes)
            bwd = Row("cross_entropy", "bwd", f"{M}x{V}", provider,
                      flops.op_cost("cross_entropy", "bwd", M=M, N=V, element_bytes=es).bytes)
            try:
                with torch.no_grad():
                    fwd.ms = timer(lambda: fn(logits, targets))
                loss = fn(logits, targets)
                bwd.ms = timer(grad_fn(loss, [logits], torch.ones_like(loss)))
                fwd.peak_mib = peak_memory_mib(lambda: torch.autograd.grad(fn(logits, targets), [logits]), device)
            except Exception as exc:
                fwd.note = bwd.note = _error(exc)
            emit(rows, fwd, bwd)
    return rows


def bench_linear_cross_entropy(providers, dtype, device, timer, smoke):
    rows = []
    es = torch.finfo(dtype).bits // 8
    for M, C, V in op_shapes("linear_cross_entropy", smoke).values():
        targets = torch.randint(0, V, (M,), device=device)
        h = torch.randn(M, C, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, C, device=device) / C**0.5).to(dtype).requires_grad_(True)
        # Bytes of the inputs and gradients only (h, W, targets, dh, dW): the fused op's point
        # is that the logits never reach memory in full.
        cost = flops.op_cost("linear_cross_entropy", "fwd+bwd", M=M, N=V, K=C, element_bytes=es)
        for provider, fn in implementations("linear_cross_entropy", providers).items():
            row = Row("linear_cross_entropy", "fwd+bwd", f"{M}x{C} @ {V}x{C}", provider, cost.bytes)
            row.note = "matmul-bound; GB/s not meaningful"

            def step():
                return torch.autograd.grad(fn(h, w, targets), [h, w])

            try:
                row.ms = timer(step)
                row.peak_mib = peak_memory_mib(step, device)
            except Exception as exc:
                row.note = _error(exc)
            emit(rows, row)
    return rows


def bench_adamw(providers, dtype, device, timer, smoke):
    from cs336.model import TransformerLM

    cfg = model_preset("gpt2-small")
    shapes = [p.shape for p in TransformerLM.from_config(cfg, device="meta").parameters()]
    if smoke:
        shapes = [(300, 32), (32, 32), (32,), (5,)]
    n = sum(torch.Size(s).numel() for s in shapes)
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    label = "gpt2-small" if not smoke else "tiny"
    rows = []
    for provider in (p for p in PROVIDERS if p in providers and p != "liger"):
        # fp32 parameters and state whatever --dtype, the case op_cost's bytes describe.
        params = [torch.randn(s, device=device) for s in shapes]
        grads = [torch.randn_like(p) for p in params]
        m = [torch.zeros(s, device=device) for s in shapes]
        v = [torch.zeros(s, device=device) for s in shapes]
        row = Row("adamw", "step", f"{label}: {len(shapes)} tensors, {n / 1e6:.1f}M params", provider,
                  flops.op_cost("adamw", "fwd", M=n, N=0).bytes)
        try:
            if provider == "compile":
                ref = compiled(ops.adamw_step_reference_)
                fn = lambda: ref(params, grads, m, v, step=10, **hyper)  # noqa: E731
            else:
                fn = lambda: ops.adamw_step_(params, grads, m, v, step=10, **hyper, backend=provider)  # noqa: E731
            row.note = "fp32 params and state"
            row.ms = timer(fn)
        except Exception as exc:
            row.note = _error(exc)
        emit(rows, row)
    return rows


BENCHES = {
    "rms_norm": bench_rms_norm,
    "swiglu": bench_swiglu,
    "cross_entropy": bench_cross_entropy,
    "linear_cross_entropy": bench_linear_cross_entropy,
    "adamw": bench_adamw,
}


def render(rows: list[Row], meta: dict, copy_gbs: float) -> str:
    lines = [f"# Kernels vs the seam's providers, torch.compile, Liger and the copy ceiling ({meta['device']})", ""]
    for key, value in meta.items():
        lines.append(f"- {key}: {value}")
    lines.append(f"- copy bandwidth (dst.copy_(src), read + write): {copy_gbs:.1f} GB/s")
    lines += ["", "| kernel | pass | shape | provider | time (us) | GB/s | % of copy | x torch | "
              "x compile | peak MiB | note |", "|" + " --- |" * 11]
    by_key = {(r.kernel, r.pass_, r.shape, r.provider): r for r in rows}
    for r in rows:
        if r.ms is None:
            lines.append(f"| {r.kernel} | {r.pass_} | {r.shape} | {r.provider} | - | - | - | - | - | - | {r.note} |")
            continue
        gbs = r.bytes_moved / (r.ms * 1e-3) / 1e9

        def speedup(other: str) -> str:
            o = by_key.get((r.kernel, r.pass_, r.shape, other))
            return f"{o.ms / r.ms:.2f}" if o is not None and o.ms else "-"

        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"
        lines.append(f"| {r.kernel} | {r.pass_} | {r.shape} | {r.provider} | {r.ms * 1e3:.1f} | {gbs:.1f} | "
                     f"{100 * gbs / copy_gbs:.0f}% | {speedup('torch')} | {speedup('compile')} | {peak} | {r.note} |")
    lines += ["", "x torch / x compile: that provider's time divided by this row's (above 1: this row is "
              "faster). GB/s: minimum bytes moved / time.", ""]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="markdown file to write (atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation/parameter dtype")
    parser.add_argument("--kernels", default=",".join(BENCHES), help=f"comma list from {','.join(BENCHES)}")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list from {','.join(PROVIDERS)}")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on any device, wall-clock timer: checks the script, measures nothing")
    args = parser.parse_args(argv)
    for name, valid in (("kernels", BENCHES), ("providers", PROVIDERS)):
        chosen = [x for x in getattr(args, name).split(",") if x]
        unknown = [x for x in chosen if x not in valid]
        if unknown or not chosen:
            parser.error(f"--{name}: unknown or empty {unknown}; choose from {', '.join(valid)}")
        setattr(args, name, chosen)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("kernels_vs_ceiling: no CUDA device is visible; this script measures GPU kernels. Run it "
              "on a machine with a GPU (or pass --smoke with TRITON_INTERPRET=1 to check the script "
              "on the CPU; its numbers are not measurements).", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not ops.triton_interpreted():
        print("kernels_vs_ceiling: --smoke on the CPU needs TRITON_INTERPRET=1 in the environment",
              file=sys.stderr)
        sys.exit(2)
    dtype = DTYPES[args.dtype]
    providers = list(args.providers)
    if device.type == "cpu" and "compile" in providers:
        providers.remove("compile")  # inductor on the CPU would time C++ compilation, not kernels
    if "liger" in providers and liger_op("rms_norm") is None:
        providers.remove("liger")
        print("kernels_vs_ceiling: liger_kernel is not installed; skipping the liger provider", file=sys.stderr)
    timer = Timer(args.smoke, device)
    import triton

    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run: not a measurement)",
        "date (UTC)": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "torch / triton": f"{torch.__version__} / {triton.__version__}",
        "dtype": args.dtype,
        "timer": "wall clock, median of 3 (smoke)" if args.smoke else "triton.testing.do_bench, median",
    }
    copy_gbs = copy_bandwidth(device, timer, args.smoke)
    rows: list[Row] = []
    for name in args.kernels:
        rows += BENCHES[name](providers, dtype, device, timer, args.smoke)
        print(f"{name}: {sum(r.ms is not None for r in rows)} timings so far", file=sys.stderr)
    text = render(rows, meta, copy_gbs)
    atomic_write_text(args.out, text)
    print(text)
    timed = [r for r in rows if r.ms is not None]
    print(f"kernels_vs_ceiling: {len(timed)} timings, copy ceiling {copy_gbs:.0f} GB/s, written to {args.out}")


if __name__ == "__main__":
    main()
