"""bench/gpu_report.py without a GPU: argument checks, the no-CUDA exit, step running and the
RESULTS.md section it writes (the GPU runs themselves need a CUDA device)."""

import importlib.util
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
    assert gpu_report.parse_args([]).steps == ["parity", "kernels", "attention", "train"]
    assert gpu_report.parse_args(["--steps", "train,parity"]).steps == ["train", "parity"]
    with pytest.raises(SystemExit) as info:
        gpu_report.parse_args(["--steps", "parity,flash"])
    assert info.value.code == 2 and "unknown flash; valid: parity, kernels" in capsys.readouterr().err


def test_default_time_limits_fit_in_eight_minutes():
    assert sum(s.limit_s for s in gpu_report.STEPS.values()) <= 8 * 60 - 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without CUDA")
def test_without_cuda_it_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    out.write_text(DOC)
    assert gpu_report.main(["--out", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert out.read_text() == DOC


def test_section_replaced_between_headings_and_other_sections_kept():
    new = "## GPU: NVIDIA H200, 2026-11-29\n\nFigures.\n"
    text = gpu_report.replace_section(DOC, new)
    assert "No GPU figure yet." not in text and "Figures." in text
    assert text.index("Intro.") < text.index("Figures.") < text.index("Gate table.") < text.index("CPU table.")
    assert gpu_report.replace_section(text, new) == text  # a second run replaces its own section
    appended = gpu_report.replace_section("# Benchmark results\n\n## CPU\n\nx\n", new)
    assert appended.endswith(new) and "## CPU" in appended


def test_render_names_device_date_versions_and_every_step():
    steps = gpu_report.STEPS
    results = [gpu_report.Result(steps["parity"], "passed", 61.2, "```\n12 passed in 60s\n```"),
               gpu_report.Result(steps["train"], "timed out", 90.0, "Stopped after 90 s.")]
    meta = {"device": "NVIDIA H200", "date": "2026-11-29", "torch": "2.11.0", "triton": "3.6.0"}
    text = gpu_report.render(results, meta)
    assert text.startswith("## GPU: NVIDIA H200, 2026-11-29\n")
    assert "torch 2.11.0, triton 3.6.0" in text
    assert "| parity | passed | 61 |" in text and "| train | timed out | 90 |" in text
    assert "### Training step, GPT-2 small" in text and "12 passed in 60s" in text


def test_run_step_reports_output_status_and_time_limit(tmp_path, monkeypatch):
    env = {"PYTHONPATH": str(ROOT)}
    monkeypatch.setattr(gpu_report, "command",
                        lambda step, work: ([sys.executable, "-c", "print('3 passed in 0.1s')"], None))
    result = gpu_report.run_step(gpu_report.Step("parity", "Parity", 60), tmp_path, env)
    assert result.status == "passed" and "3 passed in 0.1s" in result.body
    monkeypatch.setattr(gpu_report, "command",
                        lambda step, work: ([sys.executable, "-c", "import sys; print('1 failed'); sys.exit(1)"], None))
    assert gpu_report.run_step(gpu_report.Step("parity", "Parity", 60), tmp_path, env).status == "failed"
    monkeypatch.setattr(gpu_report, "command",
                        lambda step, work: ([sys.executable, "-c", "import time; time.sleep(30)"], None))
    slow = gpu_report.run_step(gpu_report.Step("train", "Train", 1), tmp_path, env)
    assert slow.status == "timed out" and "Stopped after 1 s" in slow.body


def test_commands_run_the_named_scripts(tmp_path):
    assert gpu_report.command("parity", tmp_path)[0][-3:] == ["-m", "gpu", "tests/parity"]
    cmd, out = gpu_report.command("kernels", tmp_path)
    assert "bench/kernels_vs_ceiling.py" in cmd and out == tmp_path / "kernels.md"
    cmd, out = gpu_report.command("attention", tmp_path)
    assert "bench/bench_attention.py" in cmd and "leaderboard" in cmd and str(out) in cmd
    cmd, _ = gpu_report.command("train", tmp_path)
    assert "bench/bench_model.py" in cmd
