"""The measuring steps of ``bench/gpu_report.py``: each case appends its JSON row as it is measured.

    python bench/gpu_steps.py preflight|attention|train|kernels --rows FILE [--dry-run]

A row is one line of ``FILE``: ``{"step", "case", "status": passed|failed|skipped, "ms", "note",
...figures}``, written and flushed before the next case starts, so a step stopped by its time
limit keeps every figure measured so far. ``--dry-run`` runs the same code at tiny shapes on the
CPU (the Triton kernels under TRITON_INTERPRET=1, set by the caller): it checks the plumbing and
measures nothing. Timings on CUDA are ``triton.testing.do_bench`` medians; in a dry run the
wall-clock time of one call. The parity step is ``pytest -m gpu tests/parity`` with
``bench/_rows_plugin.py``, which writes the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: the shared scripts

import torch  # noqa: E402

ROWS: list[Path] = []  # the JSONL file rows go to (set by main)
STEP = [""]


def write(case: str, status: str, ms: float | None = None, note: str = "", **figures) -> None:
    row = {"step": STEP[0], "case": case, "status": status, "ms": ms, "note": note, **figures}
    with open(ROWS[0], "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    print(f"{STEP[0]}: {case} {status}" + (f" {ms:.3f} ms" if ms is not None else "") + (f" ({note})" if note else ""),
          file=sys.stderr, flush=True)


def timer(dry: bool) -> Callable[[Callable[[], object]], float]:
    """Milliseconds of one call of ``fn``: do_bench's median on CUDA, one wall-clock call (dry run)."""
    def run(fn):
        if not dry:
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
        start = time.perf_counter()  # one call, no warm-up: the interpreter is not timed, only run
        fn()
        return (time.perf_counter() - start) * 1e3
    return run


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def preflight(dry: bool, device: torch.device) -> None:
    """CUDA, the launcher toolchain, and one tiny launch per kernel family against native."""
    from cs336 import ops

    if device.type == "cuda":
        write("CUDA device", "passed", note=torch.cuda.get_device_name(0))
    else:
        write("CUDA device", "skipped", note="dry run on the CPU")
    gcc = shutil.which("gcc") or shutil.which("cc")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    write("gcc (Triton builds its launchers with it)", "passed" if gcc else "failed", note=gcc or "not on PATH")
    write("Python.h", "passed" if header.exists() else "failed", note=str(header))
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, w, a, b = rand(4, 64), rand(64), rand(4, 96), rand(4, 96)
    logits, h, head, q = rand(6, 50), rand(6, 32), rand(50, 32), rand(1, 2, 40, 16)
    targets = torch.randint(0, 50, (6,), generator=g).to(device)
    cases = {
        "rms_norm": lambda: ops.rms_norm(x, w),
        "swiglu": lambda: ops.swiglu(a, b),
        "cross_entropy": lambda: ops.cross_entropy(logits, targets),
        "linear_cross_entropy": lambda: ops.linear_cross_entropy(h, head, targets),
        "attention": lambda: ops.attention(q, q, q, causal=True),
        "adamw": lambda: _adamw_once(ops, device),
    }
    for name, fn in cases.items():
        try:
            start = time.perf_counter()
            with ops.use_backend("triton"):
                got = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            with ops.use_backend("native"):
                want = fn()
            diff = float((got.float() - want.float()).abs().max())
            ok = diff <= 1e-4 * max(1.0, float(want.float().abs().max()))
            write(f"{name}: one launch vs native", "passed" if ok else "failed", first_s * 1e3,
                  note=f"max abs diff {diff:.2e}; ms: the first call (compile and launch)")
        except Exception as exc:  # each family is reported, the others still run
            write(f"{name}: one launch vs native", "failed", note=_error(exc))


def _adamw_once(ops, device) -> torch.Tensor:
    """One AdamW step of a fixed two-tensor state on the current backend; the updated params."""
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=g).to(device) for s in ((33, 7), (5,))]
    grads = [torch.randn(p.shape, generator=g).to(device) for p in params]
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    ops.adamw_step_(params, grads, ms, vs, step=1, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    return torch.cat([p.reshape(-1) for p in params])


def attention(dry: bool, device: torch.device) -> None:
    """The leaderboard shape, fwd+bwd: triton, SDPA's flash backend, the reference where it fits."""
    import contextlib

    import torch.nn.functional as F

    from cs336 import ops

    B, H, T, d = (1, 2, 64, 16) if dry else (1, 16, 16384, 64)
    dtype = torch.float32 if dry else torch.bfloat16
    flops = 3 * 4 * B * H * T * T * d * (T + 1) / (2 * T)  # fwd+bwd matmuls, visible pairs only
    q, k, v = (torch.randn(B, H, T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def sdpa_context():
        if device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)

    def sdpa(q, k, v):
        with sdpa_context():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    providers = {"triton": lambda q, k, v: _under(ops, "triton", ops.attention, q, k, v),
                 "sdpa flash": sdpa,
                 "torch reference": lambda q, k, v: ops.attention_reference(q, k, v, True)}
    reference_gib = 3 * B * H * T * T * 4 / 2**30  # scores, probabilities, their gradient (fp32)
    time_ms = timer(dry)
    label = f"B={B} H={H} T={T} d={d} {str(dtype).replace('torch.', '')} causal fwd+bwd"
    for name, fn in providers.items():
        if name == "torch reference" and reference_gib > 4:
            write(f"{name} {label}", "skipped", note=f"materializes about {reference_gib:.0f} GiB of (T, T) tensors")
            continue
        try:
            ms = time_ms(lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
            write(f"{name} {label}", "passed", ms, tflops=flops / (ms * 1e-3) / 1e12)
        except Exception as exc:
            write(f"{name} {label}", "failed", note=_error(exc))
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _under(ops, backend: str, fn, *args):
    with ops.use_backend(backend):
        return fn(*args)


def train(dry: bool, device: torch.device) -> None:
    """A GPT-2-small training step (bf16 autocast, fp32 weights) per provider: ms, tokens/s, MFU."""
    import dataclasses

    from cs336 import flops, hardware, ops
    from cs336.model import TransformerLM
    from cs336.optim import AdamW
    from cs336.presets import model_preset

    cfg = model_preset("gpt2-small")
    batch = 8
    if dry:
        cfg = dataclasses.replace(cfg, vocab_size=320, context_length=32, d_model=32, num_layers=1, num_heads=2,
                                  d_ff=64)
        batch = 2
    peak = None
    if device.type == "cuda":
        try:
            peak = hardware.peak_for(device)
        except Exception as exc:
            write("peak FLOP/s", "failed", note=_error(exc))
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    analytic = flops.training_flops(cfg, batch)
    for provider in ("triton", "native"):
        try:
            torch.manual_seed(0)
            model = TransformerLM.from_config(dataclasses.replace(cfg, kernels=provider), device=device)
            opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
            losses = []

            def step(model=model, opt=opt, losses=losses):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = model.loss(x, y)
                loss.backward()
                with ops.use_backend(provider):
                    opt.step()
                losses.append(loss.detach())

            ms = timer(dry)(step)
            finite = bool(torch.isfinite(torch.stack(losses)).all())
            figures = {"tokens_per_s": batch * cfg.context_length / (ms * 1e-3)}
            if peak is not None:
                figures["mfu"] = analytic / (ms * 1e-3) / peak.flops
            del model, opt
            write(f"{provider}: batch {batch} x {cfg.context_length}, d_model {cfg.d_model}, "
                  f"{cfg.num_layers} layers", "passed" if finite else "failed", ms,
                  note="" if finite else "non-finite loss", **figures)
        except Exception as exc:
            write(f"{provider}: training step", "failed", note=_error(exc))
        if device.type == "cuda":
            torch.cuda.empty_cache()


def kernels(dry: bool, device: torch.device) -> None:
    """``kernels_vs_ceiling``'s benches, every row written as it is measured (AdamW last)."""
    import kernels_vs_ceiling as kvc

    providers = ["triton", "native"] + ([] if dry else ["torch", "compile"])
    dtype = torch.float32 if dry else torch.bfloat16
    kvc_timer = kvc.Timer(dry, device)
    copy_gbs = kvc.copy_bandwidth(device, kvc_timer, dry)
    write("copy bandwidth (dst.copy_(src))", "passed", gbs=copy_gbs)

    def sink(row) -> None:
        gbs = row.bytes_moved / (row.ms * 1e-3) / 1e9 if row.ms else None
        write(f"{row.kernel} {row.pass_} {row.shape} {row.provider}", "passed" if row.ms else "failed", row.ms,
              note=row.note, gbs=gbs, copy_fraction=gbs / copy_gbs if gbs else None)

    kvc.SINKS.append(sink)
    for name in ("rms_norm", "swiglu", "cross_entropy", "linear_cross_entropy", "adamw"):
        kvc.BENCHES[name](providers, dtype, device, kvc_timer, dry)


STEPS = {"preflight": preflight, "attention": attention, "train": train, "kernels": kernels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_steps.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=list(STEPS))
    parser.add_argument("--rows", type=Path, required=True, help="JSONL file the rows are appended to")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: plumbing only")
    args = parser.parse_args(argv)
    ROWS[:] = [args.rows]
    STEP[0] = args.step
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_steps: no CUDA device is visible; use --dry-run to check the steps on the CPU", file=sys.stderr)
        return 2
    STEPS[args.step](args.dry_run, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
