"""bench/gpu_report.py without a GPU: argument checks, the no-CUDA exit, budgets, rows kept from
a step stopped by its limit, the RESULTS.md section, and ``--dry-run``: every step's code on the
CPU at tiny shapes (the GPU runs themselves need a CUDA device)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "bench" / "gpu_report.py")
gpu_report = importlib.util.module_from_spec(_spec)
sys.modules["gpu_report"] = gpu_report  # dataclasses look their module up there
_spec.loader.exec_module(gpu_report)

DOC = """# Benchmark results

Intro.

## GPU

No GPU figure yet.

## GPU compile gate (no GPU needed)

Gate table.

## CPU

CPU table.
"""


def test_steps_are_parsed_and_unknown_ones_rejected(capsys):
    assert gpu_report.parse_args([]).steps == ["preflight", "attention", "train", "kernels", "parity"]
    assert gpu_report.parse_args(["--steps", "train,parity"]).steps == ["train", "parity"]
    with pytest.raises(SystemExit) as info:
        gpu_report.parse_args(["--steps", "parity,flash"])
    assert info.value.code == 2 and "unknown flash; valid: preflight, attention" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_report.parse_args(["--budget-s", "0"])
    assert "--budget-s must be positive" in capsys.readouterr().err


def test_estimates_fit_the_default_budget_in_about_six_minutes():
    total = sum(s.estimate_s for s in gpu_report.STEPS.values())
    assert total <= 420 and total <= 6.5 * 60
    assert list(gpu_report.STEPS) == ["preflight", "attention", "train", "kernels", "parity"]  # by value
    assert gpu_report.STEPS["preflight"].estimate_s <= 25


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without CUDA")
def test_without_cuda_it_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    out.write_text(DOC)
    assert gpu_report.main(["--out", str(out), "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == DOC and not (tmp_path / "r").exists()


def test_section_replaced_between_headings_and_other_sections_kept():
    new = "## GPU: NVIDIA H200, 2026-11-29\n\nFigures.\n"
    text = gpu_report.replace_section(DOC, new)
    assert "No GPU figure yet." not in text and "Figures." in text
    assert text.index("Intro.") < text.index("Figures.") < text.index("Gate table.") < text.index("CPU table.")
    assert gpu_report.replace_section(text, new) == text  # a second run replaces its own section
    dry = gpu_report.replace_section(text, "## GPU (dry run on the CPU: plumbing only)\n\nx\n")
    assert "Figures." not in dry and "Gate table." in dry
    appended = gpu_report.replace_section("# Benchmark results\n\n## CPU\n\nx\n", new)
    assert appended.endswith(new) and "## CPU" in appended


def test_render_names_device_versions_steps_and_rows():
    steps = gpu_report.STEPS
    results = [gpu_report.Result(steps["attention"], "passed", 31.2),
               gpu_report.Result(steps["train"], "timed out", 39.0, "stopped after its 39 s limit")]
    rows = [{"step": "attention", "case": "triton T=16384", "status": "passed", "ms": 3.9, "note": "", "tflops": 410.5},
            {"step": "train", "case": "triton: batch 8", "status": "passed", "ms": 120.0, "note": "a|b",
             "tokens_per_s": 68266.7, "mfu": 0.412}]
    meta = {"device": "NVIDIA H200", "date": "2026-11-29", "torch": "2.11.0", "triton": "3.6.0"}
    text = gpu_report.render(results, rows, meta, dry=False)
    assert text.startswith("## GPU: NVIDIA H200, 2026-11-29\n")
    assert "torch 2.11.0, triton 3.6.0" in text
    assert "| attention | passed | 31 |" in text and "| train | timed out | 39 | stopped after" in text
    assert "| triton T=16384 | passed | 3.900 | 410.5 TFLOP/s |" in text
    assert "68,267 tokens/s, MFU 41.2%" in text and "a/b" in text  # a "|" in a note cannot split the table
    assert gpu_report.render([], rows, meta, dry=True).startswith("## GPU (dry run on the CPU")


def fake_steps(monkeypatch, script: str) -> None:
    """Every step runs ``script`` (python -c) with CS336_ROWS set, instead of its real command."""
    monkeypatch.setattr(gpu_report, "command", lambda step, rows, dry: [sys.executable, "-c", script, step])


WRITE_ROW = ("import json, os, sys, time; f = open(os.environ['CS336_ROWS'], 'a'); "
             "f.write(json.dumps({'step': sys.argv[1], 'case': 'c1', 'status': 'passed', 'ms': 1.5, "
             "'note': ''}) + '\\n'); f.close(); ")


def test_a_step_stopped_by_its_limit_keeps_its_rows(tmp_path, monkeypatch):
    # The step starts a grandchild (as inductor's compile workers): the kill takes it too.
    fake_steps(monkeypatch, WRITE_ROW + "import subprocess; subprocess.Popen(['sleep', '60']); time.sleep(30)")
    rows = tmp_path / "rows.jsonl"
    result = gpu_report.run_step(gpu_report.STEPS["train"], rows, dry=True, limit_s=3)
    assert result.status == "timed out" and "rows measured before are kept" in result.note
    assert result.seconds < 20
    assert [r["case"] for r in gpu_report.read_rows(rows)] == ["c1"]
    fake_steps(monkeypatch, WRITE_ROW.replace("'passed'", "'failed'"))
    assert gpu_report.run_step(gpu_report.STEPS["kernels"], rows, dry=True, limit_s=30).status == "failed"
    fake_steps(monkeypatch, "import sys; sys.exit(3)")
    failed = gpu_report.run_step(gpu_report.STEPS["parity"], rows, dry=True, limit_s=30)
    assert failed.status == "failed" and "exit 3" in failed.note


def test_budget_skips_what_does_not_fit_and_every_step_publishes(tmp_path, monkeypatch):
    fake_steps(monkeypatch, WRITE_ROW + "time.sleep(1.5)")
    out, out_dir = tmp_path / "RESULTS.md", tmp_path / "report"
    out.write_text(DOC)
    published = []
    real_publish = gpu_report.publish
    monkeypatch.setattr(gpu_report, "publish", lambda *a: (published.append(len(a[1])), real_publish(*a))[1])
    code = gpu_report.main(["--dry-run", "--out-dir", str(out_dir), "--out", str(out), "--budget-s", "17"])
    assert code == 1  # a skipped step is not a pass
    assert published == [1, 2, 3, 4, 5]  # the section is rewritten after every step
    status = {s["step"]: s["status"] for s in json.loads((out_dir / "results.json").read_text())["steps"]}
    assert status["preflight"] == "passed" and status["parity"] == "skipped"
    section = (out_dir / "GPU.md").read_text()
    assert "| parity | skipped | 0 | " in section and "of --budget-s left, needs 30 s" in section
    assert section in out.read_text() and "Gate table." in out.read_text()
    rendered = (out_dir / "GPU.md").read_text()
    (out_dir / "GPU.md").unlink()
    assert gpu_report.main(["--render-only", "--out-dir", str(out_dir)]) == 0
    assert "| c1 | passed | 1.500 |" in (out_dir / "GPU.md").read_text() and "| c1 |" in rendered


def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    """The plumbing a GPU run depends on (subprocesses, interpreter, benches, rows, the pytest
    plugin, rendering), at tiny shapes on the CPU: each step passes and leaves its rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out_dir, out = tmp_path / "report", tmp_path / "RESULTS.md"
    out.write_text(DOC)
    proc = subprocess.run([sys.executable, "bench/gpu_report.py", "--dry-run", "--out-dir", str(out_dir),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads((out_dir / "results.json").read_text())["steps"]
    assert [(s["step"], s["status"]) for s in steps] == [(n, "passed") for n in gpu_report.STEPS]
    rows = gpu_report.read_rows(out_dir / "rows.jsonl")
    by_step = {n: [r for r in rows if r["step"] == n] for n in gpu_report.STEPS}
    assert all(by_step.values()), {n: len(r) for n, r in by_step.items()}
    launches = [r for r in by_step["preflight"] if "one launch vs native" in r["case"]]
    assert len(launches) == 6 and all(r["status"] == "passed" for r in launches)
    assert {r["case"].split()[0] for r in by_step["train"]} == {"triton:", "native:"}
    assert all(r["ms"] > 0 for r in by_step["train"] + by_step["attention"])
    assert any(r["case"].startswith("adamw step") for r in by_step["kernels"])
    assert all(r["status"] == "skipped" for r in by_step["parity"])  # GPU tests, no CUDA here
    assert out.read_text().count("## GPU (dry run on the CPU") == 1 and "Gate table." in out.read_text()
