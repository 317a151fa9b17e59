"""cs336.trainer, the loop: signals (a checkpoint, exit 0), the lock, divergence stopping before a
bad step or checkpoint, a resume that applies every changed optimizer field, gradient accumulation
and the optimizer step's kernel backend."""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cs336 import ops
from cs336 import trainer as trainer_mod
from cs336.checkpoint_integrity import verify_checkpoint
from cs336.config import ConfigError, OptimConfig
from cs336.config_io import apply_overrides, changed_fields, config_to_dict
from cs336.distributed import DistInfo
from cs336.divergence import DivergenceGuard
from cs336.presets import smoke_config
from cs336.run_dir import RunDir
from cs336.train import run
from cs336.trainer import Trainer, TrainingDiverged, TrainState, check_step
from run_helpers import ROOT, TIMEOUT, cfg, cli_error, env, finish, resume_args, start_cli, steps

# Every OptimConfig field, changed far enough from the base run's value that one optimizer step
# from the same checkpoint and batch must land elsewhere (at step 6: past the warm-up of 4).
OPTIM_CHANGES = {"lr": 3e-2, "min_lr": 2.9e-3, "warmup_iters": 2, "cosine_cycle_iters": 9,
                 "betas": (0.5, 0.6), "eps": 0.1, "weight_decay": 0.9, "grad_clip": 1e-3, "fused": False,
                 "schedule": "wsd", "decay_frac": 0.9, "decay_shape": "1-sqrt", "muon_lr": 3e-2,
                 "muon_momentum": 0.5, "ns_steps": 1}
# Fields that act only in another setting: the base run for them sets it (step 6 then lies in the
# decay of the schedule, or the blocks' matrices are on Muon).
OPTIM_BASE = {"decay_frac": ["optim.schedule=wsd"], "decay_shape": ["optim.schedule=wsd", "optim.decay_frac=0.9"],
              "muon_lr": ["optim.name=muon"], "muon_momentum": ["optim.name=muon"], "ns_steps": ["optim.name=muon"]}
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
    """Every optim field is either re-applied on resume (tested below) or refused (RESUME_FIXED)."""
    from cs336.preflight import RESUME_FIXED

    fixed = {f.split(".", 1)[1] for f in RESUME_FIXED}
    assert set(OPTIM_CHANGES) | fixed == {f.name for f in dataclasses.fields(OptimConfig)}
    assert not set(OPTIM_CHANGES) & fixed


@pytest.mark.parametrize("name", sorted(OPTIM_CHANGES))
def test_resume_applies_a_changed_optim_field(tmp_path, name):
    """A --resume that changes optim.<name> continues with the new value, not the checkpoint's:
    the next step from the same state and batch differs from the unchanged resume."""
    cfg = apply_overrides(smoke_config(), BASE + OPTIM_BASE.get(name, []))
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


def test_a_save_checks_the_weights_once_and_takes_the_config_from_memory(tmp_path, monkeypatch):
    import cs336.checkpoint
    import cs336.trainer

    cfg = apply_overrides(smoke_config(), BASE)
    rd = RunDir(tmp_path)
    rd.create()
    trainer = _trainer(cfg, rd)
    _step(trainer, 0)
    calls = []
    real = cs336.trainer.check_weights

    def counted(*args, **kwargs):
        calls.append(kwargs.get("where"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cs336.trainer, "check_weights", counted)
    monkeypatch.setattr(cs336.checkpoint, "check_weights", counted)
    assert not rd.config_file.exists()  # nothing to re-read: the config comes from memory
    trainer.save(TrainState(step=1))
    assert calls == ["step 1"]
    saved = torch.load(rd.checkpoint_path(1), weights_only=True)["extra"]["config"]
    assert saved == config_to_dict(cfg)


def test_changed_fields_lists_only_what_differs_from_the_defaults():
    cfg = apply_overrides(smoke_config(), ["optim.lr=1e-2"])
    listed = changed_fields(cfg)
    assert "optim.lr=0.01" in listed and "model.d_model=32" in listed
    assert not any(item.startswith(("optim.eps=", "train.seed=")) for item in listed)
    assert changed_fields(type(cfg)()) == []


# ------------------------------------------------------------------ signals, lock, divergence

def test_sigint_saves_a_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "run"

    def fire_when_training():
        deadline = time.monotonic() + TIMEOUT  # a hang guard, not a time bound
        metrics = out / "metrics.jsonl"
        while time.monotonic() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    timer = threading.Thread(target=fire_when_training, daemon=True)
    timer.start()
    summary = run(cfg(out, "train.max_steps=100000", "train.checkpoint_interval=100000"))
    timer.join()
    assert summary["interrupted"] is True and summary["stop_signal"] == "SIGINT"
    stopped = summary["steps"]
    assert 2 <= stopped < 100000
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:06d}.pt"
    resumed = run(cfg(out, f"train.max_steps={stopped + 3}", "train.checkpoint_interval=100000"), resume=True)
    assert resumed["steps"] == stopped + 3 and resumed["interrupted"] is False and resumed["stop_signal"] is None
    assert steps(out)[-1] == stopped + 3


def test_sigterm_exits_0_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "cs336.train", "--preset", "smoke", "--out-dir", str(out),
                             "--max-steps", "100000", "--data.corpus_mb=0.1", "--train.progress=false",
                             "--train.log_interval=1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT  # a hang guard, not a time bound
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "checkpoint saved" in stdout and "--resume" in stdout
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / latest).is_file()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_data_preparation_is_one_line_and_leaves_no_temp_files(texts, tmp_path, sig, code):
    out = tmp_path / "run"
    proc, out_lines = start_cli(["--out-dir", str(out), "--train-text", str(texts / "train.txt"), "--valid-text",
                              str(texts / "valid.txt"), "--model.vocab_size=8000"], tmp_path)
    assert out_lines.wait_for("BPE tokenizer", proc), finish(proc)
    proc.send_signal(sig)
    err = finish(proc)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"interrupted by {signal.Signals(sig).name}: stopped while preparing data in "), err
    assert "no checkpoint was written" in lines[0]
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert not (out / "tokenizer" / "vocab.json").exists()  # the tokenizer was not finished
    if sig == signal.SIGINT:  # the same command (here a 2-step run) continues the preparation
        again = subprocess.run([sys.executable, "-m", "cs336.train", "--preset", "smoke", "--train.progress=false",
                                "--out-dir", str(out), "--train-text", str(texts / "train.txt"), "--valid-text",
                                str(texts / "valid.txt"), "--model.vocab_size=8000", "--max-steps", "2",
                                "--train.sample_tokens=0"], cwd=tmp_path, env=env(), capture_output=True,
                               text=True, timeout=TIMEOUT)
        assert again.returncode == 0, again.stderr
        assert (out / "checkpoints" / "step_000002.pt").is_file()

def test_second_run_in_the_same_out_dir_fails_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    first, first_lines = start_cli(["--out-dir", str(out), "--max-steps", "100000", "--data.corpus_mb=0.1",
                                 "--train.log_interval=1", "--train.checkpoint_interval=100000"], tmp_path)
    try:
        assert first_lines.wait_for("step 0: val loss", first), finish(first)
        metrics = (out / "metrics.jsonl").read_bytes()
        err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), "--train.progress=false"])
        assert f"in use by another training run (pid {first.pid}" in err
        assert first.poll() is None
        assert (out / "metrics.jsonl").read_bytes().startswith(metrics)  # the second run wrote nothing
    finally:
        first.send_signal(signal.SIGTERM)
        first_err = finish(first)
    assert first.returncode == 0, first_err
    assert "checkpoint saved" in first_lines.text()

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run_copy, capsys):
    ckpt = run_copy / "checkpoints" / "step_000008.pt"
    before = ckpt.read_bytes()
    with pytest.raises(TrainingDiverged) as exc:
        run(cfg(run_copy, "train.max_steps=40", "optim.lr=1e30", "optim.warmup_iters=0",
                "optim.grad_clip=0"), resume=True)
    assert "diverged" in str(exc.value) and "step_000008.pt" in str(exc.value)
    assert exc.value.summary["steps"] >= 8
    assert (run_copy / "checkpoints" / "latest").read_text().strip() == "step_000008.pt"
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("*.pt")) == ["step_000004.pt", "step_000008.pt"]
    err = cli_error(capsys, resume_args(run_copy, "--max-steps", "40", "--optim.lr=1e30",
                                        "--optim.warmup_iters=0", "--optim.grad_clip=0"), code=1)
    assert "lower --optim.lr" in err

def test_exploding_run_stops_before_a_bad_checkpoint(run_copy):
    with pytest.raises(TrainingDiverged) as exc:
        run(cfg(run_copy, "train.max_steps=60", "train.checkpoint_interval=1", "optim.lr=30",
                "optim.warmup_iters=0", "optim.grad_clip=0"), resume=True)
    assert "diverged" in str(exc.value) and "checkpoint" in str(exc.value)
    files = sorted((run_copy / "checkpoints").glob("step_*.pt"))
    assert files
    for path in files:
        verify_checkpoint(path, max_abs=1e4)  # every checkpoint kept holds finite, bounded weights

def test_loss_spike_stops_the_step_and_names_the_last_good_checkpoint(run_copy):
    guard = DivergenceGuard(warmup_steps=3, checkpoints_dir=run_copy / "checkpoints")
    trainer = SimpleNamespace(rd=RunDir(run_copy), cfg=cfg(run_copy))
    state = TrainState(step=10)
    for _ in range(3):
        check_step(state, trainer, torch.tensor(5.0), torch.tensor(1.0), 1e-3, guard)
    with pytest.raises(TrainingDiverged) as exc:
        check_step(state, trainer, torch.tensor(16.0), torch.tensor(1.0), 1e-3, guard)
    assert "more than 3x its running mean" in str(exc.value)
    assert "step_000008.pt" in str(exc.value)
    with pytest.raises(TrainingDiverged, match="gradient norm is inf"):
        check_step(state, trainer, torch.tensor(5.0), torch.tensor(float("inf")), 1e-3, guard)

# ------------------------------------------------------------------ gradient accumulation
# N micro-batches per optimizer step give one batch's gradients, losses and weights (up to
# rounding); DDP all-reduces only on the last micro-batch.

TOKENS = np.random.default_rng(0).integers(0, 320, 5_000).astype(np.uint16)  # also for the backend test


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

# ------------------------------------------------------------------ the optimizer step's backend
# It follows the model's kernel backend, whatever the global one is (``opt.step()`` outside
# ``ops.use_backend(cfg.model.kernels)`` once ran the Triton AdamW under ``--kernels torch``).

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

def test_a_first_checkpoint_refused_for_its_weights_says_to_run_again_not_to_resume(tmp_path):
    """The weight bound refusing the very first checkpoint: the message said 'Resume from the last
    good checkpoint ... No good checkpoint exists yet'."""
    with pytest.raises(TrainingDiverged) as exc:
        run(cfg(tmp_path / "run", "train.max_steps=2", "train.diverge_max_weight=0.01"))
    message = str(exc.value)
    assert "|w| > 0.01" in message and "Resume" not in message
    assert f"No checkpoint was written yet; run the same command --out-dir {tmp_path / 'run'} again" in message


def test_resuming_from_a_sharded_checkpoint_in_one_process_releases_the_preflight_copy(tmp_path, monkeypatch):
    """open_run_dir reads (consolidates) the checkpoint to verify it and hands that dict to restore;
    for a .dcp directory restore loads the shards itself, and the consolidated weights stayed
    referenced by train() for the whole run (a second copy of the model in host memory)."""
    import torch.distributed as dist

    from cs336.checkpoint import read_checkpoint
    from cs336.distributed import DistInfo
    from cs336.run_dir import RunDir
    from cs336.sharded_checkpoint import save_sharded
    from cs336.trainer import Trainer
    from run_helpers import free_port

    config = cfg(tmp_path / "run")
    rd = RunDir(tmp_path / "run")
    rd.create()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        source = Trainer(config, rd, torch.device("cpu"), DistInfo(), None, None)
        path = rd.checkpoint_path(4, sharded=True)
        save_sharded(source.model, source.opt, 4, path, True, config={}, data_rng=source.gen.get_state(),
                     tracker={})
    finally:
        dist.destroy_process_group()
    payload = read_checkpoint(path)
    assert payload["model"]
    target = Trainer(config, rd, torch.device("cpu"), DistInfo(), None, None)
    state = target.restore(path, payload)
    assert state.step == 4 and payload == {}
    for a, b in zip(source.model.parameters(), target.model.parameters(), strict=True):
        assert torch.equal(a, b)
