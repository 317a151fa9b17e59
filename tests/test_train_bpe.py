"""Tests for ``cs336.tokenizer.train_bpe``: the reference merges shipped in tests/fixtures (and the
CS336 ones where ../shared exists), agreement with the slow trainer in tests/bpe_slow_reference.py,
exact file splitting, errors and import hygiene. The CS336 speed check (a fresh process under
1.5 s) is a benchmark: ``pytest bench -k fresh_process``."""

from __future__ import annotations

import importlib
import io
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpe_slow_reference import read_gpt2_files, train_bpe_slow
from cs336.tokenizer.pretokenize import pretokenize, split_on_special
from cs336.tokenizer.train_bpe import count_pretokens, next_split, train_bpe

tb = importlib.import_module("cs336.tokenizer.train_bpe")  # the module; the package exports the function

EOT = "<|endoftext|>"


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.mark.parametrize("num_workers", [1, 2])
def test_matches_shipped_reference(bpe_fixtures, num_workers, monkeypatch):
    # tests/fixtures holds the slow reference's BPE of corpus.txt (cross-checked against tiktoken and
    # HF when it was made); the numba trainer, in one process and in two, must give it exactly.
    expected = read_gpt2_files(bpe_fixtures.vocab_json, bpe_fixtures.merges_txt, list(bpe_fixtures.train_specials))
    monkeypatch.setattr(tb, "PIECE_BYTES", 1_000)  # several pieces, so workers each count some
    monkeypatch.setattr(tb, "MIN_TASK_BYTES", 1_000)
    got = train_bpe(bpe_fixtures.corpus, bpe_fixtures.vocab_size, list(bpe_fixtures.train_specials),
                    num_workers=num_workers)
    assert got == expected
    assert len(expected[1]) == bpe_fixtures.vocab_size - 257


def test_slow_reference_matches_shipped_reference(bpe_fixtures):
    expected = read_gpt2_files(bpe_fixtures.vocab_json, bpe_fixtures.merges_txt, list(bpe_fixtures.train_specials))
    assert train_bpe_slow(bpe_fixtures.corpus, bpe_fixtures.vocab_size, list(bpe_fixtures.train_specials)) == expected


def test_no_merge_crosses_a_special_token(bpe_fixtures):
    # Without the special token its pieces ("<|", "endoftext", ...) are frequent enough to merge;
    # with it, no learned token holds any part of it.
    plain, _ = train_bpe(bpe_fixtures.corpus, bpe_fixtures.vocab_size, [])
    assert any(b"<|" in t or b"|>" in t for t in plain.values())
    vocab, merges = train_bpe(bpe_fixtures.corpus, bpe_fixtures.vocab_size, [EOT])
    assert [t for t in vocab.values() if b"<|" in t or b"|>" in t] == [EOT.encode()]
    assert not any(b"<" in a + b or b"|" in a + b for a, b in merges)


def test_matches_cs336_reference(cs336_fixtures):
    vocab, merges = train_bpe(cs336_fixtures / "corpus.en", 500, [EOT])
    ref_vocab, ref_merges = read_gpt2_files(cs336_fixtures / "train-bpe-reference-vocab.json",
                                            cs336_fixtures / "train-bpe-reference-merges.txt", [EOT])
    assert merges == ref_merges
    assert set(vocab) == set(ref_vocab) == set(range(500))
    assert set(vocab.values()) == set(ref_vocab.values())
    # The reference file lists the single bytes in GPT-2's table order; ours are in byte order.
    # Every merged token has the same id in both.
    assert vocab[0] == ref_vocab[0] == EOT.encode()
    assert {i: vocab[i] for i in range(257, 500)} == {i: ref_vocab[i] for i in range(257, 500)}
    assert all(vocab[1 + b] == bytes([b]) for b in range(256))


def test_slow_reference_matches_cs336_reference(cs336_fixtures):
    # The oracle behind tests/fixtures reproduces the handout's own reference (about 8 s).
    _, ref_merges = read_gpt2_files(cs336_fixtures / "train-bpe-reference-vocab.json",
                                    cs336_fixtures / "train-bpe-reference-merges.txt", [EOT])
    assert train_bpe_slow(cs336_fixtures / "corpus.en", 500, [EOT])[1] == ref_merges


def test_special_tokens_are_never_merged_into(cs336_fixtures):
    path = cs336_fixtures / "tinystories_sample.txt"
    vocab, merges = train_bpe(path, 1000, [EOT])
    assert [t for t in vocab.values() if b"<|" in t] == [EOT.encode()]
    assert (vocab, merges) == train_bpe_slow(path, 1000, [EOT])


def test_tie_goes_to_lexicographically_greater_pair(tmp_path):
    # Pre-tokens "xy", " xy", " zw", " zw": (x,y), (' ',z) and (z,w) all count 2.
    path = write(tmp_path / "ties.txt", "xy xy zw zw")
    vocab, merges = train_bpe(path, 259, [])
    assert merges == [(b"z", b"w"), (b"x", b"y"), (b" ", b"zw")]
    assert vocab[258] == b" zw"


def test_ties_compare_bytes_not_ids(tmp_path):
    # Pre-tokens "AB" x5, "ABc" x2, "bc" x2. After (A,B) -> "AB" (id 256), (AB,c) and (b,c) both
    # count 2: b"b" > b"AB", so (b,c) comes first although "AB" has the larger id.
    path = write(tmp_path / "ids.txt", "\n".join(["AB"] * 5 + ["ABc"] * 2 + ["bc"] * 2))
    vocab, merges = train_bpe(path, 259, [])
    assert merges == [(b"A", b"B"), (b"b", b"c"), (b"AB", b"c")]


def _random_corpus(rng: random.Random, n_words: int, alphabet: str, specials: list[str]) -> str:
    parts = []
    for _ in range(n_words):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        parts.append(rng.choice(["", " ", "  ", "\n", "\n\n", "\t", "'s ", ", "]) + word)
        if specials and rng.random() < 0.05:
            parts.append(rng.choice(specials))
    return "".join(parts)


@pytest.mark.parametrize(
    "alphabet, specials, vocab_size",
    [
        ("abcde", [EOT], 400),
        ("aab", [], 300),  # long repeated runs: (a, a) merges overlap
        ("xyz0123.,!?", ["<|a|>", "<|a|><|b|>"], 350),  # overlapping special tokens
        ("αβγ日本語😀é", ["<s>"], 420),  # multi-byte characters
    ],
)
def test_agrees_with_slow_trainer(tmp_path, alphabet, specials, vocab_size):
    rng = random.Random(len(alphabet))
    path = write(tmp_path / "corpus.txt", _random_corpus(rng, 3000, alphabet, specials))
    assert train_bpe(path, vocab_size, specials) == train_bpe_slow(path, vocab_size, specials)


def test_ties_between_tokens_longer_than_eight_bytes(tmp_path):
    # Words of 9-16 letters over {a, b} grow tokens that share their first 8 bytes, where the
    # heap's 8-byte keys are equal and the full byte comparison decides.
    rng = random.Random(11)
    words = ["".join(rng.choice("ab") for _ in range(rng.randint(9, 16))) for _ in range(60)]
    path = write(tmp_path / "long.txt", "\n".join(rng.choice(words) for _ in range(400)))
    vocab, merges = train_bpe(path, 600, [])
    assert (vocab, merges) == train_bpe_slow(path, 600, [])
    assert max(len(a) for a, _ in merges) > 8


@pytest.mark.parametrize(
    "low, high",
    [(b"abcdefghX", b"abcdefghY"), (b"abcdefgh", b"abcdefgh\x00"), (b"ab", b"abc"), (b"a\xff", b"b")],
)
def test_heap_order_compares_whole_byte_strings(low, high):
    """The heap's comparison of two equal-count pairs (low, c) and (high, c), both ways round:
    equal 8-byte keys must fall back to comparing the whole byte strings."""
    from cs336.tokenizer import bpe_numba as bn

    tokens = [low, high, b"c"]
    pool = np.frombuffer(b"".join(tokens), np.uint8).copy()
    tok_len = np.array([len(t) for t in tokens], np.int64)
    tok_off = np.concatenate([[0], np.cumsum(tok_len)[:-1]]).astype(np.int64)
    tok_key = np.array([bn.token_key(pool, o, n) for o, n in zip(tok_off, tok_len, strict=True)], np.int64)
    for order in ([0, 1], [1, 0]):  # pair ids in either order, so the id cannot decide
        pairs = np.zeros((2, bn.PAIR_COLS), np.int64)
        pairs[:, bn.PA], pairs[:, bn.PB], pairs[:, bn.PCOUNT] = order, 2, 5
        heap = np.zeros((2, bn.H_COLS), np.int64)
        for h in range(2):
            heap[h] = [5, tok_key[order[h]], tok_key[2], h]
        high_entry = order.index(1)
        args = (pairs, pool, tok_off, tok_len, tok_key)
        assert bn._before(heap, high_entry, 1 - high_entry, *args)
        assert not bn._before(heap, 1 - high_entry, high_entry, *args)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=300),
    n_merges=st.integers(0, 40),
    with_special=st.booleans(),
)
def test_agrees_with_slow_trainer_on_unicode(tmp_path, text, n_merges, with_special):
    specials = ["<|endoftext|>"] if with_special else []
    if with_special:
        text = text[: len(text) // 2] + EOT + text[len(text) // 2 :]
    path = write(tmp_path / "u.txt", text * 3)
    size = 256 + len(specials) + n_merges
    assert train_bpe(path, size, specials) == train_bpe_slow(path, size, specials)


def test_stops_when_no_pair_is_left(tmp_path):
    path = write(tmp_path / "short.txt", "abc abc")
    vocab, merges = train_bpe(path, 10_000, [])
    assert (vocab, merges) == train_bpe_slow(path, 10_000, [])
    assert merges == [(b"b", b"c"), (b"a", b"bc"), (b" ", b"abc")] and len(vocab) == 259


def test_empty_file_gives_bytes_and_specials(tmp_path):
    vocab, merges = train_bpe(write(tmp_path / "empty.txt", ""), 300, [EOT])
    assert merges == [] and len(vocab) == 257 and vocab[0] == EOT.encode() and vocab[256] == b"\xff"


def test_progress_and_workers_do_not_change_the_result(tmp_path, monkeypatch, capsys):
    rng = random.Random(7)
    path = write(tmp_path / "c.txt", _random_corpus(rng, 20_000, "abcdefgh é", [EOT]))
    expected = train_bpe(path, 600, [EOT])
    monkeypatch.setattr(tb, "PIECE_BYTES", 5_000)  # several pieces per worker task
    monkeypatch.setattr(tb, "MIN_TASK_BYTES", 10_000)
    assert train_bpe(path, 600, [EOT], num_workers=2, progress=True) == expected
    assert "merge" in capsys.readouterr().err


def _pretokens(data: bytes, specials: list[str]) -> list[str]:
    out = []
    for segment, is_special in split_on_special(data.decode("utf-8"), specials):
        out.extend([segment] if is_special else pretokenize(segment))
    return out


# Newlines next to ASCII, multi-byte and white-space characters (U+0085, U+00A0, U+2028 and U+3000
# are white space to the GPT-2 pattern; U+001C is not, though str.isspace says it is).
SPLIT_ALPHABET = [
    "a", "b", " ", "  ", "\n", "\n\n", "\t", "é", "日", "😀", "1", "!", "'s", "<|", "|>", "x\ny", "日\n本",
    "\x85", "\u00a0", "\u2028", "\u3000", "\x1c",
]
SPLIT_SPECIALS = [EOT, "<|a\nb|>", "|><|", "\n<|"]


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(SPLIT_ALPHABET + SPLIT_SPECIALS), max_size=80),
    specials=st.lists(st.sampled_from(SPLIT_SPECIALS), unique=True, max_size=3),
    targets=st.lists(st.floats(0, 1), min_size=1, max_size=10),
)
def test_split_points_preserve_pretokens(pieces, specials, targets):
    data = "".join(pieces).encode("utf-8")
    whole = _pretokens(data, specials)
    special_bytes = [s.encode("utf-8") for s in specials]
    old = tb.SCAN_BYTES
    tb.SCAN_BYTES = 7  # force several read windows per search
    try:
        for fraction in targets:
            target = int(fraction * len(data))
            cut = next_split(io.BytesIO(data), target, len(data), special_bytes)
            assert target <= cut <= len(data)
            assert _pretokens(data[:cut], specials) + _pretokens(data[cut:], specials) == whole, cut
    finally:
        tb.SCAN_BYTES = old


@pytest.mark.parametrize(
    "text, specials, target, expected",
    [
        ("ab<|a\nb|>cd", ["<|a\nb|>"], 0, 2),  # the special token's start
        ("ab<|a\nb|>cd", ["<|a\nb|>"], 3, 11),  # not the newline inside the special token
        ("ab<|a\nb|>cd", [], 3, 6),  # ... which is a split point when it is ordinary text
        ("x<|endoftext|><|endoftext|>", [EOT, "|><|"], 2, 27),  # "|><|" inside the first EOT
        ("a\u3000\nb c\nd", [], 0, 9),  # U+3000 is white space: the first newline is no split
        ("a\x1c\nb", [], 0, 3),  # U+001C is not white space to the GPT-2 pattern
        ("日\n本", [], 0, 4),
    ],
)
def test_split_point_examples(text, specials, target, expected):
    data = text.encode("utf-8")
    assert next_split(io.BytesIO(data), target, len(data), [s.encode() for s in specials]) == expected
    assert _pretokens(data[:expected], specials) + _pretokens(data[expected:], specials) == _pretokens(data, specials)


def test_parallel_counts_equal_whole_file_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "MIN_TASK_BYTES", 1_000)  # a task per worker on this small file
    rng = random.Random(3)
    text = _random_corpus(rng, 30_000, "abcdefg日本", [EOT, "<pad>"])
    path = write(tmp_path / "p.txt", text)
    expected = Counter(t for t in _pretokens(text.encode(), [EOT, "<pad>"]) if t not in (EOT, "<pad>"))
    assert count_pretokens(path, [EOT, "<pad>"], num_workers=3) == expected
    assert count_pretokens(path, [EOT, "<pad>"], num_workers=1) == expected


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe(tmp_path / "missing.txt", 300, [])


def test_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        train_bpe(tmp_path, 300, [])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file(tmp_path):
    path = write(tmp_path / "secret.txt", "abc")
    path.chmod(0)
    with pytest.raises(ValueError, match="cannot read input file .*secret.txt"):
        train_bpe(path, 300, [])


def test_vocab_size_too_small(tmp_path):
    path = write(tmp_path / "a.txt", "abc")
    with pytest.raises(ValueError, match=r"vocab_size=256 .* use vocab_size >= 257"):
        train_bpe(path, 256, [EOT])
    with pytest.raises(ValueError, match="vocab_size must be an integer"):
        train_bpe(path, 300.0, [])


def test_non_utf8_input_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf" + "é".encode("latin-1") + b" ok")
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 \(byte offset 3"):
        train_bpe(path, 300, [])


def test_non_utf8_offset_from_a_worker(tmp_path, monkeypatch):
    good = "some text\nmore text\n" * 2000  # 40,000 bytes, split points after each newline
    path = tmp_path / "bad.txt"
    path.write_bytes(good.encode() + b"x\xff\xfe" + good.encode())
    monkeypatch.setattr(tb, "PIECE_BYTES", 3_000)
    with pytest.raises(ValueError, match=rf"bad.txt is not UTF-8 \(byte offset {len(good) + 1}:"):
        train_bpe(path, 300, [], num_workers=2)


def test_bad_special_tokens_and_workers(tmp_path):
    path = write(tmp_path / "a.txt", "abc")
    with pytest.raises(ValueError, match="duplicates"):
        train_bpe(path, 300, [EOT, EOT])
    with pytest.raises(ValueError, match="non-empty strings"):
        train_bpe(path, 300, [""])
    with pytest.raises(ValueError, match="num_workers"):
        train_bpe(path, 300, [], num_workers=0)


def test_special_tokens_that_cannot_be_saved_are_refused(tmp_path):
    """A bare string is not split into one special token per character (it was: "<|endoftext|>"
    failed as "duplicates", "<|eot>" trained with six one-character specials), and a one-byte
    special token, whose bytes the vocabulary already holds, is refused before any counting (it
    trained, then saving failed on two ids holding the same bytes)."""
    path = write(tmp_path / "a.txt", "a b c abc abc")
    for text in (EOT, "<|eot>"):
        with pytest.raises(TypeError, match="must be a list of strings.*wrap it in a list"):
            train_bpe(path, 300, text)
    for one_byte in ("a", "\n"):
        with pytest.raises(ValueError, match=r"is a single byte.*two or more bytes"):
            train_bpe(path, 300, [EOT, one_byte])
    vocab, _ = train_bpe(path, 300, ["é"])  # one character, two bytes: a token of its own
    assert vocab[0] == "é".encode() and len(set(vocab.values())) == len(vocab)


def test_byte_keys_equal_token_key():
    """The numpy keys of the 256 one-byte tokens equal the numba ``token_key`` of each byte."""
    from cs336.tokenizer import bpe_numba as bn

    pool = np.arange(256, dtype=np.uint8)
    expected = np.array([bn.token_key(pool, b, 1) for b in range(256)], np.int64)
    np.testing.assert_array_equal(bn.byte_keys(), expected)


FRESH_SCRIPT = """
import sys
from cs336.tokenizer import train_bpe
vocab, merges = train_bpe(sys.argv[1], 280, ["<|endoftext|>"])
assert len(vocab) == 280, len(vocab)
heavy = ("torch", "matplotlib", "tqdm", "cs336.tokenizer.tokenizer", "cs336.tokenizer.encode_numba",
         "cs336.tokenizer.gpt2_files")
print(",".join(m for m in heavy if m in sys.modules))
"""


def test_training_a_tokenizer_imports_no_encoder_torch_or_matplotlib(tmp_path):
    """A fresh process that only trains a tokenizer loads neither the encoder nor torch nor
    matplotlib (each costs import time the training does not need); ``Tokenizer`` stays
    importable from the package on first access."""
    corpus = write(tmp_path / "c.txt", EOT.join(f"story {i}: the cat sat on mat {i * i}. " * 8 for i in range(40)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tb.__file__).parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", FRESH_SCRIPT, str(corpus)], check=True, cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "", f"training a tokenizer imported {out.stdout.strip()}"
    from cs336.tokenizer import Tokenizer
    from cs336.tokenizer.tokenizer import Tokenizer as Direct

    assert Tokenizer is Direct


def test_workers_are_at_most_one_per_mib_of_input(tmp_path, monkeypatch):
    """num_workers=1000 split a small file into up to 1000 tasks run by as many processes; tasks
    (and so processes) are now at least MIN_TASK_BYTES, with the same counts."""
    import multiprocessing

    rng = random.Random(5)
    path = write(tmp_path / "c.txt", _random_corpus(rng, 5_000, "abcdefgh é", [EOT]))
    pools = []
    real = multiprocessing.get_context

    class Recording:
        def __init__(self, ctx):
            self.ctx = ctx

        def Pool(self, n, *args, **kwargs):
            pools.append(n)
            return self.ctx.Pool(n, *args, **kwargs)

    monkeypatch.setattr(multiprocessing, "get_context", lambda *a: Recording(real(*a)))
    expected = count_pretokens(path, [EOT], num_workers=1)
    size = path.stat().st_size
    assert count_pretokens(path, [EOT], num_workers=1000) == expected and pools == []  # under 1 MiB: one task
    monkeypatch.setattr(tb, "MIN_TASK_BYTES", size // 3)
    assert count_pretokens(path, [EOT], num_workers=1000) == expected
    assert len(pools) == 1 and 2 <= pools[0] <= 4  # ceil(size / (size // 3)) tasks, less any equal cuts


def test_a_special_token_that_is_not_utf8_text_is_named(tmp_path):
    """A lone surrogate (how Python passes the command-line byte 0xff) failed inside the encoder
    with "'utf-8' codec can't encode character", naming neither the token nor the fix."""
    path = write(tmp_path / "a.txt", "a b c abc abc")
    with pytest.raises(ValueError, match=r"special token '<\\udcff>' holds a lone surrogate.*pass it as UTF-8"):
        train_bpe(path, 300, ["<\udcff>"])
