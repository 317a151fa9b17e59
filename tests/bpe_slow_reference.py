"""A slow byte-level BPE trainer used only as a test oracle for ``cs336.tokenizer.train_bpe``.

It follows the CS336 handout (section 2.4) literally and shares no code with the package: its own
copy of the GPT-2 pre-tokenization pattern, its own special-token split, and a full recount of
every adjacent pair after each merge. Ties go to the lexicographically greater ``(bytes, bytes)``
pair. Vocabulary ids: special tokens first, then the 256 single bytes in byte order, then merges
in creation order.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import regex

PATTERN = regex.compile(r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _ordinary_segments(text: str, special_tokens: list[str]) -> list[str]:
    """The text between special tokens; at each position the longest special token wins."""
    if not special_tokens:
        return [text]
    specials = sorted(special_tokens, key=len, reverse=True)
    segments, start, i = [], 0, 0
    while i < len(text):
        hit = next((s for s in specials if text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        segments.append(text[start:i])
        i += len(hit)
        start = i
    segments.append(text[start:])
    return segments


def _merge_word(word: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> tuple[bytes, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_bpe_slow(
    input_path: str | Path, vocab_size: int, special_tokens: list[str]
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    text = Path(input_path).read_bytes().decode("utf-8")
    words: Counter[tuple[bytes, ...]] = Counter()
    for segment in _ordinary_segments(text, special_tokens):
        for pre_token in PATTERN.findall(segment):
            words[tuple(bytes([b]) for b in pre_token.encode("utf-8"))] += 1

    vocab = {i: s.encode("utf-8") for i, s in enumerate(special_tokens)}
    for b in range(256):
        vocab[len(vocab)] = bytes([b])
    merges: list[tuple[bytes, bytes]] = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab[len(vocab)] = best[0] + best[1]
        merged: Counter[tuple[bytes, ...]] = Counter()
        for word, count in words.items():
            merged[_merge_word(word, best)] += count
        words = merged
    return vocab, merges
