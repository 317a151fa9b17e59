"""Byte-level BPE tokenizer: encode text to token ids and decode ids to text.

Semantics are the CS336 handout's: text is split on special tokens (longest match first), each ordinary
segment into GPT-2 pre-tokens, and each pre-token's UTF-8 bytes merged by applying the merge list in order;
for the GPT-2 vocabulary the ids equal tiktoken's ``gpt2`` and OpenAI's ``encoder.py``. The text is
encoded to UTF-8 once and split by byte offsets (``pretok_numba``, else the regex ``pretokenize``); one
numba call (``encode_numba.encode_pieces``) gives every pre-token's ids as one int32 array, and a cache
that persists across calls (numpy arenas, about 18 MB, cleared when full) turns a repeated pre-token into
one hash lookup. Calls from several threads on one ``Tokenizer`` are serialized by a lock. Deviations:
lone surrogates are encoded as their ``surrogatepass`` bytes (decoding to U+FFFD; tiktoken replaces them
before encoding), and bytes held under several ids encode as the lowest id.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import regex

from cs336.interrupt import make_default_handler_numba_safe

from .encode_numba import build_pair_table, clear_cache, encode_pieces, new_cache
from .gpt2_files import load_vocab_merges
from .pretokenize import check_special_token_text, pretokenize, special_token_regex, split_on_special

try:
    from .pretok_numba import utf8_bounds
except ImportError:
    utf8_bounds = None  # type: ignore[assignment]

# A safe place to cut a stream: after a non-whitespace character that is followed by whitespace.
# No alternative of the GPT-2 pattern matches across such a point or looks past it.
_CUT_RE = regex.compile(r"(?r)\S(?=\s)")


class Tokenizer:
    """Byte-level BPE tokenizer over ``vocab`` (id -> bytes) and ``merges`` (in creation order).

    ``special_tokens`` are never split; one that is not in ``vocab`` gets the next free id.
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: list[str] | None = None,
    ) -> None:
        self.vocab: dict[int, bytes] = dict(vocab)
        self.merges: list[tuple[bytes, bytes]] = list(merges)
        token_id: dict[bytes, int] = {}
        for idx in sorted(self.vocab):
            token = self.vocab[idx]
            if not isinstance(idx, int) or idx < 0 or not isinstance(token, bytes):
                raise ValueError(f"vocab entry {idx!r}: {token!r} must map a non-negative int id to bytes")
            token_id.setdefault(token, idx)
        missing_bytes = [b for b in range(256) if bytes([b]) not in token_id]
        if missing_bytes:
            raise ValueError(
                f"vocab lacks the single-byte token {bytes([missing_bytes[0]])!r} "
                f"({len(missing_bytes)} of 256 missing); a byte-level BPE vocab holds all 256 bytes"
            )
        if max(self.vocab) >= 2**31 - len(special_tokens or ()):
            raise ValueError(f"vocab id {max(self.vocab)} does not fit in int32; renumber the vocab")
        if isinstance(special_tokens, (str, bytes)):
            raise TypeError(f"special_tokens must be a list of strings, got {special_tokens!r}; wrap it in a list")
        self.special_tokens: list[str] = []
        self._special_ids: dict[str, int] = {}
        next_id = max(self.vocab) + 1
        for tok in special_tokens or ():
            if not isinstance(tok, str) or not tok:
                raise ValueError(f"special token {tok!r} must be a non-empty string")
            if tok in self._special_ids:
                continue
            check_special_token_text(tok)
            data = tok.encode("utf-8")
            if data not in token_id:
                self.vocab[next_id] = data
                token_id[data] = next_id
                next_id += 1
            self.special_tokens.append(tok)
            self._special_ids[tok] = token_id[data]
        self._special_re = special_token_regex(self.special_tokens)
        self._max_special_len = max((len(t) for t in self.special_tokens), default=0)
        self._token_id = token_id

        n_merges = len(self.merges)
        left = np.empty(n_merges, dtype=np.int32)
        right = np.empty(n_merges, dtype=np.int32)
        new_id = np.empty(n_merges, dtype=np.int32)
        for r, (a, b) in enumerate(self.merges):
            for piece in (a, b, a + b):
                if piece not in token_id:
                    raise ValueError(
                        f"merge {r} ({a!r}, {b!r}): {piece!r} is not in the vocab; "
                        "vocab and merges must come from the same tokenizer"
                    )
            left[r], right[r], new_id[r] = token_id[a], token_id[b], token_id[a + b]
        self._byte_ids = np.array([token_id[bytes([b])] for b in range(256)], dtype=np.int32)
        self._pairs = build_pair_table(left, right, new_id)

        self._vocab_size = max(self.vocab) + 1
        if self._vocab_size <= 2 * len(self.vocab) + 256:
            self._decode_table: list[bytes | None] | dict[int, bytes] = [None] * self._vocab_size
            for idx, token in self.vocab.items():
                self._decode_table[idx] = token
        else:  # sparse ids (a dict from the caller): memory stays proportional to the vocab
            self._decode_table = dict(self.vocab)
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # new_cache(), on first use
        self._lock = threading.Lock()

    @classmethod
    def from_files(
        cls,
        vocab_filepath: str | os.PathLike,
        merges_filepath: str | os.PathLike,
        special_tokens: list[str] | None = None,
    ) -> Tokenizer:
        """Load GPT-2-format ``vocab.json`` and ``merges.txt`` (see ``gpt2_files``)."""
        vocab, merges = load_vocab_merges(vocab_filepath, merges_filepath)
        return cls(vocab, merges, special_tokens)

    def __reduce__(self):
        specials = list(self.special_tokens)
        return (Tokenizer, (self.vocab, self.merges, specials))

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (ids of the output can be stored in this many values)."""
        return self._vocab_size

    def token_id(self, token: bytes) -> int | None:
        """The id of ``token``, or None when it is not in the vocab."""
        return self._token_id.get(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return self.encode_array(text).tolist()

    def encode_iterable(self, iterable: Iterable[str], *, buffer_chars: int = 1 << 16) -> Iterator[int]:
        """Lazily yield the ids of the concatenation of ``iterable`` (e.g. an open text file).

        The ids equal ``encode("".join(iterable))``. Text is buffered until at least
        ``buffer_chars`` characters are held, then encoded up to the last point where no
        pre-token or special token can continue across; the rest stays buffered. Memory is
        bounded by ``buffer_chars`` plus the longest stretch of input without such a point.
        """
        if buffer_chars < 1:
            raise ValueError(f"buffer_chars must be >= 1, got {buffer_chars}")
        parts: list[str] = []
        held = 0
        threshold = buffer_chars
        for chunk in iterable:
            if not isinstance(chunk, str):
                raise TypeError(
                    f"encode_iterable expects str chunks, got {type(chunk).__name__}; "
                    "open files in text mode"
                )
            parts.append(chunk)
            held += len(chunk)
            if held < threshold:
                continue
            buf = "".join(parts)
            cut = self.safe_cut(buf)
            if cut > 0:
                yield from self.encode(buf[:cut])
                buf = buf[cut:]
                threshold = buffer_chars
            else:
                threshold = 2 * len(buf)  # no cut point yet: wait for twice as much text
            parts = [buf]
            held = len(buf)
        yield from self.encode("".join(parts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 decode to U+FFFD."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        elif not isinstance(ids, list):
            ids = list(ids)
        table = self._decode_table
        try:
            data = b"".join(map(table.__getitem__, ids))  # type: ignore[arg-type]  # None: TypeError below
            if ids and min(ids) < 0:
                raise IndexError
        except (IndexError, KeyError, TypeError):
            size = self._vocab_size
            for i in ids:
                if not isinstance(i, (int, np.integer)) or not 0 <= i < size or (
                    table[i] if isinstance(table, list) else table.get(int(i))
                ) is None:
                    raise ValueError(
                        f"token id {i!r} is not in the vocabulary (valid ids: 0..{size - 1})"
                    ) from None
            raise
        return data.decode("utf-8", errors="replace")

    def _encode_bounds(self, data: bytes, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:  # the numba call updates the cache arrays without the GIL
            if self._cache is None:
                self._cache = new_cache()
            result = encode_pieces(np.frombuffer(data, dtype=np.uint8), bounds, self._byte_ids, self._pairs,
                                   *self._cache)
            if self._cache[3][3]:
                clear_cache(self._cache)
        return result

    def safe_cut(self, buf: str) -> int:
        """Largest position p > 0 such that encoding buf[:p] and the text after p separately
        equals encoding them together, whatever text follows ``buf``; 0 when there is none."""
        limit = len(buf) - 1 - self._max_special_len
        if limit <= 0:
            return 0
        m = _CUT_RE.search(buf, 0, limit + 1)
        if m is None:
            return 0
        cut = m.end()
        if self._special_re is not None:
            # Special-token matches starting before `limit` cannot change with more text.
            for sm in self._special_re.finditer(buf, 0, len(buf)):
                if sm.start() >= cut:
                    break
                if sm.end() > cut:
                    return sm.start()
        return cut

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int32 array (``encode`` without the list conversion)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        make_default_handler_numba_safe()  # Ctrl-C inside a numba callback would segfault
        if self._special_re is not None and any(tok in text for tok in self.special_tokens):
            segments = split_on_special(text, self.special_tokens)
        else:
            data, bounds = pretoken_bounds(text)  # no special token: one ordinary segment
            return self._encode_bounds(data, bounds)[0]
        # All ordinary segments go through one numba call (one fixed call cost per text);
        # `layout` records, in text order, a special id or a range of pre-token indices.
        datas: list[bytes] = []
        starts: list[np.ndarray] = []
        layout: list[tuple[int, int]] = []
        n_bytes = 0
        n_pieces = 0
        for segment, is_special in segments:
            if is_special:
                layout.append((-1, self._special_ids[segment]))
                continue
            data, bounds = pretoken_bounds(segment)
            datas.append(data)
            starts.append(bounds[:-1] + n_bytes)
            layout.append((n_pieces, n_pieces + len(bounds) - 1))
            n_bytes += len(data)
            n_pieces += len(bounds) - 1
        starts.append(np.array([n_bytes], dtype=np.int64))
        out, out_bounds = self._encode_bounds(b"".join(datas), np.concatenate(starts))
        parts = []
        for first, last in layout:
            if first < 0:
                parts.append(np.array([last], dtype=np.int32))
            else:
                parts.append(out[out_bounds[first] : out_bounds[last]])
        return np.concatenate(parts)


def pretoken_bounds(text: str) -> tuple[bytes, np.ndarray]:
    """UTF-8 bytes of ``text`` and the int64 byte offsets where its GPT-2 pre-tokens start, plus
    ``len(bytes)`` at the end. Uses the numba scanner when present, else ``pretokenize``."""
    if utf8_bounds is not None:
        return utf8_bounds(text)
    return pretoken_bounds_regex(text)


def pretoken_bounds_regex(text: str) -> tuple[bytes, np.ndarray]:
    """``pretoken_bounds`` computed from ``pretokenize`` (the definition)."""
    encoded = [piece.encode("utf-8", "surrogatepass") for piece in pretokenize(text)]
    bounds = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=bounds[1:])
    return b"".join(encoded), bounds
