"""Continuing a sweep: its plan in ``DIR/sweep.json``, and what an earlier run of it finished.

``open_sweep_dir`` claims the sweep directory before any point runs: a new or empty directory
gets the plan (every point's config, less its run directory); a directory whose plan equals this
one is continued, and the result rows of its ``summary.json`` come back by point name; another
plan, or files without a plan, are refused naming the difference, and nothing there is touched.
``cs336.sweep.run_sweep`` keeps the ``FINISHED`` points and resumes a point from its latest
checkpoint when it has one (``resumable``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from cs336 import config_io as cfglib
from cs336.sweep_report import write_json


class SweepError(ValueError):
    """A sweep argument is invalid; the message names it and the fix."""


def resumable(run) -> bool:
    """Whether the point's run directory holds a checkpoint to continue from."""
    from cs336.run_dir import RunDir

    return run.run_dir.is_dir() and RunDir(run.run_dir).latest_checkpoint() is not None


FINISHED = ("ok", "diverged")
"""Statuses of a point that a continued sweep keeps (an ``error`` or ``interrupted`` point runs again,
from its latest checkpoint when it has one)."""


MANIFEST = "sweep.json"
"""The plan of a sweep (point names and configs), written in its directory before any point runs;
re-running the same command finds it and continues the sweep."""


def _plan_record(planned: Sequence) -> dict:
    """What identifies a sweep: its points and their configs (less the run directory, whose
    spelling may differ between two invocations of one command)."""
    points = {}
    for run in planned:
        cfg = cfglib.config_to_dict(run.config)
        cfg["train"].pop("out_dir", None)
        points[run.name] = cfg
    return {"format": "cs336-sweep", "version": 1, "points": points}


def open_sweep_dir(out: Path, planned: Sequence) -> dict[str, dict]:
    """Claim ``out`` for this sweep: a new or empty directory gets the manifest; a directory of
    the same sweep (its manifest equals this plan) is continued, and its result rows are
    returned by point name; anything else is refused, and nothing in it is touched."""

    record = _plan_record(planned)
    manifest = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out-dir {out} is a file; pass a directory for the sweep")
    if manifest.is_file():
        try:
            saved = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SweepError(f"{manifest} is unreadable ({exc}); choose a new --out-dir") from None
        if saved != record:
            diff = _plan_difference(saved.get("points", {}) if isinstance(saved, dict) else {}, record["points"])
            raise SweepError(f"--out-dir {out} holds another sweep ({diff}); re-run that sweep's own command "
                             "to continue it, or choose a new --out-dir")
        return _previous_rows(out)
    if out.exists() and any(out.iterdir()):
        raise SweepError(f"--out-dir {out} already holds files and is not a sweep directory (no {MANIFEST}); "
                         "choose a new directory")
    write_json(manifest, record)
    return {}


def _plan_difference(saved: dict, now: dict) -> str:
    gone, new = sorted(set(saved) - set(now)), sorted(set(now) - set(saved))
    if gone or new:
        return "its points differ: " + "; ".join(
            part for part in (f"only there: {', '.join(gone)}" if gone else "",
                              f"only in this command: {', '.join(new)}" if new else "") if part)
    for name in now:
        for section, fields in now[name].items():
            for field_name, value in fields.items():
                old = saved[name].get(section, {}).get(field_name)
                if old != value:
                    return f"point {name}: {section}.{field_name} is {old!r} there, {value!r} here"
    return "its manifest differs"


def _previous_rows(out: Path) -> dict[str, dict]:
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {r["name"]: r for r in summary.get("runs", []) if isinstance(r, dict) and "name" in r}
