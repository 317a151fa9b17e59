"""Each Triton kernel against eager PyTorch, torch.compile and the copy-bandwidth ceiling.

    python bench/kernels_vs_ceiling.py --out bench/RESULTS-kernels.md
    python bench/kernels_vs_ceiling.py --out r.md --dtype fp32 --providers triton,eager

Needs a CUDA device. For every kernel (RMSNorm, SwiGLU gate, cross-entropy, fused linear
cross-entropy, AdamW) and pass (fwd, bwd; fwd+bwd for the fused LM head, one step for AdamW) it
times, with ``triton.testing.do_bench`` (median): the Triton kernel, the eager reference from
``cs336.ops`` / ``cs336.nn_utils``, ``torch.compile`` of that reference, and where PyTorch has
its own fused op, that op. The ceiling is the device-to-device copy bandwidth measured in the
same run (``dst.copy_(src)`` of 1 GiB: read + write). GB/s counts the bytes the op must move at
minimum (each input read once, each output written once), so every provider is credited with the
same bytes and the GB/s ratio equals the speed ratio. Writes a markdown table (atomically).

``--smoke`` runs tiny shapes on whatever device is present (the CPU needs TRITON_INTERPRET=1)
with a wall-clock timer, to check the script end to end; its numbers are not measurements.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

PROVIDERS = ("triton", "eager", "compile", "torch-fused")
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
    torch._dynamo.reset()
    return torch.compile(fn)


def bench_elementwise(name, providers, make_inputs, ref, kernel, fwd_bytes, bwd_bytes, shape_text, timer, device):
    """fwd and bwd rows for an op whose inputs all get gradients (RMSNorm, SwiGLU)."""
    rows = []
    fns = {"triton": kernel, "eager": ref, "compile": compiled(ref) if "compile" in providers else None}
    for provider in (p for p in ("triton", "eager", "compile") if p in providers):
        inputs = make_inputs()
        fn = fns[provider]
        fwd = Row(name, "fwd", shape_text, provider, fwd_bytes)
        bwd = Row(name, "bwd", shape_text, provider, bwd_bytes)
        try:
            with torch.no_grad():
                fwd.ms = timer(lambda: fn(*inputs))
            out = fn(*inputs)
            dy = torch.randn_like(out)
            bwd.ms = timer(grad_fn(out, [t for t in inputs if t.requires_grad], dy))
        except Exception as exc:  # a provider that fails is reported, not fatal
            fwd.note = bwd.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        rows += [fwd, bwd]
    return rows


def bench_rms_norm(providers, dtype, device, timer, smoke):
    from cs336.ops import rms_norm_reference
    from kernels.rms_norm import rms_norm

    rows = []
    for M, N in ([(64, 96)] if smoke else [(16384, 4096), (4096, 16384), (32768, 1024)]):
        es = torch.finfo(dtype).bits // 8

        def make():
            return [torch.randn(M, N, device=device, dtype=dtype, requires_grad=True),
                    torch.randn(N, device=device, dtype=dtype, requires_grad=True)]

        rows += bench_elementwise(
            "rms_norm", providers, make, lambda x, w: rms_norm_reference(x, w, 1e-5),
            lambda x, w: rms_norm(x, w, 1e-5), 2 * M * N * es, 3 * M * N * es, f"{M}x{N}", timer, device)
    return rows


def bench_swiglu(providers, dtype, device, timer, smoke):
    from cs336.ops import swiglu_reference
    from kernels.swiglu import swiglu

    rows = []
    for M, N in ([(64, 100)] if smoke else [(8192, 11008), (16384, 3072)]):
        es = torch.finfo(dtype).bits // 8

        def make():
            return [torch.randn(M, N, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]

        rows += bench_elementwise("swiglu", providers, make, swiglu_reference, swiglu,
                                  3 * M * N * es, 5 * M * N * es, f"{M}x{N}", timer, device)
    return rows


def bench_cross_entropy(providers, dtype, device, timer, smoke):
    import torch.nn.functional as F

    from cs336.nn_utils import cross_entropy as reference
    from kernels.cross_entropy import cross_entropy

    rows = []
    for M, V in ([(32, 300)] if smoke else [(8192, 50257), (16384, 32000)]):
        es = torch.finfo(dtype).bits // 8
        targets = torch.randint(0, V, (M,), device=device)
        fns = {"triton": cross_entropy, "eager": reference,
               "compile": compiled(reference) if "compile" in providers else None,
               "torch-fused": lambda x, t: F.cross_entropy(x.float(), t)}
        for provider in (p for p in PROVIDERS if p in providers):
            fn = fns[provider]
            logits = torch.randn(M, V, device=device, dtype=dtype, requires_grad=True)
            fwd = Row("cross_entropy", "fwd", f"{M}x{V}", provider, M * V * es)
            bwd = Row("cross_entropy", "bwd", f"{M}x{V}", provider, 2 * M * V * es)
            if provider == "torch-fused":
                fwd.note = bwd.note = "F.cross_entropy on fp32 logits"
            try:
                with torch.no_grad():
                    fwd.ms = timer(lambda: fn(logits, targets))
                loss = fn(logits, targets)
                bwd.ms = timer(grad_fn(loss, [logits], torch.ones_like(loss)))
                fwd.peak_mib = peak_memory_mib(lambda: torch.autograd.grad(fn(logits, targets), [logits]), device)
            except Exception as exc:
                fwd.note = bwd.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            rows += [fwd, bwd]
    return rows


def bench_linear_cross_entropy(providers, dtype, device, timer, smoke):
    from cs336.ops import linear_cross_entropy_reference as reference
    from kernels.cross_entropy import linear_cross_entropy

    rows = []
    for M, C, V in ([(64, 32, 300)] if smoke else [(8192, 768, 50257), (16384, 1024, 32000)]):
        es = torch.finfo(dtype).bits // 8
        targets = torch.randint(0, V, (M,), device=device)
        h = torch.randn(M, C, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, C, device=device) / C**0.5).to(dtype).requires_grad_(True)
        fns = {"triton": linear_cross_entropy, "eager": reference,
               "compile": compiled(reference) if "compile" in providers else None}
        for provider in (p for p in ("triton", "eager", "compile") if p in providers):
            fn = fns[provider]
            # Bytes of the inputs and gradients only (h, W, dh, dW): the fused op's point is
            # that the logits never reach memory in full.
            row = Row("linear_cross_entropy", "fwd+bwd", f"{M}x{C} @ {V}x{C}", provider, 2 * (M * C + V * C) * es)
            row.note = "matmul-bound; GB/s not meaningful"

            def step():
                return torch.autograd.grad(fn(h, w, targets), [h, w])

            try:
                row.ms = timer(step)
                row.peak_mib = peak_memory_mib(step, device)
            except Exception as exc:
                row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            rows.append(row)
    return rows


def bench_adamw(providers, dtype, device, timer, smoke):
    from cs336.ops import adamw_step_reference_
    from kernels.adamw import adamw_step_

    # GPT-2 small's parameter tensors (124M): embeddings, 12 x (4 attention + 3 FFN + 2 norm), head.
    shapes = [(50257, 768)] + [(768, 768)] * 48 + [(3072, 768)] * 24 + [(768, 3072)] * 12 + [(768,)] * 25
    shapes.append((50257, 768))
    if smoke:
        shapes = [(300, 32), (32, 32), (32,), (5,)]
    n = sum(torch.Size(s).numel() for s in shapes)
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    rows = []
    for provider in (p for p in PROVIDERS if p in providers):
        params = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
        grads = [torch.randn_like(p) for p in params]
        m = [torch.zeros(s, device=device) for s in shapes]
        v = [torch.zeros(s, device=device) for s in shapes]
        es = torch.finfo(dtype).bits // 8
        row = Row("adamw", "step", f"{len(shapes)} tensors, {n / 1e6:.1f}M params", provider,
                  n * (3 * es + 4 * 4))  # read p, g, m, v; write p, m, v (state fp32)
        try:
            if provider == "triton":
                fn = lambda: adamw_step_(params, grads, m, v, step=10, **hyper)  # noqa: E731
            elif provider in ("eager", "compile"):
                ref = compiled(adamw_step_reference_) if provider == "compile" else adamw_step_reference_
                fn = lambda: ref(params, grads, m, v, step=10, **hyper)  # noqa: E731
            else:
                row.note = "torch.optim.AdamW(fused=True): decay before the update, not Algorithm 2"
                leaves = [torch.nn.Parameter(p) for p in params]
                for leaf, g in zip(leaves, grads):
                    leaf.grad = g
                opt = torch.optim.AdamW(leaves, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
                fn = opt.step
            row.ms = timer(fn)
        except Exception as exc:
            row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        rows.append(row)
    return rows


BENCHES = {
    "rms_norm": bench_rms_norm,
    "swiglu": bench_swiglu,
    "cross_entropy": bench_cross_entropy,
    "linear_cross_entropy": bench_linear_cross_entropy,
    "adamw": bench_adamw,
}


def render(rows: list[Row], meta: dict, copy_gbs: float) -> str:
    lines = [f"# Kernels vs eager, torch.compile and the copy ceiling ({meta['device']})", ""]
    for key, value in meta.items():
        lines.append(f"- {key}: {value}")
    lines.append(f"- copy bandwidth (dst.copy_(src), read + write): {copy_gbs:.1f} GB/s")
    lines += ["", "| kernel | pass | shape | provider | time (us) | GB/s | % of copy | x eager | "
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
                     f"{100 * gbs / copy_gbs:.0f}% | {speedup('eager')} | {speedup('compile')} | {peak} | {r.note} |")
    lines += ["", "x eager / x compile: that provider's time divided by this row's (above 1: this row is "
              "faster). GB/s: minimum bytes moved / time.", ""]
    return "\n".join(lines)


def write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".kernels_vs_ceiling.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("kernels_vs_ceiling: --smoke on the CPU needs TRITON_INTERPRET=1 in the environment",
              file=sys.stderr)
        sys.exit(2)
    dtype = DTYPES[args.dtype]
    providers = list(args.providers)
    if device.type == "cpu" and "compile" in providers:
        providers.remove("compile")  # inductor on the CPU would time C++ compilation, not kernels
    timer = Timer(args.smoke, device)
    import triton

    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run: not a measurement)",
        "date (UTC)": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
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
    write_atomic(args.out, text)
    print(text)
    timed = [r for r in rows if r.ms is not None]
    print(f"kernels_vs_ceiling: {len(timed)} timings, copy ceiling {copy_gbs:.0f} GB/s, written to {args.out}")


if __name__ == "__main__":
    main()
