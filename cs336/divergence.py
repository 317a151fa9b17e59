"""Divergence detection for the training loop, checked every step before the optimizer step.

``DivergenceGuard.check(step, loss, grad_norm)`` raises ``Diverged`` on a NaN/inf loss or
gradient norm, on a loss above ``spike_factor`` times its running mean (an exponential moving
average updated only by accepted steps, after ``warmup_steps``), or on a gradient norm above
``max_grad_norm``. The message names the newest intact checkpoint with finite weights no larger
than ``max_abs_weight`` (``cs336.checkpoint_integrity.last_good_checkpoint``). The loop reads the
loss and gradient norm once per step anyway, so the check adds no host sync. Defaults: a loss
that triples its running mean after warm-up is far outside step-to-step noise (a few percent on
CS336-sized runs) and precedes the NaN by a few steps; weights above 1e4 do not occur in a
healthy pre-norm Transformer (initial weights are O(1), trained ones O(10) at most).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from cs336.checkpoint_integrity import last_good_checkpoint
from cs336.run_dir import checkpoint_files

DEFAULT_MAX_ABS_WEIGHT = 1e4
"""Pre-save guard bound on |weight| (see the module docstring)."""


LOWER = "a lower --optim.lr or more --optim.warmup_iters"


def recovery_advice(last: Path | None, checkpoints_dir: str | os.PathLike | None) -> str:
    """The sentence a divergence message ends with: the last good checkpoint ``last`` to resume
    from, or, without one, how to start over in the same run directory (it holds no checkpoint)
    or another one (its checkpoints are all damaged or beyond the weight bound)."""
    if last is not None:
        return f"Last good checkpoint: {last}; resume from it (--out-dir {last.parent.parent} --resume) with {LOWER}"
    if checkpoints_dir is not None and checkpoint_files(checkpoints_dir):
        return (f"No checkpoint in {checkpoints_dir} is intact with bounded weights; start a new run in "
                f"another --out-dir with {LOWER}")
    run = f" --out-dir {Path(checkpoints_dir).parent}" if checkpoints_dir is not None else ""
    return f"No checkpoint was written yet; run the same command{run} again (without --resume) with {LOWER}"


class Diverged(RuntimeError):
    """Training diverged; the message names the last good checkpoint."""


@dataclass
class DivergenceGuard:
    spike_factor: float | None = 3.0
    warmup_steps: int = 20
    ema: float = 0.9
    max_grad_norm: float | None = None
    checkpoints_dir: str | os.PathLike | None = None
    max_abs_weight: float | None = DEFAULT_MAX_ABS_WEIGHT

    def __post_init__(self) -> None:
        if self.spike_factor is not None and not (self.spike_factor > 1 and math.isfinite(self.spike_factor)):
            raise ValueError(f"spike_factor must be a finite number > 1, got {self.spike_factor}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        self._mean: float | None = None
        self._seen = 0

    @property
    def running_mean(self) -> float | None:
        return self._mean

    def state_dict(self) -> dict:
        """The running mean and the steps seen (saved in a checkpoint, so a resumed run keeps them)."""
        return {"mean": self._mean, "seen": self._seen}

    def load_state_dict(self, d: dict) -> None:
        mean = d.get("mean")
        self._mean = float(mean) if mean is not None and math.isfinite(mean) else None
        self._seen = int(d.get("seen", 0))

    def last_good(self, step: int | None = None) -> Path | None:
        """The newest intact, bounded checkpoint, of step ``step`` at most when given."""
        if self.checkpoints_dir is None:
            return None
        return last_good_checkpoint(self.checkpoints_dir, max_abs=self.max_abs_weight, max_step=step)

    def advice(self, step: int | None = None) -> str:
        """What to do next: resume from the last good checkpoint (of step ``step`` at most), or,
        when the run has none, run again (the same --out-dir takes a new run while it holds none)."""
        return recovery_advice(self.last_good(step), self.checkpoints_dir)

    def _fail(self, what: str, step: int) -> None:
        raise Diverged(f"training diverged at step {step}: {what}; stopped before the optimizer step. "
                       f"{self.advice(step)}")

    def check(self, step: int, loss: float, grad_norm: float | None = None) -> None:
        """Raise ``Diverged`` if this step's values show divergence; else record them."""
        if not math.isfinite(loss):
            self._fail(f"loss is {loss}", step)
        if grad_norm is not None and not math.isfinite(grad_norm):
            self._fail(f"gradient norm is {grad_norm} (loss {loss:.4g})", step)
        if grad_norm is not None and self.max_grad_norm is not None and grad_norm > self.max_grad_norm:
            self._fail(f"gradient norm {grad_norm:.4g} exceeds the limit {self.max_grad_norm:g}", step)
        if (self.spike_factor is not None and self._mean is not None and self._seen >= self.warmup_steps
                and loss > self.spike_factor * self._mean):
            self._fail(f"loss {loss:.4g} is more than {self.spike_factor:g}x its running mean "
                       f"{self._mean:.4g}", step)
        self._mean = loss if self._mean is None else self.ema * self._mean + (1 - self.ema) * loss
        self._seen += 1
