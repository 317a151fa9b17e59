"""The benchmark suite collects, one tiny case runs and writes the extra_info fields, and the
harness (bench/_harness.py) is the one every benchmark script uses.

The default test run does not time anything (benchmarks live in bench/, outside testpaths);
this runs ``pytest bench`` in subprocesses the way a user would.
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

from cs336 import flops

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = ("torch", "native", "compile", "triton")


def _load(name: str):
    """Import bench/<name>.py the way its command line does (bench/ on sys.path)."""
    bench_dir = str(ROOT / "bench")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _pytest(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "pytest", "bench", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)


def test_bench_suite_collects_every_op_provider_and_pass():
    done = _pytest("--collect-only", "-q")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ids = done.stdout
    for op in ("test_rms_norm", "test_swiglu", "test_cross_entropy", "test_linear_cross_entropy"):
        for provider in PROVIDERS:
            for which in ("fwd", "bwd", "fwd+bwd"):
                assert f"{op}[{provider}-{which}-tiny]" in ids
    for provider in PROVIDERS:
        assert f"test_adamw_step[{provider}-tinystories]" in ids
        assert f"test_train_step[{provider}-tinystories]" in ids
        assert f"test_train_step[{provider}-gpt2-small]" in ids
    for mode in ("eager", "compile"):
        assert f"test_train_step_vs_nanogpt[{mode}-tinystories]" in ids


def test_bench_modules_import_the_harness_not_conftest():
    conftest = ast.parse((ROOT / "bench" / "conftest.py").read_text())
    defined = {n.name for n in conftest.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    fixtures = {n.name for n in conftest.body if isinstance(n, ast.FunctionDef)
                and any("fixture" in ast.unparse(d) for d in n.decorator_list)}
    assert defined == fixtures, f"conftest.py defines non-fixtures: {sorted(defined - fixtures)}"
    for path in sorted((ROOT / "bench").glob("*.py")):
        text = path.read_text()
        assert "from conftest import" not in text, f"{path.name} imports helpers from conftest"
        # Scratch directories (tempfile.TemporaryDirectory) are fine; a hand-made rename is not.
        assert "os.replace(" not in text and "NamedTemporaryFile" not in text and "mkstemp" not in text, \
            f"{path.name} writes files by hand instead of through cs336.fileio"


def test_nanogpt_reference_has_the_projects_shape():
    from cs336.model import TransformerLM
    from cs336.presets import model_preset

    nanogpt = _load("nanogpt_ref")
    cfg = model_preset("tinystories")
    ours = TransformerLM.from_config(cfg, device="meta")
    ref = nanogpt.GPT(cfg, device="meta")
    assert sum(p.numel() for p in ref.parameters()) == ours.num_parameters()
    small = dict(vocab_size=50, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=24)
    ref = nanogpt.GPT(model_preset("tinystories").__class__(**small))
    tokens = torch.randint(0, 50, (2, 8))
    loss = ref(tokens, tokens)
    assert loss.shape == () and abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 1.5
    # RoPE on interleaved pairs, as cs336.layers.RotaryPositionalEmbedding.
    from cs336.layers import RotaryPositionalEmbedding

    x = torch.randn(2, 3, 8, 16)
    cos, sin = nanogpt.rope_tables(16, 8, 10_000.0)
    expected = RotaryPositionalEmbedding(10_000.0, 16, 8)(x, torch.arange(8))
    torch.testing.assert_close(nanogpt.apply_rope(x, cos, sin), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "cross_entropy", "linear_cross_entropy", "adamw"])
def test_kernels_vs_ceiling_takes_shapes_and_bytes_from_the_harness(monkeypatch, op):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kvc = _load("kernels_vs_ceiling")
    harness = sys.modules["_harness"]
    rows = kvc.BENCHES[op](["torch", "native"], torch.float32, torch.device("cpu"), lambda fn: (fn(), 1.0)[1],
                           True)
    assert rows and {r.provider for r in rows} == {"torch", "native"}
    assert all(r.ms == 1.0 and not r.note.startswith("error") for r in rows), [r.note for r in rows]
    if op == "adamw":
        numel = 300 * 32 + 32 * 32 + 32 + 5
        assert all(r.bytes_moved == flops.op_cost("adamw", "fwd", M=numel, N=0).bytes for r in rows)
        return
    dims = harness.OP_SHAPES[op]["tiny"][:-1]
    for r in rows:
        if op == "linear_cross_entropy":
            M, K, V = dims
            assert r.bytes_moved == flops.op_cost(op, "fwd+bwd", M=M, N=V, K=K).bytes
        else:
            assert r.shape == "x".join(map(str, dims))
            assert r.bytes_moved == flops.op_cost(op, r.pass_, M=dims[0], N=dims[1]).bytes


def test_tiny_cases_run_and_record_extra_info(tmp_path):
    out = tmp_path / "bench.json"
    done = _pytest("-k", "(rms_norm or linear_cross_entropy) and torch and tiny and not bwd",
                   f"--benchmark-json={out}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    results = {b["extra_info"]["op"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    assert set(results) == {"rms_norm", "linear_cross_entropy"}
    for info in results.values():
        for key in ("device", "torch", "triton", "provider", "analytic_flops", "measured_flops",
                    "bytes_moved", "gbps", "median_s", "peak_flops", "peak_source"):
            assert key in info, key
        assert info["provider"] == "torch" and info["pass"] == "fwd" and info["gbps"] > 0
    rms = results["rms_norm"]
    assert rms["bytes_moved"] == flops.op_cost("rms_norm", "fwd", M=rms["M"], N=rms["N"]).bytes
    assert rms["measured_flops"] == 0  # FlopCounterMode counts matmuls only; RMSNorm has none
    lce = results["linear_cross_entropy"]
    assert lce["measured_flops"] == lce["analytic_matmul_flops"] == 2 * lce["M"] * lce["K"] * lce["N"]
    if rms["device_type"] == "cpu":
        assert rms["peak_source"].startswith("CPU measured in-session")

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    report.main([str(out), "--png", str(tmp_path / "roof.png"), "--md", str(tmp_path / "table.md")])
    table = (tmp_path / "table.md").read_text()
    assert "| rms_norm | tiny | fwd | torch |" in table
    assert f"{lce['measured_flops']:,} / {lce['measured_flops']:,}" in table
    assert (tmp_path / "roof.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_lists_the_paired_train_step_ratio():
    report = _load("report")
    info = {"op": "train_step_vs_nanogpt", "provider": "auto (native)", "mode": "eager", "shape": "tinystories",
            "batch_size": 4, "tokens_per_s": 1000.0, "nanogpt_tokens_per_s": 950.0, "speed_ratio": 1.0526,
            "device": "cpu", "pass": "step"}
    table = report.markdown([{"name": "t", "stats": {"median": 1.024}, "extra_info": info}])
    assert "| eager (auto (native)) | tinystories | 4 | 1000 | 950 | 1.053 |" in table
