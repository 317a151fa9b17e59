"""Compile the FlashAttention kernels ahead of time for sm_80 and sm_90a; print registers, spills, smem.

    python bench/attention_compile.py [--head-dims 16,32,64,128] [--dtypes bfloat16,float16,float32] [--T 4096]

No GPU is needed: ``triton.compile`` with a ``GPUTarget`` builds the PTX and cubin, and the PTX is
assembled again with Triton's bundled ``ptxas -v`` to read registers and spill bytes. The launch
settings are ``kernels.attention.attention_config``'s; the runtime's specialization is applied by
hand (ints equal to 1 become constants; pointers and ints divisible by 16 get the divisibility
hint) for a (B=1, H=16, T, d) causal and non-causal problem. Produces the attention table of
bench/RESULTS.md. The project-wide compile gate of issue 9 (``kernels/gpu_check.py``) is meant to
cover these kernels from the launchers themselves; this script predates it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

from kernels import attention as A

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store + load bytes) from ``ptxas -v`` (the bundled one that accepts the PTX)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for exe in (ptxas, ptxas + "-blackwell"):  # the older one rejects newer PTX versions
            done = subprocess.run([exe, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", f.name, "-o", os.devnull],
                                  capture_output=True, text=True)
            text = done.stdout + done.stderr
            regs = re.search(r"Used (\d+) registers", text)
            if regs:
                spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
                return int(regs.group(1)), int(spill.group(1)) + int(spill.group(2)) if spill else 0
    finally:
        os.unlink(f.name)
    raise RuntimeError(f"ptxas gave no register count:\n{text[:2000]}")


def compile_kernel(fn, args: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """Compile ``fn`` with runtime-like specialization; returns (registers, spill bytes, smem bytes)."""
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):  # a pointer type such as "*bf16"
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(triton.compiler.ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    regs, spills = ptxas_usage(compiled.asm["ptx"], arch)
    return regs, spills, compiled.metadata.shared


def launches(d: int, dtype: torch.dtype, causal: bool, T: int, H: int = 16):
    """(name, kernel, args, constexprs, num_warps, num_stages, tiles) as the launchers would call them."""
    width = A._tile_width(d)
    cfg = A.attention_config(width, dtype, causal)
    ptr = "*" + TYPES[dtype]

    def strides(prefix: str) -> dict:
        return {f"stride_{prefix}z": H * T * d, f"stride_{prefix}h": T * d, f"stride_{prefix}t": d}

    sizes = dict(H=H, T_q=T, T_k=T, qk_scale=0.18, sm_scale=0.125)
    args = dict(o_ptr=ptr, dk_ptr=ptr, dv_ptr=ptr, dq_ptr=ptr, q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, do_ptr=ptr,
                lse_ptr="*fp32", delta_ptr="*fp32", **sizes)
    for prefix in ("q", "k", "v", "o", "d", "dk", "dv", "dq"):
        args.update(strides(prefix))
    dots = dict(CAUSAL=causal, PRECISION="ieee", UPCAST=False, D=d, HEAD_DIM=width)
    return [
        ("fwd", A._attn_fwd_kernel, args, dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **dots),
         cfg.fwd_warps, cfg.fwd_stages, f"{cfg.block_m}x{cfg.block_n}"),
        ("bwd_delta", A._attn_bwd_delta_kernel, args, dict(D=d, HEAD_DIM=width, BLOCK_M=cfg.block_m2),
         cfg.bwd_warps, cfg.bwd_stages, f"{cfg.block_m2}"),
        ("bwd_dkdv", A._attn_bwd_dkdv_kernel, args, dict(BLOCK_M=cfg.block_m1, BLOCK_N=cfg.block_n1, **dots),
         cfg.bwd_warps, cfg.bwd_stages, f"{cfg.block_m1}x{cfg.block_n1}"),
        ("bwd_dq", A._attn_bwd_dq_kernel, args, dict(BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2, **dots),
         cfg.bwd_warps, cfg.bwd_stages, f"{cfg.block_m2}x{cfg.block_n2}"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", default="16,32,64,128")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--T", type=int, default=4096, help="sequence length the ints are specialized for")
    opts = parser.parse_args(argv)
    dims = [int(x) for x in opts.head_dims.split(",")]
    dtypes = [getattr(torch, x) for x in opts.dtypes.split(",")]
    print("| kernel | d | dtype | causal | tiles | warps / stages | target | regs | spill B | smem B |")
    print("| --- | ---: | --- | --- | --- | --- | --- | ---: | ---: | ---: |")
    failures = 0
    for d, dtype, causal in itertools.product(dims, dtypes, (True, False)):
        for name, fn, args, consts, warps, stages, tiles in launches(d, dtype, causal, opts.T):
            for arch in (80, 90):
                target = f"sm_{arch}{'a' if arch == 90 else ''}"
                try:
                    regs, spills, smem = compile_kernel(fn, args, consts, arch, warps, stages)
                except Exception as exc:  # report every failing config, then exit non-zero
                    failures += 1
                    print(f"| {name} | {d} | {TYPES[dtype]} | {causal} | {tiles} | {warps} / {stages} | {target} | "
                          f"compile error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | |")
                    continue
                failures += spills > 0
                print(f"| {name} | {d} | {TYPES[dtype]} | {causal} | {tiles} | {warps} / {stages} | {target} | "
                      f"{regs} | {spills} | {smem} |", flush=True)
    print(f"{failures} config(s) failed to compile or spilled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
