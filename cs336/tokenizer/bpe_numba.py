"""The BPE merge loop, compiled with numba.

Input: the distinct pre-tokens ("words") as symbol-id arrays with their counts. Each merge picks the pair
with the highest count, ties to the lexicographically greater pair of byte strings (a prefix sorts first),
as Python's ``max`` over ``(count, (bytes, bytes))`` does in the CS336 handout's reference algorithm.
Deviation from that reference: only the words containing the pair are rewritten, so a merge costs time
in proportion to the words it touches. State: a pair table (open addressing on ``(a << 32) | b``, rows
``(a, b, count, list head, last word, dirty stamp)``); per pair a linked list of the words that have
held it (stale entries skipped); a binary max-heap of ``(count, key a, key b, pair id)`` with lazy
invalidation (an entry counts only if its count is current; each changed pair gets one fresh entry per
merge; a key holds a token's first 8 bytes, so most ties resolve in the heap). Per merge ``(a, b) -> t``
the pairs overlapping a merge site are subtracted and those touching a new ``t`` added. The arrays
persist between calls, so ``train_bpe._merge`` runs the loop in blocks and reports progress.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Columns of the pair-row array.
PA, PB, PCOUNT, PHEAD, PLAST, PSTAMP = 0, 1, 2, 3, 4, 5
PAIR_COLS = 6
# Columns of the heap: count, 8-byte keys of the two tokens (see token_key), pair id.
H_COUNT, H_KA, H_KB, H_PID = 0, 1, 2, 3
H_COLS = 4
# Slots of the scalar-state array.
M_PAIRS, M_NODES, M_HEAP, M_POOL, M_DONE = 0, 1, 2, 3, 4
META_LEN = 5

_FIB = np.uint64(11400714819323198485)  # 2**64 / golden ratio: Fibonacci hashing multiplier
_SIGN = np.uint64(1 << 63)


@njit(cache=True)
def _grow_rows(arr, need):
    """``arr`` (2-D) with at least ``need`` rows, doubling its length when it is too short."""
    if need <= arr.shape[0]:
        return arr
    cap = arr.shape[0] * 2
    while cap < need:
        cap *= 2
    out = np.empty((cap, arr.shape[1]), arr.dtype)
    out[: arr.shape[0]] = arr
    return out


@njit(cache=True)
def _grow_1d(arr, need):
    if need <= arr.shape[0]:
        return arr
    cap = arr.shape[0] * 2
    while cap < need:
        cap *= 2
    out = np.empty(cap, arr.dtype)
    out[: arr.shape[0]] = arr
    return out


@njit(cache=True)
def _slot(key, table):
    """Row of ``key`` in the hash table (a power-of-two number of ``(key, pair id)`` rows below
    2**32), or of the empty row where it belongs; Fibonacci hashing, linear probing."""
    mask = table.shape[0] - 1
    i = np.int64(((np.uint64(key) * _FIB) >> np.uint64(32)) & np.uint64(mask))
    while table[i, 0] != -1 and table[i, 0] != key:
        i = (i + 1) & mask
    return i


@njit(cache=True)
def _rehash(table, pairs, n_pairs, need):
    """A table with room for ``need`` pairs at load factor <= 1/2."""
    cap = table.shape[0]
    if 2 * need <= cap:
        return table
    while 2 * need > cap:
        cap *= 2
    out = np.full((cap, 2), -1, np.int64)
    for p in range(n_pairs):
        key = (pairs[p, PA] << 32) | pairs[p, PB]
        i = _slot(key, out)
        out[i, 0] = key
        out[i, 1] = p
    return out


@njit(cache=True)
def _cmp_tokens(x, y, pool, tok_off, tok_len):
    """Sign of bytes(x) - bytes(y) in lexicographic order (a proper prefix sorts first)."""
    if x == y:
        return 0
    ox, oy, lx, ly = tok_off[x], tok_off[y], tok_len[x], tok_len[y]
    for k in range(min(lx, ly)):
        cx, cy = pool[ox + k], pool[oy + k]
        if cx != cy:
            return 1 if cx > cy else -1
    if lx == ly:
        return 0
    return 1 if lx > ly else -1


@njit(cache=True)
def token_key(pool, off, length):
    """The token's first 8 bytes as a big-endian integer (zero-padded), with the sign bit flipped
    so that signed comparison of keys orders them as the byte strings; equal keys need a full
    comparison."""
    key = np.uint64(0)
    for k in range(8):
        key <<= np.uint64(8)
        if k < length:
            key |= np.uint64(pool[off + k])
    return np.int64(key ^ _SIGN)


def byte_keys() -> np.ndarray:
    """``token_key`` of the 256 one-byte tokens, computed in numpy (an entry point fewer for numba
    to load in a fresh process): byte b is the key ``(b << 56) ^ sign bit``."""
    return ((np.arange(256, dtype=np.uint64) << np.uint64(56)) ^ _SIGN).view(np.int64)


@njit(cache=True)
def _before(heap, i, j, pairs, pool, tok_off, tok_len, tok_key):
    """True when heap entry i ranks above entry j: higher count, then greater (bytes, bytes).
    Entries carry the two tokens' 8-byte keys, so most ties resolve without touching the pool."""
    for col in range(H_PID):  # count, key of a, key of b
        if heap[i, col] != heap[j, col]:
            return heap[i, col] > heap[j, col]
    pi, pj = heap[i, H_PID], heap[j, H_PID]
    c = _cmp_tokens(pairs[pi, PA], pairs[pj, PA], pool, tok_off, tok_len)
    if c == 0:
        c = _cmp_tokens(pairs[pi, PB], pairs[pj, PB], pool, tok_off, tok_len)
    return c > 0


@njit(cache=True)
def _swap(heap, i, j):
    for col in range(H_COLS):
        heap[i, col], heap[j, col] = heap[j, col], heap[i, col]


@njit(cache=True)
def _set_entry(heap, h, p, pairs, tok_key):
    heap[h, H_COUNT] = pairs[p, PCOUNT]
    heap[h, H_KA] = tok_key[pairs[p, PA]]
    heap[h, H_KB] = tok_key[pairs[p, PB]]
    heap[h, H_PID] = p


@njit(cache=True)
def _sift_down(heap, i, n, pairs, pool, tok_off, tok_len, tok_key):
    while True:
        best = i
        left, right = 2 * i + 1, 2 * i + 2
        if left < n and _before(heap, left, best, pairs, pool, tok_off, tok_len, tok_key):
            best = left
        if right < n and _before(heap, right, best, pairs, pool, tok_off, tok_len, tok_key):
            best = right
        if best == i:
            return
        _swap(heap, i, best)
        i = best


@njit(cache=True)
def _sift_up(heap, i, pairs, pool, tok_off, tok_len, tok_key):
    while i > 0:
        parent = (i - 1) // 2
        if not _before(heap, i, parent, pairs, pool, tok_off, tok_len, tok_key):
            return
        _swap(heap, i, parent)
        i = parent


@njit(cache=True)
def _pair_id(a, b, pairs, table, meta):
    """Id of pair (a, b), adding a zero-count row when it is new (the caller guarantees room)."""
    key = (np.int64(a) << 32) | np.int64(b)
    i = _slot(key, table)
    if table[i, 0] == key:
        return table[i, 1]
    p = meta[M_PAIRS]
    pairs[p, PA], pairs[p, PB], pairs[p, PCOUNT] = a, b, 0
    pairs[p, PHEAD], pairs[p, PLAST], pairs[p, PSTAMP] = -1, -1, -1
    table[i, 0] = key
    table[i, 1] = p
    meta[M_PAIRS] = p + 1
    return p


@njit(cache=True)
def _link(p, w, pairs, nodes, meta):
    """Record that word w contains pair p (once per word: repeats from the same word are dropped)."""
    if pairs[p, PLAST] == w:
        return
    n = meta[M_NODES]
    nodes[n, 0] = w
    nodes[n, 1] = pairs[p, PHEAD]
    pairs[p, PHEAD] = n
    pairs[p, PLAST] = w
    meta[M_NODES] = n + 1


@njit(cache=True)
def init_state(sym, word_start, word_len, word_count, pool, tok_off, tok_len, tok_key):
    """Count every adjacent pair, index the words containing each, and heapify.

    Returns (pairs, table, nodes, heap, meta).
    """
    total = np.int64(0)
    for w in range(word_start.shape[0]):
        total += max(word_len[w] - 1, 0)
    pairs = np.empty((max(total, np.int64(16)), PAIR_COLS), np.int64)
    nodes = np.empty((max(total, np.int64(16)), 2), np.int64)
    table = _rehash(np.full((16, 2), -1, np.int64), pairs, np.int64(0), total)
    meta = np.zeros(META_LEN, np.int64)
    meta[M_POOL] = pool.shape[0]
    for w in range(word_start.shape[0]):
        s, c = word_start[w], word_count[w]
        for i in range(word_len[w] - 1):
            p = _pair_id(sym[s + i], sym[s + i + 1], pairs, table, meta)
            pairs[p, PCOUNT] += c
            _link(p, w, pairs, nodes, meta)
    n_pairs = meta[M_PAIRS]
    heap = np.empty((max(2 * n_pairs, 16), H_COLS), np.int64)
    for p in range(n_pairs):
        _set_entry(heap, p, p, pairs, tok_key)
    for i in range(n_pairs // 2 - 1, -1, -1):
        _sift_down(heap, i, n_pairs, pairs, pool, tok_off, tok_len, tok_key)
    meta[M_HEAP] = n_pairs
    return pairs, table, nodes, heap, meta


@njit(cache=True)
def _mark(p, m, pairs, dirty, n_dirty):
    """Append p to the pairs changed by merge m unless it is there already; returns the new size."""
    if pairs[p, PSTAMP] == m:
        return n_dirty
    pairs[p, PSTAMP] = m
    dirty[n_dirty] = p
    return n_dirty + 1


@njit(cache=True)
def run_merges(sym, word_start, word_len, word_count, pool, tok_off, tok_len, tok_key,
               pairs, table, nodes, heap, meta, first_new_id, merges, stop):
    """Perform merges until ``meta[M_DONE] == stop`` or no pair is left.

    Merge m creates token ``first_new_id + m`` and is written to ``merges[m] = (a, b)``. ``sym`` and
    ``word_len`` are rewritten in place; ``tok_off``/``tok_len`` must have room for every new
    token. Returns (pool, pairs, table, nodes, heap), some of them reallocated. Arrays grow here,
    before each word is rewritten, so that the helpers called per pair never reallocate.
    """
    max_len = 1
    for w in range(word_len.shape[0]):
        max_len = max(max_len, word_len[w])
    site = np.zeros(max_len, np.bool_)  # per position of the word being rewritten: in a merge site
    dirty = np.empty(64, np.int64)
    root = np.int64(0)  # typed index: a literal 0 would make numba compile the heap helpers twice
    while meta[M_DONE] < stop:
        # Pop the best entry that is still current.
        best = -1
        while meta[M_HEAP] > 0:
            n = meta[M_HEAP] - 1
            count, p = heap[0, H_COUNT], heap[0, H_PID]
            _swap(heap, root, n)
            meta[M_HEAP] = n
            _sift_down(heap, root, n, pairs, pool, tok_off, tok_len, tok_key)
            if count > 0 and pairs[p, PCOUNT] == count:
                best = p
                break
        if best == -1:
            break
        m = meta[M_DONE]
        a, b = pairs[best, PA], pairs[best, PB]
        t = first_new_id + m
        merges[m, 0], merges[m, 1] = a, b
        # Bytes of the new token: bytes(a) + bytes(b).
        start, la, lb = meta[M_POOL], tok_len[a], tok_len[b]
        pool = _grow_1d(pool, start + la + lb)
        pool[start : start + la] = pool[tok_off[a] : tok_off[a] + la]
        pool[start + la : start + la + lb] = pool[tok_off[b] : tok_off[b] + lb]
        tok_off[t], tok_len[t] = start, la + lb
        tok_key[t] = token_key(pool, start, la + lb)
        meta[M_POOL] = start + la + lb

        n_dirty = np.int64(0)
        node = pairs[best, PHEAD]
        while node != -1:
            w = nodes[node, 0]
            node = nodes[node, 1]
            s, length, c = word_start[w], word_len[w], word_count[w]
            hits = 0
            i = 0
            while i < length - 1:
                if sym[s + i] == a and sym[s + i + 1] == b:
                    site[i] = True
                    site[i + 1] = True
                    hits += 1
                    i += 2
                else:
                    site[i] = False
                    i += 1
            if i == length - 1:
                site[i] = False
            if hits == 0:
                continue
            # Room for this word's new pairs, index entries and changed pairs.
            pairs = _grow_rows(pairs, meta[M_PAIRS] + length)
            nodes = _grow_rows(nodes, meta[M_NODES] + length)
            dirty = _grow_1d(dirty, n_dirty + 2 * length)
            table = _rehash(table, pairs, meta[M_PAIRS], meta[M_PAIRS] + length)
            # Remove every pair that overlaps a merge site.
            for i in range(length - 1):
                if site[i] or site[i + 1]:
                    p = _pair_id(sym[s + i], sym[s + i + 1], pairs, table, meta)
                    pairs[p, PCOUNT] -= c
                    n_dirty = _mark(p, m, pairs, dirty, n_dirty)
            # Rewrite the word in place.
            j = 0
            i = 0
            while i < length:
                if i < length - 1 and sym[s + i] == a and sym[s + i + 1] == b:
                    sym[s + j] = t
                    i += 2
                else:
                    sym[s + j] = sym[s + i]
                    i += 1
                j += 1
            word_len[w] = j
            # Add every pair that touches a new token.
            for i in range(j - 1):
                x, y = sym[s + i], sym[s + i + 1]
                if x == t or y == t:
                    p = _pair_id(x, y, pairs, table, meta)
                    pairs[p, PCOUNT] += c
                    _link(p, w, pairs, nodes, meta)
                    n_dirty = _mark(p, m, pairs, dirty, n_dirty)
        pairs[best, PHEAD] = -1  # (a, b) cannot occur again: new adjacencies all involve t
        meta[M_DONE] = m + 1
        heap = _grow_rows(heap, meta[M_HEAP] + n_dirty)
        for k in range(n_dirty):
            p = dirty[k]
            if pairs[p, PCOUNT] > 0:
                h = meta[M_HEAP]
                _set_entry(heap, h, p, pairs, tok_key)
                meta[M_HEAP] = h + 1
                _sift_up(heap, h, pairs, pool, tok_off, tok_len, tok_key)
    return pool, pairs, table, nodes, heap
