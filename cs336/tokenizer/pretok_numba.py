"""A numba scanner equivalent to ``regex.findall(GPT2_PATTERN, text)``.

GPT-2's pattern ``'(?:[sdmt]|ll|ve|re)| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`` is evaluated
by hand, alternative by alternative, as a backtracking engine does at each start position: (1) an ASCII
apostrophe and a lowercase contraction; (2-4) an optional U+0020, taken only if the next character starts
the run, then a run of letters, numbers or "other"; (5) a whitespace run, whole at the end of the text,
else minus its last character (``(?!\\S)``) when that leaves one; (6) a single whitespace character.
Some alternative matches everywhere, so pre-tokens partition the text and are kept as byte boundaries
of its UTF-8 (``utf8_bounds``; lone surrogates via ``surrogatepass``); ``pretokenize_fast`` splits at
them in C, ``pretoken_counts`` counts distinct pre-tokens in numba for the BPE trainer. Deviation from
``unicodedata``: the class table (one byte per code point) is built from the installed ``regex`` itself,
so it follows that module's Unicode version; its cache location: README, "Tokenizer".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import regex
from numba import njit

from cs336.fileio import atomic_open

KIND_OTHER = 0  # [^\s\p{L}\p{N}]
KIND_LETTER = 1  # \p{L}
KIND_NUMBER = 2  # \p{N}
KIND_SPACE = 3  # \s
N_CODE_POINTS = 0x110000

_SPACE = 0x20
_APOSTROPHE = 0x27
_TABLE: np.ndarray | None = None


def cache_dir() -> Path:
    """Where the kind table is cached: ``$CS336_CACHE_DIR``, else ``$XDG_CACHE_HOME/cs336``,
    else ``~/.cache/cs336``."""
    if os.environ.get("CS336_CACHE_DIR"):
        return Path(os.environ["CS336_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cs336"


def build_kind_table() -> np.ndarray:
    """One uint8 per code point: KIND_LETTER, KIND_NUMBER, KIND_SPACE or KIND_OTHER, as the
    installed ``regex`` classifies it.

    The scanner relies on the three classes being disjoint and on U+0020 being whitespace only;
    both hold for every Unicode version so far, and a ``regex`` build where they fail is refused.
    """
    every = np.arange(N_CODE_POINTS, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")
    table = np.full(N_CODE_POINTS, KIND_OTHER, dtype=np.uint8)
    claimed = np.zeros(N_CODE_POINTS, dtype=np.uint8)
    for kind, pattern in ((KIND_LETTER, r"\p{L}+"), (KIND_NUMBER, r"\p{N}+"), (KIND_SPACE, r"\s+")):
        for m in regex.finditer(pattern, every):
            table[m.start():m.end()] = kind
            claimed[m.start():m.end()] += 1
    if claimed.max() > 1 or table[_SPACE] != KIND_SPACE:
        overlap = np.flatnonzero(claimed > 1)[:5].tolist()
        raise RuntimeError(
            f"regex {regex.__version__} puts code points {overlap} in more than one of \\p{{L}}, "
            "\\p{N}, \\s (or does not call U+0020 whitespace); the numba pre-tokenizer assumes "
            "disjoint classes: use cs336.tokenizer.pretokenize.pretokenize_regex instead"
        )
    return table


def _save_atomic(table: np.ndarray, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, table)


def _load_cached(path: Path) -> np.ndarray | None:
    """The table stored at ``path``, or None when it is missing or not a kind table."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if loaded.dtype != np.uint8 or loaded.shape != (N_CODE_POINTS,) or loaded.max() > KIND_SPACE:
        return None
    return loaded


def kind_table() -> np.ndarray:
    """The kind table, from memory, the on-disk cache, or built (and then cached if the cache
    directory is writable; an unwritable cache only costs the rebuild next time)."""
    global _TABLE
    if _TABLE is not None:
        return _TABLE
    try:
        path = cache_dir() / f"gpt2_kinds_regex-{regex.__version__}.npy"
    except RuntimeError:  # Path.home(): no home directory to hold the cache
        path = None
    table = _load_cached(path) if path is not None else None
    if table is None:
        table = build_kind_table()
        if path is not None:
            try:
                _save_atomic(table, path)
            except OSError:
                pass
    _TABLE = table
    return table


@njit(cache=True, nogil=True, inline="always")
def _decode(buf, i):
    """Code point starting at byte i of well-formed UTF-8 (surrogates allowed) and its width."""
    b0 = np.int64(buf[i])
    if b0 < 0x80:
        return b0, 1
    if b0 < 0xE0:
        return ((b0 & 0x1F) << 6) | (np.int64(buf[i + 1]) & 0x3F), 2
    if b0 < 0xF0:
        return (
            ((b0 & 0x0F) << 12)
            | ((np.int64(buf[i + 1]) & 0x3F) << 6)
            | (np.int64(buf[i + 2]) & 0x3F)
        ), 3
    return (
        ((b0 & 0x07) << 18)
        | ((np.int64(buf[i + 1]) & 0x3F) << 12)
        | ((np.int64(buf[i + 2]) & 0x3F) << 6)
        | (np.int64(buf[i + 3]) & 0x3F)
    ), 4


@njit(cache=True, nogil=True)
def scan_bounds(buf, kinds):
    """Byte boundaries of the pre-tokens of ``buf``: int64 array [0, e1, e2, ..., len(buf)].

    ``buf`` is a uint8 array of UTF-8 as ``encode_utf8`` makes it (a truncated or invalid
    sequence is read past), ``kinds`` is ``kind_table()``. Callable from other numba code.
    """
    n = buf.shape[0]
    bounds = np.empty(n + 1, dtype=np.int64)
    bounds[0] = 0
    k = 0
    i = 0
    while i < n:
        cp, w = _decode(buf, i)
        kind = kinds[cp]
        end = -1
        if cp == _APOSTROPHE and i + 1 < n:
            # 1. contractions: ' then s|d|m|t, or ll|ve|re (ASCII, one byte each)
            c1 = buf[i + 1]
            if c1 == 0x73 or c1 == 0x64 or c1 == 0x6D or c1 == 0x74:  # s d m t
                end = i + 2
            elif i + 2 < n:
                c2 = buf[i + 2]
                if (
                    (c1 == 0x6C and c2 == 0x6C)  # ll
                    or (c1 == 0x76 and c2 == 0x65)  # ve
                    or (c1 == 0x72 and c2 == 0x65)  # re
                ):
                    end = i + 3
        if end < 0:
            j = i
            if cp == _SPACE and i + 1 < n:
                # 2.-4. a U+0020 joins the run that the next character starts, if any
                cp1 = _decode(buf, i + 1)[0]
                if kinds[cp1] != KIND_SPACE:
                    kind = kinds[cp1]
                    j = i + 1
            if kind != KIND_SPACE:
                while j < n:
                    cpj, wj = _decode(buf, j)
                    if kinds[cpj] != kind:
                        break
                    j += wj
                end = j
            else:
                # 5.-6. \s+(?!\S) gives back the run's last character unless the run ends the
                # text; a single character followed by non-space falls to \s+
                last = i
                while j < n:
                    cpj, wj = _decode(buf, j)
                    if kinds[cpj] != KIND_SPACE:
                        break
                    last = j
                    j += wj
                end = j if (j == n or last == i) else last
        k += 1
        bounds[k] = end
        i = end
    return bounds[: k + 1].copy()


@njit(cache=True, nogil=True)
def _join(buf, bounds, sep):
    """``buf`` with the bytes ``sep`` inserted at every inner boundary."""
    n_tok = bounds.shape[0] - 1
    m = sep.shape[0]
    out = np.empty(buf.shape[0] + max(n_tok - 1, 0) * m, dtype=np.uint8)
    o = 0
    t = 1
    nxt = bounds[1]
    for p in range(buf.shape[0]):
        if p == nxt:
            for q in range(m):
                out[o + q] = sep[q]
            o += m
            t += 1
            nxt = bounds[t]
        out[o] = buf[p]
        o += 1
    return out


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)  # 64-bit FNV-1a constants (Fowler, Noll, Vo)
_FNV_PRIME = np.uint64(0x100000001B3)


@njit(cache=True, nogil=True)
def _grow(arr, need):
    """``arr`` itself when it holds ``need`` items, else a copy with at least twice the room."""
    if need <= arr.shape[0]:
        return arr
    out = np.empty(max(need, 2 * arr.shape[0]), dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


@njit(cache=True, nogil=True)
def count_spans(buf, bounds):
    """``(first, counts)``: for each distinct byte string among the spans
    ``buf[bounds[k]:bounds[k + 1]]``, the index k of its first occurrence and its number of
    occurrences, in order of first occurrence.

    An open-addressing hash table (FNV-1a hashes, linear probing) that doubles when half full;
    the distinct spans are copied into a compact arena so that comparisons stay in cache. Memory
    is proportional to the distinct spans, not to the text.
    """
    n_tok = bounds.shape[0] - 1
    cap = 1024
    slots = np.full(cap, -1, dtype=np.int64)  # unique index per slot, -1 when empty
    first = np.empty(256, dtype=np.int64)
    counts = np.empty(256, dtype=np.int64)
    hashes = np.empty(256, dtype=np.uint64)
    arena_at = np.empty(257, dtype=np.int64)  # unique u is arena[arena_at[u]:arena_at[u + 1]]
    arena = np.empty(4096, dtype=np.uint8)
    arena_at[0] = 0
    n_uniq = 0
    for k in range(n_tok):
        a = bounds[k]
        b = bounds[k + 1]
        h = _FNV_OFFSET
        for p in range(a, b):
            h = (h ^ np.uint64(buf[p])) * _FNV_PRIME
        pos = np.int64(h & np.uint64(cap - 1))
        found = -1
        while slots[pos] >= 0:
            u = slots[pos]
            if hashes[u] == h:
                c = arena_at[u]
                if arena_at[u + 1] - c == b - a:
                    same = True
                    for q in range(b - a):
                        if arena[c + q] != buf[a + q]:
                            same = False
                            break
                    if same:
                        found = u
                        break
            pos = (pos + 1) & (cap - 1)
        if found >= 0:
            counts[found] += 1
            continue
        first = _grow(first, n_uniq + 1)
        counts = _grow(counts, n_uniq + 1)
        hashes = _grow(hashes, n_uniq + 1)
        arena_at = _grow(arena_at, n_uniq + 2)
        end = arena_at[n_uniq] + b - a
        arena = _grow(arena, end)
        arena[arena_at[n_uniq]:end] = buf[a:b]
        arena_at[n_uniq + 1] = end
        first[n_uniq] = k
        counts[n_uniq] = 1
        hashes[n_uniq] = h
        slots[pos] = n_uniq
        n_uniq += 1
        if 2 * n_uniq > cap:
            cap *= 2
            slots = np.full(cap, -1, dtype=np.int64)
            for v in range(n_uniq):
                pos = np.int64(hashes[v] & np.uint64(cap - 1))
                while slots[pos] >= 0:
                    pos = (pos + 1) & (cap - 1)
                slots[pos] = v
    return first[:n_uniq].copy(), counts[:n_uniq].copy()


def encode_utf8(text: str) -> bytes:
    """UTF-8 bytes of ``text``; lone surrogates are kept with ``surrogatepass``."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def utf8_bounds(text: str) -> tuple[bytes, np.ndarray]:
    """``(data, bounds)``: the UTF-8 bytes of ``text`` and the int64 byte boundaries of its GPT-2
    pre-tokens; pre-token k is ``data[bounds[k]:bounds[k + 1]]``."""
    data = encode_utf8(text)
    return data, scan_bounds(np.frombuffer(data, dtype=np.uint8), kind_table())


def pretokenize_bytes(text: str) -> list[bytes]:
    """GPT-2 pre-tokens of ``text`` as UTF-8 ``bytes``."""
    data, bounds = utf8_bounds(text)
    if len(bounds) <= 2:
        return [data] if data else []
    # 0xFF never occurs in UTF-8, so it is a separator that cannot collide with the text.
    sep = np.frombuffer(b"\xff", dtype=np.uint8)
    return _join(np.frombuffer(data, dtype=np.uint8), bounds, sep).tobytes().split(b"\xff")


# Separator candidates for the str path: the first one absent from the text is used.
_SEPARATORS = ("\x00", "\x01", "\ufdd0", "\ufdd1", "\U0010fffe")


def pretokenize_fast(text: str) -> list[str]:
    """GPT-2 pre-tokens of ``text``, equal to ``regex.findall(GPT2_PATTERN, text)``."""
    data, bounds = utf8_bounds(text)
    if len(bounds) <= 2:
        return [text] if text else []
    for sep in _SEPARATORS:
        if sep not in text:
            sep_bytes = np.frombuffer(sep.encode("utf-8"), dtype=np.uint8)
            joined = _join(np.frombuffer(data, dtype=np.uint8), bounds, sep_bytes).tobytes()
            return joined.decode("utf-8", "surrogatepass").split(sep)
    edges = bounds.tolist()
    return [data[a:b].decode("utf-8", "surrogatepass") for a, b in zip(edges, edges[1:], strict=False)]


def pretoken_counts(text: str) -> dict[str, int]:
    """Occurrences of each GPT-2 pre-token of ``text``, equal to
    ``collections.Counter(regex.findall(GPT2_PATTERN, text))``; keys in order of first occurrence.
    Only the distinct pre-tokens become Python strings."""
    data, bounds = utf8_bounds(text)
    first, counts = count_spans(np.frombuffer(data, dtype=np.uint8), bounds)
    starts = bounds[first].tolist()
    ends = bounds[first + 1].tolist()
    return {
        data[a:b].decode("utf-8", "surrogatepass"): c
        for a, b, c in zip(starts, ends, counts.tolist(), strict=True)
    }
