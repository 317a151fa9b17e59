"""Interruption: SIGINT/SIGTERM end a command with one line and 130/143, no traceback, no crash,
no temporary file; signals landing inside numba never tear compiled code (the encode segfault).

Real processes and real signals: each command is started as users start it, the test waits for a
sign that work has begun (a temporary output file, a progress bar), then signals it."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cs336.interrupt import Interrupted, deferred_signals, handling_signals, run_cli
from cs336.tokenizer.__main__ import main
from cs336.tokenizer.gpt2_files import save_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # generous: the machine may be loaded; no assertion depends on speed


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture(scope="module")
def letters_tok(tmp_path_factory):
    """A tokenizer with a few merges over letters, and a 6 MB file that is one word."""
    root = tmp_path_factory.mktemp("intr")
    vocab = {b: bytes([b]) for b in range(256)}
    merges = [(b"a", b"b"), (b"c", b"d"), (b"ab", b"cd")]
    for i, (a, b) in enumerate(merges):
        vocab[256 + i] = a + b
    save_tokenizer_dir(root / "tok", vocab, merges, [])
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
    (root / "word.txt").write_bytes(rng.choice(letters, size=6_000_000).tobytes())
    return root


def _start_and_signal(cmd, ready, sig, cwd=None):
    """Start ``cmd``, wait until ``ready()`` is true, send ``sig``; return (rc, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=cwd)
    deadline = time.monotonic() + TIMEOUT
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err.decode("utf-8", "replace")


def _one_clean_line(err: str, signame: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "Fatal Python error" not in err and "Segmentation" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"interrupted by {signame}: "), err
    return lines[0]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_encode_of_one_long_word_interrupted(letters_tok, tmp_path, sig, code):
    out = tmp_path / "word.bin"
    cmd = [sys.executable, "-m", "cs336.tokenizer", "encode", "--tokenizer-dir", str(letters_tok / "tok"),
           "--input", str(letters_tok / "word.txt"), "--out", str(out), "--quiet"]
    rc, err = _start_and_signal(cmd, lambda: any(tmp_path.glob(".word.bin.*")), sig)
    assert rc == code, err
    line = _one_clean_line(err, sig.name)
    assert "while encoding" in line and f"{out} was not created" in line
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


def test_interrupted_encode_keeps_the_previous_output(letters_tok, tmp_path):
    out = tmp_path / "word.bin"
    out.write_bytes(b"previous")
    cmd = [sys.executable, "-m", "cs336.tokenizer", "encode", "--tokenizer-dir", str(letters_tok / "tok"),
           "--input", str(letters_tok / "word.txt"), "--out", str(out), "--quiet"]
    rc, err = _start_and_signal(cmd, lambda: any(tmp_path.glob(".word.bin.*")), signal.SIGINT)
    assert rc == 130 and f"{out} is unchanged" in _one_clean_line(err, "SIGINT")
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["word.bin"]


STRESS = textwrap.dedent("""
    import contextlib, os, random, signal, sys, threading, time
    from cs336.interrupt import Interrupted, handling_signals, _numba_root
    from cs336.tokenizer import Tokenizer
    mode, rounds = sys.argv[1], int(sys.argv[2])
    vocab = {b: bytes([b]) for b in range(256)}
    vocab[256] = b"ab"
    tok = Tokenizer(vocab, [(b"a", b"b")])
    text = "ab" * 20000            # one pre-token: each call is mostly compiled code
    tok.encode_array(text)
    go = threading.Event()
    def pester():                  # one SIGINT per round, 0.5-3 ms into the encode loop
        rng = random.Random(0)
        while True:
            go.wait()
            go.clear()
            time.sleep(rng.uniform(0.0005, 0.003))
            os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=pester, daemon=True).start()
    expected = Interrupted if mode == "cli" else KeyboardInterrupt
    caught = 0
    for _ in range(rounds):
        try:
            with handling_signals() if mode == "cli" else contextlib.nullcontext():
                go.set()
                while True:
                    tok.encode_array(text)
        except expected as exc:
            tb = exc.__traceback__
            while tb is not None:
                assert not tb.tb_frame.f_code.co_filename.startswith(_numba_root()), "raised inside numba"
                tb = tb.tb_next
            assert sys.gettrace() is None, "tracing left on"
            caught += 1
    print("caught", caught)
""")


@pytest.mark.parametrize("mode", ["cli", "library"])
def test_signals_hammering_numba_calls_never_crash(mode):
    # Without the deferral this fails within a few rounds (SystemError "returned a result with an
    # exception set" from encode_pieces, or a segfault). "library": Python's default handler, made
    # numba-safe by the Tokenizer; "cli": cs336.interrupt.handling_signals.
    proc = subprocess.run([sys.executable, "-c", STRESS, mode, "40"], capture_output=True, text=True,
                          env=_env(), timeout=TIMEOUT)
    assert proc.returncode == 0 and proc.stdout.strip() == "caught 40", proc.stderr[-2000:]


@pytest.mark.slow
def test_bpe_training_interrupted(tmp_path):
    rng = np.random.default_rng(1)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(3, 12))) for _ in range(20000)]
    (tmp_path / "text.txt").write_text(" ".join(rng.choice(words, size=400_000)), encoding="utf-8")
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "cs336.tokenizer", "train", "--input", str(tmp_path / "text.txt"),
           "--vocab-size", "20000", "--out-dir", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    seen = b""
    while b"merge" not in seen and proc.poll() is None:  # the merge bar: pre-tokenization is done
        seen += os.read(proc.stderr.fileno(), 4096)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=TIMEOUT)
    err = (seen + rest).decode("utf-8", "replace")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Fatal Python error" not in err
    assert "interrupted by SIGINT: stopped while training a 20000-token BPE vocabulary" in err
    assert f"nothing was written to {out}" in err
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.slow
def test_parallel_encode_interrupted_leaves_no_worker_tracebacks(tmp_path):
    rng = np.random.default_rng(2)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 9))) for _ in range(5000)]
    (tmp_path / "big.txt").write_text(" ".join(rng.choice(words, size=3_000_000)), encoding="utf-8")
    vocab = {b: bytes([b]) for b in range(256)}
    save_tokenizer_dir(tmp_path / "tok", vocab, [], [])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [sys.executable, "-m", "cs336.tokenizer", "encode", "--tokenizer-dir", str(tmp_path / "tok"),
           "--input", str(tmp_path / "big.txt"), "--out", str(out_dir / "big.bin"), "--quiet", "--workers", "2"]
    # Ctrl-C in a terminal reaches the whole process group: do the same.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), start_new_session=True)
    while not any(out_dir.glob(".big.bin.*")) and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(0.3)  # let the pool start working
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err
    _one_clean_line(err.decode(), "SIGINT")
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------ run_cli and deferral

def test_run_cli_user_error_is_one_line_exit_2(capsys):
    def body():
        raise ValueError("data/x.txt: not UTF-8; convert it")
    with pytest.raises(SystemExit) as info:
        run_cli(body)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: data/x.txt: not UTF-8; convert it\n"


def test_run_cli_only_rank_0_prints(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert info.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        run_cli(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert capsys.readouterr().err == "error: boom\n"


def test_run_cli_interrupt_reports_what_was_kept(capsys):
    def body():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives before this ends
    with pytest.raises(SystemExit) as info:
        run_cli(body, on_interrupt=lambda: "kept checkpoint step_000010.pt")
    assert info.value.code == 143
    assert capsys.readouterr().err == "interrupted by SIGTERM: kept checkpoint step_000010.pt\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_run_cli_exit_codes_per_error_type(capsys):
    class Diverged(RuntimeError):
        pass

    with pytest.raises(SystemExit) as info:
        run_cli(lambda: (_ for _ in ()).throw(Diverged("loss is nan")), exit_codes={Diverged: 1})
    assert info.value.code == 1 and capsys.readouterr().err == "error: loss is nan\n"


def test_run_cli_lets_bugs_keep_their_traceback():
    with pytest.raises(SystemExit):
        run_cli(lambda: (_ for _ in ()).throw(ValueError("user")))
    with pytest.raises(KeyError):
        run_cli(lambda: {}["bug"])


def test_deferred_block_raises_at_its_end():
    done = []
    with pytest.raises(Interrupted) as info:
        with handling_signals():
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                done.append("rest of the block ran")
    assert done == ["rest of the block ran"] and info.value.exit_code == 130


# ------------------------------------------------------------------ never write over inputs

def _exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_encode_refuses_out_equal_to_input_or_inside_the_tokenizer(letters_tok, tmp_path, capsys):
    text = tmp_path / "in.txt"
    text.write_text("hello world", encoding="utf-8")
    tok = letters_tok / "tok"
    before = {p.name: p.read_bytes() for p in tok.iterdir()}
    base = ["encode", "--tokenizer-dir", str(tok), "--input", str(text), "--quiet"]
    alias = tmp_path / "sub" / ".." / "in.txt"
    (tmp_path / "sub").mkdir()
    for out in (text, alias):
        assert "would overwrite the input" in _exit_2(base + ["--out", str(out)], capsys)
    assert "inside the tokenizer directory" in _exit_2(base + ["--out", str(tok / "vocab.json")], capsys)
    assert "inside the tokenizer directory" in _exit_2(base + ["--out", str(tok / "x.bin")], capsys)
    assert text.read_text(encoding="utf-8") == "hello world"
    assert {p.name: p.read_bytes() for p in tok.iterdir()} == before


def test_train_refuses_out_that_would_overwrite_its_input(tmp_path, capsys):
    out = tmp_path / "tok"
    out.mkdir()
    src = out / "merges.txt"
    src.write_text("some text to train on " * 20, encoding="utf-8")
    err = _exit_2(["train", "--input", str(src), "--vocab-size", "260", "--out-dir", str(out)], capsys)
    assert "would overwrite the input" in err
    assert src.read_text(encoding="utf-8") == "some text to train on " * 20
    assert "--workers 0" in _exit_2(["train", "--input", str(src), "--vocab-size", "260", "--out-dir",
                                     str(tmp_path / "t2"), "--workers", "0"], capsys)
