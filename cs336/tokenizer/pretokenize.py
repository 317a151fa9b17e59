"""Pre-tokenization: split text on special tokens, then into GPT-2 pre-tokens.

The pattern is GPT-2's (Radford et al. 2019, as given in the CS336 handout). ``pretokenize`` is
the one entry point the trainer and the encoder use. ``pretokenize_regex`` (``regex.findall``) is
the definition; ``pretokenize`` returns the same list, computed by the numba scanner in
``pretok_numba`` for texts of ``FAST_MIN_CHARS`` characters or more (3-4x faster on
shakespeare.txt) and by the regex below that, where the scanner's fixed cost of a few
microseconds per call is larger than the regex's work. ``pretok_numba`` (and with it numba) is
imported on the first long text only, so short-text users do not pay for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_RE = regex.compile(GPT2_PATTERN)

FAST_MIN_CHARS = 64
"""Texts at least this long go to the numba scanner: below it ``regex.findall`` is faster (on
this project's CPU: 1.4 us vs 3.7 us at 10 characters, 6.7 us vs 4.4 us at 100)."""


def check_special_token_text(token: str, error: type[ValueError] = ValueError, prefix: str = "") -> None:
    """Raise ``error`` for a special token that UTF-8 cannot encode: a lone surrogate, which is
    what Python makes of a command-line byte that is not UTF-8."""
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{prefix}special token {token!r} holds a lone surrogate, which is not text UTF-8 can store "
                    "(a command-line byte that is not UTF-8?); pass it as UTF-8") from None


def pretokenize_regex(text: str) -> list[str]:
    """The reference: ``regex.findall(GPT2_PATTERN, text)``."""
    return _GPT2_RE.findall(text)


def pretokenize(text: str) -> list[str]:
    """GPT-2 pre-tokens of ``text`` (which must not contain special tokens); always equal to
    ``pretokenize_regex(text)``."""
    if len(text) < FAST_MIN_CHARS:
        return _GPT2_RE.findall(text)
    from .pretok_numba import pretokenize_fast

    return pretokenize_fast(text)


def pretoken_counts(text: str) -> dict[str, int]:
    """Occurrences of each GPT-2 pre-token of ``text``; always equal to
    ``Counter(pretokenize_regex(text))``. Long texts are counted inside the numba scanner, so only
    the distinct pre-tokens become Python strings."""
    if len(text) < FAST_MIN_CHARS:
        return Counter(_GPT2_RE.findall(text))
    from .pretok_numba import pretoken_counts as counts_fast

    return counts_fast(text)


def special_token_regex(special_tokens: Iterable[str]) -> regex.Pattern | None:
    """A pattern matching any special token, longest first (so overlapping tokens resolve to the
    longest match), or None when there are none."""
    tokens = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    if not tokens:
        return None
    return regex.compile("|".join(regex.escape(t) for t in tokens))


def split_on_special(text: str, special_tokens: Iterable[str]) -> list[tuple[str, bool]]:
    """Split ``text`` into ``(segment, is_special)`` pieces; empty ordinary segments are dropped."""
    pattern = special_token_regex(special_tokens)
    if pattern is None:
        return [(text, False)] if text else []
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            pieces.append((text[pos:m.start()], False))
        pieces.append((m.group(), True))
        pos = m.end()
    if pos < len(text):
        pieces.append((text[pos:], False))
    return pieces
