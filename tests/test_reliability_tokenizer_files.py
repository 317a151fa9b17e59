"""Tokenizer files are validated as a whole before any work: each malformed kind gives one clear
error naming the file and the fix, through the library and the command line (exit 2)."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from cs336.tokenizer.gpt2_files import (
    TokenizerFileError,
    bytes_to_unicode,
    load_tokenizer_dir,
    load_vocab,
    save_tokenizer_dir,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tokdir(tmp_path):
    vocab = {b: bytes([b]) for b in range(256)}
    merges = [(b"h", b"e"), (b"he", b"l")]
    vocab.update({256: b"he", 257: b"hel", 258: b"<|endoftext|>"})
    save_tokenizer_dir(tmp_path / "tok", vocab, merges, ["<|endoftext|>"])
    return tmp_path / "tok"


def _vocab_json(tokdir) -> dict:
    return json.loads((tokdir / "vocab.json").read_text(encoding="utf-8"))


def _set_vocab(tokdir, data):
    (tokdir / "vocab.json").write_text(data if isinstance(data, str) else json.dumps(data, ensure_ascii=False),
                                       encoding="utf-8")


def test_a_huge_id_is_refused_before_any_allocation(tokdir):
    vocab = _vocab_json(tokdir)
    vocab[bytes_to_unicode()[ord("h")] + "x"] = 2_000_000_000
    _set_vocab(tokdir, vocab)
    with pytest.raises(TokenizerFileError, match=r"vocab\.json: ids must be 0\.\.259 for 260 tokens, but id "
                                                 r"2000000000 occurs and id 259 is missing"):
        load_tokenizer_dir(tokdir)


def test_huge_id_through_the_command_line_stays_small(tokdir, tmp_path):
    vocab = _vocab_json(tokdir)
    vocab["hx"] = 2_000_000_000
    _set_vocab(tokdir, vocab)
    (tmp_path / "in.txt").write_text("hello", encoding="utf-8")
    code = ("import resource, runpy, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"  # would need > 4 GB otherwise
            "sys.argv = ['cs336.tokenizer'] + sys.argv[1:]\n"
            "runpy.run_module('cs336.tokenizer', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code, "encode", "--tokenizer", str(tokdir), "--input",
                           str(tmp_path / "in.txt"), "--out", str(tmp_path / "in.bin"), "--quiet"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "2000000000" in proc.stderr and not (tmp_path / "in.bin").exists()


@pytest.mark.parametrize("content, pattern", [
    ("", r"vocab\.json: vocab\.json is empty; write the tokenizer again"),
    ("   \n", r"vocab\.json is empty"),
    ('{"a": 0, "a": 1}', r"token 'a' appears twice"),
    ('{"a": 0.5}', r"token 'a' has id 0\.5; ids must be non-negative integers"),
    ('{"a": true}', r"token 'a' has id True"),
    ('{"a": -1}', r"token 'a' has id -1"),
    ('{"a": [0]}', r"token 'a' has id \[0\]"),
    ('"just a string"', r"expected a JSON object mapping token strings to ids, got str"),
    ("[" * 100000, r"(nested too deeply|not valid JSON)"),
    ('{"a": 0', r"vocab\.json:1: not valid JSON"),
])
def test_malformed_vocab_kinds(tokdir, content, pattern):
    _set_vocab(tokdir, content)
    with pytest.raises(TokenizerFileError, match=pattern) as info:
        load_tokenizer_dir(tokdir)
    assert str(tokdir / "vocab.json") in str(info.value)


def test_binary_and_non_utf8_files(tokdir):
    (tokdir / "merges.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(TokenizerFileError, match=r"merges\.txt: merges\.txt is not UTF-8"):
        load_tokenizer_dir(tokdir)
    (tokdir / "tokenizer.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: tokenizer\.json is not UTF-8"):
        load_tokenizer_dir(tokdir)


def test_vocab_must_be_dense(tokdir):
    vocab = _vocab_json(tokdir)
    vocab[bytes_to_unicode()[ord("h")] + "el"] = 300  # moves 'hel' from 257 to 300
    _set_vocab(tokdir, vocab)
    with pytest.raises(TokenizerFileError, match=r"id 300 occurs and id 257 is missing; renumber"):
        load_vocab(tokdir / "vocab.json")


def test_merges_consistent_with_vocab_and_tokenizer_json(tokdir):
    merges = (tokdir / "merges.txt").read_text(encoding="utf-8")
    meta = json.loads((tokdir / "tokenizer.json").read_text())
    (tokdir / "merges.txt").write_text(merges.replace("he l\n", ""), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"records num_merges 2 but .* hold 1"):
        load_tokenizer_dir(tokdir)
    (tokdir / "tokenizer.json").write_text(json.dumps({"special_tokens": meta["special_tokens"]}))
    with pytest.raises(TokenizerFileError, match=r"token 'hel' \(id 257\) is made by no merge"):
        load_tokenizer_dir(tokdir)
    (tokdir / "merges.txt").write_text(merges + "hel q\n", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"merges\.txt:4: merged token 'helq' is not in the vocabulary"):
        load_tokenizer_dir(tokdir)
    (tokdir / "merges.txt").write_text(merges, encoding="utf-8")
    (tokdir / "tokenizer.json").write_text(json.dumps({**meta, "num_merges": 5}))
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json records num_merges 5 but .* hold 2"):
        load_tokenizer_dir(tokdir)
    (tokdir / "tokenizer.json").write_text(json.dumps({**meta, "vocab_size": "259"}))
    with pytest.raises(TokenizerFileError, match=r"'vocab_size' is '259'; expected a non-negative integer"):
        load_tokenizer_dir(tokdir)
    (tokdir / "tokenizer.json").write_text(json.dumps({**meta, "special_tokens": []}))
    with pytest.raises(TokenizerFileError, match=r"'<\|endoftext\|>' \(id 258\) is made by no merge .* and is "
                                                 r"not a special token"):
        load_tokenizer_dir(tokdir)
    (tokdir / "tokenizer.json").write_text(json.dumps(meta))
    vocab, merges_list, specials = load_tokenizer_dir(tokdir)
    assert len(vocab) == 259 and len(merges_list) == 2 and specials == ["<|endoftext|>"]


def test_command_line_reports_each_kind_in_one_line(tokdir, tmp_path):
    (tmp_path / "in.txt").write_text("hello", encoding="utf-8")
    _set_vocab(tokdir, "")
    proc = subprocess.run([sys.executable, "-m", "cs336.tokenizer", "encode", "--tokenizer", str(tokdir), "--input",
                           str(tmp_path / "in.txt"), "--out", str(tmp_path / "in.bin"), "--quiet"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "vocab.json is empty" in proc.stderr


def test_sparse_vocab_dict_in_the_library_stays_small():
    from cs336.tokenizer import Tokenizer

    vocab = {b: bytes([b]) for b in range(256)}
    vocab[2_000_000_000] = b"ab"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tok = Tokenizer(vocab, [(b"a", b"b")])
    assert tok.encode("abc") == [2_000_000_000, 99]
    assert tok.decode([2_000_000_000, 99]) == "abc"
    with pytest.raises(ValueError, match="token id 300 is not in the vocabulary"):
        tok.decode([300])
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mb < 1000  # a dense table would be 16 GB
