"""Loss curves of a run: ``loss.png`` with train/val loss against step and against wallclock.

Reads the run's ``metrics.jsonl`` (one JSON object per line; train lines carry ``train_loss``,
evaluation lines ``val_loss``). Uses matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from cs336.fileio import atomic_open


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def plot_losses(metrics_path: str | Path, out_path: str | Path, title: str | None = None) -> Path:
    """Write the two-panel loss plot of ``metrics_path`` to ``out_path`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        pts = [(r["step"], r.get("wallclock_s", 0.0), r[key]) for r in rows if r.get(key) is not None]
        if not pts:
            continue
        steps, walls, losses = zip(*pts, strict=True)
        label = key.replace("_", " ")
        axes[0].plot(steps, losses, style, label=label, markersize=3)
        axes[1].plot(walls, losses, style, label=label, markersize=3)
    for ax, xlabel in zip(axes, ("step", "wallclock (s)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_open(out_path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return out_path
