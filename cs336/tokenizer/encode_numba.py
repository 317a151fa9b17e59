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
open-addressing hash table in flat arrays (keys ``left << 32 | right``, linear probing), built
once per tokenizer. Many pre-tokens are encoded in one call: bytes concatenated, with offsets.
Compiled functions are cached on disk (``cache=True``), so later processes skip compilation.
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
def build_pair_table(left: np.ndarray, right: np.ndarray, new_id: np.ndarray):
    """Hash table from pair (left, right) to (rank, new id); rank = index in the merge list.

    A pair listed twice keeps its first rank (later duplicates can never apply).
    Returns (keys int64[S], ranks int32[S], ids int32[S]) with S a power of two >= 2 * merges.
    """
    n = left.shape[0]
    size = 16
    while size < 2 * n:
        size *= 2
    mask = np.int64(size - 1)
    keys = np.full(size, _EMPTY, dtype=np.int64)
    ranks = np.zeros(size, dtype=np.int32)
    ids = np.zeros(size, dtype=np.int32)
    for r in range(n):
        key = (np.int64(left[r]) << 32) | np.int64(right[r])
        slot = _hash(key, mask)
        while keys[slot] != _EMPTY and keys[slot] != key:
            slot = (slot + 1) & mask
        if keys[slot] == _EMPTY:
            keys[slot] = key
            ranks[slot] = r
            ids[slot] = new_id[r]
    return keys, ranks, ids


@numba.njit(cache=True, nogil=True, inline="always")
def _lookup(keys, mask, a, b):
    key = (np.int64(a) << 32) | np.int64(b)
    slot = _hash(key, mask)
    while True:
        k = keys[slot]
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
def _merge_piece(data, start, n, byte_ids, keys, mask, ranks, ids, sym, nxt, prv, prank, hr, hp, out, n_out):
    """Merge the pre-token ``data[start:start+n]``; write its ids at ``out[n_out:]``; return the
    new end of ``out``."""
    for j in range(n):
        sym[j] = byte_ids[data[start + j]]
        nxt[j] = j + 1 if j + 1 < n else -1
        prv[j] = j - 1
    size = 0
    for j in range(n - 1):
        slot = _lookup(keys, mask, sym[j], sym[j + 1])
        if slot >= 0:
            prank[j] = ranks[slot]
            size = _heap_push(hr, hp, size, ranks[slot], j)
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
        slot = _lookup(keys, mask, sym[pos], sym[right])
        sym[pos] = ids[slot]
        after = nxt[right]
        nxt[pos] = after
        if after >= 0:
            prv[after] = pos
        prank[right] = -1
        prank[pos] = -1
        if after >= 0:
            slot = _lookup(keys, mask, sym[pos], sym[after])
            if slot >= 0 and ranks[slot] >= floor:
                prank[pos] = ranks[slot]
                size = _heap_push(hr, hp, size, ranks[slot], pos)
        before = prv[pos]
        if before >= 0:
            prank[before] = -1
            slot = _lookup(keys, mask, sym[before], sym[pos])
            if slot >= 0 and ranks[slot] >= floor:
                prank[before] = ranks[slot]
                size = _heap_push(hr, hp, size, ranks[slot], before)
    j = 0 if n > 0 else -1
    while j >= 0:
        out[n_out] = sym[j]
        n_out += 1
        j = nxt[j]
    return n_out


CACHE_SLOTS_MAX = 1 << 21
"""Most slots of the per-call pre-token cache; it starts at 16 slots (cheap for short texts) and
doubles when half full, so at most 1M distinct pre-tokens (80 MB) are cached per call."""


@numba.njit(cache=True, nogil=True)
def encode_pieces(data, bounds, byte_ids, keys, ranks, ids):
    """Encode the pre-tokens ``data[bounds[i]:bounds[i+1]]`` (uint8) to token ids.

    Each distinct pre-token is merged once: an open-addressing table keyed by an FNV-1a hash of
    its bytes points at its first occurrence, whose ids are copied for later ones. The table
    grows with the number of distinct pre-tokens, so it stays cache-resident for typical text.
    Returns (out int32[T], out_bounds int64[P+1]): pre-token i's ids are
    ``out[out_bounds[i]:out_bounds[i+1]]``.
    """
    n_pieces = bounds.shape[0] - 1
    mask = np.int64(keys.shape[0] - 1)
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

    # Cache: slot -> first occurrence (its byte start, byte length, ids start, id count) + hash.
    slots = 16
    c_start = np.full(slots, -1, dtype=np.int64)
    c_len = np.empty(slots, dtype=np.int64)
    c_out = np.empty(slots, dtype=np.int64)
    c_nout = np.empty(slots, dtype=np.int64)
    c_hash = np.empty(slots, dtype=np.uint64)
    filled = 0

    n_out = 0
    for i in range(n_pieces):
        out_bounds[i] = n_out
        start = bounds[i]
        n = bounds[i + 1] - start
        h = np.uint64(0xCBF29CE484222325)  # FNV-1a 64-bit offset basis
        for j in range(n):
            h = (h ^ np.uint64(data[start + j])) * np.uint64(0x100000001B3)  # FNV prime
        cmask = np.uint64(slots - 1)
        slot = h & cmask
        hit = False
        while c_start[slot] >= 0:
            if c_hash[slot] == h and c_len[slot] == n:
                o = c_start[slot]
                hit = True
                for j in range(n):
                    if data[o + j] != data[start + j]:
                        hit = False
                        break
                if hit:
                    break
            slot = (slot + np.uint64(1)) & cmask
        if hit:
            first = c_out[slot]
            for j in range(c_nout[slot]):
                out[n_out + j] = out[first + j]
            n_out += c_nout[slot]
            continue
        first = n_out
        n_out = _merge_piece(
            data, start, n, byte_ids, keys, mask, ranks, ids, sym, nxt, prv, prank, hr, hp, out, n_out
        )
        if 2 * (filled + 1) > slots:
            if 2 * slots > CACHE_SLOTS_MAX:
                continue  # full: later new pre-tokens are merged without being cached
            # grow: rehash every entry into a table twice the size
            new_slots = 2 * slots
            nmask = np.uint64(new_slots - 1)
            n_start = np.full(new_slots, -1, dtype=np.int64)
            n_len = np.empty(new_slots, dtype=np.int64)
            n_outs = np.empty(new_slots, dtype=np.int64)
            n_nout = np.empty(new_slots, dtype=np.int64)
            n_hash = np.empty(new_slots, dtype=np.uint64)
            for s in range(slots):
                if c_start[s] >= 0:
                    t = c_hash[s] & nmask
                    while n_start[t] >= 0:
                        t = (t + np.uint64(1)) & nmask
                    n_start[t] = c_start[s]
                    n_len[t] = c_len[s]
                    n_outs[t] = c_out[s]
                    n_nout[t] = c_nout[s]
                    n_hash[t] = c_hash[s]
            slots = new_slots
            c_start, c_len, c_out, c_nout, c_hash = n_start, n_len, n_outs, n_nout, n_hash
            slot = h & nmask
            while c_start[slot] >= 0:
                slot = (slot + np.uint64(1)) & nmask
        c_start[slot] = start
        c_len[slot] = n
        c_out[slot] = first
        c_nout[slot] = n_out - first
        c_hash[slot] = h
        filled += 1
    out_bounds[n_pieces] = n_out
    return out[:n_out], out_bounds
