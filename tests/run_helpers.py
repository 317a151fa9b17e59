"""Helpers of the main-job tests (tests/test_train.py, tests/test_trainer.py): a small run's
config, the CLI's one-line error, and a CLI process whose output lines a test can wait for
(readiness is a line of output or a file, never a sleep of fixed length)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cs336.config_io import apply_overrides
from cs336.presets import smoke_config
from cs336.train import main

TIMEOUT = 300


BASE = ["train.max_steps=8", "train.eval_interval=4", "train.log_interval=2", "train.checkpoint_interval=4",
        "train.sample_tokens=0", "data.corpus_mb=0.1"]


ROOT = Path(__file__).resolve().parents[1]


def cfg(out_dir, *extra):
    return apply_overrides(smoke_config(), BASE + [f"train.out_dir={out_dir}", *extra])


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


def env():
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


def start_cli(args, cwd) -> tuple[subprocess.Popen, Lines]:
    """Start the CLI; its stdout lines are collected (``Lines``), stderr by ``finish``."""
    proc = subprocess.Popen([sys.executable, "-m", "cs336.train", "--preset", "smoke", "--train.progress=false",
                             *args], cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.err_lines = Lines(proc.stderr)
    return proc, Lines(proc.stdout)


def finish(proc) -> str:
    """Wait for ``proc`` (started by ``start_cli``); its stderr."""
    proc.wait(timeout=TIMEOUT)
    return proc.err_lines.text()


def token_args(base_run, train_path, valid_path, out_dir):
    return ["--preset", "smoke", "--out-dir", str(out_dir), "--train.progress=false",
            f"--data.train_tokens={train_path}", f"--data.valid_tokens={valid_path}",
            f"--data.tokenizer_dir={base_run / 'tokenizer'}"]


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    """Two runs' metrics rows agree step for step (losses, gradient norm, learning rate)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "grad_norm", "lr"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (ra["step"], key)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a test's process-group rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
