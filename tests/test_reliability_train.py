"""Reliability of ``python -m cs336.train`` as a user meets it: interruption outside the training
loop, concurrent runs, directories that are not run directories, corrupt checkpoints on resume,
divergence, and values that cannot work (issue 12). Real processes and real signals where that is
what users do; readiness is a line of output or a file, never a sleep of fixed length."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cs336.checkpoint_integrity import verify_checkpoint
from cs336.divergence import DivergenceGuard
from cs336.run_dir import RunDir
from cs336.train import run
from cs336.trainer import TrainingDiverged, TrainState, check_step
from test_train_reliability import base_run, cfg, cli_error, resume_args, run_copy  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


class Lines:
    """Collects a pipe's lines in a thread; ``wait_for(text)`` blocks until one contains it."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for line in iter(pipe.readline, ""):
            self.lines.append(line)

    def wait_for(self, text: str, proc) -> bool:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if any(text in line for line in self.lines):
                return True
            time.sleep(0.02)
        return any(text in line for line in self.lines)

    def text(self) -> str:
        self._thread.join(timeout=TIMEOUT)
        return "".join(self.lines)


def _train(args, cwd) -> tuple[subprocess.Popen, Lines]:
    """Start the CLI; its stdout lines are collected (``Lines``), stderr by ``_finish``."""
    proc = subprocess.Popen([sys.executable, "-m", "cs336.train", "--preset", "smoke", "--train.progress=false",
                             *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.err_lines = Lines(proc.stderr)
    return proc, Lines(proc.stdout)


def _finish(proc) -> str:
    """Wait for ``proc`` (started by ``_train``); its stderr."""
    proc.wait(timeout=TIMEOUT)
    return proc.err_lines.text()


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A training text whose BPE training takes several seconds, and a small valid text."""
    root = tmp_path_factory.mktemp("texts")
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrst"), size=rng.integers(3, 12))) for _ in range(30000)]
    (root / "train.txt").write_text(" ".join(rng.choice(words, size=300_000)), encoding="utf-8")
    (root / "valid.txt").write_text(" ".join(rng.choice(words, size=5_000)), encoding="utf-8")
    return root


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_data_preparation_is_one_line_and_leaves_no_temp_files(texts, tmp_path, sig, code):
    out = tmp_path / "run"
    proc, out_lines = _train(["--out-dir", str(out), "--train-text", str(texts / "train.txt"), "--valid-text",
                              str(texts / "valid.txt"), "--model.vocab_size=8000"], tmp_path)
    assert out_lines.wait_for("BPE tokenizer", proc), _finish(proc)
    proc.send_signal(sig)
    err = _finish(proc)
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
                                "--train.sample_tokens=0"], cwd=tmp_path, env=_env(), capture_output=True,
                               text=True, timeout=TIMEOUT)
        assert again.returncode == 0, again.stderr
        assert (out / "checkpoints" / "step_000002.pt").is_file()


def test_second_run_in_the_same_out_dir_fails_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    first, first_lines = _train(["--out-dir", str(out), "--max-steps", "100000", "--data.corpus_mb=0.1",
                                 "--train.log_interval=1", "--train.checkpoint_interval=100000"], tmp_path)
    try:
        assert first_lines.wait_for("step 0: val loss", first), _finish(first)
        metrics = (out / "metrics.jsonl").read_bytes()
        err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), "--train.progress=false"])
        assert f"in use by another training run (pid {first.pid}" in err
        assert first.poll() is None
        assert (out / "metrics.jsonl").read_bytes().startswith(metrics)  # the second run wrote nothing
    finally:
        first.send_signal(signal.SIGTERM)
        first_err = _finish(first)
    assert first.returncode == 0, first_err
    assert "checkpoint saved" in first_lines.text()


def test_ordinary_non_empty_directory_is_refused_and_untouched(tmp_path, capsys):
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "config.json").write_text('{"mine": true}\n')
    (docs / "metrics.jsonl").write_text("my notes\n")
    before = {p.name: p.read_bytes() for p in docs.iterdir()}
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(docs), "--train.progress=false"])
    assert "is not a run directory" in err and "pass a new or empty directory" in err
    assert {p.name: p.read_bytes() for p in docs.iterdir()} == before


def test_runs_without_out_dir_get_distinct_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = run(cfg(None, "train.max_steps=1", "train.eval_interval=1", "train.checkpoint_interval=1"))
    b = run(cfg(None, "train.max_steps=1", "train.eval_interval=1", "train.checkpoint_interval=1"))
    assert a["run_dir"] != b["run_dir"]
    assert all((tmp_path / s["run_dir"] / ".cs336-run").is_file() for s in (a, b))


def test_flipped_bytes_are_refused_on_resume_naming_the_previous_checkpoint(run_copy, capsys):  # noqa: F811
    ckpt = run_copy / "checkpoints" / "step_000008.pt"
    data = bytearray(ckpt.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 400):
        data[i] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    config = (run_copy / "config.json").read_bytes()
    err = cli_error(capsys, resume_args(run_copy, "--max-steps", "10"))
    assert str(ckpt) in err and "step_000004.pt" in err
    assert "training a" not in capsys.readouterr().out  # refused before any data work
    assert (run_copy / "config.json").read_bytes() == config


def test_exploding_run_stops_before_a_bad_checkpoint(run_copy):  # noqa: F811
    with pytest.raises(TrainingDiverged) as exc:
        run(cfg(run_copy, "train.max_steps=60", "train.checkpoint_interval=1", "optim.lr=30",
                "optim.warmup_iters=0", "optim.grad_clip=0"), resume=True)
    assert "diverged" in str(exc.value) and "checkpoint" in str(exc.value)
    files = sorted((run_copy / "checkpoints").glob("step_*.pt"))
    assert files
    for path in files:
        verify_checkpoint(path, max_abs=1e4)  # every checkpoint kept holds finite, bounded weights


def test_loss_spike_stops_the_step_and_names_the_last_good_checkpoint(run_copy):  # noqa: F811
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


@pytest.mark.parametrize("flag, fragment", [
    ("--optim.lr=nan", "--optim.lr='nan' is not a finite number"),
    ("--optim.lr=inf", "--optim.lr='inf' is not a finite number"),
    ("--optim.betas=0.9,inf", "--optim.betas='inf' is not a finite number"),
    ("--max-steps=1e30", "does not fit a 64-bit integer"),
    ("--model.d_model=99999999999999999999999", "does not fit a 64-bit integer"),
    ("--train.sample_temperature=-inf", "not a finite number"),
])
def test_non_finite_or_oversized_flags_are_refused(flag, fragment, tmp_path, capsys):
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(tmp_path / "run"), flag])
    assert fragment in err
    assert not (tmp_path / "run").exists()


def test_config_file_that_is_not_text_is_refused(tmp_path, capsys):
    binary = tmp_path / "conf.json"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary")
    err = cli_error(capsys, ["--config", str(binary), "--out-dir", str(tmp_path / "run")])
    assert "not a text config file" in err and str(binary) in err
    latin = tmp_path / "latin.toml"
    latin.write_bytes("[optim]\nlr = 1e-3 # caf\xe9\n".encode("latin-1"))
    err = cli_error(capsys, ["--config", str(latin), "--out-dir", str(tmp_path / "run")])
    assert "not UTF-8 text" in err


def test_empty_sample_prompt_fails_before_any_work(tmp_path, capsys):
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(tmp_path / "run"), "--train.sample_prompt="])
    assert "train.sample_prompt is empty" in err
    assert not (tmp_path / "run").exists()


def test_tokenizer_dir_larger_than_the_model_fails_before_any_work(base_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), "--model.vocab_size=300",
                             f"--data.tokenizer_dir={base_run / 'tokenizer'}", "--train.progress=false"])
    assert "has 320 token ids but the model has 300 embedding rows" in err
    assert "--model.vocab_size=320" in err
    assert not out.exists()


def test_missing_or_empty_input_paths_fail_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    valid = tmp_path / "valid.txt"
    valid.write_text("some text\n")
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), "--train-text", str(tmp_path / "nope.txt"),
                             "--valid-text", str(valid)])
    assert f"--train-text {tmp_path / 'nope.txt'} does not exist" in err
    (tmp_path / "empty.txt").write_text("")
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), "--train-text", str(tmp_path / "empty.txt"),
                             "--valid-text", str(valid)])
    assert "is empty" in err
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), f"--data.tokenizer_dir={tmp_path}"])
    assert "vocab.json" in err and "does not exist" in err
    assert not out.exists()


def test_model_too_large_for_the_device_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    err = cli_error(capsys, ["--preset", "smoke", "--out-dir", str(out), "--device", "cpu",
                             "--model.d_model=131072", "--model.d_ff=131072", "--model.num_heads=2"])
    assert "training this model needs about" in err and "lower --model.d_model" in err
    assert not out.exists()
