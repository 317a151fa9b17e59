"""pytest plugin of ``bench/gpu_report.py``'s parity step: one JSON row per test, as it finishes.

    CS336_ROWS=rows.jsonl python -m pytest -p _rows_plugin -m gpu tests/parity   (bench/ on PYTHONPATH)

Rows have the shape of ``bench/gpu_steps.py``'s (step ``parity``, case = the test id), appended
and flushed per test, so a run stopped by its time limit keeps every result so far.
"""

from __future__ import annotations

import json
import os


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("CS336_ROWS")
    if not path or not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    note = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        note = str(report.longrepr[2])[:160]
    elif report.failed:
        note = (str(report.longrepr).strip().splitlines() or [""])[-1][:160]
    row = {"step": "parity", "case": report.nodeid, "status": report.outcome, "ms": report.duration * 1e3,
           "note": note}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
