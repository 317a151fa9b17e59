"""Failure handling of the main job: signals, divergence, bad checkpoints, bad token files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cs336.config import smoke_config
from cs336.config_io import apply_overrides
from cs336.data import save_tokens
from cs336.train import TrainingDiverged, main, run

BASE = ["train.max_steps=8", "train.eval_interval=4", "train.log_interval=2", "train.checkpoint_interval=4",
        "train.sample_tokens=0", "data.corpus_mb=0.1"]
ROOT = Path(__file__).resolve().parents[1]


def cfg(out_dir, *extra):
    return apply_overrides(smoke_config(), BASE + [f"train.out_dir={out_dir}", *extra])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 8-step run (checkpoints at 4 and 8) that tests copy and damage."""
    out = tmp_path_factory.mktemp("base") / "run"
    run(cfg(out))
    return out


@pytest.fixture
def run_copy(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def cli_error(capsys, argv, code=2):
    """Run the CLI, expect SystemExit(code); return stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def resume_args(run_dir, *extra):
    return ["--out-dir", str(run_dir), "--resume", "--train.progress=false", *extra]


def steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigint_saves_a_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "run"

    def fire_when_training():
        deadline = time.time() + 60
        metrics = out / "metrics.jsonl"
        while time.time() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    timer = threading.Thread(target=fire_when_training, daemon=True)
    timer.start()
    summary = run(cfg(out, "train.max_steps=100000", "train.checkpoint_interval=100000"))
    timer.join()
    assert summary["interrupted"] is True
    stopped = summary["steps"]
    assert 2 <= stopped < 100000
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:06d}.pt"
    resumed = run(cfg(out, f"train.max_steps={stopped + 3}", "train.checkpoint_interval=100000"), resume=True)
    assert resumed["steps"] == stopped + 3 and resumed["interrupted"] is False
    assert steps(out)[-1] == stopped + 3


def test_sigterm_exits_0_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "cs336.train", "--preset", "smoke", "--out-dir", str(out),
                             "--max-steps", "100000", "--data.corpus_mb=0.1", "--train.progress=false",
                             "--train.log_interval=1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "checkpoint saved" in stdout and "--resume" in stdout
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / latest).is_file()


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


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or corrupt"),
    (lambda p: p.write_bytes(b"not a checkpoint at all"), "truncated or corrupt"),
    (lambda p: torch.save({"w": torch.zeros(2)}, p), "not a training checkpoint"),
])
def test_damaged_checkpoints_give_one_clear_error(run_copy, capsys, damage, fragment):
    ckpt = run_copy / "checkpoints" / "step_000008.pt"
    damage(ckpt)
    err = cli_error(capsys, resume_args(run_copy, "--max-steps", "10"))
    assert fragment in err and str(ckpt) in err


def test_resume_with_a_conflicting_model_flag_is_refused_before_writing(run_copy, capsys):
    config = (run_copy / "config.json").read_bytes()
    err = cli_error(capsys, resume_args(run_copy, "--max-steps", "10", "--model.d_model=64"))
    assert "differ from" in err and "model.d_model: saved 32, requested 64" in err
    assert (run_copy / "config.json").read_bytes() == config


def test_resume_and_restart_guards(run_copy, tmp_path, capsys):
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(run_copy), "--train.progress=false"])
    assert "already holds checkpoints" in err and "--resume" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = cli_error(capsys, ["--out-dir", str(empty), "--resume"])
    assert "config.json" in err
    (run_copy / "checkpoints" / "latest").write_text("step_999999.pt\n")
    err = cli_error(capsys, resume_args(run_copy))
    assert "latest" in err and "step_999999.pt" in err


def _token_args(base_run, train_path, valid_path, out_dir):
    return ["--preset", "smoke", "--out-dir", str(out_dir), "--train.progress=false",
            f"--data.train_tokens={train_path}", f"--data.valid_tokens={valid_path}",
            f"--data.tokenizer_dir={base_run / 'tokenizer'}"]


def test_empty_token_file(base_run, tmp_path, capsys):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    err = cli_error(capsys, _token_args(base_run, empty, base_run / "data" / "valid.bin", tmp_path / "o"))
    assert str(empty) in err and "empty" in err


def test_token_file_with_wrong_dtype(base_run, tmp_path, capsys):
    tokens = np.fromfile(base_run / "data" / "train.bin", dtype=np.uint16)
    wide = tmp_path / "wide.bin"
    tokens.astype(np.uint32).tofile(wide)  # raw uint32 without a sidecar: read as uint16 by default
    (tmp_path / "wide.bin.json").write_text(json.dumps({"dtype": "uint16", "count": int(tokens.size)}))
    err = cli_error(capsys, _token_args(base_run, wide, base_run / "data" / "valid.bin", tmp_path / "o"))
    assert str(wide) in err and "truncated or was overwritten" in err


def test_token_ids_beyond_the_vocabulary(base_run, tmp_path, capsys):
    foreign = tmp_path / "foreign.bin"
    save_tokens(foreign, np.arange(1000, 2000))
    err = cli_error(capsys, _token_args(base_run, foreign, base_run / "data" / "valid.bin", tmp_path / "o"))
    assert str(foreign) in err and "another tokenizer" in err


def test_token_file_shorter_than_one_window(base_run, tmp_path, capsys):
    short = tmp_path / "short.bin"
    save_tokens(short, np.arange(10))
    err = cli_error(capsys, _token_args(base_run, short, base_run / "data" / "valid.bin", tmp_path / "o"))
    assert str(short) in err and "context_length" in err


def test_context_longer_than_the_model(capsys, tmp_path):
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(tmp_path / "o"), "--train.context_length=64"])
    assert "train.context_length=64 exceeds model.context_length=32" in err


def test_missing_text_files(capsys, tmp_path):
    err = cli_error(capsys, ["--out-dir", str(tmp_path / "o"), "--train-text", str(tmp_path / "nope.txt"),
                             "--valid-text", str(tmp_path / "nope2.txt")])
    assert "--train-text" in err and "nope.txt" in err


def test_text_that_is_not_utf8(capsys, tmp_path):
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_bytes(b"a fine start " * 50 + b"\xff\xfe broken " * 5)
    valid.write_text("fine text " * 50)
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(tmp_path / "o"), "--train.progress=false",
                             "--train-text", str(train), "--valid-text", str(valid)])
    assert str(train) in err and "UTF-8" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no CUDA device exists")
def test_triton_kernels_without_a_gpu(base_run, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    err = cli_error(capsys, _token_args(base_run, base_run / "data" / "train.bin", base_run / "data" / "valid.bin",
                                        tmp_path / "o") + ["--kernels", "triton"])
    assert "--kernels triton needs a CUDA device" in err
    assert not (tmp_path / "o").exists(), "the backend check must come before any file is written"


def test_unknown_flag_names_the_closest_valid_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model.d_modle=64"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--model.d_modle=64" in err and "--model.d_model" in err
