"""GPU compile gate without a GPU: every Triton kernel compiled ahead of time for sm_80 and sm_90a.

    python -m kernels.gpu_check [--full] [--targets sm_80,sm_90a] [--kernels rms_norm,adamw]
                                [--json out.json]

Triton's CPU interpreter (how tests/parity runs the kernels) never specializes arguments, never
allocates registers and never checks launch limits, so a kernel can pass every parity test and
still fail to compile, or spill, on a GPU. This gate closes that gap with what a GPU run would do:

1. **Configurations from the launchers themselves.** Each case (``kernels/gpu_cases.py``) calls
   the real launchers (the functions in ``kernels/*.py`` that pick BLOCK_SIZE and num_warps and
   launch) on ``meta`` tensors, with ``JITFunction.run`` replaced by a recorder, so the gate holds
   no copy of any block-size rule. ``kernels._common.simulated_gpu`` gives the persistent grids
   the SM count of the target GPU. Meta tensors report addresses ``offset * itemsize`` from 0: a
   fresh allocation is 16-byte aligned as from the CUDA caching allocator (which aligns to 512).
2. **The runtime's own specialization.** Signature, constexprs and attributes come from Triton's
   own binder (``create_function_from_signature`` then ``JITFunction._pack_args``, or the same
   steps inline on Triton versions without ``_pack_args``): an int equal to 1 becomes a
   compile-time constant; ints and pointers divisible by 16 carry ``tt.divisibility = 16``.
3. **Compile and measure.** ``triton.compile`` for ``GPUTarget("cuda", 80 | 90, 32)`` runs the
   whole pipeline through Triton's bundled ``ptxas`` (results land in Triton's cache, so a second
   run is fast). Registers, stack frame (where ptxas spills) plus local memory, and static shared
   memory are read from the cubin with the bundled ``cuobjdump -res-usage``; dynamic shared
   memory from the compile metadata.
4. **Occupancy** (warps resident per SM) from registers (allocated per warp in units of 256, 64K
   per SM), shared memory (plus 1 KB reserved per block) and the 64-warp / 32-block limits:
   CUDA C Programming Guide, compute capability 8.0 and 9.0 tables.

The gate exits non-zero on any compile error, any local-memory use (spill) at a realistic shape,
any configuration that cannot launch (0 warps per SM), or any ``*_kernel`` of the package that no
case launches. The default selection is a CI-sized subset (every kernel, dtype, constexpr branch
and the int == 1 cases); ``--full`` runs the whole shape matrix.

The cases (shapes, per kernel family) live in ``kernels/gpu_cases.py``; a new kernel family adds
one ``@case`` function there.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import kernels
from kernels._common import interpreted, simulated_gpu
from kernels.gpu_cases import CASES, add_param_groups


@dataclasses.dataclass(frozen=True)
class Target:
    """One GPU architecture: compile target and the per-SM limits that bound occupancy."""

    name: str  # ptxas architecture, e.g. sm_90a
    arch: int  # compute capability as Triton's GPUTarget takes it
    gpu: str  # the GPU whose SM count sizes persistent grids
    sm_count: int
    smem_per_sm: int  # bytes of shared memory per SM usable by blocks
    smem_per_block: int  # largest shared-memory allocation of one block
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    reserved_smem: int = 1024  # per block, taken by the CUDA runtime


TARGETS = {
    "sm_80": Target("sm_80", 80, "A100", 108, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    "sm_90a": Target("sm_90a", 90, "H100", 132, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}


def warps_per_sm(t: Target, num_warps: int, regs: int, shared: int) -> int:
    """Warps resident per SM for blocks of ``num_warps`` warps; 0 if such a block cannot launch."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocation unit: 256 registers per warp
    if num_warps * 32 > 1024 or regs_per_warp * num_warps > t.regs_per_sm or shared > t.smem_per_block:
        return 0
    blocks = min(t.regs_per_sm // regs_per_warp // num_warps, t.max_warps // num_warps,
                 t.smem_per_sm // (shared + t.reserved_smem), t.max_blocks)
    return blocks * num_warps


@dataclasses.dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict


def capture(run: Callable[[], object]) -> list[Launch]:
    """The kernel launches ``run()`` makes, recorded instead of compiled or executed."""
    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    saved = JITFunction.run
    JITFunction.run = record
    try:
        run()
    finally:
        JITFunction.run = saved
    return launches


# ---------------------------------------------------------------------------------------------
# Specialization, compilation, measurement.
# ---------------------------------------------------------------------------------------------


def specialize(kernel: JITFunction, backend, args: tuple, kwargs: dict):
    """(options, signature, constexprs, attrs) as ``JITFunction.run`` computes them on ``backend``."""
    from triton.runtime.jit import create_function_from_signature, find_paths_if, get_iterable_path

    kwargs = dict(kwargs)
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; earlier: the TRITON_DEBUG variable
    runtime_debug = knobs.runtime.debug if knobs else os.environ.get("TRITON_DEBUG", "0") == "1"
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or runtime_debug
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    if hasattr(kernel, "_pack_args"):  # triton >= 3.5
        return kernel._pack_args(backend, kwargs, bound, specialization, options)
    options = backend.parse_options(kwargs)  # older triton: the same steps, inline in run()
    sigvals = [x[0] for x in specialization]
    signature = {p.name: v for p, v in zip(kernel.params, sigvals, strict=True)}
    constexprs = {path: get_iterable_path(list(bound.values()), path)
                  for path in find_paths_if(sigvals, lambda _, val: val == "constexpr")}
    attrvals = [x[1] for x in specialization]
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k))
             for k in find_paths_if(attrvals, lambda _, x: isinstance(x, str))}
    return options, signature, constexprs, attrs


def _tool(name: str) -> Path:
    package = importlib.import_module("triton.backends.nvidia").__file__
    if package is None:
        raise RuntimeError("triton.backends.nvidia is not an installed package; reinstall triton")
    return Path(package).parent / "bin" / name


def toolchain_problem() -> str | None:
    """Why Triton's NVIDIA backend cannot compile here (None when it can)."""
    try:
        from triton.compiler.compiler import make_backend
        make_backend(GPUTarget("cuda", 80, 32))
    except Exception as e:  # noqa: BLE001 - any failure means the backend is unusable
        return f"triton's nvidia backend is unavailable: {type(e).__name__}: {e}"
    for tool in ("ptxas", "cuobjdump"):
        if not os.access(_tool(tool), os.X_OK):
            return f"triton's bundled {tool} is missing at {_tool(tool)}"
    return None


def resources(cubin: bytes) -> dict[str, int]:
    """Per-thread registers and local memory (stack frame, where ptxas spills, plus local arrays)
    and static shared memory of the one kernel in ``cubin``, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_tool("cuobjdump")), "-res-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK/SHARED/LOCAL line:\n{out}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "spill_bytes": stack + local, "static_shared": shared}


@dataclasses.dataclass
class Row:
    """One compiled configuration on one target (cases that specialize alike share a row)."""

    kernel: str
    target: str
    config: str
    num_warps: int
    cases: list[str]
    realistic: bool
    regs: int | None = None
    spill_bytes: int | None = None
    shared: int | None = None
    warps_per_sm: int | None = None
    error: str | None = None

    def failure(self) -> str | None:
        if self.error:
            return f"compile error: {self.error}"
        if self.warps_per_sm == 0:
            return "cannot launch (registers, threads or shared memory over the limit)"
        if self.spill_bytes and self.realistic:
            return f"spills {self.spill_bytes} B per thread"
        return None


def describe(kernel: JITFunction, signature: dict, constexprs: dict, attrs: dict) -> str:
    """Pointer dtypes, declared constexprs, ints specialized to constants, ints not divisible by 16."""
    names = [p.name for p in kernel.params]
    declared = {p.name for p in kernel.params if p.is_constexpr}
    ptrs = sorted({v[1:] for v in signature.values() if isinstance(v, str) and v.startswith("*")})
    parts = ["/".join(ptrs)] if ptrs else []
    for (i, *_), value in sorted(constexprs.items()):
        value = getattr(value, "name", value)
        parts.append(f"{names[i]}={value}" + ("" if names[i] in declared else " (int 1 -> constexpr)"))
    odd = [names[i] for (i, *_), a in attrs.items()
           if signature[names[i]][0] == "i" and not any(x[0] == "tt.divisibility" for x in a)]
    if odd:
        parts.append("not %16: " + ",".join(odd))
    return " ".join(parts)


def compile_rows(targets: list[Target], families: list[str], full: bool, progress=None) -> list[Row]:
    """Run the cases per target, specialize every launch, compile each distinct one once."""
    from triton.compiler.compiler import ASTSource, make_backend

    rows: dict[tuple, Row] = {}
    work: list[tuple[Row, Target, tuple[Any, Any]]] = []
    for t in targets:
        backend = make_backend(GPUTarget("cuda", t.arch, 32))
        for family in families:
            for c in CASES[family](full):
                with simulated_gpu(t.sm_count):
                    launches = capture(c.run)
                if not launches:
                    raise RuntimeError(f"gpu_check case {family}: {c.label} launched no kernel")
                for launch in launches:
                    options, signature, constexprs, attrs = specialize(launch.kernel, backend, launch.args,
                                                                       launch.kwargs)
                    src = ASTSource(launch.kernel, signature, constexprs, attrs)
                    key = (t.name, src.hash(), str(options))
                    if key in rows:
                        rows[key].cases.append(c.label)
                        rows[key].realistic |= c.realistic
                        continue
                    row = Row(launch.kernel.__name__, t.name, describe(launch.kernel, signature, constexprs, attrs),
                              options.num_warps, [c.label], c.realistic)
                    rows[key] = row
                    work.append((row, t, (src, options)))
    for row, t, (src, options) in (progress(work) if progress else work):
        measure(row, t, src, options)
    return list(rows.values())


def measure(row: Row, t: Target, src, options) -> None:
    """Compile ``src`` for ``t`` and fill in ``row``'s resources, or its error."""
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", t.arch, 32), options=options.__dict__)
        usage = resources(compiled.asm["cubin"])
        row.regs, row.spill_bytes = usage["regs"], usage["spill_bytes"]
        row.shared = int(compiled.metadata.shared) + usage["static_shared"]
        row.warps_per_sm = warps_per_sm(t, row.num_warps, row.regs, row.shared)
    except Exception as e:  # noqa: BLE001 - every compile failure is reported, not raised
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        row.error = f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


def package_kernels() -> set[str]:
    """Names of every ``@triton.jit`` function named ``*_kernel`` in the package's modules."""
    found = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name in ("gpu_check", "gpu_cases"):
            continue
        module = importlib.import_module(f"kernels.{info.name}")
        found |= {name for name, obj in vars(module).items()
                  if name.endswith("_kernel") and isinstance(obj, (JITFunction, InterpretedFunction))}
    return found


def format_table(rows: list[Row]) -> str:
    """Markdown table, one line per kernel / config / target."""
    lines = ["| kernel | config | target | warps | regs | spill B | smem B | warps/SM | cases |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(rows, key=lambda r: (r.kernel, r.config, r.target)):
        more = f" (+{len(r.cases) - 1})" if len(r.cases) > 1 else ""
        if r.error:
            cells = ["ERROR", "", "", ""]
        else:
            cells = [str(r.regs), str(r.spill_bytes), str(r.shared), str(r.warps_per_sm)]
        lines.append(f"| {r.kernel} | {r.config} | {r.target} | {r.num_warps} | " + " | ".join(cells)
                     + f" | {r.cases[0]}{more} |")
    return "\n".join(lines)


def format_summary(rows: list[Row]) -> str:
    """Markdown table, one line per kernel and target: configurations, register range, largest
    spill, fewest warps per SM, compile errors."""
    lines = ["| kernel | target | configs | regs | max spill B | min warps/SM | errors |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for kernel, target in sorted({(r.kernel, r.target) for r in rows}):
        group = [r for r in rows if (r.kernel, r.target) == (kernel, target)]
        ok = [r for r in group if r.error is None]
        regs = [r.regs for r in ok if r.regs is not None]
        spills = [r.spill_bytes for r in ok if r.spill_bytes is not None]
        warps = [r.warps_per_sm for r in ok if r.warps_per_sm is not None]
        reg_range = f"{min(regs)}-{max(regs)}" if regs else "-"
        lines.append(f"| {kernel} | {target} | {len(group)} | {reg_range} | {max(spills, default='-')} | "
                     f"{min(warps, default='-')} | {len(group) - len(ok)} |")
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in its folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the whole shape matrix (default: CI subset)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {', '.join(TARGETS)}")
    parser.add_argument("--kernels", default="", help="comma list of kernel families (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--param-shapes", type=Path, metavar="FILE",
                        help="JSON {label: [shape, ...]} of parameter lists for the AdamW cases "
                             "(python bench/gpu_shapes.py writes the model presets')")
    args = parser.parse_args(argv)
    targets = [x for x in args.targets.split(",") if x]
    families = [x for x in args.kernels.split(",") if x] or list(CASES)
    for given, valid, flag in ((targets, TARGETS, "--targets"), (families, CASES, "--kernels")):
        bad = [x for x in given if x not in valid]
        if bad or not given:
            parser.error(f"{flag}: unknown {', '.join(bad) or 'empty list'}; valid: {', '.join(valid)}")
    if args.json is not None and args.json.is_dir():  # refused before minutes of compiling
        parser.error(f"--json {args.json} is a directory; pass the path of the JSON file to write")
    if args.param_shapes is not None:
        try:
            add_param_groups(json.loads(args.param_shapes.read_text()))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            parser.error(f"--param-shapes {args.param_shapes}: {exc}; give a JSON object "
                         "{label: [[dim, ...], ...]} (python bench/gpu_shapes.py --out FILE writes one)")
    if interpreted():
        # The kernels were defined as interpreter functions in this process: compile in a fresh one.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "kernels.gpu_check", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode
    problem = toolchain_problem()
    if problem:
        print(f"gpu_check: cannot compile for NVIDIA GPUs here: {problem}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    from tqdm import tqdm

    rows = compile_rows([TARGETS[t] for t in targets], families, args.full,
                        progress=lambda w: tqdm(w, desc="compile", unit="kernel", disable=None, file=sys.stderr))
    print(format_table(rows))
    print()
    print(format_summary(rows))
    failures = [f"{r.kernel} [{r.config}] on {r.target} ({r.cases[0]}): {r.failure()}" for r in rows if r.failure()]
    if not args.kernels:
        compiled = {r.kernel for r in rows}
        failures += [f"{k}: no case launches it; add one (@case in kernels/gpu_cases.py)"
                     for k in sorted(package_kernels() - compiled)]
    if args.json:
        payload = {"triton": triton.__version__, "torch": torch.__version__, "full": args.full,
                   "targets": targets, "rows": [dataclasses.asdict(r) for r in rows], "failures": failures}
        try:
            _write_atomic(args.json, json.dumps(payload, indent=1) + "\n")
        except OSError as exc:
            print(f"gpu_check: error: cannot write --json {args.json} ({exc.strerror or exc}); "
                  "pass a writable path", file=sys.stderr)
            return 2
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    names = ", ".join(f"{t} ({TARGETS[t].gpu}, {TARGETS[t].sm_count} SMs)" for t in targets)
    print(f"gpu_check: {len(rows)} configurations compiled for {names}; {len(failures)} failures", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
