"""Run-directory ownership, the exclusive lock (two real processes), unique run names, the
resume-conflict diff, the tokenizer/model check, divergence detection and up-front validation."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cs336.checkpoint import save_checkpoint
from cs336.divergence import Diverged, DivergenceGuard
from cs336.model import TransformerLM
from cs336.run_guard import (
    LOCK,
    MARKER,
    RunDirBusy,
    RunDirRefused,
    RunLock,
    check_tokenizer_fits_model,
    claim_run_dir,
    config_conflicts,
    is_run_dir,
    new_run_dir,
)
from cs336.validate import FlagError, existing_file, read_text_file, writable_dir

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ marker and ownership

def test_new_and_empty_directories_are_claimed(tmp_path):
    fresh = claim_run_dir(tmp_path / "a" / "b")
    assert (fresh / MARKER).is_file() and is_run_dir(fresh)
    (tmp_path / "empty").mkdir()
    assert (claim_run_dir(tmp_path / "empty") / MARKER).is_file()
    assert json.loads((fresh / MARKER).read_text())["pid"] == os.getpid()


def test_ordinary_non_empty_directory_is_refused_and_left_alone(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "config.json").write_text("my own file")
    with pytest.raises(RunDirRefused, match=r"holds files \(config\.json\) and is not a run directory"):
        claim_run_dir(docs)
    assert sorted(p.name for p in docs.iterdir()) == ["config.json"]
    assert (docs / "config.json").read_text() == "my own file"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirRefused, match="is a file"):
        claim_run_dir(tmp_path / "file")


def test_existing_run_directories_are_accepted(tmp_path):
    run = claim_run_dir(tmp_path / "run")
    (run / "metrics.jsonl").write_text("{}\n")
    assert claim_run_dir(run) == run
    legacy = tmp_path / "legacy"  # written before the marker existed
    (legacy / "checkpoints").mkdir(parents=True)
    (legacy / "config.json").write_text("{}")
    assert claim_run_dir(legacy) == legacy and (legacy / MARKER).is_file()


def test_run_names_never_collide(tmp_path):
    made = {new_run_dir(tmp_path) for _ in range(50)}
    assert len(made) == 50 and all((p / MARKER).is_file() for p in made)


# ------------------------------------------------------------------ lock, two real processes

HOLDER = textwrap.dedent("""
    import sys, time
    from cs336.run_guard import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()   # hold until the test says so
    print("released", flush=True)
""")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_second_process_fails_at_once_while_the_first_holds_the_lock(tmp_path):
    run = claim_run_dir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom cs336.run_guard import RunLock, RunDirBusy\n"
             "try:\n    RunLock(sys.argv[1]).acquire()\nexcept RunDirBusy as e:\n    print(e); sys.exit(3)",
             str(run)], capture_output=True, text=True, env=_env(), timeout=120)
        assert second.returncode == 3
        assert "in use by another training run" in second.stdout and f"pid {holder.pid}" in second.stdout
        with pytest.raises(RunDirBusy):
            RunLock(run).acquire()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
    finally:
        holder.kill() if holder.poll() is None else None
        holder.wait(timeout=60)
    with RunLock(run):  # free again
        pass


def test_lock_of_a_killed_process_is_released(tmp_path):
    run = claim_run_dir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(timeout=60)
    lock = RunLock(run).acquire()
    assert f"pid {os.getpid()}" in (run / LOCK).read_text()
    lock.release()


# ------------------------------------------------------------------ resume conflicts, tokenizer fit

def test_config_conflicts_lists_changed_leaves_except_allowed():
    saved = {"model": {"d_model": 64, "num_layers": 2}, "train": {"max_steps": 100, "lr": 1e-3},
             "data": {"special_tokens": ["<|endoftext|>"]}}
    requested = {"model": {"d_model": 128, "num_layers": 2}, "train": {"max_steps": 500, "lr": 1e-3},
                 "data": {"special_tokens": ("<|endoftext|>",)}}
    assert config_conflicts(saved, requested, allowed=("train.max_steps",)) == [
        "model.d_model: saved 64, requested 128"]
    assert config_conflicts(saved, saved) == []


def test_tokenizer_larger_than_model_is_refused():
    check_tokenizer_fits_model(500, 500)
    with pytest.raises(ValueError, match=r"600 token ids .* 500 embedding rows .* --model\.vocab_size=600"):
        check_tokenizer_fits_model(600, 500)


# ------------------------------------------------------------------ divergence

def test_loss_spike_is_caught_before_nan_and_names_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=40, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=24,
                          rope_theta=10_000.0, kernels="torch")
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(model, None, 10, ckpts / "step_000010.pt")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)  # an exploded state saved by something else
    torch.save({"model": model.state_dict(), "iteration": 20}, ckpts / "step_000020.pt")
    guard = DivergenceGuard(checkpoints_dir=ckpts, warmup_steps=5)
    losses = [4.0 - 0.01 * i for i in range(30)]
    for step, loss in enumerate(losses, 1):
        guard.check(step, loss, grad_norm=1.0)
    guard.check(31, 7.0, 2.0)  # noisy but under 3x
    with pytest.raises(Diverged) as info:
        guard.check(32, 40.0, grad_norm=5.0)
    message = str(info.value)
    assert "step 32" in message and "running mean" in message
    assert str(ckpts / "step_000010.pt") in message  # step 20 holds weights far beyond 1e4


@pytest.mark.parametrize("loss, grad, pattern", [(math.nan, 1.0, "loss is nan"),
                                                  (2.0, math.inf, "gradient norm is inf"),
                                                  (2.0, 500.0, "exceeds the limit 100")])
def test_non_finite_values_and_grad_limit(loss, grad, pattern):
    guard = DivergenceGuard(max_grad_norm=100.0)
    guard.check(1, 3.0, 1.0)
    with pytest.raises(Diverged, match=pattern):
        guard.check(2, loss, grad)
    with pytest.raises(Diverged, match="No good checkpoint exists yet"):
        DivergenceGuard().check(1, math.nan)


def test_early_spikes_during_warmup_do_not_fire():
    guard = DivergenceGuard(warmup_steps=10)
    for step, loss in enumerate([10.0, 9.0, 30.0, 8.0, 7.5], 1):
        guard.check(step, loss)
    with pytest.raises(ValueError, match="spike_factor"):
        DivergenceGuard(spike_factor=0.5)


# ------------------------------------------------------------------ validation

def test_path_validation(tmp_path):
    with pytest.raises(FlagError, match="--train-text .* does not exist"):
        existing_file("--train-text", tmp_path / "missing.txt")
    with pytest.raises(FlagError, match="is a directory"):
        existing_file("--train-text", tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(FlagError, match="is a file; pass a directory"):
        writable_dir("--out-dir", tmp_path / "f")
    assert writable_dir("--out-dir", tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"


def test_config_file_that_is_not_text(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"a": torch.zeros(3)}, ckpt)
    with pytest.raises(FlagError, match=r"--config .* is a zip archive \(a checkpoint\?\)"):
        read_text_file("--config", ckpt)
    (tmp_path / "latin1.json").write_bytes('{"x": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(FlagError, match="not UTF-8 text"):
        read_text_file("--config", tmp_path / "latin1.json")
    (tmp_path / "ok.json").write_text('{"x": 1}')
    assert read_text_file("--config", tmp_path / "ok.json") == '{"x": 1}'
