"""Every GPU figure of the project from one command, sized for a 15-minute GPU lease.

    PYTHONPATH=. python bench/gpu_report.py --out-dir gpu-report [--out bench/RESULTS.md]
                                            [--steps preflight,attention,train,kernels,parity]
                                            [--budget-s 420] [--dry-run]

Steps run in order of value, each a subprocess with a time limit (``bench/gpu_steps.py``; parity
is ``pytest -m gpu tests/parity`` with ``bench/_rows_plugin.py``): ``preflight`` (CUDA, gcc and
Python.h for Triton's launchers, one tiny launch per kernel family against native),
``attention`` (the CS336 leaderboard shape: triton and SDPA's flash backend; the O(T^2)
reference only where it fits in 4 GiB), ``train`` (a GPT-2-small step per provider, MFU),
``kernels`` (each kernel against its providers and the copy ceiling) and ``parity``.

Every case appends its row to ``DIR/rows.jsonl`` when measured (each step's output goes to
``DIR/<step>.log``; past its limit its whole process group is killed), and after each step the section
is rendered to ``DIR/GPU.md`` (and into the ``## GPU`` section of ``--out``), written atomically:
a run stopped at any point keeps what it measured (``--render-only`` re-renders the rows). A
step's limit is its estimate (``STEPS``: startup, cold Triton compiles and timed cases at the
rates below; about 6 minutes in all on an H100/H200) capped by what is left of ``--budget-s``;
a step with less than its minimum left is skipped with a note. ``--dry-run`` runs every step's
code on the CPU at tiny shapes (Triton under TRITON_INTERPRET=1): the plumbing, no measurement.
Exit status: 0 when every step passed, 1 when one did not, 2 without CUDA (and no --dry-run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # cs336 from the source tree, as on the GPU machine
SECTION = re.compile(r"^## GPU(:.*| \(.*)?$")
# Estimate rates for an H100/H200 host: a cold Triton compile of one configuration 1 s (the
# compile gate takes 1-4 s per configuration on this loaded 2-core CPU machine), an inductor
# graph 10 s, one case 1 s (do_bench: warm-up 10 + 50 ms of repetitions, plus set-up), 10 s of
# process start (torch, triton imports). The estimates below sum to 383 s, 6.4 minutes.
COMPILE_S, INDUCTOR_S, CASE_S, START_S = 1, 10, 1, 10


@dataclass
class Step:
    name: str
    title: str
    compiles: int  # cold Triton compiles (distinct kernel configurations launched)
    inductor: int  # torch.compile graphs
    cases: int  # timed cases or tests
    min_s: int  # below this much budget the step is skipped

    @property
    def estimate_s(self) -> int:
        return START_S + COMPILE_S * self.compiles + INDUCTOR_S * self.inductor + CASE_S * self.cases


STEPS = {
    "preflight": Step("preflight", "Preflight: toolchain and one launch per kernel family", 6, 0, 6, 15),
    "attention": Step("attention", "Attention, CS336 leaderboard shape (B 1, T 16384, 16 heads of 64, bf16, "
                                   "causal, fwd+bwd)", 4, 0, 3, 20),
    "train": Step("train", "Training step, GPT-2 small (batch 8 x 1024, bf16 autocast)", 14, 0, 2, 30),
    "kernels": Step("kernels", "Kernels vs the seam's providers, torch.compile and copy bandwidth",
                    24, 9, 60, 30),
    "parity": Step("parity", "Parity at GPU shapes (`pytest -m gpu tests/parity`)", 60, 1, 54, 30),
}


@dataclass
class Result:
    step: Step
    status: str  # passed | failed | timed out | skipped
    seconds: float
    note: str = ""


def command(step: str, rows: Path, dry: bool) -> list[str]:
    py = sys.executable
    if step == "parity":
        # A dry run collects two files (their GPU tests skip on the CPU): the plugin's plumbing.
        where = ["tests/parity/test_train_step.py", "tests/parity/test_swiglu.py"] if dry else ["tests/parity"]
        return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_rows_plugin", "-m", "gpu", *where]
    return [py, "bench/gpu_steps.py", step, "--rows", str(rows)] + (["--dry-run"] if dry else [])


def step_env(rows: Path, dry: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if dry:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "bench"), env.get("PYTHONPATH", "")])
    env["CS336_ROWS"] = str(rows)
    return env


def run_step(step: Step, rows: Path, dry: bool, limit_s: float) -> Result:
    """Run ``step`` in its own process group (its output in ``<rows folder>/<step>.log``); past
    ``limit_s`` the whole group is killed (inductor's compile workers too), its rows stay."""
    log_path = rows.parent / f"{step.name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(step.name, rows, dry), cwd=ROOT, env=step_env(rows, dry), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Result(step, "timed out", time.perf_counter() - start,
                          f"stopped after its {limit_s:.0f} s limit; the rows measured before are kept")
    seconds = time.perf_counter() - start
    failed = [r for r in read_rows(rows) if r["step"] == step.name and r["status"] == "failed"]
    if code == 0 and not failed:
        return Result(step, "passed", seconds)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    note = f"{len(failed)} case(s) failed" if failed else f"exit {code}: " + " / ".join(tail)[-300:]
    return Result(step, "failed", seconds, note.replace("|", "/"))


def read_rows(path: Path) -> list[dict]:
    """The rows of ``path`` (a line cut short by a kill is ignored)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _figures(row: dict) -> str:
    parts = []
    for key, fmt in (("tflops", "{:.1f} TFLOP/s"), ("tokens_per_s", "{:,.0f} tokens/s"), ("mfu", "MFU {:.1%}"),
                     ("gbs", "{:.1f} GB/s"), ("copy_fraction", "{:.0%} of copy")):
        if row.get(key) is not None:
            parts.append(fmt.format(row[key]))
    return ", ".join(parts)


def render(results: list[Result], rows: list[dict], meta: dict[str, str], dry: bool) -> str:
    """The GPU section: heading, versions, one status line per step, then each step's rows."""
    heading = ("## GPU (dry run on the CPU: plumbing only, not measurements)" if dry
               else f"## GPU: {meta['device']}, {meta['date']}")
    lines = [heading, "", "Written by `PYTHONPATH=. python bench/gpu_report.py` ("
             + ", ".join(f"{k} {v}" for k, v in meta.items() if k not in ("device", "date")) + ").", "",
             "| step | status | seconds | note |", "| --- | --- | ---: | --- |"]
    lines += [f"| {r.step.name} | {r.status} | {r.seconds:.0f} | {r.note} |" for r in results]
    names = [r.step.name for r in results] + sorted({row["step"] for row in rows} - {r.step.name for r in results})
    for name in names:
        step_rows = [row for row in rows if row["step"] == name]
        if not step_rows:
            continue
        title = STEPS[name].title if name in STEPS else name
        lines += ["", f"### {title}", "", "| case | status | ms | figures | note |", "| --- | --- | ---: | --- | --- |"]
        for row in step_rows:
            ms = f"{row['ms']:.3f}" if row.get("ms") is not None else "-"
            note = str(row.get("note", "")).replace("|", "/")
            lines.append(f"| {row['case']} | {row['status']} | {ms} | {_figures(row)} | {note} |")
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


def write_atomic(path: Path, text: str) -> None:
    from cs336.fileio import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def publish(args, results: list[Result], meta: dict[str, str]) -> None:
    section = render(results, read_rows(args.out_dir / "rows.jsonl"), meta, args.dry_run)
    write_atomic(args.out_dir / "GPU.md", section)
    write_atomic(args.out_dir / "results.json", json.dumps(
        {"meta": meta, "dry_run": args.dry_run,
         "steps": [{"step": r.step.name, "status": r.status, "seconds": r.seconds, "note": r.note} for r in results]},
        indent=1) + "\n")
    if args.out is not None:
        document = args.out.read_text() if args.out.exists() else "# Benchmark results\n"
        write_atomic(args.out, replace_section(document, section))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu_report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="folder for GPU.md, rows.jsonl and results.json (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file whose '## GPU' section is replaced (e.g. bench/RESULTS.md)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma list from {','.join(STEPS)}")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for all steps together")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny shapes")
    parser.add_argument("--render-only", action="store_true", help="re-render DIR/rows.jsonl, run nothing")
    args = parser.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in args.steps if s not in STEPS]
    if bad or not args.steps:
        parser.error(f"--steps: unknown {', '.join(bad) or 'empty list'}; valid: {', '.join(STEPS)}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s:g}")
    if args.render_only and args.out_dir is None:
        parser.error("--render-only needs --out-dir DIR (the folder holding rows.jsonl)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not args.render_only and not torch.cuda.is_available():
        print("gpu_report: no CUDA device is visible (torch.cuda.is_available() is False). Run it on a "
              "machine with an NVIDIA GPU, or pass --dry-run to run every step's code on the CPU at tiny "
              "shapes.", file=sys.stderr)
        return 2
    import triton

    versions = {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else "CPU"
    meta = {"device": device, "date": dt.date.today().isoformat(), **versions}
    tmp = None
    if args.out_dir is None:
        tmp = tempfile.TemporaryDirectory()
        args.out_dir = Path(tmp.name)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = args.out_dir / "rows.jsonl"
    if args.render_only:
        publish(args, [], meta)
        return 0
    rows.unlink(missing_ok=True)
    results: list[Result] = []
    start = time.perf_counter()
    for name in args.steps:
        step = STEPS[name]
        left = args.budget_s - (time.perf_counter() - start)
        if left < step.min_s:
            results.append(Result(step, "skipped", 0.0, f"{left:.0f} s of --budget-s left, needs {step.min_s} s"))
        else:
            # A dry run on a shared CPU is checked for its plumbing, not its pace: all that is left.
            limit = left if args.dry_run else min(step.estimate_s * 1.5, left)
            print(f"gpu_report: {name} (limit {limit:.0f} s) ...", file=sys.stderr, flush=True)
            results.append(run_step(step, rows, args.dry_run, limit))
            print(f"gpu_report: {name} {results[-1].status} in {results[-1].seconds:.0f} s", file=sys.stderr)
        publish(args, results, meta)
    bad = [r.step.name for r in results if r.status != "passed"]
    where = f"{args.out_dir / 'GPU.md'}" + (f" and {args.out}" if args.out else "")
    print(f"gpu_report: wrote {where}; " + (f"not passed: {', '.join(bad)}" if bad else "every step passed"),
          file=sys.stderr)
    if tmp is not None:
        print((args.out_dir / "GPU.md").read_text())
        tmp.cleanup()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
