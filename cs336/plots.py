"""Loss curves of a run: ``loss.png`` with train/val loss against step and against wallclock.

Reads the run's ``metrics.jsonl`` (one JSON object per line; train lines carry ``train_loss``,
evaluation lines ``val_loss``) and ``resumes.json`` beside it (the steps a ``--resume`` continued
from, written by ``record_resume``). The loss axis is logarithmic: after the first hundred steps
a linear axis leaves the curve in the bottom tenth of the panel, while equal ratios of loss stay
equal heights on a log axis. Each resume is a dashed vertical line. Uses matplotlib's Agg
backend, so no display is needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cs336.fileio import atomic_open, atomic_write_text
from cs336.run_dir import read_metrics

RESUMES = "resumes.json"


def read_resumes(run_dir: str | Path) -> list[dict]:
    """``[{"step": N, "wallclock_s": S}, ...]`` of the run's resumes (empty when none or unreadable)."""
    try:
        rows = json.loads((Path(run_dir) / RESUMES).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)] if isinstance(rows, list) else []


def record_resume(run_dir: str | Path, step: int, wallclock_s: float = 0.0) -> None:
    """Note that the run in ``run_dir`` resumed at ``step``; resumes recorded past ``step`` (of a
    continuation that was itself rolled back) are dropped, as the metrics past it are."""
    kept = [r for r in read_resumes(run_dir) if r["step"] < step]
    kept.append({"step": int(step), "wallclock_s": float(wallclock_s)})
    atomic_write_text(Path(run_dir) / RESUMES, json.dumps(kept) + "\n")


def plot_losses(metrics_path: str | Path, out_path: str | Path, title: str | None = None) -> Path:
    """Write the two-panel loss plot of ``metrics_path`` to ``out_path`` (atomically)."""
    import matplotlib.pyplot as plt

    fig = loss_figure(metrics_path, title)
    out_path = Path(out_path)
    with atomic_open(out_path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return out_path


def loss_figure(metrics_path: str | Path, title: str | None = None):
    """The matplotlib figure of ``plot_losses`` (axes: loss against step, against wallclock)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plotted = False
    label: str | None
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        pts = [(r["step"], r.get("wallclock_s", 0.0), r[key]) for r in rows
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and r[key] > 0]
        if not pts:
            continue
        plotted = True
        steps, walls, losses = zip(*pts, strict=True)
        label = key.replace("_", " ")
        axes[0].plot(steps, losses, style, label=label, markersize=3)
        axes[1].plot(walls, losses, style, label=label, markersize=3)
    for i, resume in enumerate(read_resumes(Path(metrics_path).parent)):
        label = "resumed" if i == 0 else None
        axes[0].axvline(resume["step"], color="gray", linestyle="--", linewidth=0.8, label=label)
        axes[1].axvline(resume.get("wallclock_s", 0.0), color="gray", linestyle="--", linewidth=0.8, label=label)
    for ax, xlabel in zip(axes, ("step", "wallclock (s)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token, log scale)")
        if plotted:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
