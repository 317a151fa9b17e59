"""Every GPU figure of the project from one command, written into the GPU section of bench/RESULTS.md.

    PYTHONPATH=. python bench/gpu_report.py [--out bench/RESULTS.md] [--steps parity,kernels,attention,train]

Needs one CUDA device (sized for an H100/H200: under 8 minutes in all) and no network. Each step
runs as its own subprocess with a time limit, so a failing or slow step is reported in the section
and the others still run:

- ``parity``: ``pytest -m gpu tests/parity`` (the kernels against the references at GPU shapes);
- ``kernels``: ``python bench/kernels_vs_ceiling.py`` (each kernel against eager, torch.compile,
  PyTorch's fused ops and the copy-bandwidth ceiling);
- ``attention``: ``pytest bench/bench_attention.py -k leaderboard`` (the CS336 assignment-2
  leaderboard shape: batch 1, T = 16384, d_model 1024, 16 heads, bf16, causal, forward + backward);
- ``train``: ``pytest bench/bench_model.py -k "small and (torch or triton)"`` (a training step of
  GPT-2 small, tokens/s and MFU against the device's dense BF16 peak).

Benchmark JSONs are rendered with ``bench/report.py``. The section written replaces the one headed
``## GPU`` (or ``## GPU: ...``) and starts with the device, date and versions; the file is written
atomically. Exit status: 0 when every step passed, 1 when one failed, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = re.compile(r"^## GPU(:.*)?$")


@dataclass
class Step:
    name: str
    title: str
    limit_s: int  # seconds before the step is stopped; the defaults sum to under 8 minutes


STEPS = {
    "parity": Step("parity", "Parity at GPU shapes (`pytest -m gpu tests/parity`)", 120),
    "kernels": Step("kernels", "Kernels vs eager, torch.compile and copy bandwidth "
                               "(`python bench/kernels_vs_ceiling.py`)", 150),
    "attention": Step("attention", "Attention, CS336 leaderboard shape "
                                   "(`pytest bench/bench_attention.py -k leaderboard`)", 90),
    "train": Step("train", "Training step, GPT-2 small (`pytest bench/bench_model.py`)", 90),
}


@dataclass
class Result:
    step: Step
    status: str  # passed | failed | timed out
    seconds: float
    body: str  # markdown shown under the step's heading


def command(step: str, work: Path) -> tuple[list[str], Path | None]:
    """The subprocess of ``step`` and the file it writes (None: its output is the summary)."""
    py = sys.executable
    if step == "parity":
        return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/parity"], None
    if step == "kernels":
        out = work / "kernels.md"
        return [py, "bench/kernels_vs_ceiling.py", "--out", str(out)], out
    bench = {"attention": ("bench/bench_attention.py", "leaderboard"),
             "train": ("bench/bench_model.py", "small and (torch or triton)")}[step]
    out = work / f"{step}.json"
    # -m "": no marker filter (the default one skips slow and gpu tests); -k selects the cases.
    return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", bench[0], "-k", bench[1],
            "--benchmark-json", str(out)], out


def run_step(step: Step, work: Path, env: dict[str, str]) -> Result:
    cmd, out = command(step.name, work)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.limit_s)
    except subprocess.TimeoutExpired as e:
        tail = _tail((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or "")
        return Result(step, "timed out", time.perf_counter() - start, f"Stopped after {step.limit_s} s.\n\n{tail}")
    seconds = time.perf_counter() - start
    status = "passed" if proc.returncode == 0 else "failed"
    parts = []
    if out is not None and out.suffix == ".json" and out.exists():
        table = work / f"{step.name}-table.md"
        subprocess.run([sys.executable, "bench/report.py", str(out), "--md", str(table)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
        parts.append(table.read_text().strip() if table.exists() else f"(bench/report.py could not render {out.name})")
    elif out is not None and out.exists():
        parts.append(out.read_text().strip())
    if status == "failed" or not parts:
        parts.append(_tail(proc.stdout + proc.stderr))
    return Result(step, status, seconds, "\n\n".join(parts))


def _tail(output: str, lines: int = 25) -> str:
    return "```\n" + "\n".join(output.strip().splitlines()[-lines:]) + "\n```"


def render(results: list[Result], meta: dict[str, str]) -> str:
    """The GPU section: heading with device and date, versions, one subsection per step."""
    lines = [f"## GPU: {meta['device']}, {meta['date']}", "",
             "Written by `PYTHONPATH=. python bench/gpu_report.py` ("
             + ", ".join(f"{k} {v}" for k, v in meta.items() if k not in ("device", "date")) + ").", "",
             "| step | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {r.step.name} | {r.status} | {r.seconds:.0f} |" for r in results]
    for r in results:
        lines += ["", f"### {r.step.title}", "", r.body]
    return "\n".join(lines) + "\n"


def replace_section(document: str, section: str) -> str:
    """``document`` with its ``## GPU`` section (up to the next ``## `` heading) replaced by
    ``section``; appended at the end when there is none."""
    lines = document.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if SECTION.match(ln.rstrip("\n"))), None)
    if start is None:
        return document.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + rest if rest else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu_report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md",
                        help="markdown file whose '## GPU' section is replaced (default: bench/RESULTS.md)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma list from {','.join(STEPS)}")
    args = parser.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in args.steps if s not in STEPS]
    if bad or not args.steps:
        parser.error(f"--steps: unknown {', '.join(bad) or 'empty list'}; valid: {', '.join(STEPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_report: no CUDA device is visible (torch.cuda.is_available() is False). Run it on a "
              "machine with an NVIDIA GPU; without one, `python -m kernels.gpu_check` checks the kernels' "
              "GPU compiles and `make test` runs them in the interpreter.", file=sys.stderr)
        return 2
    from cs336 import hardware
    from cs336.fileio import atomic_write_text

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    meta = {"device": torch.cuda.get_device_name(0), "date": dt.date.today().isoformat(), **hardware.versions()}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.steps:
            print(f"gpu_report: {name} ...", file=sys.stderr, flush=True)
            results.append(run_step(STEPS[name], Path(tmp), env))
            print(f"gpu_report: {name} {results[-1].status} in {results[-1].seconds:.0f} s", file=sys.stderr)
    document = args.out.read_text() if args.out.exists() else "# Benchmark results\n"
    atomic_write_text(args.out, replace_section(document, render(results, meta)))
    failed = [r.step.name for r in results if r.status != "passed"]
    print(f"gpu_report: wrote the GPU section of {args.out}; "
          + (f"failed: {', '.join(failed)}" if failed else "every step passed"), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
