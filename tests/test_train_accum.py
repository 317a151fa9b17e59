"""Gradient accumulation: N micro-batches per optimizer step give the gradients, losses and weights
of one batch (up to float rounding); DDP all-reduces only on the last micro-batch."""

import contextlib
import json

import numpy as np
import pytest
import torch

from cs336 import trainer as trainer_mod
from cs336.config import ConfigError
from cs336.config_io import apply_overrides
from cs336.distributed import DistInfo
from cs336.presets import smoke_config
from cs336.run_dir import RunDir
from cs336.train import run

TOKENS = np.random.default_rng(0).integers(0, 320, 5_000).astype(np.uint16)


def make_trainer(tmp_path, accum: int) -> trainer_mod.Trainer:
    cfg = apply_overrides(smoke_config(), [f"train.grad_accum_steps={accum}", "train.batch_size=8",
                                           "train.device=cpu"])
    return trainer_mod.Trainer(cfg, RunDir(tmp_path), torch.device("cpu"), DistInfo(), TOKENS, TOKENS)


def gradients(t: trainer_mod.Trainer) -> tuple[float, list[torch.Tensor]]:
    loss, norm = t.forward_backward()
    return float(loss), [p.grad.clone() for p in t.model.parameters()]


def test_micro_batches_sum_to_the_batch_gradient(tmp_path):
    loss1, grads1 = gradients(make_trainer(tmp_path, 1))
    for accum in (2, 4, 8):
        loss, grads = gradients(make_trainer(tmp_path, accum))
        assert loss == pytest.approx(loss1, rel=1e-6), accum
        for g, g1 in zip(grads, grads1, strict=True):
            torch.testing.assert_close(g, g1, rtol=1e-5, atol=1e-7)


def test_same_seed_same_losses_and_weights_for_any_accumulation(tmp_path):
    rows, weights = {}, {}
    for accum in (1, 2, 4):
        out = tmp_path / f"a{accum}"
        run(apply_overrides(smoke_config(), [
            f"train.out_dir={out}", "train.max_steps=4", "train.log_interval=1", "train.eval_interval=4",
            "train.checkpoint_interval=4", "train.sample_tokens=0", "data.corpus_mb=0.05",
            f"train.grad_accum_steps={accum}"]))
        rows[accum] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        weights[accum] = torch.load(out / "checkpoints" / "step_000004.pt", weights_only=True)["model"]
    for accum in (2, 4):
        for r, r1 in zip(rows[accum], rows[1], strict=True):
            for key in ("train_loss", "val_loss", "grad_norm"):
                if key in r1:
                    assert r[key] == pytest.approx(r1[key], rel=1e-5), (accum, r1["step"], key)
        for name, w in weights[accum].items():
            torch.testing.assert_close(w, weights[1][name], rtol=1e-4, atol=1e-5, msg=f"{accum} {name}")


def test_accumulation_must_divide_the_batch(tmp_path):
    with pytest.raises(ConfigError, match="grad_accum_steps=3 does not divide train.batch_size=8"):
        apply_overrides(smoke_config(), ["train.batch_size=8", "train.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match="grad_accum_steps=4 does not divide the 2 rows each rank"):
        trainer_mod.dist_utils.micro_batches(trainer_mod.dist_utils.rank_rows(8, DistInfo(0, 4)), 4)


class _RecordingDDP(torch.nn.Module):
    """Stands in for DistributedDataParallel: records which micro-batches ran inside no_sync."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.in_no_sync, self.calls = inner, False, []

    @contextlib.contextmanager
    def no_sync(self):
        self.in_no_sync = True
        try:
            yield
        finally:
            self.in_no_sync = False

    def forward(self, x, y):
        self.calls.append(self.in_no_sync)
        return self.inner(x, y)


def test_ddp_skips_the_all_reduce_on_all_but_the_last_micro_batch(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, 4)  # one process; then it is told it is rank 0 of 2, DDP stubbed
    t.info = DistInfo(rank=0, world_size=2)
    t.micro_batches = trainer_mod.dist_utils.micro_batches(
        trainer_mod.dist_utils.rank_rows(8, t.info), 4)
    t.step_fn = _RecordingDDP(t.step_fn)
    monkeypatch.setattr(trainer_mod.dist_utils, "mean_across_ranks", lambda value, info: value)
    t.forward_backward()
    assert t.step_fn.calls == [True, True, True, False]
