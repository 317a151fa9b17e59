"""cs336.trainer: what a resume does with a changed optimizer field, and the start lines."""

import dataclasses

import numpy as np
import pytest
import torch

from cs336.config import OptimConfig
from cs336.config_io import apply_overrides, changed_fields
from cs336.distributed import DistInfo
from cs336.presets import smoke_config
from cs336.run_dir import RunDir
from cs336.trainer import TrainState, Trainer

# Every OptimConfig field, changed far enough from the base run's value that one optimizer step
# from the same checkpoint and batch must land elsewhere (at step 6: past the warm-up of 4).
OPTIM_CHANGES = {"lr": 3e-2, "min_lr": 2.9e-3, "warmup_iters": 2, "cosine_cycle_iters": 9,
                 "betas": (0.5, 0.6), "eps": 0.1, "weight_decay": 0.9, "grad_clip": 1e-3, "fused": False}
BASE = ["optim.lr=3e-3", "optim.warmup_iters=4", "optim.weight_decay=0.1", "optim.grad_clip=1.0",
        "model.kernels=native", "train.max_steps=20", "train.batch_size=4"]


def _trainer(cfg, rd):
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, 4000).astype(np.uint16)
    return Trainer(cfg, rd, torch.device("cpu"), DistInfo(), tokens, tokens)


def _step(trainer, step):
    trainer.set_lr(step)
    trainer.forward_backward()
    trainer.optimizer_step()


def test_the_table_covers_every_optim_field():
    assert set(OPTIM_CHANGES) == {f.name for f in dataclasses.fields(OptimConfig)}


@pytest.mark.parametrize("name", sorted(OPTIM_CHANGES))
def test_resume_applies_a_changed_optim_field(tmp_path, name):
    """A --resume that changes optim.<name> continues with the new value, not the checkpoint's:
    the next step from the same state and batch differs from the unchanged resume."""
    cfg = apply_overrides(smoke_config(), BASE)
    rd = RunDir(tmp_path)
    rd.create()
    first = _trainer(cfg, rd)
    for step in range(6):
        _step(first, step)
    first.save(TrainState(step=6))
    changed = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **{name: OPTIM_CHANGES[name]}))
    weights = {}
    for label, c in (("same", cfg), ("changed", changed)):
        trainer = _trainer(c, rd)
        state = trainer.restore(rd.latest_checkpoint())
        assert state.step == 6
        group = trainer.opt.param_groups[0]
        for key in ("betas", "eps", "weight_decay", "fused"):
            assert group[key] == (tuple(getattr(c.optim, key)) if key == "betas" else getattr(c.optim, key))
        _step(trainer, 6)
        weights[label] = [p.detach().clone() for p in trainer.model.parameters()]
    if name == "fused":  # False (the reference loop) and None (native here) agree to rounding
        return
    assert any(not torch.equal(a, b) for a, b in zip(weights["same"], weights["changed"], strict=True)), \
        f"optim.{name}={OPTIM_CHANGES[name]!r} had no effect after the resume"


def test_changed_fields_lists_only_what_differs_from_the_defaults():
    cfg = apply_overrides(smoke_config(), ["optim.lr=1e-2"])
    listed = changed_fields(cfg)
    assert "optim.lr=0.01" in listed and "model.d_model=32" in listed
    assert not any(item.startswith(("optim.eps=", "train.seed=")) for item in listed)
    assert changed_fields(type(cfg)()) == []
