"""``python -m cs336.tokenizer train|encode`` and the multi-worker file encoder behind ``encode``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cs336.tokenizer import Tokenizer, train_bpe
from cs336.tokenizer.__main__ import main
from cs336.tokenizer.encode_file import encode_file, iter_chunks, token_dtype
from cs336.tokenizer.gpt2_files import load_tokenizer_dir, save_tokenizer_dir, tokenizer_hash

EOT = "<|endoftext|>"
ROOT = Path(__file__).resolve().parents[1]
DOC = (
    "Lily found a shiny stone by the river. She showed it to her mom, who smiled.\n"
    "\"It's beautiful!\" said Mom. They took it home and put it on the shelf.\n\n"
    "Größe 東京 🙂  two  spaces\tand a tab, numbers 12345 and 3.14.\r\n"
)


def _read(path) -> str:
    with open(path, encoding="utf-8", newline="") as f:  # keep \r\n, as the encoder does
        return f.read()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "corpus.txt"
    docs = [DOC.replace("Lily", name) * (1 + i % 3) for i, name in enumerate(["Lily", "Tom", "Ann", "Max"] * 30)]
    path.write_text(EOT.join(docs) + "\n\n  trailing  \n", encoding="utf-8", newline="")
    return path


@pytest.fixture(scope="module")
def tokdir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tok"
    main(["train", "--input", str(corpus), "--vocab-size", "400", "--special-token", EOT, "--out-dir", str(out)])
    return out


def test_train_writes_tokenizer_dir(tokdir, corpus):
    vocab, merges, specials = load_tokenizer_dir(tokdir)
    assert (vocab, merges) == train_bpe(corpus, 400, [EOT]) and specials == [EOT]
    meta = json.loads((tokdir / "tokenizer.json").read_text(encoding="utf-8"))
    assert meta["special_tokens"] == [EOT] and meta["vocab_size"] == len(vocab)


def test_train_prints_summary(corpus, tmp_path, capsys):
    main(["train", "--input", str(corpus), "--vocab-size", "300", "--out-dir", str(tmp_path / "t")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "in " in line and "peak memory" in line and "longest token" in line


@pytest.mark.parametrize("workers", [1, 2])
def test_encode_matches_tokenizer(tokdir, corpus, tmp_path, workers, capsys):
    out = tmp_path / "corpus.bin"
    main(["encode", "--tokenizer-dir", str(tokdir), "--input", str(corpus), "--out", str(out),
          "--workers", str(workers), "--quiet"])
    tok = Tokenizer(*load_tokenizer_dir(tokdir))
    expected = tok.encode(_read(corpus))
    ids = np.fromfile(out, dtype=np.uint16)
    assert ids.tolist() == expected
    meta = json.loads((tmp_path / "corpus.bin.json").read_text(encoding="utf-8"))
    assert meta["dtype"] == "uint16" and meta["count"] == len(expected)
    assert meta["tokenizer_hash"] == tokenizer_hash(tokdir)
    report = capsys.readouterr().out
    assert "bytes/token" in report and "MB/s" in report
    assert f"{corpus.stat().st_size / len(expected):.2f} bytes/token" in report


@pytest.mark.parametrize("chunk_chars", [5, 37, 500, 1 << 16])
def test_multi_worker_output_identical_to_single(tokdir, corpus, tmp_path, chunk_chars):
    tok = Tokenizer(*load_tokenizer_dir(tokdir))
    chunks = list(iter_chunks(corpus, tok, chunk_chars))
    assert "".join(chunks) == _read(corpus)
    if chunk_chars < 1000:
        assert len(chunks) > 10
    encode_file(corpus, tmp_path / "one.bin", tok, workers=1, chunk_chars=chunk_chars)
    encode_file(corpus, tmp_path / "three.bin", tok, workers=3, chunk_chars=chunk_chars)
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "three.bin").read_bytes()
    assert np.fromfile(tmp_path / "one.bin", dtype=np.uint16).tolist() == tok.encode(_read(corpus))


def test_uint32_above_65536_ids(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    # vocab.json files must number ids densely, so the sparse id 70000 goes through the library.
    vocab = {b: bytes([b]) for b in range(256)}
    vocab[70000] = b"ab"
    (tmp_path / "in.txt").write_text("abba cab", encoding="utf-8")
    encode_file(tmp_path / "in.txt", tmp_path / "in.bin", Tokenizer(vocab, [(b"a", b"b")]))
    assert np.fromfile(tmp_path / "in.bin", dtype=np.uint32).tolist() == [70000, 98, 97, 32, 99, 70000]
    assert json.loads((tmp_path / "in.bin.json").read_text())["dtype"] == "uint32"


def _exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv + (["--quiet"] if argv[0] == "encode" else []))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_exit_2(tokdir, corpus, tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    err = _exit_2(["encode", "--tokenizer-dir", str(tokdir), "--input", str(missing),
                   "--out", str(tmp_path / "x.bin")], capsys)
    assert str(missing) in err
    assert not (tmp_path / "x.bin").exists()
    err = _exit_2(["encode", "--tokenizer-dir", str(tmp_path / "nodir"), "--input", str(corpus),
                   "--out", str(tmp_path / "x.bin")], capsys)
    assert "nodir" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text('{"a": 0,', encoding="utf-8")
    (broken / "merges.txt").write_text("", encoding="utf-8")
    err = _exit_2(["encode", "--tokenizer-dir", str(broken), "--input", str(corpus),
                   "--out", str(tmp_path / "x.bin")], capsys)
    assert "vocab.json:1" in err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ".encode("latin-1") * 10)
    err = _exit_2(["encode", "--tokenizer-dir", str(tokdir), "--input", str(latin1),
                   "--out", str(tmp_path / "y.bin")], capsys)
    assert str(latin1) in err and "at byte 3" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "latin1.txt"]
    err = _exit_2(["train", "--input", str(corpus), "--vocab-size", "200", "--out-dir", str(tmp_path / "t")], capsys)
    assert "--vocab-size 200" in err
    err = _exit_2(["train", "--input", str(missing), "--vocab-size", "300", "--out-dir", str(tmp_path / "t")], capsys)
    assert str(missing) in err
    err = _exit_2(["encode", "--tokenizer-dir", str(tokdir), "--input", str(corpus),
                   "--out", str(tmp_path / "z.bin"), "--workers", "0"], capsys)
    assert "workers" in err


@pytest.fixture
def tiny_tokdir(tmp_path):
    """A hand-made tokenizer directory: the 256 bytes, "he", "hel" and <|endoftext|>."""
    vocab = {b: bytes([b]) for b in range(256)}
    vocab.update({256: b"he", 257: b"hel", 258: EOT.encode()})
    save_tokenizer_dir(tmp_path / "tok", vocab, [(b"h", b"e"), (b"he", b"l")], [EOT])
    return tmp_path / "tok"


def test_huge_id_through_the_command_line_stays_small(tiny_tokdir, tmp_path):
    vocab = json.loads((tiny_tokdir / "vocab.json").read_text(encoding="utf-8"))
    vocab["hx"] = 2_000_000_000
    (tiny_tokdir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "in.txt").write_text("hello", encoding="utf-8")
    code = ("import resource, runpy, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"  # would need > 4 GB otherwise
            "sys.argv = ['cs336.tokenizer'] + sys.argv[1:]\n"
            "runpy.run_module('cs336.tokenizer', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code, "encode", "--tokenizer-dir", str(tiny_tokdir), "--input",
                           str(tmp_path / "in.txt"), "--out", str(tmp_path / "in.bin"), "--quiet"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "2000000000" in proc.stderr and not (tmp_path / "in.bin").exists()


def test_command_line_reports_each_kind_in_one_line(tiny_tokdir, tmp_path):
    (tmp_path / "in.txt").write_text("hello", encoding="utf-8")
    (tiny_tokdir / "vocab.json").write_text("", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "cs336.tokenizer", "encode", "--tokenizer-dir", str(tiny_tokdir),
                           "--input",
                           str(tmp_path / "in.txt"), "--out", str(tmp_path / "in.bin"), "--quiet"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "vocab.json is empty" in proc.stderr


def test_module_entry_point(tokdir, corpus, tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "cs336.tokenizer", "encode", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--workers" in help_text
    run = subprocess.run(
        [sys.executable, "-m", "cs336.tokenizer", "encode", "--tokenizer-dir", str(tokdir), "--input", str(corpus),
         "--out", str(tmp_path / "c.bin"), "--workers", "2", "--quiet"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "bytes/token" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "cs336.tokenizer", "encode", "--tokenizer-dir", str(tokdir), "--input",
         str(tmp_path / "nope.txt"), "--out", str(tmp_path / "d.bin")],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "nope.txt" in bad.stderr and "Traceback" not in bad.stderr


def test_old_flag_spellings_still_work_with_a_note(corpus, tmp_path, capsys):
    main(["train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "t")])
    assert "note: --out is deprecated; use --out-dir" in capsys.readouterr().err
    main(["encode", "--tokenizer", str(tmp_path / "t"), "--input", str(corpus), "--out", str(tmp_path / "c.bin"),
          "--quiet"])
    assert "note: --tokenizer is deprecated; use --tokenizer-dir" in capsys.readouterr().err
    assert (tmp_path / "c.bin").stat().st_size > 0
    with pytest.raises(SystemExit) as exc:
        main(["train", "--input", str(corpus), "--vocab-size", "300"])
    assert exc.value.code == 2 and "required: --out-dir" in capsys.readouterr().err


def test_empty_input_and_an_impossible_vocab_size_are_refused(corpus, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in _exit_2(["train", "--input", str(empty), "--vocab-size", "300", "--out-dir",
                                  str(tmp_path / "t")], capsys)
    err = _exit_2(["train", "--input", str(corpus), "--vocab-size", str(10**11), "--out-dir", str(tmp_path / "t")],
                  capsys)
    assert "is more than" in err and "at most" in err
    assert not (tmp_path / "t").exists()


def test_encode_reads_a_training_runs_tokenizer_dir(tokdir, corpus, tmp_path, capsys):
    """A run's DIR/tokenizer has vocab.json + merges.txt but no tokenizer.json: its special tokens
    come from the run's config.json (or --special-token)."""
    import shutil

    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokdir / name, run / "tokenizer" / name)
    args = ["encode", "--tokenizer-dir", str(run / "tokenizer"), "--input", str(corpus), "--quiet"]
    err = _exit_2([*args, "--out", str(tmp_path / "a.bin")], capsys)
    assert "pass each with --special-token" in err
    (run / "config.json").write_text(json.dumps({"data": {"special_tokens": [EOT]}}))
    main([*args, "--out", str(tmp_path / "b.bin")])
    main(["encode", "--tokenizer-dir", str(tokdir), "--input", str(corpus), "--quiet",
          "--out", str(tmp_path / "c.bin")])
    assert (tmp_path / "b.bin").read_bytes() == (tmp_path / "c.bin").read_bytes()
    (run / "config.json").unlink()
    main([*args, "--special-token", EOT, "--out", str(tmp_path / "d.bin")])
    assert (tmp_path / "d.bin").read_bytes() == (tmp_path / "c.bin").read_bytes()


def test_encode_refuses_special_tokens_other_than_tokenizer_json(tokdir, corpus, tmp_path, capsys):
    """--special-token names the special tokens of a directory without tokenizer.json; one that
    differs from the tokenizer.json of the directory is refused, not silently ignored (which
    encoded the text as if the flag were absent)."""
    args = ["encode", "--tokenizer-dir", str(tokdir), "--input", str(corpus)]
    err = _exit_2([*args, "--special-token", "Lily", "--out", str(tmp_path / "a.bin")], capsys)
    assert "tokenizer.json lists the special tokens ['<|endoftext|>'], not ['Lily']" in err
    assert "drop --special-token" in err and not (tmp_path / "a.bin").exists()
    err = _exit_2([*args, "--special-token", EOT, "--special-token", "Lily", "--out", str(tmp_path / "a.bin")],
                  capsys)
    assert "not ['<|endoftext|>', 'Lily']" in err
    main([*args, "--quiet", "--special-token", EOT, "--out", str(tmp_path / "b.bin")])  # the same ones: fine
    main([*args, "--quiet", "--out", str(tmp_path / "c.bin")])
    assert (tmp_path / "b.bin").read_bytes() == (tmp_path / "c.bin").read_bytes()


def test_encode_ignores_a_run_config_beside_a_tokenizer_json(tokdir, corpus, tmp_path):
    """A directory with tokenizer.json takes its own special tokens, whatever a config.json one
    level up says (only a run's DIR/tokenizer, without tokenizer.json, reads the run's config)."""
    import shutil

    tok = tmp_path / "project" / "tok"
    shutil.copytree(tokdir, tok)
    (tok.parent / "config.json").write_text(json.dumps({"data": {"special_tokens": ["<|other|>"]}}))
    main(["encode", "--tokenizer-dir", str(tok), "--input", str(corpus), "--quiet", "--out", str(tmp_path / "a.bin")])
    ids = np.fromfile(tmp_path / "a.bin", dtype=np.uint16).tolist()
    assert ids == Tokenizer(*load_tokenizer_dir(tokdir)).encode(_read(corpus))


def test_encode_refuses_a_directory_at_the_sidecar_path_before_writing(tokdir, corpus, tmp_path, capsys):
    """The token file and its .json sidecar are replaced together at the end; a directory at the
    sidecar's path is refused first (it failed after the token file was replaced, leaving new tokens
    beside a stale or missing sidecar, with an error naming a temporary file)."""
    out = tmp_path / "c.bin"
    out.write_bytes(b"old tokens")
    (tmp_path / "c.bin.json").mkdir()
    args = ["--input", str(corpus), "--out", str(out)]
    err = _exit_2(["encode", "--tokenizer-dir", str(tokdir), *args], capsys)
    assert f"{out}.json is a directory" in err
    assert out.read_bytes() == b"old tokens" and sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.bin.json"]
    tok = Tokenizer(*load_tokenizer_dir(tokdir))
    with pytest.raises(ValueError, match=r"c\.bin\.json is a directory, where encoding .* writes its \.json sidecar"):
        encode_file(corpus, out, tok)
    assert out.read_bytes() == b"old tokens" and sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.bin.json"]


def test_an_input_that_is_not_a_regular_file_is_said_so(tokdir, tmp_path, capsys):
    """A directory or a device as --input was reported as 'no such file'."""
    for cmd in (["train", "--vocab-size", "300", "--out-dir", str(tmp_path / "t")],
                ["encode", "--tokenizer-dir", str(tokdir), "--out", str(tmp_path / "x.bin")]):
        assert f"--input {tmp_path} is a directory" in _exit_2([*cmd, "--input", str(tmp_path)], capsys)
        assert "--input /dev/null is not a regular file" in _exit_2([*cmd, "--input", "/dev/null"], capsys)
        assert "does not exist" in _exit_2([*cmd, "--input", str(tmp_path / "none.txt")], capsys)
    assert not list(tmp_path.iterdir())


def test_encode_starts_no_more_workers_than_the_input_has_chunks(tokdir, corpus, tmp_path, monkeypatch):
    """--workers 64 on a small file started 64 processes (and 100000 would fork that many); each
    block read makes at most one chunk, so the pool is capped there, with the same ids."""
    import cs336.tokenizer.encode_file as ef

    sizes = []
    real = ef._pool_context

    def recording():
        ctx = real()

        class Ctx:
            def Pool(self, n, **kwargs):
                sizes.append(n)
                return ctx.Pool(n, **kwargs)

        return Ctx()

    monkeypatch.setattr(ef, "_pool_context", recording)
    tok = Tokenizer(*load_tokenizer_dir(tokdir))
    n_bytes = corpus.stat().st_size
    stats = encode_file(corpus, tmp_path / "a.bin", tok, workers=64, chunk_chars=n_bytes // 3 + 1)
    assert sizes == [4] and stats.workers == 4  # 3 blocks, and what is left after the last cut
    stats = encode_file(corpus, tmp_path / "b.bin", tok, workers=64, chunk_chars=2 * n_bytes)
    assert sizes == [4, 2] and stats.workers == 2
    expected = tok.encode(_read(corpus))
    for name in ("a.bin", "b.bin"):
        assert np.fromfile(tmp_path / name, dtype=np.uint16).tolist() == expected


def test_encode_refuses_an_out_path_ending_in_a_slash(tokdir, corpus, tmp_path, capsys):
    """--out DIR/ (a directory that does not exist yet) wrote a file named DIR and DIR.json, and
    said it wrote "DIR/ and DIR/.json"."""
    out = f"{tmp_path}/new/"
    err = _exit_2(["encode", "--tokenizer-dir", str(tokdir), "--input", str(corpus), "--out", out], capsys)
    assert f"--out {out} ends in a slash, so it names a directory" in err
    with pytest.raises(ValueError, match="ends in a slash"):
        encode_file(corpus, out, Tokenizer(*load_tokenizer_dir(tokdir)))
    assert not list(tmp_path.iterdir())


def test_a_special_token_that_is_not_utf8_text_is_named(tokdir, corpus, tmp_path, capsys):
    """The byte 0xff in --special-token (a lone surrogate to Python) ended in "'utf-8' codec can't
    encode character", naming neither the flag's token nor the fix."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokdir / name, bare / name)
    for cmd in (["train", "--input", str(corpus), "--vocab-size", "300", "--out-dir", str(tmp_path / "t")],
                ["encode", "--tokenizer-dir", str(bare), "--input", str(corpus), "--out", str(tmp_path / "x.bin")]):
        err = _exit_2([*cmd, "--special-token", EOT, "--special-token", "<\udcff>"], capsys)
        assert "special token '<\\udcff>' holds a lone surrogate" in err and "pass it as UTF-8" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare"]
