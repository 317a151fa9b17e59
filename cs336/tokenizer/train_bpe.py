"""Train a byte-level BPE tokenizer: ``train_bpe(input_path, vocab_size, special_tokens)``.

The algorithm is the CS336 handout's (assignment 1, section 2.4), after Sennrich et al. (2016)
and GPT-2 (Radford et al. 2019): split the text on special tokens, pre-tokenize each piece with
the GPT-2 pattern (``cs336.tokenizer.pretokenize``), count the distinct pre-tokens, then merge the
most frequent adjacent pair of symbols, ties going to the lexicographically greater
``(bytes, bytes)`` pair, until the vocabulary has ``vocab_size`` entries. Vocabulary ids: the
special tokens (in the order given), then the 256 single bytes in byte order, then the merges in
creation order. No merge crosses a pre-token or special-token boundary.

Counting runs in worker processes over byte ranges of the file. A range ends where splitting the
file leaves every pre-token and special token intact: at the start of a special token, or after a
newline that sits between two non-space characters x and y. There the GPT-2 pattern gives the
same pre-tokens with or without the split: no alternative continues a pre-token from x into a
newline, ``\\s+(?!\\S)`` cannot match a newline followed by y, so ``\\s+`` makes it a pre-token of
its own, which ``\\s+(?!\\S)`` also matches at the end of the left part. Each worker
reads its range in pieces of about ``PIECE_BYTES``, so memory grows with the number of distinct
pre-tokens, not with the file size. Inputs below ``SMALL_INPUT_BYTES`` are counted in this process,
which is faster than starting workers. The merge loop is ``cs336.tokenizer.bpe_numba``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import regex

from cs336.tokenizer.pretokenize import check_special_token_text, pretoken_counts, split_on_special

# Below this, worker processes cost more than they save: on this project's 2-core CPU one process
# counts English at about 50 ms per MiB, and 2 workers add about 60 ms (start the pool, pickle the
# counts back, add them up), so they pay off from about 2.5 MiB.
SMALL_INPUT_BYTES = 2 << 20
PIECE_BYTES = 4 << 20  # bytes decoded and pre-tokenized at a time (about 1M pre-tokens of English)
TASK_BYTES = 64 << 20  # bytes per worker task (one progress-bar step)
MIN_TASK_BYTES = 1 << 20  # the smallest task an explicit num_workers splits into: a process per MiB at most
SCAN_BYTES = 1 << 16  # read size while searching for a split point
_SPACE = regex.compile(r"\s")  # the GPT-2 pattern's notion of white space (Unicode White_Space)


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: list[str],
    *,
    num_workers: int | None = None,
    progress: bool = False,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train byte-level BPE on the UTF-8 text file ``input_path``.

    Returns ``(vocab, merges)``: ``vocab`` maps id to token bytes, ``merges`` lists the merged
    pairs in creation order. ``num_workers`` counts pre-tokens in that many processes (default:
    the usable CPUs, or this process alone for small inputs); ``progress`` shows tqdm bars.
    Fewer than ``vocab_size`` entries come back only when no pair is left to merge.
    """
    path = _check_input(input_path)
    specials = _check_special_tokens(special_tokens)
    _check_vocab_size(vocab_size, len(specials))
    workers = _check_workers(num_workers, path.stat().st_size)
    counts = count_pretokens(path, specials, num_workers=workers, progress=progress)
    merge_ids = _merge(counts, len(specials), vocab_size - len(specials) - 256, progress)

    vocab = {i: s.encode("utf-8") for i, s in enumerate(specials)}
    for b in range(256):
        vocab[len(specials) + b] = bytes([b])
    merges = []
    for a, b in merge_ids.tolist():
        merges.append((vocab[a], vocab[b]))
        vocab[len(vocab)] = vocab[a] + vocab[b]
    return vocab, merges


def _check_input(input_path: str | os.PathLike) -> Path:
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"train_bpe: input file {path} does not exist; pass the path of a UTF-8 text file")
    if not path.is_file():
        raise ValueError(f"train_bpe: input {path} is not a regular file; pass the path of a UTF-8 text file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ValueError(f"train_bpe: cannot read input file {path} ({e.strerror}); check its permissions") from None
    return path


def _check_special_tokens(special_tokens: list[str]) -> list[str]:
    """The special tokens as a list; refuses a bare string (``list()`` would make each of its
    characters a special token), empty or non-string items, duplicates, and one-byte tokens: the
    vocabulary already holds every byte, so a one-byte special token would be a second id for the
    same bytes, which GPT-2's vocab.json (token -> id) cannot store."""
    if isinstance(special_tokens, (str, bytes)):
        raise TypeError(f"train_bpe: special_tokens must be a list of strings, got {special_tokens!r}; "
                        "wrap it in a list")
    specials = list(special_tokens or [])
    for s in specials:
        if not isinstance(s, str) or not s:
            raise ValueError(f"train_bpe: special_tokens must be non-empty strings, got {s!r}")
        check_special_token_text(s, prefix="train_bpe: ")
        if len(s.encode("utf-8")) == 1:
            raise ValueError(f"train_bpe: special token {s!r} is a single byte, which is already one of the "
                             "256 byte tokens; use a special token of two or more bytes")
    if len(set(specials)) != len(specials):
        raise ValueError(f"train_bpe: special_tokens {specials!r} has duplicates; list each token once")
    return specials


def _check_vocab_size(vocab_size: int, n_special: int) -> None:
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool):
        raise ValueError(f"train_bpe: vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < 256 + n_special:
        raise ValueError(
            f"train_bpe: vocab_size={vocab_size} is smaller than 256 byte tokens + {n_special} special "
            f"token(s); use vocab_size >= {256 + n_special}"
        )


def _check_workers(num_workers: int | None, size: int) -> int:
    if num_workers is None:
        if size < SMALL_INPUT_BYTES:
            return 1
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(cpus, size // (SMALL_INPUT_BYTES // 2)))
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"train_bpe: num_workers must be a positive integer or None, got {num_workers!r}")
    return num_workers


def _split_pattern(special_bytes: list[bytes]) -> re.Pattern[bytes]:
    """Zero-width matches at candidate split points: special-token starts and newline ends."""
    alternatives = [rb"(?<=\n)"]
    if special_bytes:
        alternatives.insert(0, b"(?=" + b"|".join(re.escape(s) for s in special_bytes) + b")")
    return re.compile(b"|".join(alternatives))


def _is_solid(char: bytes) -> bool:
    """True for one whole UTF-8 character that the GPT-2 pattern's ``\\s`` does not match."""
    try:
        text = char.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return len(text) == 1 and _SPACE.match(text) is None


def _newline_split(buf: bytes, rel: int) -> bool:
    """``buf[rel - 1]`` is a newline between two non-space characters (see the module docstring)."""
    if rel < 2 or rel >= len(buf) or buf[rel - 1] != 0x0A:
        return False
    start = rel - 2
    while start > 0 and rel - 1 - start < 4 and 0x80 <= buf[start] < 0xC0:  # back over continuation bytes
        start -= 1
    lead = buf[rel]
    width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return _is_solid(buf[start : rel - 1]) and _is_solid(buf[rel : rel + width])


def next_split(f, target: int, end: int, special_bytes: list[bytes]) -> int:
    """The first offset in ``[target, end]`` of the binary file ``f`` where the file can be split
    without changing its pre-tokens or special tokens (``end`` when there is none): the start of a
    special token, or just after a newline with a non-space character on each side; in both cases
    no occurrence of a special token may straddle the offset.
    """
    pattern = _split_pattern(special_bytes)
    reach = max([len(s) for s in special_bytes] + [5])  # bytes needed on either side of a candidate
    pos = target
    while pos < end:
        lo = max(pos - reach, 0)
        want = pos - lo + SCAN_BYTES + reach
        f.seek(lo)
        buf = f.read(want)
        limit = pos - lo + SCAN_BYTES  # candidates past this lack look-ahead; the next window has them
        for m in pattern.finditer(buf, pos - lo):
            rel = m.start()
            if rel > limit or lo + rel >= end:
                break
            if not (any(buf.startswith(s, rel) for s in special_bytes) or _newline_split(buf, rel)):
                continue
            if not any(0 <= buf.find(s, max(rel - len(s) + 1, 0), rel + len(s) - 1) < rel for s in special_bytes):
                return lo + rel
        if len(buf) < want:
            return end
        pos = lo + limit + 1
    return end


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"train_bpe: {path} is not UTF-8 (byte offset {offset + e.start}: {e.reason}); "
            "convert it first, e.g. `iconv -f <its encoding> -t UTF-8`"
        ) from None


def _count_range(job: tuple[Path, int, int, list[str]]) -> tuple[dict[str, int], int]:
    """Pre-token counts of the byte range ``[start, end)``, read ``PIECE_BYTES`` at a time."""
    path, start, end, specials = job
    special_bytes = [s.encode("utf-8") for s in specials]
    counts: Counter[str] = Counter()
    with open(path, "rb") as f:
        pos = start
        while pos < end:
            stop = next_split(f, pos + PIECE_BYTES, end, special_bytes) if pos + PIECE_BYTES < end else end
            f.seek(pos)
            text = _decode(f.read(stop - pos), path, pos)
            for segment, is_special in split_on_special(text, specials):
                if not is_special:
                    counts.update(pretoken_counts(segment))
            pos = stop
    return counts, end - start


def count_pretokens(
    path: str | os.PathLike, specials: list[str], *, num_workers: int = 1, progress: bool = False
) -> Counter[str]:
    """Counts of the distinct pre-tokens of the file (special tokens excluded)."""
    path = Path(path)
    size = path.stat().st_size
    # At most one task (so one process) per MIN_TASK_BYTES: --workers 100000 forked that many
    # processes whatever the input; the counts do not depend on the split.
    n_tasks = max(min(num_workers, -(-size // MIN_TASK_BYTES)), -(-size // TASK_BYTES))
    special_bytes = [s.encode("utf-8") for s in specials]
    with open(path, "rb") as f:
        cuts = sorted({0, size} | {next_split(f, k * size // n_tasks, size, special_bytes) for k in range(1, n_tasks)})
    jobs = [(path, a, b, specials) for a, b in zip(cuts, cuts[1:], strict=False)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc="pre-tokenize")
    total: Counter[str] = Counter()
    try:
        if num_workers == 1 or len(jobs) <= 1:
            _accumulate(total, map(_count_range, jobs), bar)
        else:
            import multiprocessing

            with multiprocessing.get_context().Pool(min(num_workers, len(jobs))) as pool:
                _accumulate(total, pool.imap_unordered(_count_range, jobs), bar)
    finally:
        if bar is not None:
            bar.close()
    return total


def _accumulate(total: Counter[str], results, bar) -> None:
    for counts, n_bytes in results:
        total.update(counts)
        if bar is not None:
            bar.update(n_bytes)


def _merge(counts: Counter[str], n_special: int, num_merges: int, progress: bool) -> np.ndarray:
    """Run the numba merge loop; returns the merged id pairs, shape (merges done, 2)."""
    from cs336.tokenizer import bpe_numba

    words = [w.encode("utf-8") for w in counts]
    keep = [i for i, w in enumerate(words) if len(w) > 1]  # one-byte words hold no pair
    lengths = np.fromiter((len(words[i]) for i in keep), np.int64, len(keep))
    word_count = np.fromiter(counts.values(), np.int64, len(words))[keep] if keep else np.zeros(0, np.int64)
    sym = np.frombuffer(b"".join(words[i] for i in keep), np.uint8).astype(np.int32) + n_special
    word_start = np.zeros(len(keep), np.int64)
    np.cumsum(lengths[:-1], out=word_start[1:])
    word_len = lengths.copy()

    n_tokens = n_special + 256 + num_merges
    pool = np.arange(256, dtype=np.uint8)
    tok_off = np.zeros(n_tokens, np.int64)
    tok_len = np.zeros(n_tokens, np.int64)
    tok_off[n_special : n_special + 256] = np.arange(256)
    tok_len[n_special : n_special + 256] = 1
    tok_key = np.zeros(n_tokens, np.int64)
    tok_key[n_special : n_special + 256] = bpe_numba.byte_keys()

    pairs, table, nodes, heap, meta = bpe_numba.init_state(
        sym, word_start, word_len, word_count, pool, tok_off, tok_len, tok_key
    )
    merges = np.zeros((num_merges, 2), np.int64)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_merges, desc="merge")
    # Bounded calls: a signal waits for the current call only (at most 1000 merges), progress or not.
    step = max(1, min(num_merges // 100, 1000))
    try:
        done = 0
        while done < num_merges:
            pool, pairs, table, nodes, heap = bpe_numba.run_merges(
                sym, word_start, word_len, word_count, pool, tok_off, tok_len, tok_key,
                pairs, table, nodes, heap, meta, n_special + 256, merges, min(done + step, num_merges),
            )
            now = int(meta[bpe_numba.M_DONE])
            if bar is not None:
                bar.update(now - done)
            if now == done or now < min(done + step, num_merges):
                done = now
                break
            done = now
    finally:
        if bar is not None:
            bar.close()
    return merges[:done]
