"""The trainer's optimizer step runs on the model's kernel backend, whatever the global one is
(issue 11: ``opt.step()`` outside ``ops.use_backend(cfg.model.kernels)`` followed the global
``auto``, so ``--kernels torch`` ran the Triton AdamW on a CUDA machine)."""

import types

import numpy as np
import pytest
import torch

from cs336 import ops
from cs336 import trainer as trainer_mod
from cs336.config import smoke_config
from cs336.config_io import apply_overrides
from cs336.distributed import DistInfo
from cs336.run_dir import RunDir

TOKENS = np.random.default_rng(0).integers(0, 320, 2_000).astype(np.uint16)


@pytest.mark.parametrize(("model_backend", "global_backend", "expected"),
                         [("torch", "triton", "reference"), ("triton", "torch", "triton")])
def test_optimizer_step_follows_the_model_backend(tmp_path, monkeypatch, model_backend, global_backend,
                                                  expected):
    ran = []
    fake_kernels = types.SimpleNamespace(adamw_step_=lambda *a, **k: ran.append("triton"))
    monkeypatch.setattr(ops, "_kernels_module", lambda name: fake_kernels)
    monkeypatch.setattr(ops, "triton_interpreted", lambda: True)  # triton "runs" on this CPU
    reference = ops.adamw_step_reference_
    monkeypatch.setattr(ops, "adamw_step_reference_", lambda *a, **k: (ran.append("reference"), reference(*a, **k)))
    cfg = apply_overrides(smoke_config(), ["train.device=cpu", "model.kernels=torch"])
    t = trainer_mod.Trainer(cfg, RunDir(tmp_path), torch.device("cpu"), DistInfo(), TOKENS, TOKENS)
    t.forward_backward()
    t.cfg = apply_overrides(cfg, [f"model.kernels={model_backend}"])
    with ops.use_backend(global_backend):
        t.optimizer_step()
    assert ran == [expected]
