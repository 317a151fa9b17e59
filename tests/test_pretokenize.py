"""The numba pre-tokenizer against ``regex.findall(GPT2_PATTERN, text)`` (and its counts against
``collections.Counter`` of that list).

Hand-picked cases cover each alternative of the pattern and its interplay with the others;
tests/fixtures/corpus.txt (and, where ../shared exists, the CS336 fixtures and shakespeare.txt)
cover real text; hypothesis covers the rest of Unicode.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpe_slow_reference import PATTERN
from cs336.tokenizer import pretok_numba
from cs336.tokenizer.pretokenize import (
    FAST_MIN_CHARS,
    pretokenize,
    pretokenize_regex,
    split_on_special,
)

CASES = [
    "",
    "a",
    " ",
    "  ",
    "hello world",
    "Hello, world! How's it going?",
    # contractions: lowercase ASCII only
    "it's we'll they've you're I'd I'm don't",
    "IT'S WE'LL THEY'VE 'S 'D 'M 'T 'LL 'Ll 'lL 'VE 'Re",
    "'s's's 'x ''s '' ' 'l 'v 'r 'll'",
    "rock'n'roll o'clock",
    "it\u2019s it\u02bcs it\uff07s it`s",
    "word 's word  's",
    "?'s !'ll",
    "'",
    "'l",
    "'s",
    "'ve",
    "x'",
    # spaces before words, numbers, punctuation
    "a  b   c    d",
    "  leading",
    "trailing  ",
    "trailing ",
    "x \ny",
    "x  \ny",
    "x\n y",
    "x\n\n y",
    "x \n\n  y",
    " 123  456 7",
    " ... !!  ?? ",
    "a\tb\t\tc \t d",
    "line\r\nline\r\n\r\n",
    "\n",
    "\n\n",
    "\r\n",
    " \n",
    "\n ",
    "x\n",
    "x \n ",
    # Unicode whitespace (regex's \s, not str.isspace: U+001C..U+001F are not \s there)
    "a\u00a0b \u00a0c\u00a0\u00a0d",
    "a\u3000b\u2009c\u202fd\u205fe\u1680f\u2028g\u2029h\x85i",
    "a\x1cb\x1dc\x1ed\x1ff",
    "a\x0bb\x0cc",
    "\u00a0 x",
    " \u00a0x",
    "x\u200by\ufeffz",
    # numbers in other scripts, letter-like numbers, mixed runs
    "\u0661\u0662\u0663 \u0967\u0968 \u2160\u2161 \u00bd\u00b2 \uff11\uff12",
    "abc123def 4.5 6,7 8e9",
    "x\u00b2 \u2460\u2461",
    # combining marks are not letters (\p{M}): they are "other"
    "e\u0301 caf\u00e9 cafe\u0301s na\u0308ive \u0915\u093f \u0e01\u0e34",
    # emoji, CJK, astral letters and numbers
    "\U0001f600\U0001f600 hi \U0001f44d\U0001f3fd \U0001f1fa\U0001f1f8",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587 \ud55c\uad6d\uc5b4",
    "\U00010400\U00010428 \U0001d7ce\U0001d7cf \U00020000\U0002a6d6",
    "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd",
    # lone surrogates are legal in str and regex classifies them as "other"
    "a\ud800b \udfff \ud83d\ude00 x",
    # characters used as separators internally
    "a\x00b \x00 \x01c",
    "x\x00\x01\ufdd0\ufdd1\U0010fffe y",
    "\U0010ffff \ufffe \uffff",
]


def _fast_paths(text: str) -> None:
    """Every output form of the numba scanner equals regex on ``text``."""
    ref = pretokenize_regex(text)
    assert pretok_numba.pretokenize_fast(text) == ref
    assert pretokenize(text) == ref
    data, bounds = pretok_numba.utf8_bounds(text)
    assert data == pretok_numba.encode_utf8(text)
    spans = [data[a:b] for a, b in zip(bounds.tolist(), bounds[1:].tolist(), strict=False)]
    assert spans == [t.encode("utf-8", "surrogatepass") for t in ref]
    assert pretok_numba.pretokenize_bytes(text) == spans
    counts = pretok_numba.pretoken_counts(text)
    assert counts == Counter(ref)
    assert list(counts) == list(dict.fromkeys(ref))


def test_reference_is_the_handouts_pattern():
    # tests/bpe_slow_reference.py holds its own copy of the handout's GPT-2 pattern.
    for text in CASES:
        assert pretokenize_regex(text) == PATTERN.findall(text)
    assert pretokenize_regex("It's 2 o'clock  \n\n now") == ["It", "'s", " 2", " o", "'", "clock", "  \n\n", " now"]


@pytest.mark.parametrize("text", CASES)
def test_hand_picked(text):
    _fast_paths(text)
    _fast_paths(text * 5)  # past FAST_MIN_CHARS, and each case glued to itself
    _fast_paths("x " + text + " y")


def test_long_text_goes_to_numba_and_short_to_regex(monkeypatch):
    calls = []
    monkeypatch.setattr(pretok_numba, "pretokenize_fast", lambda t: calls.append(t) or ["stub"])
    short = "a" * (FAST_MIN_CHARS - 1)
    assert pretokenize(short) == [short]
    assert calls == []
    assert pretokenize(short + "a") == ["stub"]
    assert calls == [short + "a"]


def test_bounds_partition_the_bytes():
    text = " Hello  world\u00a0\u00a0\U0001f600!! 12 \n"
    data, bounds = pretok_numba.utf8_bounds(text)
    assert bounds.dtype == np.int64
    assert bounds[0] == 0 and bounds[-1] == len(data)
    assert np.all(np.diff(bounds) > 0)
    assert pretok_numba.utf8_bounds("")[1].tolist() == [0]


def test_counts_with_many_distinct_pretokens():
    """Enough distinct pre-tokens to grow the hash table and its arena several times."""
    rng = np.random.default_rng(1)
    alphabet = list("abcdefgh\u00e9\u4e2d'0 ")
    words = ["".join(rng.choice(alphabet, size=rng.integers(1, 9))) for _ in range(30000)]
    text = " ".join(words + words[:5000])
    ref = pretokenize_regex(text)
    assert len(set(ref)) > 5000
    assert pretok_numba.pretoken_counts(text) == Counter(ref)
    assert pretokenize(text) == ref


def test_kind_table_matches_regex_on_sampled_code_points():
    table = pretok_numba.kind_table()
    rng = np.random.default_rng(0)
    sample = np.concatenate([np.arange(0, 0x3000), rng.integers(0, 0x110000, size=20000)])
    expected_kind = {
        pretok_numba.KIND_LETTER: regex.compile(r"\p{L}"),
        pretok_numba.KIND_NUMBER: regex.compile(r"\p{N}"),
        pretok_numba.KIND_SPACE: regex.compile(r"\s"),
        pretok_numba.KIND_OTHER: regex.compile(r"[^\s\p{L}\p{N}]"),
    }
    for cp in sample.tolist():
        kind = int(table[cp])
        assert expected_kind[kind].fullmatch(chr(cp)), f"U+{cp:04X} classified as kind {kind}"


def test_kind_table_other_class_over_all_code_points():
    """KIND_OTHER is exactly regex's ``[^\\s\\p{L}\\p{N}]`` (the class of alternative 4)."""
    every = np.arange(pretok_numba.N_CODE_POINTS, dtype=np.uint32).tobytes().decode(
        "utf-32-le", "surrogatepass"
    )
    other = np.zeros(pretok_numba.N_CODE_POINTS, dtype=bool)
    for m in regex.finditer(r"[^\s\p{L}\p{N}]+", every):
        other[m.start():m.end()] = True
    assert np.array_equal(pretok_numba.kind_table() == pretok_numba.KIND_OTHER, other)
    assert 0.5 < other.mean() < 0.95  # unassigned and private-use code points are "other"


def test_kind_table_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CS336_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(pretok_numba, "_TABLE", None)
    built = pretok_numba.kind_table()
    files = list((tmp_path / "cache").glob("*.npy"))
    assert len(files) == 1 and regex.__version__ in files[0].name
    assert np.array_equal(np.load(files[0]), built)
    # a damaged cache file (garbage, truncated, wrong values) is rebuilt, not trusted
    whole = files[0].read_bytes()
    for damaged in (b"not a numpy file", whole[: len(whole) // 2], whole[:-1] + b"\x07"):
        files[0].write_bytes(damaged)
        monkeypatch.setattr(pretok_numba, "_TABLE", None)
        assert np.array_equal(pretok_numba.kind_table(), built)
        assert np.array_equal(np.load(files[0]), built)
    # an unwritable cache location still yields the table
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("CS336_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setattr(pretok_numba, "_TABLE", None)
    assert np.array_equal(pretok_numba.kind_table(), built)


def test_fresh_process_uses_caches(tmp_path):
    """A second fresh process loads the kind table and the compiled scanner from disk."""
    code = (
        "from cs336.tokenizer import pretok_numba as P;"
        "assert P.pretokenize_fast('a b ' * 40) == ['a'] + [' b', ' a'] * 39 + [' b', ' '];"
        "assert P.pretoken_counts('a b ' * 40) == {'a': 1, ' b': 40, ' a': 39, ' ': 1};"
        "fns = (P.scan_bounds, P._join, P.count_spans);"
        "print(*(sum(f.stats.cache_misses.values()) for f in fns))"
    )
    env = dict(os.environ, CS336_CACHE_DIR=str(tmp_path))

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
            cwd=Path(pretok_numba.__file__).parents[2],
        )

    run()
    assert len(list(tmp_path.glob("*.npy"))) == 1
    assert run().stdout.split() == ["0", "0", "0"], "numba recompiled instead of loading its cache"


def test_split_on_special_then_pretokenize():
    text = "a<|endoftext|>  b<|endoftext|><|endoftext|>c "
    pieces = split_on_special(text, ["<|endoftext|>", "<|endoftext|><|endoftext|>"])
    assert pieces == [("a", False), ("<|endoftext|>", True), ("  b", False),
                      ("<|endoftext|><|endoftext|>", True), ("c ", False)]
    for segment, special in pieces:
        if not special:
            _fast_paths(segment)


@pytest.mark.parametrize(
    "name",
    ["address.txt", "corpus.en", "german.txt", "tinystories_sample.txt",
     "special_token_double_newlines_non_whitespace.txt", "special_token_trailing_newlines.txt"],
)
def test_cs336_fixture_texts(cs336_fixtures, name):
    path = cs336_fixtures / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    _fast_paths(path.read_text(encoding="utf-8"))


def test_shipped_corpus(bpe_fixtures):
    _fast_paths(bpe_fixtures.text)


def test_shakespeare(shared_dir):
    path = shared_dir / "corpora" / "shakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    text = path.read_text(encoding="utf-8")
    ref = pretokenize_regex(text)
    assert pretokenize(text) == ref
    assert pretok_numba.pretoken_counts(text) == Counter(ref)


# Characters the pattern treats specially, weighted up against the rest of Unicode.
_SPECIAL = list(
    " '\t\n\r\x0b\x0c\x1c\x85\u00a0\u2009\u3000sdmtlvreSDLVR0\u0661\u00b2.,!?\u0301\u2019"
    "\ud800\udfff\x00"
)
_ALPHABET = st.one_of(
    st.sampled_from(_SPECIAL),
    st.sampled_from([" ", " ", "'", "a", "1", "."]),
    st.characters(codec="utf-8"),
    st.characters(),  # includes lone surrogates
)
_TEXT = st.lists(
    st.one_of(
        st.text(_ALPHABET, max_size=6),
        st.sampled_from(["'s", "'ll", " 've", "  ", " \n", "\r\n"]),
    ),
    max_size=40,
).map("".join)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TEXT)
def test_fuzz_unicode(text):
    _fast_paths(text)


@pytest.mark.slow
@settings(max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TEXT, max_size=8).map("".join))
def test_fuzz_unicode_long(text):
    _fast_paths(text)


@pytest.mark.parametrize("text", ["", "a b", "Hello  world, it's 2024!\n\n" * 9, "naïve café  日本語 123 ¾\t\r\n" * 7])
def test_pretoken_counts_equal_counter_of_regex(text):
    from collections import Counter

    from cs336.tokenizer.pretokenize import pretoken_counts, pretokenize_regex

    assert pretoken_counts(text) == Counter(pretokenize_regex(text))
