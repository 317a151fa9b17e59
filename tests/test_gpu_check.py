"""The GPU compile gate (``python -m kernels.gpu_check``): every kernel compiles for sm_80 and sm_90a
as the runtime would specialize it, without spills, at the configurations its launchers choose.

The gate runs in a subprocess without TRITON_INTERPRET (this process defines the kernels as
interpreter functions). The default subset compiles about 90 configurations: about 15 s of CPU
cold, seconds once Triton's cache holds them; the full matrix is marked slow.
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from kernels import gpu_check

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_shapes", ROOT / "bench" / "gpu_shapes.py")
bench_shapes = importlib.util.module_from_spec(_spec)
sys.modules["bench_shapes"] = bench_shapes
_spec.loader.exec_module(bench_shapes)
PROBLEM = gpu_check.toolchain_problem()
needs_toolchain = pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))


def run_gate(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "kernels.gpu_check", "--json", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"gate wrote no JSON (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


def model_shapes(folder: Path, presets: list[str]) -> Path:
    """The presets' parameter lists as the gate takes them (bench/gpu_shapes.py, the caller side)."""
    out = folder / "shapes.json"
    subprocess.run([sys.executable, "bench/gpu_shapes.py", "--out", str(out), "--presets", ",".join(presets)],
                   cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    if PROBLEM is not None:
        pytest.skip(PROBLEM)
    folder = tmp_path_factory.mktemp("gate")
    return run_gate(folder / "subset.json", "--param-shapes", str(model_shapes(folder, ["gpt2-small"])))


def test_kernels_import_nothing_of_cs336():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "cs336" or n.startswith("cs336.") for n in names), (path.name, names)
    code = ("import sys, kernels.gpu_check, kernels.attention, kernels.adamw, kernels.cross_entropy, "
            "kernels.rms_norm, kernels.swiglu; print(sorted(m for m in sys.modules if m.split('.')[0] == 'cs336'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
                         | {"PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"


def test_adamw_cases_take_the_callers_parameter_lists(subset):
    _, report = subset
    cases = " ".join(c for r in rows_of(report, "_adamw_kernel") for c in r["cases"])
    n = len(bench_shapes.param_groups(["gpt2-small"])["gpt2-small"])
    assert f"gpt2-small ({n} tensors)" in cases and "one scalar" in cases


def test_param_shapes_file_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "shapes.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--param-shapes", str(bad)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--param-shapes {bad}" in err and "bench/gpu_shapes.py" in err


def rows_of(report: dict, kernel: str) -> list[dict]:
    return [r for r in report["rows"] if r["kernel"] == kernel]


def test_subset_passes_with_no_error_or_spill(subset):
    proc, report = subset
    assert proc.returncode == 0, f"{report['failures']}\n{proc.stderr[-3000:]}"
    assert report["failures"] == []
    assert {r["target"] for r in report["rows"]} == {"sm_80", "sm_90a"}
    for r in report["rows"]:
        assert r["error"] is None and r["spill_bytes"] == 0, r
        assert r["regs"] > 0 and r["warps_per_sm"] > 0, r
    assert "| kernel | config | target |" in proc.stdout


def test_subset_covers_every_kernel_dtype_and_branch(subset):
    _, report = subset
    assert {r["kernel"] for r in report["rows"]} == gpu_check.package_kernels()
    for kernel in ("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
                   "_ce_fwd_kernel", "_ce_bwd_kernel"):
        configs = " ".join(r["config"] for r in rows_of(report, kernel))
        for dtype in ("fp32", "bf16", "fp16"):
            assert dtype in configs, (kernel, dtype)
    for kernel in ("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"):
        configs = {r["config"] for r in rows_of(report, kernel)}
        assert any("ONE_BLOCK=True" in c for c in configs) and any("ONE_BLOCK=False" in c for c in configs)
    ce = {r["config"] for r in rows_of(report, "_ce_fwd_kernel")}
    assert any("WRITE_GRAD=True" in c for c in ce) and any("WRITE_GRAD=False" in c for c in ce)
    adamw = {r["config"] for r in rows_of(report, "_adamw_kernel")}
    for d in ("fp32", "bf16", "fp16"):
        assert any(f"P_DTYPE={d} G_DTYPE={d} M_DTYPE={d}" in c for c in adamw), d
        assert any(f"P_DTYPE={d} G_DTYPE={d} M_DTYPE=fp32" in c for c in adamw), d


def test_adamw_one_tensor_group_compiles(subset):
    # Regression: a one-tensor group passes T == 1, which the runtime turns into a constant;
    # T.to(tl.int64) then failed to compile ('int' object has no attribute 'to').
    _, report = subset
    one = [r for r in rows_of(report, "_adamw_kernel") if "T=1 (int 1 -> constexpr)" in r["config"]]
    assert {r["target"] for r in one} == {"sm_80", "sm_90a"}
    assert len(one) >= 2 * 5  # five dtype combinations per target
    assert all(r["error"] is None and r["regs"] > 0 for r in one)


def test_int_one_specializations_of_rms_norm_backward(subset):
    _, report = subset
    configs = [r["config"] for r in rows_of(report, "_rms_norm_bwd_kernel")]
    assert any("M=1 (int 1 -> constexpr)" in c and "rows_per_program=1 (int 1 -> constexpr)" in c for c in configs)
    assert any("(int 1" not in c for c in configs)


def _int_kernel(out_ptr, T, BLOCK: tl.constexpr):
    t = T.to(tl.int64)
    tl.store(out_ptr + tl.arange(0, BLOCK), t + tl.zeros((BLOCK,), dtype=tl.int64))


@needs_toolchain
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_specialization_follows_the_runtime():
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    kernel = JITFunction(_int_kernel)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    out = torch.empty(64, dtype=torch.int64, device="meta")
    cases = {1: ("constexpr", None), 32: ("i32", 16), 33: ("i32", None)}
    for value, (kind, divisibility) in cases.items():
        for ptr, aligned in ((out, True), (out[1:], False)):  # out[1:] starts 8 bytes in
            _, signature, constexprs, attrs = gpu_check.specialize(kernel, backend, (ptr, value), {"BLOCK": 16})
            assert signature["T"] == kind
            assert ((1,) in constexprs) == (value == 1)
            assert (["tt.divisibility", 16] in attrs.get((0,), [])) == aligned
            if kind == "i32":
                assert (["tt.divisibility", 16] in attrs.get((1,), [])) == (divisibility == 16)


# Compiled in a fresh process: under TRITON_INTERPRET the language's builtins are patched.
PROBE = """
import dataclasses, json, torch
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction
from kernels import gpu_check


def int_kernel(out_ptr, T, BLOCK: tl.constexpr):
    t = T.to(tl.int64)
    tl.store(out_ptr + tl.arange(0, BLOCK), t + tl.zeros((BLOCK,), dtype=tl.int64))


kernel = JITFunction(int_kernel)
t = gpu_check.TARGETS["sm_80"]
backend = make_backend(GPUTarget("cuda", t.arch, 32))
out = torch.empty(64, dtype=torch.int64, device="meta")
rows = {}
for value in (1, 2):
    (launch,) = gpu_check.capture(lambda: kernel[(1,)](out, value, BLOCK=64))
    options, signature, constexprs, attrs = gpu_check.specialize(kernel, backend, launch.args, launch.kwargs)
    row = gpu_check.Row("int_kernel", t.name, "", options.num_warps, [str(value)], True)
    gpu_check.measure(row, t, ASTSource(kernel, signature, constexprs, attrs), options)
    rows[value] = dict(dataclasses.asdict(row), failure=row.failure())
print(json.dumps(rows))
"""


@needs_toolchain
def test_gate_reports_a_compile_error_only_where_the_runtime_specializes(tmp_path):
    # The AdamW bug in miniature: T.to() on an int argument fails to compile only when T == 1.
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "no attribute 'to'" in (rows["1"]["error"] or ""), rows["1"]
    assert rows["1"]["failure"].startswith("compile error")
    assert rows["2"]["error"] is None and rows["2"]["regs"] > 0 and rows["2"]["failure"] is None


def test_occupancy_from_registers_threads_and_shared_memory():
    h100, a100 = gpu_check.TARGETS["sm_90a"], gpu_check.TARGETS["sm_80"]
    assert gpu_check.warps_per_sm(h100, 4, 32, 0) == 64  # warp limit
    assert gpu_check.warps_per_sm(h100, 4, 96, 0) == 20  # 65536 / (96 * 32) = 21 warps -> 5 blocks
    assert gpu_check.warps_per_sm(h100, 8, 40, 0) == 48  # 40 regs allocate as 40 * 32 = 1280 per warp
    assert gpu_check.warps_per_sm(h100, 4, 33, 0) == 48  # 33 rounds up to 40 per thread (not 60)
    assert gpu_check.warps_per_sm(h100, 32, 64, 0) == 32
    assert gpu_check.warps_per_sm(h100, 32, 65, 0) == 0  # 72 * 32 * 32 > 65536: cannot launch
    assert gpu_check.warps_per_sm(a100, 4, 32, 100 * 1024) == 4  # one 101 KB block per 164 KB SM
    assert gpu_check.warps_per_sm(a100, 4, 32, 200 * 1024) == 0  # over the per-block maximum


def test_failures_are_errors_launch_limits_and_realistic_spills():
    row = gpu_check.Row("k", "sm_80", "", 4, ["c"], True, regs=32, spill_bytes=0, shared=0, warps_per_sm=64)
    assert row.failure() is None
    assert "spills 16 B" in gpu_check.Row(**{**row.__dict__, "spill_bytes": 16}).failure()
    assert gpu_check.Row(**{**row.__dict__, "spill_bytes": 16, "realistic": False}).failure() is None
    assert "cannot launch" in gpu_check.Row(**{**row.__dict__, "warps_per_sm": 0}).failure()
    assert "compile error" in gpu_check.Row(**{**row.__dict__, "error": "boom"}).failure()


def test_cli_rejects_unknown_targets_and_kernels(capsys):
    for argv in (["--targets", "sm_70"], ["--kernels", "softmax"], ["--targets", ""]):
        with pytest.raises(SystemExit) as info:
            gpu_check.main(argv)
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "valid: sm_80, sm_90a" in err and "valid: rms_norm" in err


@pytest.mark.slow
def test_full_matrix_passes(tmp_path):
    if PROBLEM is not None:
        pytest.skip(PROBLEM)
    presets = list(bench_shapes.param_groups())
    proc, report = run_gate(tmp_path / "full.json", "--full", "--param-shapes", str(model_shapes(tmp_path, presets)))
    assert proc.returncode == 0, f"{report['failures']}\n{proc.stderr[-3000:]}"
    assert report["full"] and len(report["rows"]) > 150


def test_json_path_that_is_a_directory_is_refused_before_compiling(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--kernels", "rms_norm", "--json", str(tmp_path)])
    assert exc.value.code == 2 and "is a directory" in capsys.readouterr().err
