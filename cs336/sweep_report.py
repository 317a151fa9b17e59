"""Reports of a sweep (``cs336.sweep``): summary.json / summary.csv / summary.md and curves.png.

Every file is rewritten atomically after each run, so an interrupted sweep leaves a readable
summary of the runs that finished. ``curves.png`` overlays the validation loss of every run
against step (tokens for a batch-size sweep) and against wallclock; runs that diverged or failed
are dashed; the loss axis is logarithmic and stops at 10x the highest starting loss. Reads
each run's ``metrics.jsonl`` as ``cs336.train`` writes it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cs336.fileio import atomic_open, atomic_write_text
from cs336.run_dir import read_metrics


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: Any) -> str:
    return f"{x:.4f}" if finite(x) else "-"


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


COLUMNS = ("steps", "final_train_loss", "final_val_loss", "best_val_loss", "tokens_per_s", "wallclock_s")


def write_reports(rows: Sequence[dict], out: Path, keys: Sequence[str], *, x_tokens: bool = False,
                  configs: dict[str, Any] | None = None) -> None:
    """summary.json / .csv / .md and curves.png for the rows so far."""
    write_json(out / "summary.json", {"grid": list(keys), "runs": list(rows)})
    header = ["name", *keys, *COLUMNS, "status"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        writer.writerow([r["name"], *(r["point"].get(k, "") for k in keys), *(r[c] for c in COLUMNS),
                         r["status"]])
    atomic_write_text(out / "summary.csv", buf.getvalue())
    md = ["| " + " | ".join([*keys, "steps", "final train", "final val", "best val", "tokens/s",
                             "wallclock s", "status"]) + " |",
          "|" + " --- |" * (len(keys) + 7)]
    for r in rows:
        cells = [*(r["point"].get(k, "") for k in keys), str(r["steps"] if r["steps"] is not None else "-"),
                 fmt(r["final_train_loss"]), fmt(r["final_val_loss"]), fmt(r["best_val_loss"]),
                 f"{r['tokens_per_s']:.0f}" if finite(r["tokens_per_s"]) else "-",
                 f"{r['wallclock_s']:.1f}" if finite(r["wallclock_s"]) else "-",
                 r["status"] + (f" ({r['reason']})" if r["reason"] and r["status"] != "ok" else "")]
        md.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    plot_curves(rows, out / "curves.png", x_tokens=x_tokens, configs=configs or {})


def plot_curves(rows: Sequence[dict], path: Path, *, x_tokens: bool = False,
                configs: dict[str, Any]) -> None:
    """Val loss of every run against step (tokens for batch sweeps) and against wallclock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    starts, highest = [], -math.inf
    for r in rows:
        evals = [m for m in read_metrics(Path(r["run_dir"])) if finite(m.get("val_loss"))]
        if not evals:
            continue
        cfg = configs.get(r["name"])
        per_step = cfg.train.batch_size * cfg.context_length if x_tokens and cfg is not None else None
        xs = [m["step"] * per_step for m in evals] if per_step else [m["step"] for m in evals]
        ys = [m["val_loss"] for m in evals]
        starts.append(ys[0])
        highest = max(highest, *ys)
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["point"].items())
        style = "--" if r["status"] != "ok" else "-"
        ax_step.plot(xs, ys, style, marker="o", markersize=2.5,
                     label=label + (f" [{r['status']}]" if r["status"] != "ok" else ""))
        ax_time.plot([m.get("wallclock_s", math.nan) for m in evals], ys, style, marker="o", markersize=2.5)
    ax_step.set_xlabel("tokens" if x_tokens else "step")
    ax_time.set_xlabel("wallclock (s)")
    # A diverged run can reach losses orders of magnitude above the start; clip one decade above
    # it so the other runs stay readable.
    top = 10 * max(starts) if starts else None
    for ax in (ax_step, ax_time):
        ax.set_ylabel("val loss (log scale)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.grid(alpha=0.3, which="both")
        if top is not None and highest > top:
            ax.set_ylim(top=top)
    if ax_step.lines:
        ax_step.legend(fontsize=7)
    fig.suptitle(path.parent.name, fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80)
    plt.close(fig)
