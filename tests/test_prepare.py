"""cs336.prepare: data caches are keyed by their inputs (a run in a directory left by another run
rebuilds what was made from other inputs, the stale train.bin case, and reuses what is current),
an interrupted preparation leaves no partial file under a final name, and the tokenizer is
parsed and hashed once per preparation."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from cs336 import prepare
from cs336.config import ConfigError
from cs336.data import sidecar_path
from cs336.distributed import DistInfo
from cs336.prepare import TOKENIZER_KEY, prepare_data, token_file_is_current
from cs336.run_dir import RunDir
from cs336.tokenizer.gpt2_files import tokenizer_hash

EOT = "<|endoftext|>"


def _cfg(train_text, valid_text, vocab_size=300, **data):
    """The fields of TrainConfig that prepare_data reads (duck-typed, independent of config.py)."""
    d = SimpleNamespace(source="text", train_text=str(train_text), valid_text=str(valid_text),
                        special_tokens=[EOT], tokenizer_dir=None, tokenizer_sample_mb=None,
                        corpus_mb=0.05, corpus_seed=0, train_tokens=None, valid_tokens=None)
    for k, v in data.items():
        setattr(d, k, v)
    return SimpleNamespace(data=d, model=SimpleNamespace(vocab_size=vocab_size),
                           train=SimpleNamespace(progress=False), context_length=8)


def _texts(tmp_path, name, word):
    train = tmp_path / f"{name}-train.txt"
    valid = tmp_path / f"{name}-valid.txt"
    train.write_text((f"{word} and the {word} went home. {EOT}" * 300), encoding="utf-8")
    valid.write_text((f"the {word} stayed. {EOT}" * 40), encoding="utf-8")
    return train, valid


def _prepare(cfg, run):
    said = []
    rd = RunDir(run)
    rd.create()
    train, valid, tok = prepare_data(cfg, rd, DistInfo(), said.append)
    return rd, train, tok, said


def test_other_train_text_rebuilds_tokenizer_and_token_files(tmp_path):
    run = tmp_path / "run"
    a_train, a_valid = _texts(tmp_path, "a", "cat")
    b_train, b_valid = _texts(tmp_path, "b", "zebra")
    rd, tokens_a, _, _ = _prepare(_cfg(a_train, a_valid), run)
    rd, tokens_b, tok, said = _prepare(_cfg(b_train, b_valid), run)
    assert any("training it again" in s for s in said) and any("is stale" in s for s in said)
    meta = json.loads(sidecar_path(rd.data / "train.bin").read_text())
    assert meta["input"] == str(b_train.resolve()) and meta["tokenizer_hash"] == tokenizer_hash(rd.tokenizer)
    head = tok.decode(np.asarray(tokens_b[:40]).tolist())
    assert "zebra" in head and b_train.read_text().startswith(head)
    assert json.loads((rd.tokenizer / TOKENIZER_KEY).read_text())["train_text"]["path"] == str(b_train.resolve())


def test_current_files_are_reused_and_a_touched_text_is_not(tmp_path):
    run = tmp_path / "run"
    train, valid = _texts(tmp_path, "a", "cat")
    rd, _, _, _ = _prepare(_cfg(train, valid), run)
    stamp = (rd.data / "train.bin").stat().st_mtime_ns, (rd.vocab_path).stat().st_mtime_ns
    rd, _, _, said = _prepare(_cfg(train, valid), run)
    assert said == [] and ((rd.data / "train.bin").stat().st_mtime_ns, rd.vocab_path.stat().st_mtime_ns) == stamp
    train.write_text(train.read_text() + "one more line. ", encoding="utf-8")
    assert token_file_is_current(rd.data / "train.bin", train, tokenizer_hash(rd.tokenizer)) is not None
    rd, _, _, said = _prepare(_cfg(train, valid), run)
    assert any("is stale" in s for s in said)
    assert json.loads(sidecar_path(rd.data / "train.bin").read_text())["input_bytes"] == train.stat().st_size


def test_other_vocab_size_retrains_the_tokenizer(tmp_path):
    run = tmp_path / "run"
    train, valid = _texts(tmp_path, "a", "cat")
    _prepare(_cfg(train, valid, vocab_size=270), run)
    rd, _, tok, said = _prepare(_cfg(train, valid, vocab_size=280), run)
    assert any("other vocab_size" in s for s in said)
    assert len(tok.vocab) > 270


def test_interrupted_preparation_leaves_no_partial_file_and_is_redone(tmp_path, monkeypatch):
    from cs336.tokenizer import Tokenizer

    run = tmp_path / "run"
    train, valid = _texts(tmp_path, "a", "cat")
    real = Tokenizer.encode_array

    def interrupted(self, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "encode_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepare(_cfg(train, valid), run)
    data_files = sorted(p.name for p in (run / "data").iterdir())
    assert not any(name.startswith(".") for name in data_files), data_files  # no temporary files
    assert "train.bin" not in data_files and "train.bin.json" not in data_files
    monkeypatch.setattr(Tokenizer, "encode_array", real)
    rd, tokens, _, _ = _prepare(_cfg(train, valid), run)
    assert len(tokens) == json.loads(sidecar_path(rd.data / "train.bin").read_text())["count"] > 0


def test_embedded_corpus_is_keyed_by_size_and_seed(tmp_path):
    run = tmp_path / "run"
    rd, _, _, _ = _prepare(_cfg(None, None, source="embedded", corpus_mb=0.02), run)
    small = (rd.data / "train.txt").stat().st_size
    rd, _, _, said = _prepare(_cfg(None, None, source="embedded", corpus_mb=0.04), run)
    assert (rd.data / "train.txt").stat().st_size > small
    assert any("writing the embedded story corpus" in s for s in said)


def test_pre_encoded_tokens_of_another_tokenizer_are_refused(tmp_path):
    from cs336.data import TokenFileError
    from cs336.tokenizer import Tokenizer
    from cs336.tokenizer.encode_file import encode_file
    from cs336.tokenizer.gpt2_files import save_tokenizer_dir

    vocab = {b: bytes([b]) for b in range(256)}
    save_tokenizer_dir(tmp_path / "tok_a", vocab, [], [EOT])
    save_tokenizer_dir(tmp_path / "tok_b", {**vocab, 256: b"th"}, [(b"t", b"h")], [EOT])
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 50, encoding="utf-8")
    for name in ("train", "valid"):
        encode_file(text, tmp_path / f"{name}.bin", Tokenizer(vocab, []),
                    tokenizer_hash=tokenizer_hash(tmp_path / "tok_a"))
    cfg = _cfg(None, None, source="tokens", train_tokens=str(tmp_path / "train.bin"),
               valid_tokens=str(tmp_path / "valid.bin"), tokenizer_dir=str(tmp_path / "tok_b"))
    with pytest.raises(TokenFileError, match=r"train\.bin was encoded with another tokenizer .* than the one in "
                                             r".*run_b/tokenizer"):
        _prepare(cfg, tmp_path / "run_b")
    cfg.data.tokenizer_dir = str(tmp_path / "tok_a")
    _, tokens, _, _ = _prepare(cfg, tmp_path / "run_a")
    assert len(tokens) == len("the cat sat on the mat. " * 50)


@pytest.mark.parametrize("kind", ["trained", "cached", "tokenizer_dir"])
def test_the_tokenizer_is_parsed_and_hashed_once(tmp_path, monkeypatch, kind):
    train, valid = _texts(tmp_path, "a", "cat")
    cfg = _cfg(train, valid)
    if kind != "trained":
        _prepare(cfg, tmp_path / "first")
    if kind == "tokenizer_dir":
        cfg = _cfg(train, valid, tokenizer_dir=str(tmp_path / "first" / "tokenizer"))
    calls = {"parse": 0, "hash": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(prepare, "load_vocab_merges", counted("parse", prepare.load_vocab_merges))
    monkeypatch.setattr(prepare, "tokenizer_hash", counted("hash", prepare.tokenizer_hash))
    source = prepare.source_tokenizer(cfg)  # what the trainer does before opening the run directory
    rd = RunDir(tmp_path / ("first" if kind == "cached" else "second"))
    rd.create()
    tokens, _, tok = prepare_data(cfg, rd, DistInfo(), lambda msg: None, source)
    assert calls == {"parse": 0 if kind == "trained" else 1, "hash": 1}
    assert tok.decode(np.asarray(tokens[:20]).tolist()) in train.read_text()


@pytest.mark.parametrize("bad", [-1, -32768])
def test_pre_encoded_tokens_with_negative_ids_are_refused(tmp_path, bad):
    """A signed token file holding a negative id is refused before training, as one holding an id
    past the vocabulary is (only the largest id was checked: a negative input id indexed the
    embedding from its end, a negative target stopped the run with a traceback)."""
    from cs336.data import TokenFileError, save_tokens
    from cs336.tokenizer.gpt2_files import save_tokenizer_dir

    save_tokenizer_dir(tmp_path / "tok", {b: bytes([b]) for b in range(256)}, [], [EOT])
    tokens = np.arange(200, dtype=np.int16) % 256
    save_tokens(tmp_path / "valid.bin", tokens, dtype="int16")
    tokens[150] = bad
    save_tokens(tmp_path / "train.bin", tokens, dtype="int16")
    cfg = _cfg(None, None, source="tokens", train_tokens=str(tmp_path / "train.bin"),
               valid_tokens=str(tmp_path / "valid.bin"), tokenizer_dir=str(tmp_path / "tok"))
    with pytest.raises(TokenFileError, match=rf"train\.bin holds id {bad}, below 0"):
        _prepare(cfg, tmp_path / "run")


def test_tokenizer_sample_is_the_first_bytes_of_the_text_as_they_are(tmp_path):
    """The tokenizer sample is the text's first data.tokenizer_sample_mb * 10**6 bytes, cut after
    the last document separator, byte for byte: it was read in text mode, so every \\r of a
    \\r\\n text was dropped (the tokenizer never saw the line ends it then encoded), and the limit
    counted characters, so a non-ASCII text gave a sample up to 4 times as large."""
    from cs336.tokenizer.train_bpe import train_bpe

    doc = "Größe 東京 line one\r\nline two\r\n"
    train = tmp_path / "train.txt"
    train.write_bytes((doc + EOT).encode() * 2000)
    valid = tmp_path / "valid.txt"
    valid.write_bytes((doc + EOT).encode() * 20)
    cfg = _cfg(train, valid, tokenizer_sample_mb=0.01)
    rd, _, tok, _ = _prepare(cfg, tmp_path / "run")
    sample = (rd.data / "tokenizer_sample.txt").read_bytes()
    one = len((doc + EOT).encode())
    assert sample == (doc + EOT).encode() * (10_000 // one)
    assert train_bpe(rd.data / "tokenizer_sample.txt", 300, [EOT]) == (tok.vocab, tok.merges)
    assert b"\r\n" in tok.vocab.values()  # the pair the text mode removed


def test_tokenizer_sample_without_a_separator_ends_on_a_whole_character(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("x" + "é" * 9_999 + "東" * 99, encoding="utf-8")  # byte 10**4 is inside an é
    valid = tmp_path / "valid.txt"
    valid.write_text("é é " * 100, encoding="utf-8")
    rd, _, _, _ = _prepare(_cfg(train, valid, tokenizer_sample_mb=0.01, special_tokens=["<|doc|>"]),
                           tmp_path / "run")
    assert (rd.data / "tokenizer_sample.txt").read_text(encoding="utf-8") == "x" + "é" * 4_999


def test_tokenizer_sample_of_a_text_that_is_not_utf8_names_the_text(tmp_path):
    train = tmp_path / "train.txt"
    train.write_bytes(b"abc \xff " + f"word {EOT}".encode() * 2000)
    valid = tmp_path / "valid.txt"
    valid.write_text("the end", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{train} is not UTF-8 \(byte offset 4"):
        _prepare(_cfg(train, valid, tokenizer_sample_mb=0.01), tmp_path / "run")


def test_a_tokenizer_dir_trained_with_other_special_tokens_is_refused(tmp_path):
    """A data.tokenizer_dir whose tokenizer.json lists other special tokens than
    data.special_tokens is refused before any work: the run used its own, so the tokenizer's
    <|doc|> (id 0) was never produced, the documents' "<|doc|>" was encoded as ordinary text and
    <|endoftext|> got an extra id (or a model-size error blaming 301 ids on the tokenizer)."""
    from cs336.tokenizer.gpt2_files import save_tokenizer_dir

    doc = "<|doc|>"
    vocab = {0: doc.encode(), **{1 + b: bytes([b]) for b in range(256)}}
    save_tokenizer_dir(tmp_path / "tok", vocab, [], [doc])
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text(f"the cat sat. {doc}" * 100, encoding="utf-8")
    valid.write_text(f"the dog sat. {doc}" * 10, encoding="utf-8")
    cfg = _cfg(train, valid, vocab_size=257, tokenizer_dir=str(tmp_path / "tok"))
    with pytest.raises(ConfigError, match=r"trained with the special tokens \['<\|doc\|>'\] .* but "
                                          r"data.special_tokens is \['<\|endoftext\|>'\]; pass "
                                          r"--data.special_tokens=<\|doc\|>"):
        prepare.source_tokenizer(cfg)
    cfg.data.special_tokens = [doc]
    _, tokens, tok, _ = _prepare(cfg, tmp_path / "run")
    assert tok.vocab_size == 257 and np.asarray(tokens[:14]).tolist() == tok.encode(f"the cat sat. {doc}")
    assert int((np.asarray(tokens) == 0).sum()) == 100


def test_embedded_corpus_separates_documents_with_the_first_special_token(tmp_path):
    """The embedded corpus is separated by data.special_tokens[0], as the README says the first
    special token separates documents: it was always "<|endoftext|>", which under other special
    tokens was encoded as ordinary text while the run's separator never occurred."""
    from cs336 import corpus

    run = tmp_path / "run"
    rd, tokens, tok, _ = _prepare(_cfg(None, None, source="embedded", corpus_mb=0.02, special_tokens=["<|doc|>"]),
                                  run)
    text = (rd.data / "train.txt").read_text(encoding="utf-8")
    assert EOT not in text and text == corpus.corpus_text(int(0.02e6 * 0.95), 0).replace(EOT, "<|doc|>")
    assert int((np.asarray(tokens) == tok.token_id(b"<|doc|>")).sum()) == text.count("<|doc|>") > 0
    rd, _, _, said = _prepare(_cfg(None, None, source="embedded", corpus_mb=0.02), run)  # back to the default
    assert any("writing the embedded story corpus" in s for s in said)
    assert "<|doc|>" not in (rd.data / "train.txt").read_text(encoding="utf-8")
