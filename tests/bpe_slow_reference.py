"""A slow byte-level BPE trainer and encoder, used only as test oracles for ``cs336.tokenizer``.

Both follow the CS336 handout (assignment 1, sections 2.4-2.6) literally and share no code with
the package: their own copy of the GPT-2 pre-tokenization pattern, their own special-token split
(leftmost match, the longest special token at that position), a full recount of every adjacent
pair after each merge, ties going to the lexicographically greater ``(bytes, bytes)`` pair.
Vocabulary ids: special tokens first, then the 256 single bytes in byte order, then merges in
creation order. ``encode_slow`` applies the merges to each pre-token in list order; it jumps
straight to the next merge present in the pre-token, which is the same as trying every merge in
turn (one that is absent merges nothing) and keeps the 50,000 GPT-2 merges affordable.
``read_gpt2_files`` reads GPT-2's vocab.json / merges.txt with its own copy of GPT-2's byte table.
tests/fixtures/make_fixtures.py checks both against the CS336 fixtures and tiktoken.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import regex

PATTERN = regex.compile(r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def split_special(text: str, special_tokens: list[str]) -> list[tuple[str, bool]]:
    """``(piece, is_special)`` in text order; at each position the longest special token wins."""
    specials = sorted(special_tokens, key=len, reverse=True)
    pieces, start, i = [], 0, 0
    while i < len(text):
        hit = next((s for s in specials if text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        pieces += [(text[start:i], False), (hit, True)]
        i += len(hit)
        start = i
    pieces.append((text[start:], False))
    return [(piece, special) for piece, special in pieces if piece]


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


def train_from_text(
    text: str, vocab_size: int, special_tokens: list[str]
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    words: Counter[tuple[bytes, ...]] = Counter()
    for piece, is_special in split_special(text, special_tokens):
        if not is_special:
            for pre_token in PATTERN.findall(piece):
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


def train_bpe_slow(
    input_path: str | Path, vocab_size: int, special_tokens: list[str]
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    return train_from_text(Path(input_path).read_bytes().decode("utf-8"), vocab_size, special_tokens)


def encode_slow(
    text: str, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], special_tokens: list[str]
) -> list[int]:
    """Ids of ``text``; a special token missing from ``vocab`` takes the next free id."""
    ids_of: dict[bytes, int] = {}
    for idx in sorted(vocab):
        ids_of.setdefault(vocab[idx], idx)
    for token in special_tokens:
        ids_of.setdefault(token.encode("utf-8"), max(ids_of.values()) + 1)
    ranks: dict[tuple[bytes, bytes], list[int]] = {}
    for r, pair in enumerate(merges):
        ranks.setdefault(pair, []).append(r)
    out: list[int] = []
    for piece, is_special in split_special(text, special_tokens):
        if is_special:
            out.append(ids_of[piece.encode("utf-8")])
            continue
        for pre_token in PATTERN.findall(piece):
            word = tuple(bytes([b]) for b in pre_token.encode("utf-8"))
            done = 0  # merges[:done] have been applied
            while True:
                present = [r for p in zip(word, word[1:], strict=False) for r in ranks.get(p, ()) if r >= done]
                if not present:
                    break
                word = _merge_word(word, merges[min(present)])
                done = min(present) + 1
            out.extend(ids_of[part] for part in word)
    return out


def gpt2_byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68
    bytes map in byte order to U+0100, U+0101, ..."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(0x100 + k) for k, b in enumerate(b for b in range(256) if b not in table)})
    return table


def read_gpt2_files(
    vocab_path: str | Path, merges_path: str | Path, special_tokens: list[str] = ()
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """``(vocab, merges)`` of GPT-2-format files; ``special_tokens`` are spelled literally there."""
    char_to_byte = {c: b for b, c in gpt2_byte_to_char().items()}

    def unspell(token: str) -> bytes:
        return token.encode("utf-8") if token in special_tokens else bytes(char_to_byte[c] for c in token)

    spelled = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    vocab = {i: unspell(token) for token, i in spelled.items()}
    lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
    merges = [tuple(map(unspell, line.split(" "))) for line in lines if line and not line.startswith("#version")]
    return vocab, merges
