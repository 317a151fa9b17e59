"""Hyperparameter sweeps: one training run per point of a cartesian grid of config overrides.

    python -m cs336.sweep [--preset NAME] [--config FILE] [--section.field=VALUE ...] \
        --grid "optim.lr=1e-4,3e-4,1e-3,3e-3" [--grid ...] [--set key=value ...] [--out-dir DIR]

The base config takes the flags of ``python -m cs336.train`` (``cs336.cli``; ``--base FILE`` is
``--config FILE``, ``--set KEY=VALUE`` is ``--KEY=VALUE`` applied after the other flags). Each
``--grid KEY=V1,V2,...`` is one axis (``cs336.config_io.apply_overrides`` syntax); every combination
runs in ``DIR/<key=value__...>``, all validated before the first run. Deviation from a plain grid:
a ``train.batch_size`` axis keeps training tokens fixed by scaling the step counts and
``train.eval_batches`` by ``base_batch_size / batch_size`` (unless the grid sets ``train.max_steps``).
Runs go one after another, or one per CUDA device in subprocesses; the plan is kept in
``DIR/sweep.json`` (``cs336.sweep_resume``) and the summaries written by ``cs336.sweep_report``.
Divergence, errors, Ctrl-C, continuing and the files written: README, "What happens when".
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cs336 import config as cfglib
from cs336 import config_io
from cs336.cli import add_config_arguments, add_deprecated_alias, config_from_args, parse_args
from cs336.interrupt import Interrupted
from cs336.sweep_report import finite, fmt, read_metrics, write_json, write_reports
from cs336.sweep_resume import FINISHED, MANIFEST, SweepError, open_sweep_dir, resumable  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[str, ...]


@dataclass
class PlannedRun:
    name: str
    point: dict[str, str]
    config: cfglib.TrainConfig
    run_dir: Path


def parse_grid(text: str) -> Axis:
    """``"optim.lr=1e-4,3e-4"`` -> Axis("optim.lr", ("1e-4", "3e-4"))."""
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
        raise SweepError(f"--grid {text!r}: expected KEY=V1,V2,... such as --grid optim.lr=1e-4,3e-4")
    values = tuple(v.strip() for v in rest.split(","))
    if not rest.strip() or any(not v for v in values):
        raise SweepError(f"--grid {text!r}: empty value; list the values as V1,V2,... with no empty entries")
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise SweepError(f"--grid {text!r}: value(s) {', '.join(duplicates)} listed twice")
    return Axis(key, values)


def grid_points(axes: Sequence[Axis]) -> list[dict[str, str]]:
    """Cartesian product of the axes, the first axis varying slowest."""
    keys = [a.key for a in axes]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise SweepError(f"--grid key(s) {', '.join(duplicates)} given twice; give each key one --grid")
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(a.values for a in axes))]


def point_name(point: dict[str, str]) -> str:
    """Run-directory name of a point: ``optim.lr=1e-4__model.ffn_type=silu``."""
    parts = [f"{k}={re.sub(r'[^A-Za-z0-9.+-]', '_', v)}" for k, v in point.items()]
    name = "__".join(parts) or "base"
    if len(name) > MAX_NAME:  # a file name holds 255 bytes: keep the start, tell long values apart by a hash
        digest = hashlib.sha256(json.dumps(point, sort_keys=True).encode("utf-8")).hexdigest()[:16]
        name = f"{name[:MAX_NAME - 18]}~{digest}"
    return name


MAX_NAME = 200
"""Longest point name (ASCII) used as is; room under the 255-byte file-name limit for temp suffixes."""


BATCH_KEY = "train.batch_size"
STEP_KEYS = ("train.max_steps", "train.eval_interval", "train.log_interval", "optim.warmup_iters",
             "optim.cosine_cycle_iters", "train.eval_batches")
"""Counts scaled by base_batch / batch in a batch-size sweep (None / 0 entries stay)."""


def get_path(cfg: Any, path: str) -> Any:
    section, name = path.split(".")
    return getattr(getattr(cfg, section), name)


def set_path(cfg: Any, path: str, value: Any) -> Any:
    """A copy of cfg with one field replaced (the section's validation runs again)."""
    section, name = path.split(".")
    updated = dataclasses.replace(getattr(cfg, section), **{name: value})
    return dataclasses.replace(cfg, **{section: updated})


def scale_steps(cfg: Any, base_batch: int, batch: int) -> Any:
    """Scale the step counts (and validation batches) by base_batch / batch so the number of
    training and validation tokens stays fixed."""
    for path in STEP_KEYS:
        steps = get_path(cfg, path)
        if steps:
            cfg = set_path(cfg, path, max(1, round(steps * base_batch / batch)))
    return cfg


def plan_sweep(base: Any, points: Sequence[dict[str, str]], sets: Sequence[str],
               out: Path) -> list[PlannedRun]:
    """Resolve every point's config (raising on any bad key or value) before anything runs.

    ``points`` are override dicts, usually ``grid_points(axes)``; ``sets`` apply to all of them.
    """
    try:
        base = config_io.apply_overrides(copy.deepcopy(base), list(sets))
    except cfglib.ConfigError as exc:
        raise SweepError(f"--set: {exc}") from None
    swept_out = any("train.out_dir" in point for point in points)
    if swept_out or base.train.out_dir is not None:
        where = "--grid" if swept_out else f"train.out_dir={base.train.out_dir}"
        raise SweepError(f"{where}: a sweep runs each point in DIR/<point> of its own --out-dir DIR, so "
                         "train.out_dir would be ignored; drop it and pass --out-dir for the sweep directory")
    planned = []
    for point in points:
        name = point_name(point)
        try:
            cfg = config_io.apply_overrides(copy.deepcopy(base), [f"{k}={v}" for k, v in point.items()])
            if BATCH_KEY in point and "train.max_steps" not in point:
                cfg = scale_steps(cfg, get_path(base, BATCH_KEY), get_path(cfg, BATCH_KEY))
        except cfglib.ConfigError as exc:
            raise SweepError(f"grid point {name}: {exc}") from None
        cfg = set_path(cfg, "train.out_dir", str(out / name))
        if not cfg.train.wandb_group:
            cfg = set_path(cfg, "train.wandb_group", out.name)
        planned.append(PlannedRun(name, point, cfg, out / name))
    _check_distinct(planned)
    return planned


def _check_distinct(planned: Sequence[PlannedRun]) -> None:
    """Refuse two points that would share a run directory (values that differ only in characters
    ``point_name`` replaces by ``_``) or that train the same config (``1e-3`` and ``0.001``)."""
    seen: dict[str, PlannedRun] = {}
    configs: dict[str, PlannedRun] = {}
    for run in planned:
        if run.name in seen:
            raise SweepError(f"grid points {seen[run.name].point} and {run.point} would share the run directory "
                             f"{run.run_dir} (characters other than letters, digits and . + - become _); "
                             "make the values differ in letters or digits")
        seen[run.name] = run
        record = config_io.config_to_dict(run.config)
        record["train"].pop("out_dir", None)
        key = json.dumps(record, sort_keys=True, default=str)
        if key in configs:
            raise SweepError(f"grid points {configs[key].name} and {run.name} give the same config (the values "
                             "are equal once parsed); list each value once")
        configs[key] = run


def varies_data(points: Sequence[dict[str, str]]) -> bool:
    """Whether some point changes what the data preparation produces (corpus or tokenizer)."""
    return any(k.startswith("data.") or k == "model.vocab_size" for p in points for k in p)


def share_data(planned: Sequence[PlannedRun], out: Path, say=print) -> list[PlannedRun]:
    """Prepare corpus, tokenizer and token files once in ``out/_data`` and point every run at them.

    Returns the runs unchanged when they already train on token files or a point varies the data
    (then each run prepares its own).
    """
    base = planned[0].config
    if base.data.source == "tokens" or varies_data([r.point for r in planned]):
        return list(planned)
    from cs336.distributed import DistInfo
    from cs336.prepare import prepare_data
    from cs336.run_dir import RunDir

    rd = RunDir(out / "_data")
    rd.create()
    prepare_data(base, rd, DistInfo(), say)
    overrides: dict[str, Any] = {"dataset": "embedded", "train_text": None, "valid_text": None,
                 "train_tokens": str(rd.data / "train.bin"), "valid_tokens": str(rd.data / "valid.bin"),
                 "tokenizer_dir": str(rd.tokenizer)}
    return [dataclasses.replace(r, config=dataclasses.replace(
        r.config, data=dataclasses.replace(r.config.data, **overrides))) for r in planned]


def starting_loss(rows: Sequence[dict]) -> float | None:
    """The loss at initialization: the step-0 validation loss, else the first train loss logged."""
    for r in rows:
        if r.get("step") == 0 and finite(r.get("val_loss")):
            return r["val_loss"]
    return next((r["train_loss"] for r in rows if finite(r.get("train_loss"))), None)


def classify(summary: dict, run_dir: Path) -> tuple[str, str]:
    """(status, reason) of a finished run: ``ok``, ``interrupted`` or ``diverged`` (a non-finite
    final loss, or a final train or val loss above the starting loss)."""
    if summary.get("interrupted"):
        return "interrupted", f"stopped by {summary.get('stop_signal') or 'a signal'}"
    final_train, final_val = summary.get("final_train_loss"), summary.get("final_val_loss")
    if not finite(final_train) or (final_val is not None and not finite(final_val)):
        return "diverged", "non-finite loss"
    start = starting_loss(read_metrics(run_dir))
    for name, final in (("train", final_train), ("val", final_val)):
        if start is not None and finite(final) and cast(float, final) > start:
            return "diverged", f"final {name} loss {final:.4g} above the starting loss {start:.4g}"
    return "ok", ""


def run_point(run: PlannedRun, resume: bool = False) -> dict:
    """Train one point in this process (``resume``: continue it from its latest checkpoint);
    never raises for divergence or a failed run."""
    from cs336 import train

    try:
        summary = train.run(run.config, resume=resume) if resume else train.run(run.config)
        status, reason = classify(summary, Path(summary.get("run_dir", run.run_dir)))
    except train.TrainingDiverged as exc:
        summary = dict(getattr(exc, "summary", None) or {})
        status, reason = "diverged", str(exc)
    except Exception as exc:  # noqa: BLE001 - a failed point is recorded; the sweep goes on
        summary, status, reason = {}, "error", f"{type(exc).__name__}: {exc}"
    return _row(run, summary, status, reason)


def _row(run: PlannedRun, summary: dict, status: str, reason: str) -> dict:
    row = {"name": run.name, "point": run.point, "run_dir": str(summary.get("run_dir", run.run_dir)),
           "status": status, "diverged": status == "diverged", "reason": reason,
           "stop_signal": summary.get("stop_signal") if status == "interrupted" else None}
    for key in ("steps", "final_train_loss", "final_val_loss", "best_val_loss", "tokens_per_s",
                "wallclock_s"):
        value = summary.get(key)
        row[key] = value if value is None or finite(value) or isinstance(value, int) else None
    return row


def _worker(spec_path: str) -> None:
    """Subprocess side of a parallel sweep: run the point in spec_path, write its result row."""
    spec = json.loads(Path(spec_path).read_text())
    run = PlannedRun(spec["name"], spec["point"], config_io.config_from_dict(spec["config"]),
                     Path(spec["run_dir"]))
    row = run_point(run, resume=bool(spec.get("resume")))
    write_json(Path(spec["result"]), row)


def run_parallel(planned: Sequence[PlannedRun], devices: Sequence[str], out: Path, on_row,
                 worker_cmd: Sequence[str] | None = None) -> list[dict]:
    """Run the points in subprocesses, one at a time per device (``CUDA_VISIBLE_DEVICES=device``).

    Each subprocess runs ``worker_cmd + [spec.json]`` (default ``python -m cs336.sweep --worker``),
    which trains the point described in the spec and writes its result row. After an interrupted
    run or Ctrl-C no further points start; the running ones finish (they save a checkpoint).
    """
    cmd = list(worker_cmd or [sys.executable, "-m", "cs336.sweep", "--worker"])
    specs_dir = out / ".specs"
    specs_dir.mkdir(parents=True, exist_ok=True)
    pending = list(enumerate(planned))
    running: dict[str, tuple[subprocess.Popen, int, Path]] = {}
    rows: list[dict | None] = [None] * len(planned)
    stopped: Interrupted | None = None
    while pending or running:
        try:
            for device in devices:
                if device in running or not pending:
                    continue
                index, run = pending.pop(0)
                spec = specs_dir / f"{index}.json"
                result = specs_dir / f"{index}.result.json"
                write_json(spec, {"name": run.name, "point": run.point, "run_dir": str(run.run_dir),
                                  "config": config_io.config_to_dict(run.config), "result": str(result),
                                  "resume": resumable(run)})
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=device)
                running[device] = (subprocess.Popen([*cmd, str(spec)], env=env), index, result)
            time.sleep(0.2)
        except (KeyboardInterrupt, Interrupted) as exc:
            print("interrupted: no further points start; waiting for the running ones", flush=True)
            stopped = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            pending.clear()
        for device, (proc, index, result) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[device]
            if result.is_file():
                rows[index] = json.loads(result.read_text())
            else:
                reason = f"worker exited with status {proc.returncode}"
                rows[index] = _row(planned[index], {}, "error", reason)
            if cast(dict, rows[index])["status"] == "interrupted":  # set just above
                pending.clear()
                stopped = stopped or Interrupted(_stop_signal(cast(dict, rows[index])))
            on_row(rows[index], planned)
    if stopped is not None:
        raise stopped
    return [r for r in rows if r is not None]


def _stop_signal(row: dict) -> int:
    """The signal that stopped an interrupted point (SIGINT for a row that does not say)."""
    name = str(row.get("stop_signal"))
    return int(signal.Signals[name]) if name in signal.Signals.__members__ else int(signal.SIGINT)


def run_sweep(planned: Sequence[PlannedRun], out: Path, devices: Sequence[str] | None = None, *,
              worker_cmd: Sequence[str] | None = None, previous: dict[str, dict] | None = None) -> list[dict]:
    """Run every planned point, rewriting the reports in ``out`` after each one; with more than
    one device, in parallel subprocesses (``run_parallel``). ``previous``: result rows of an
    earlier, interrupted run of this sweep by point name; finished ones are kept, not rerun.

    Stopped by a signal (a point's training saves a checkpoint and returns, or the signal lands
    between points) it raises ``Interrupted`` after writing the reports of the points done."""
    out.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []
    keys = list(dict.fromkeys(k for run in planned for k in run.point))
    batch_axis = BATCH_KEY in keys

    def on_row(row: dict, plan: Sequence[PlannedRun]) -> None:
        done.append(row)
        print(f"[{len(done)}/{len(plan)}] {row['name']}: {row['status']}"
              f" final val {fmt(row['final_val_loss'])}" + (f" ({row['reason']})" if row["reason"] else ""),
              flush=True)
        order = {r.name: i for i, r in enumerate(plan)}
        write_reports(sorted(done, key=lambda r: order[r["name"]]), out, keys,
                      x_tokens=batch_axis, configs={r.name: r.config for r in plan})

    kept = {name: row for name, row in (previous or {}).items() if row.get("status") in FINISHED}
    todo = [run for run in planned if run.name not in kept]
    for run in planned:
        if run.name in kept:
            on_row(kept[run.name], planned)
    if kept:
        print(f"continuing the sweep in {out}: {len(kept)} finished point(s) kept, {len(todo)} to run",
              flush=True)
    if devices and len(devices) > 1:
        run_parallel(todo, devices, out, lambda row, _: on_row(row, planned), worker_cmd)
        return done
    for run in todo:
        resume = resumable(run)
        print(f"[{len(done) + 1}/{len(planned)}] {'resuming' if resume else 'running'} {run.name}", flush=True)
        on_row(run_point(run, resume=resume), planned)
        if done[-1]["status"] == "interrupted":
            raise Interrupted(_stop_signal(done[-1]))
    return done


def default_devices() -> list[str]:
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cs336.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, config_aliases=("--base",), without=("--out-dir",))
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="one sweep axis; repeat for a cartesian product")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="same as --KEY=VALUE: applied to every point, after the other flags and "
                             "before the grid values")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="sweep directory (default runs/sweep-<keys>-<time>); re-running a command "
                             "with the same --out-dir continues that sweep")
    add_deprecated_alias(parser, "--out", "--out-dir", type=Path)
    parser.add_argument("--no-share-data", action="store_false", dest="share_data",
                        help="let every run prepare its own corpus, tokenizer and token files "
                             "(by default they are prepared once in DIR/_data when no point varies them)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def run_and_report(planned: Sequence[PlannedRun], out: Path, previous: dict[str, dict] | None = None) -> int:
    """Run the sweep, print its one-line summary, and return the exit status (1 if a run failed);
    an interrupted sweep raises ``Interrupted`` and prints no best point."""
    rows = run_sweep(planned, out, default_devices(), previous=previous)
    ok = [r for r in rows if r["status"] == "ok" and finite(r["final_val_loss"])]
    best = min(ok, key=lambda r: r["final_val_loss"]) if ok else None
    n_div = sum(r["diverged"] for r in rows)
    n_err = sum(r["status"] == "error" for r in rows)
    print(f"sweep: {len(rows)} runs, {n_div} diverged, {n_err} failed"
          + (f"; best {best['name']} final val {best['final_val_loss']:.4f}" if best else "")
          + f"; summary in {out / 'summary.md'}")
    return 1 if n_err else 0


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    if args.worker:
        _worker(args.worker)
        return
    from cs336.cli import run_cli

    setup: dict = {}

    def body() -> None:
        if not args.grid:
            raise SweepError("no --grid given; add at least one, e.g. --grid optim.lr=1e-4,3e-4")
        axes = [parse_grid(g) for g in args.grid]
        base = config_from_args(args)
        keys = "-".join(a.key.split(".")[-1] for a in axes)
        setup["out"] = out = args.out_dir or Path("runs") / f"sweep-{keys}-{time.strftime('%Y%m%d-%H%M%S')}"
        planned = plan_sweep(base, grid_points(axes), args.sets, out)
        previous = open_sweep_dir(out, planned)
        if args.out_dir is None:
            print(f"sweep directory {out}; to continue it after an interruption, re-run with "
                  f"--out-dir {out}", flush=True)
        planned = share_data(planned, out) if args.share_data else planned
        setup["status"] = run_and_report(planned, out, previous)

    def on_interrupt() -> str:
        out = setup.get("out")
        if out is None:
            return "no run of the sweep was started"
        return (f"finished points are kept in {out}; re-run the same command with --out-dir {out} "
                "to continue (the interrupted point resumes from its checkpoint)")

    run_cli(body, user_errors=(SweepError, cfglib.ConfigError), on_interrupt=on_interrupt)
    if setup.get("status"):
        sys.exit(setup["status"])


if __name__ == "__main__":
    main()
