"""Numba core of the BPE encoder: merge by pair rank over arrays of token ids.

A pre-token's bytes start as single-byte token ids. The pair with the lowest merge rank is
merged first, leftmost occurrence first, until no adjacent pair is a merge. That equals applying
the merge list in order, each merge to all of its occurrences (the CS336 reference): merging
pair k only creates pairs that contain the new token, whose merges come after k. For merge lists
where that does not hold (a merge listed before the merge creating one of its halves) a pair of
rank lower than the rank being applied is never merged, which is again what applying the list in
order does.

Per pre-token the work is O(n log n) for n bytes: a doubly linked list of symbols and a binary
min-heap of (rank, position) entries with lazy deletion. The pair -> (rank, new id) table is an
open-addressing hash table of int64 rows (key ``left << 32 | right``, rank, new id; linear
probing), built once per tokenizer. Many pre-tokens are encoded in one call: bytes concatenated,
with offsets. A pre-token cache that persists across calls (``new_cache``: an open-addressing
table keyed by an FNV-1a hash of the bytes, plus arenas for the key bytes and the ids) makes a
repeated pre-token cost one hash lookup and a copy. Compiled functions are cached on disk
(``cache=True``), so later processes skip compilation.
"""

from __future__ import annotations

import numba
import numpy as np

_EMPTY = np.int64(-1)


@numba.njit(cache=True, nogil=True)
def _hash(key: np.int64, mask: np.int64) -> np.int64:
    # Fibonacci hashing: multiply by 2**64 / golden ratio (as a signed int64), keep high bits.
    h = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    return np.int64(h >> np.uint64(29)) & mask


@numba.njit(cache=True)
def build_pair_table(left: np.ndarray, right: np.ndarray, new_id: np.ndarray) -> np.ndarray:
    """Hash table from pair (left, right) to (rank, new id); rank = index in the merge list.

    A pair listed twice keeps its first rank (later duplicates can never apply).
    Returns int64[S, 3] rows (key, rank, new id), key -1 when empty, S a power of two
    >= 2 * merges; one row per probe keeps a lookup to one cache line.
    """
    n = left.shape[0]
    size = 16
    while size < 2 * n:
        size *= 2
    mask = np.int64(size - 1)
    table = np.full((size, 3), _EMPTY, dtype=np.int64)
    for r in range(n):
        key = (np.int64(left[r]) << 32) | np.int64(right[r])
        slot = _hash(key, mask)
        while table[slot, 0] != _EMPTY and table[slot, 0] != key:
            slot = (slot + 1) & mask
        if table[slot, 0] == _EMPTY:
            table[slot, 0] = key
            table[slot, 1] = r
            table[slot, 2] = new_id[r]
    return table


@numba.njit(cache=True, nogil=True, inline="always")
def _lookup(pairs, mask, a, b):
    """Row of pair (a, b) in ``pairs``, or -1."""
    key = (np.int64(a) << 32) | np.int64(b)
    slot = _hash(key, mask)
    while True:
        k = pairs[slot, 0]
        if k == key:
            return slot
        if k == _EMPTY:
            return -1
        slot = (slot + 1) & mask


@numba.njit(cache=True, nogil=True, inline="always")
def _heap_push(hr, hp, size, rank, pos):
    i = size
    hr[i] = rank
    hp[i] = pos
    while i > 0:
        parent = (i - 1) >> 1
        if hr[parent] < hr[i] or (hr[parent] == hr[i] and hp[parent] < hp[i]):
            break
        hr[i], hr[parent] = hr[parent], hr[i]
        hp[i], hp[parent] = hp[parent], hp[i]
        i = parent
    return size + 1


@numba.njit(cache=True, nogil=True, inline="always")
def _heap_pop(hr, hp, size):
    size -= 1
    hr[0] = hr[size]
    hp[0] = hp[size]
    i = 0
    while True:
        lo = i
        for c in (2 * i + 1, 2 * i + 2):
            if c < size and (hr[c] < hr[lo] or (hr[c] == hr[lo] and hp[c] < hp[lo])):
                lo = c
        if lo == i:
            break
        hr[i], hr[lo] = hr[lo], hr[i]
        hp[i], hp[lo] = hp[lo], hp[i]
        i = lo
    return size


@numba.njit(cache=True, nogil=True, inline="always")
def _merge_piece(data, start, n, byte_ids, pairs, mask, sym, nxt, prv, prank, hr, hp, out, n_out):
    """Merge the pre-token ``data[start:start+n]``; write its ids at ``out[n_out:]``; return the
    new end of ``out``."""
    for j in range(n):
        sym[j] = byte_ids[data[start + j]]
        nxt[j] = j + 1 if j + 1 < n else -1
        prv[j] = j - 1
    size = 0
    for j in range(n - 1):
        slot = _lookup(pairs, mask, sym[j], sym[j + 1])
        if slot >= 0:
            prank[j] = pairs[slot, 1]
            size = _heap_push(hr, hp, size, prank[j], j)
        else:
            prank[j] = -1
    if n > 0:
        prank[n - 1] = -1
    floor = -1  # rank being applied; lower-ranked pairs can no longer merge
    while size > 0:
        rank = hr[0]
        pos = hp[0]
        size = _heap_pop(hr, hp, size)
        if prank[pos] != rank:
            continue  # stale: the pair at pos changed since this entry was pushed
        floor = rank
        right = nxt[pos]
        slot = _lookup(pairs, mask, sym[pos], sym[right])
        sym[pos] = pairs[slot, 2]
        after = nxt[right]
        nxt[pos] = after
        if after >= 0:
            prv[after] = pos
        prank[right] = -1
        prank[pos] = -1
        if after >= 0:
            slot = _lookup(pairs, mask, sym[pos], sym[after])
            if slot >= 0 and pairs[slot, 1] >= floor:
                prank[pos] = pairs[slot, 1]
                size = _heap_push(hr, hp, size, prank[pos], pos)
        before = prv[pos]
        if before >= 0:
            prank[before] = -1
            slot = _lookup(pairs, mask, sym[before], sym[pos])
            if slot >= 0 and pairs[slot, 1] >= floor:
                prank[before] = pairs[slot, 1]
                size = _heap_push(hr, hp, size, prank[before], before)
    j = 0 if n > 0 else -1
    while j >= 0:
        out[n_out] = sym[j]
        n_out += 1
        j = nxt[j]
    return n_out


CACHE_SLOTS = 1 << 18
"""Slots of the pre-token cache; at most half are filled (131,072 distinct pre-tokens)."""
CACHE_KEY_BYTES = 1 << 22
"""Bytes of pre-token text the cache holds (4 MB)."""
CACHE_IDS = 1 << 20
"""Token ids the cache holds (4 MB)."""


def new_cache() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An empty pre-token cache for ``encode_pieces``: (table int64[S, 5] rows (hash, key
    start, key length, ids start, id count) with key length -1 when empty; key bytes uint8[K];
    ids int32[I]; state int64[4] = (entries, key bytes used, ids used, full flag))."""
    table = np.zeros((CACHE_SLOTS, 5), dtype=np.int64)
    table[:, 2] = -1
    return (table, np.empty(CACHE_KEY_BYTES, dtype=np.uint8), np.empty(CACHE_IDS, dtype=np.int32),
            np.zeros(4, dtype=np.int64))


def clear_cache(cache) -> None:
    """Empty ``cache`` in place."""
    table, _, _, state = cache
    table[:, 2] = -1
    state[:] = 0


@numba.njit(cache=True, nogil=True)
def encode_pieces(data, bounds, byte_ids, pairs, c_table, c_keys, c_ids, c_state):
    """Encode the pre-tokens ``data[bounds[i]:bounds[i+1]]`` (uint8) to token ids.

    The cache (see ``new_cache``) persists across calls: an open-addressing table keyed by an
    FNV-1a hash of a pre-token's bytes gives its ids; a pre-token not found is merged and added
    while there is room, else ``c_state[3]`` is set (the caller then clears the cache).
    Returns (out int32[T], out_bounds int64[P+1]): pre-token i's ids are
    ``out[out_bounds[i]:out_bounds[i+1]]``.
    """
    n_pieces = bounds.shape[0] - 1
    mask = np.int64(pairs.shape[0] - 1)
    cmask = np.uint64(c_table.shape[0] - 1)
    longest = 0
    for i in range(n_pieces):
        longest = max(longest, bounds[i + 1] - bounds[i])
    sym = np.empty(longest, dtype=np.int32)  # token id at each live position
    nxt = np.empty(longest, dtype=np.int64)  # next live position, -1 at the end
    prv = np.empty(longest, dtype=np.int64)  # previous live position, -1 at the start
    prank = np.empty(longest, dtype=np.int32)  # rank of the pair starting here, -1 if none
    # heap entries, stale ones included: n - 1 initial pairs + at most 2 per merge (n - 1 merges)
    hr = np.empty(3 * longest, dtype=np.int32)  # heap: ranks
    hp = np.empty(3 * longest, dtype=np.int64)  # heap: positions
    out = np.empty(bounds[n_pieces] - bounds[0], dtype=np.int32)
    out_bounds = np.empty(n_pieces + 1, dtype=np.int64)

    n_out = 0
    for i in range(n_pieces):
        out_bounds[i] = n_out
        start = bounds[i]
        n = bounds[i + 1] - start
        h = np.uint64(0xCBF29CE484222325)  # FNV-1a 64-bit offset basis
        for j in range(n):
            h = (h ^ np.uint64(data[start + j])) * np.uint64(0x100000001B3)  # FNV prime
        hkey = np.int64(h)
        slot = h & cmask
        hit = False
        while c_table[slot, 2] >= 0:
            if c_table[slot, 0] == hkey and c_table[slot, 2] == n:
                o = c_table[slot, 1]
                hit = True
                for j in range(n):
                    if c_keys[o + j] != data[start + j]:
                        hit = False
                        break
                if hit:
                    break
            slot = (slot + np.uint64(1)) & cmask
        if hit:
            first = c_table[slot, 3]
            for j in range(c_table[slot, 4]):
                out[n_out + j] = c_ids[first + j]
            n_out += c_table[slot, 4]
            continue
        first = n_out
        n_out = _merge_piece(data, start, n, byte_ids, pairs, mask, sym, nxt, prv, prank, hr, hp, out, n_out)
        count = n_out - first
        if (
            2 * (c_state[0] + 1) > c_table.shape[0]
            or c_state[1] + n > c_keys.shape[0]
            or c_state[2] + count > c_ids.shape[0]
        ):
            c_state[3] = 1  # full: later new pre-tokens of this call are merged, not cached
            continue
        c_table[slot, 0] = hkey
        c_table[slot, 1] = c_state[1]
        c_table[slot, 2] = n
        c_table[slot, 3] = c_state[2]
        c_table[slot, 4] = count
        for j in range(n):
            c_keys[c_state[1] + j] = data[start + j]
        for j in range(count):
            c_ids[c_state[2] + j] = out[first + j]
        c_state[0] += 1
        c_state[1] += n
        c_state[2] += count
    out_bounds[n_pieces] = n_out
    return out[:n_out], out_bounds
