"""The benchmark suite collects, and one tiny case runs and writes the extra_info fields.

The default test run does not time anything (benchmarks live in bench/, outside testpaths);
this runs ``pytest bench`` in subprocesses the way a user would.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from cs336 import flops

ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "pytest", "bench", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)


def test_bench_suite_collects_every_op_provider_and_pass():
    done = _pytest("--collect-only", "-q")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ids = done.stdout
    for op in ("test_rms_norm", "test_swiglu", "test_cross_entropy", "test_linear_cross_entropy"):
        for provider in ("torch", "compile", "triton"):
            for which in ("fwd", "bwd", "fwd+bwd"):
                assert f"{op}[{provider}-{which}-tiny]" in ids
    for provider in ("torch", "compile", "triton"):
        assert f"test_adamw_step[{provider}-tinystories]" in ids
        assert f"test_train_step[{provider}-tinystories]" in ids
        assert f"test_train_step[{provider}-gpt2-small]" in ids


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
