"""Tokenizer encode/decode against independent references, with no shared files.

A tokenizer is trained here by a plain-Python BPE loop on an embedded corpus; its ids are
checked against (a) a plain-Python encoder that applies the merge list in order to each
pre-token (the CS336 definition) and (b) a tiktoken ``Encoding`` built from the same vocabulary.
Hypothesis covers round trips and arbitrary Unicode; the streaming encoder is checked against
``encode`` for line-by-line and odd-size chunking; special-token overlap and errors are covered.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from cs336.tokenizer import Tokenizer
from cs336.tokenizer.pretokenize import GPT2_PATTERN, pretokenize_regex
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


def train_tiny(text: str, num_merges: int, specials: list[str]):
    """Plain-Python BPE training (CS336 semantics): ids = specials, 256 bytes, merges."""
    counts: Counter[str] = Counter()
    for segment, is_special in reference_split(text, specials):
        if not is_special:
            counts.update(pretokenize_regex(segment))
    words = {tuple(bytes([b]) for b in p.encode("utf-8")): c for p, c in counts.items()}
    vocab = {i: s.encode("utf-8") for i, s in enumerate(specials)}
    vocab.update({len(specials) + b: bytes([b]) for b in range(256)})
    merges: list[tuple[bytes, bytes]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, c in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab[len(vocab)] = best[0] + best[1]
        words = {apply_merge(word, best): c for word, c in words.items()}
    return vocab, merges


def apply_merge(parts, pair):
    out = []
    i = 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i] == pair[0] and parts[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return tuple(out)


def reference_split(text: str, specials: list[str]):
    """Split on special tokens, longest match at the leftmost position, by direct scanning."""
    by_length = sorted(specials, key=len, reverse=True)
    pieces, start, i = [], 0, 0
    while i < len(text):
        match = next((s for s in by_length if text.startswith(s, i)), None)
        if match is None:
            i += 1
            continue
        if i > start:
            pieces.append((text[start:i], False))
        pieces.append((match, True))
        i += len(match)
        start = i
    if start < len(text):
        pieces.append((text[start:], False))
    return pieces


def reference_encode(text, vocab, merges, specials):
    """The CS336 definition: apply each merge in list order to every pre-token."""
    ids_of = {}
    for idx in sorted(vocab):
        ids_of.setdefault(vocab[idx], idx)
    out = []
    for segment, is_special in reference_split(text, specials):
        if is_special:
            out.append(ids_of[segment.encode("utf-8")])
            continue
        for piece in pretokenize_regex(segment):
            parts = tuple(bytes([b]) for b in piece.encode("utf-8"))
            for pair in merges:
                if len(parts) == 1:
                    break
                parts = apply_merge(parts, pair)
            out.extend(ids_of[p] for p in parts)
    return out


@pytest.fixture(scope="module")
def trained():
    vocab, merges = train_tiny(TRAIN_TEXT, 300, [EOT])
    return vocab, merges


@pytest.fixture(scope="module")
def tok(trained):
    vocab, merges = trained
    return Tokenizer(vocab, merges, [EOT])


def tiktoken_encoding(vocab, specials):
    special_bytes = {s.encode("utf-8") for s in specials}
    ranks = {token: idx for idx, token in vocab.items() if token not in special_bytes}
    special_ids = {token.decode("utf-8"): idx for idx, token in vocab.items() if token in special_bytes}
    return tiktoken.Encoding("cs336-test", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special_ids)


@pytest.mark.parametrize("text", TEXTS + [TRAIN_TEXT])
def test_matches_reference_merge_loop(tok, trained, text):
    vocab, merges = trained
    assert tok.encode(text) == reference_encode(text, vocab, merges, [EOT])


@pytest.mark.parametrize("text", TEXTS + [TRAIN_TEXT])
def test_matches_tiktoken_built_from_our_vocab(tok, trained, text):
    enc = tiktoken_encoding(trained[0], [EOT])
    assert tok.encode(text) == enc.encode(text, allowed_special={EOT})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), st.sampled_from([EOT, " ", "\n", "  x"])), max_size=8))
def test_hypothesis_against_both_references(tok, trained, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert ids == reference_encode(text, trained[0], trained[1], [EOT])
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
        assert tok.encode(text) == reference_encode(text, vocab, merges, [])
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
    assert ids == reference_encode(f"a{double}b{EOT}c{double}{EOT}", tok.vocab, merges, [EOT, double])
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


def test_encode_array_matches_encode(tok):
    arr = tok.encode_array(TRAIN_TEXT)
    assert arr.dtype == np.int32
    assert arr.tolist() == tok.encode(TRAIN_TEXT)


def test_pickle_roundtrip(tok):
    import pickle

    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TRAIN_TEXT) == tok.encode(TRAIN_TEXT)
    assert clone.special_tokens == tok.special_tokens


@pytest.mark.parametrize("slots, key_bytes, ids",
                         [(16, 1 << 20, 1 << 20), (1 << 10, 40, 1 << 20), (1 << 10, 1 << 20, 12)])
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
        assert tok.encode(line) == reference_encode(line, vocab, merges, [EOT])
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
    assert expected == reference_encode(text, tok.vocab, merges, specials)
    assert list(tok.encode_iterable(chunks, buffer_chars=5)) == expected
