"""``cs336.tokenizer.Tokenizer`` encode/decode against independent references.

Hermetic: the literal ids of tests/fixtures/corpus.txt under the shipped GPT-2-format files (made
by tests/bpe_slow_reference.py and cross-checked against tiktoken and HF when generated), and a
tokenizer trained here by the slow reference on an embedded corpus, whose ids are checked against
(a) the slow encoder (the merge list applied in order to each pre-token, the CS336 definition) and
(b) a tiktoken ``Encoding`` over the same vocabulary. Hypothesis covers round trips and arbitrary
Unicode; the streaming encoder is checked for line-by-line and odd-size chunking; special-token
overlap and errors are covered. Where ../shared exists, GPT-2's own files are checked against
tiktoken's ``gpt2`` encoding (run offline from ../shared/tools/make_tiktoken_gpt2_cache.py).
"""

from __future__ import annotations

import importlib.util
import itertools
import resource
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from bpe_slow_reference import encode_slow, read_gpt2_files, train_from_text
from cs336.tokenizer import Tokenizer
from cs336.tokenizer.pretokenize import GPT2_PATTERN
from cs336.tokenizer.tokenizer import pretoken_bounds, pretoken_bounds_regex

EOT = "<|endoftext|>"

CORPUS = (
    "Once upon a time there was a little dog named Spot. Spot liked to run in the park.\n"
    "One day, Spot saw a big red ball. He ran to the ball and played with it all day!\n\n"
    "The   children's teacher said: \"we'll read 12 books, they've read 345 already.\"\n"
    "Über die Brücke gehen wir morgen früh; Straße, Mädchen, Größe.\n"
    "東京は日本の首都です。 今日は いい天気ですね。\n"
    "Emoji: 🙂🙂 🚀 — naïve café résumé coöperate; tabs\tand\r\nwindows lines\n"
    "    indented code: x = f(y) + 42  # comment\n"
    "1234567890 3.14159 -17 +0.5e10 ...\n"
)
TRAIN_TEXT = (CORPUS + EOT) * 3 + CORPUS.upper() + EOT + CORPUS.replace(" ", "  ")

TEXTS = [
    "",
    " ",
    "\n\n",
    "Hello, world!",
    "the theme of the thesis",
    "Spot's ball isn't red; it's BLUE!!!",
    "   leading and trailing   ",
    "a\n\n\nb \n c\t\td",
    "東京 Straße 🙂🙂🙂 naïve",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "x" * 3000,
    " " * 1000 + "end",
    CORPUS,
]


@pytest.fixture(scope="module")
def trained():
    return train_from_text(TRAIN_TEXT, 257 + 300, [EOT])


@pytest.fixture(scope="module")
def tok(trained):
    vocab, merges = trained
    return Tokenizer(vocab, merges, [EOT])


def tiktoken_encoding(vocab, specials):
    special_bytes = {s.encode("utf-8") for s in specials}
    ranks = {token: idx for idx, token in vocab.items() if token not in special_bytes}
    special_ids = {token.decode("utf-8"): idx for idx, token in vocab.items() if token in special_bytes}
    return tiktoken.Encoding("cs336-test", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special_ids)


@pytest.fixture(scope="module")
def shipped(bpe_fixtures):
    """name -> (Tokenizer from the shipped files with that case's special tokens, its ids)."""
    return {name: (Tokenizer.from_files(bpe_fixtures.vocab_json, bpe_fixtures.merges_txt, case["special_tokens"]),
                   case["ids"]) for name, case in bpe_fixtures.cases.items()}


@pytest.mark.parametrize("name", ["plain", "eot", "overlap"])
def test_shipped_ids(shipped, bpe_fixtures, name):
    tok, expected = shipped[name]
    text = bpe_fixtures.text
    assert tok.encode(text) == expected
    assert b"".join(tok.vocab[i] for i in expected) == text.encode("utf-8")
    assert tok.decode(expected) == text
    with open(bpe_fixtures.corpus, encoding="utf-8", newline="") as f:
        assert list(tok.encode_iterable(f, buffer_chars=64)) == expected
    chunks = [text[i : i + 7] for i in range(0, len(text), 7)]  # cuts through the special tokens
    assert list(tok.encode_iterable(chunks, buffer_chars=16)) == expected


def test_shipped_ids_are_the_slow_references(bpe_fixtures):
    vocab, merges = read_gpt2_files(bpe_fixtures.vocab_json, bpe_fixtures.merges_txt, [EOT])
    for case in bpe_fixtures.cases.values():
        assert encode_slow(bpe_fixtures.text, vocab, merges, case["special_tokens"]) == case["ids"]


def test_generator_reproduces_the_shipped_fixtures(bpe_fixtures, capsys):
    # make_fixtures.py --check retrains and re-encodes with the slow reference, cross-checks
    # tiktoken and HF tokenizers and compares with the files (its ../shared checks are
    # test_train_bpe.py::test_matches_cs336_reference and test_gpt2_matches_tiktoken here).
    spec = importlib.util.spec_from_file_location("make_fixtures", bpe_fixtures.corpus.parent / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check", "--no-shared"]) == 0, capsys.readouterr().out


def test_shipped_special_token_cases_differ_where_they_should(shipped, bpe_fixtures):
    # The three cases tell the rules apart: <|endoftext|> as text is several ids; as a special
    # token one id (0, its vocab.json id); "<|endoftext|><|endoftext|>" takes the next free id
    # (500) and, being longer, wins wherever it matches.
    eot, double = EOT, EOT + EOT
    plain, eot_ids, overlap = (shipped[name][1] for name in ("plain", "eot", "overlap"))
    text = bpe_fixtures.text
    n_double = len(text.split(double)) - 1
    assert eot_ids.count(0) == text.count(eot) and 0 not in plain
    assert overlap.count(500) == n_double >= 2 and overlap.count(0) == text.count(eot) - 2 * n_double
    assert len(plain) > len(eot_ids) > len(overlap)


@pytest.mark.parametrize("text", TEXTS + [TRAIN_TEXT])
def test_matches_reference_merge_loop(tok, trained, text):
    vocab, merges = trained
    assert tok.encode(text) == encode_slow(text, vocab, merges, [EOT])


@pytest.mark.parametrize("text", TEXTS + [TRAIN_TEXT])
def test_matches_tiktoken_built_from_our_vocab(tok, trained, text):
    enc = tiktoken_encoding(trained[0], [EOT])
    assert tok.encode(text) == enc.encode(text, allowed_special={EOT})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), st.sampled_from([EOT, " ", "\n", "  x"])), max_size=8))
def test_hypothesis_against_both_references(tok, trained, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert ids == encode_slow(text, trained[0], trained[1], [EOT])
    assert ids == tiktoken_encoding(trained[0], [EOT]).encode(text, allowed_special={EOT})
    assert tok.decode(ids) == text


def test_scanner_bounds_equal_regex_bounds():
    for text in TEXTS + [TRAIN_TEXT]:
        data, bounds = pretoken_bounds(text)
        ref_data, ref_bounds = pretoken_bounds_regex(text)
        assert data == ref_data
        np.testing.assert_array_equal(bounds, ref_bounds)


def test_merge_list_order_is_respected_for_inconsistent_merges():
    # (b"x", b"ab") is listed before (b"a", b"b") creates b"ab": applying merges in order never
    # uses it; a rank-only heap without a floor would.
    vocab = {b: bytes([b]) for b in range(256)}
    merges = [(b"x", b"ab"), (b"a", b"b"), (b"ab", b"c")]
    for token in (b"xab", b"ab", b"abc"):
        vocab[len(vocab)] = token
    tok = Tokenizer(vocab, merges)
    for text in ["xab", "xabc", "abab", "xxabcab"]:
        assert tok.encode(text) == encode_slow(text, vocab, merges, [])
    assert tok.encode("xab") == [ord("x"), 257]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_longest_special_token_wins(trained):
    vocab, merges = trained
    double = EOT + EOT
    tok = Tokenizer(vocab, merges, [EOT, double])
    single_id = tok.encode(EOT)[0]
    double_id = tok.encode(double)[0]
    assert single_id != double_id
    ids = tok.encode(f"a{double}b{EOT}c{double}{EOT}")
    assert ids == encode_slow(f"a{double}b{EOT}c{double}{EOT}", tok.vocab, merges, [EOT, double])
    assert ids.count(double_id) == 2 and ids.count(single_id) == 2
    assert tok.decode(ids) == f"a{double}b{EOT}c{double}{EOT}"


def test_special_tokens_get_ids(trained):
    vocab, merges = trained
    tok = Tokenizer(vocab, merges, [EOT, "<|pad|>", EOT])
    assert tok.special_tokens == [EOT, "<|pad|>"]
    assert tok.encode(EOT) == [0]  # already in the vocab
    assert tok.encode("<|pad|>") == [max(vocab) + 1]  # appended
    assert tok.vocab_size == len(vocab) + 1
    plain = Tokenizer(vocab, merges)
    assert len(plain.encode(EOT)) > 1  # without the special token it is ordinary text


def test_a_special_token_that_is_not_utf8_text_is_named(trained):
    """A lone surrogate (the command-line byte 0xff as Python passes it) ended in UnicodeEncodeError's
    "'utf-8' codec can't encode character", naming neither the token nor the fix."""
    with pytest.raises(ValueError, match=r"special token '<\\udcff>' holds a lone surrogate.*pass it as UTF-8"):
        Tokenizer(*trained, [EOT, "<\udcff>"])


def test_encode_iterable_line_by_line(tok, tmp_path):
    path = tmp_path / "corpus.txt"
    text = TRAIN_TEXT * 5 + "\n\n  \n" + CORPUS
    path.write_text(text, encoding="utf-8", newline="")
    expected = tok.encode(text)
    with open(path, encoding="utf-8", newline="") as f:
        assert list(tok.encode_iterable(f)) == expected
    with open(path, encoding="utf-8", newline="") as f:
        assert list(tok.encode_iterable(f, buffer_chars=64)) == expected


@pytest.mark.parametrize("size", [1, 2, 7, 13, 100])
@pytest.mark.parametrize("buffer_chars", [1, 50, 4096])
def test_encode_iterable_odd_chunks(tok, size, buffer_chars):
    text = (TRAIN_TEXT + "  \n\n" + EOT + EOT + " x\n ") * 2
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    assert list(tok.encode_iterable(chunks, buffer_chars=buffer_chars)) == tok.encode(text)


def test_encode_iterable_is_lazy(tok):
    endless = itertools.cycle(["Spot ran to the park. ", "He saw a ball!\n"])
    first = list(itertools.islice(tok.encode_iterable(endless, buffer_chars=256), 500))
    assert first == tok.encode("Spot ran to the park. He saw a ball!\n" * 100)[:500]


def test_decode_invalid_utf8_is_replaced(tok):
    e_acute = tok.encode("é")  # two bytes; a lone continuation byte is invalid UTF-8
    byte_ids = [i for i, t in tok.vocab.items() if t == b"\xa9"]
    assert tok.decode(byte_ids) == "\ufffd"
    assert tok.decode(e_acute + byte_ids + e_acute) == "é\ufffdé"


def test_decode_accepts_arrays_and_rejects_bad_ids(tok):
    ids = tok.encode("Hello there")
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "Hello there"
    assert tok.decode(iter(ids)) == "Hello there"
    for bad in (tok.vocab_size, -1, 10**9):
        with pytest.raises(ValueError, match=f"token id {bad} is not in the vocabulary"):
            tok.decode(ids + [bad])


def test_constructor_errors(trained):
    vocab, merges = trained
    no_byte = {i: t for i, t in vocab.items() if t != b"\x00"}
    with pytest.raises(ValueError, match="single-byte token"):
        Tokenizer(no_byte, merges)
    with pytest.raises(ValueError, match=r"merge 1 .*not in the vocab"):
        Tokenizer(vocab, [merges[0], (b"zz", b"qq")])
    with pytest.raises(ValueError, match="non-empty string"):
        Tokenizer(vocab, merges, [""])
    with pytest.raises(TypeError, match="wrap it in a list"):
        Tokenizer(vocab, merges, EOT)
    with pytest.raises(ValueError, match="does not fit in int32"):
        Tokenizer({**vocab, 2**31: b"big"}, merges)
    with pytest.raises(TypeError, match="expects str"):
        Tokenizer(vocab, merges).encode(b"bytes")


def test_encode_array_matches_reference(tok, trained):
    arr = tok.encode_array(TRAIN_TEXT)
    assert arr.dtype == np.int32
    assert arr.tolist() == encode_slow(TRAIN_TEXT, *trained, [EOT])


def test_pickle_roundtrip(tok):
    import pickle

    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TRAIN_TEXT) == tok.encode(TRAIN_TEXT)
    assert clone.special_tokens == tok.special_tokens


@pytest.mark.parametrize("slots, key_bytes, ids", [(16, 1 << 20, 1 << 20), (1 << 10, 40, 1 << 20),
                                                   (1 << 10, 1 << 20, 12)])
def test_cache_fills_and_clears(trained, monkeypatch, slots, key_bytes, ids):
    # A cache too small for the text (by slots, key bytes or ids) fills within a call, is cleared
    # after it, and never changes the ids.
    from cs336.tokenizer import encode_numba

    monkeypatch.setattr(encode_numba, "CACHE_SLOTS", slots)
    monkeypatch.setattr(encode_numba, "CACHE_KEY_BYTES", key_bytes)
    monkeypatch.setattr(encode_numba, "CACHE_IDS", ids)
    vocab, merges = trained
    tok = Tokenizer(vocab, merges, [EOT])
    fresh = Tokenizer(vocab, merges, [EOT])
    lines = (TRAIN_TEXT + TRAIN_TEXT.upper()).splitlines(keepends=True)
    for line in lines + lines:
        assert tok.encode(line) == encode_slow(line, vocab, merges, [EOT])
        entries, used_keys, used_ids, full = tok._cache[3]
        assert full == 0 and 2 * entries <= slots and used_keys <= key_bytes and used_ids <= ids
    assert tok.encode(TRAIN_TEXT) == fresh.encode(TRAIN_TEXT)


@pytest.mark.parametrize("size", [1, 3, 8])
def test_encode_iterable_special_tokens_with_whitespace(trained, size):
    # Special tokens that contain a cut point (non-space then space) or are whitespace must
    # never be split across buffered pieces.
    vocab, merges = trained
    specials = [EOT, "big red", "\n\n", "red ball"]
    tok = Tokenizer(vocab, merges, specials)
    text = ("a big red ball.\n\n\nthe big red dog " + EOT + " red ball\n\n x\n") * 20
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    expected = tok.encode(text)
    assert expected == encode_slow(text, tok.vocab, merges, specials)
    assert list(tok.encode_iterable(chunks, buffer_chars=5)) == expected


def test_sparse_vocab_dict_in_the_library_stays_small():
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


# GPT-2's own files against tiktoken's gpt2 encoding (needs ../shared).
CS336_TEXTS = ["address.txt", "german.txt", "tinystories_sample.txt", "corpus.en",
               "special_token_double_newlines_non_whitespace.txt", "special_token_trailing_newlines.txt"]


@pytest.fixture(scope="session")
def gpt2_tiktoken(shared_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    tool = shared_dir / "tools" / "make_tiktoken_gpt2_cache.py"
    subprocess.run([sys.executable, str(tool), str(shared_dir / "fixtures"), str(cache)], check=True,
                   capture_output=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        yield tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def gpt2(cs336_fixtures):
    files = cs336_fixtures / "gpt2_vocab.json", cs336_fixtures / "gpt2_merges.txt"
    return Tokenizer.from_files(*files), Tokenizer.from_files(*files, special_tokens=[EOT])


def test_gpt2_hello_world_exact_ids(gpt2, gpt2_tiktoken):
    # "Hello" = 15496, "," = 11, " world" = 995, "!" = 0 in GPT-2's vocab.
    assert gpt2[0].encode("Hello, world!") == gpt2_tiktoken.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2[0].decode([15496, 11, 995, 0]) == "Hello, world!"


@pytest.mark.parametrize("name", CS336_TEXTS + ["corpus.txt (ours)"])
def test_gpt2_matches_tiktoken(gpt2, gpt2_tiktoken, cs336_fixtures, bpe_fixtures, name):
    path = bpe_fixtures.corpus if name.endswith("(ours)") else cs336_fixtures / name
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    plain, with_eot = gpt2[0].encode(text), gpt2[1].encode(text)
    assert plain == gpt2_tiktoken.encode_ordinary(text)
    assert with_eot == gpt2_tiktoken.encode(text, allowed_special={EOT})
    assert gpt2[0].decode(plain) == text and gpt2[1].decode(with_eot) == text
    if EOT in text:
        assert with_eot.count(50256) == text.count(EOT) and plain != with_eot


def test_gpt2_shakespeare_matches_tiktoken(gpt2, gpt2_tiktoken, shared_dir):
    path = shared_dir / "corpora" / "shakespeare.txt"
    text = path.read_text(encoding="utf-8")
    assert gpt2[0].encode(text) == gpt2_tiktoken.encode_ordinary(text)
    expected = gpt2_tiktoken.encode(text, allowed_special={EOT})
    assert gpt2[1].encode(text) == expected
    with open(path, encoding="utf-8", newline="") as f:
        assert list(gpt2[1].encode_iterable(f)) == expected
