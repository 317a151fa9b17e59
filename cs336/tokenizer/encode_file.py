"""Encode a text file into a flat token file, optionally with a pool of worker processes.

The input is read in blocks and cut only where ``Tokenizer.safe_cut`` allows (after a
non-whitespace character followed by whitespace, never inside a special token), so each chunk
encodes independently and the concatenated ids equal ``Tokenizer.encode`` of the whole file for
any number of workers. Chunks go to the workers with at most ``2 * workers`` in flight, and their
ids are written in input order, so memory stays bounded by a few chunks whatever the file size.

Output: ``uint16`` ids (``uint32`` when the vocabulary has more than 65,536 ids), native byte
order, no header (``np.memmap(path, dtype=...)`` reads it), plus a JSON sidecar ``<out>.json``
with dtype, count, the tokenizer hash and the input's resolved path, size and mtime (the key
``cs336.prepare`` checks before reusing the file). Both are written to temporary files in the output
directory and renamed into place when complete; on any exception or interruption both
temporary files are removed and the previous files (if any) stay as they were.

The file is read with ``newline=""``, so ``\\r\\n`` line ends are encoded as they are.
"""

from __future__ import annotations

import codecs
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cs336.fileio import temp_beside, writing
from cs336.interrupt import deferred_signals, ignore_sigint_in_worker

from .tokenizer import Tokenizer

DEFAULT_CHUNK_CHARS = 1 << 18
"""Characters per chunk handed to a worker: small enough to balance 2-16 workers on a few MB."""


@dataclass
class EncodeStats:
    """What ``encode_file`` did."""

    input_bytes: int
    tokens: int
    seconds: float
    dtype: str
    workers: int = 1
    """Processes that encoded (``workers``, or fewer when the input makes fewer chunks)."""

    @property
    def bytes_per_token(self) -> float:
        return self.input_bytes / max(self.tokens, 1)

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65,536), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def iter_chunks(path: str | os.PathLike, tokenizer: Tokenizer, chunk_chars: int) -> Iterator[str]:
    """Consecutive pieces of the text in ``path`` (about ``chunk_chars`` long) that encode
    independently; their concatenation is the whole file."""
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    buf = ""
    retry_at = chunk_chars
    try:
        with open(path, encoding="utf-8", newline="") as f:
            while True:
                block = f.read(chunk_chars)
                if not block:
                    break
                buf += block
                if len(buf) < retry_at:
                    continue
                cut = tokenizer.safe_cut(buf)
                if cut > 0:
                    yield buf[:cut]
                    buf = buf[cut:]
                    retry_at = chunk_chars
                else:
                    retry_at = 2 * len(buf)  # no cut point yet: wait for twice as much text
    except UnicodeDecodeError as exc:
        offset = _first_invalid_utf8(path)
        raise ValueError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {offset}); convert the file to UTF-8"
        ) from None
    if buf:
        yield buf


def _first_invalid_utf8(path: str | os.PathLike) -> int:
    """File offset of the first byte that is not valid UTF-8 (-1 when there is none)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            held = len(decoder.getstate()[0])  # bytes of an unfinished character
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                return pos - held + exc.start
            pos += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        return pos - len(decoder.getstate()[0]) + exc.start
    return -1


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    ignore_sigint_in_worker()  # Ctrl-C reaches the whole process group; the parent stops the pool
    _WORKER_TOKENIZER = tokenizer


def _encode_chunk(text: str, dtype: str) -> np.ndarray:
    if _WORKER_TOKENIZER is None:
        raise RuntimeError("encode worker used before _init_worker set its tokenizer")
    return _WORKER_TOKENIZER.encode_array(text).astype(dtype)


def _pool_context():
    # fork shares the loaded tokenizer and compiled numba code with the workers at no cost;
    # elsewhere the tokenizer is pickled to each worker once.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def encode_file(
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    workers: int = 1,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    tokenizer_hash: str | None = None,
    progress: bool = False,
) -> EncodeStats:
    """Encode ``input_path`` into ``out_path`` (+ ``out_path.json``); see the module docstring."""
    src = Path(input_path)
    if not src.is_file():
        what = "not a regular file" if src.exists() else "no such file"
        raise ValueError(f"{src}: {what}; pass an existing UTF-8 text file as the input")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    if os.fspath(out_path).endswith(("/", os.sep)):  # Path() drops the slash: a file would be written
        raise ValueError(f"{os.fspath(out_path)} ends in a slash, so it names a directory; pass the path of "
                         "the token file to write (e.g. DIR/train.bin)")
    dst = Path(out_path)
    for target in (dst, dst.with_name(dst.name + ".json")):  # before any work: both are replaced at the end
        if target.is_dir():
            raise ValueError(f"{target} is a directory, where encoding {src} writes "
                             f"{'the token file' if target == dst else 'its .json sidecar'}; pass another "
                             "output path or move the directory")
    with writing(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    src_stat = src.stat()
    input_bytes = src_stat.st_size
    # Each block read yields at most one chunk, so more processes than blocks would only idle
    # (and --workers 100000 would fork that many).
    workers = min(workers, -(-input_bytes // chunk_chars) + 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=input_bytes, unit="B", unit_scale=True, desc=f"encode {src.name}")

    start = time.perf_counter()
    tmp = tmp_meta = None
    tokens = 0
    try:
        with deferred_signals(), writing(dst):  # the cleanup below knows the name before a signal lands
            fd, tmp = temp_beside(dst)
        with writing(dst), os.fdopen(fd, "wb") as out:

            def write(ids: np.ndarray, text: str) -> None:
                nonlocal tokens
                out.write(ids.tobytes())
                tokens += len(ids)
                if bar is not None:
                    bar.update(len(text.encode("utf-8")))

            chunks = iter_chunks(src, tokenizer, chunk_chars)
            if workers == 1:
                for text in chunks:
                    write(tokenizer.encode_array(text).astype(dtype), text)
            else:
                ctx = _pool_context()
                with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
                    pending: deque = deque()
                    for text in chunks:
                        pending.append((pool.apply_async(_encode_chunk, (text, dtype.name)), text))
                        while len(pending) >= 2 * workers:
                            result, done = pending.popleft()
                            write(result.get(), done)
                    while pending:
                        result, done = pending.popleft()
                        write(result.get(), done)
        seconds = time.perf_counter() - start
        sidecar = {
            "dtype": dtype.name,
            "count": tokens,
            "tokenizer_hash": tokenizer_hash,
            "input": str(src.resolve()),
            "input_bytes": input_bytes,
            "input_mtime_ns": src_stat.st_mtime_ns,
        }
        meta_path = dst.with_name(dst.name + ".json")
        with deferred_signals(), writing(meta_path):
            fd_meta, tmp_meta = temp_beside(meta_path)
        with writing(meta_path), os.fdopen(fd_meta, "w", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=2)
            f.write("\n")
        with deferred_signals():  # token file and sidecar change together
            os.replace(tmp, dst)
            os.replace(tmp_meta, meta_path)
            tmp = tmp_meta = None
    except BaseException:
        for leftover in (tmp, tmp_meta):
            if leftover is not None and os.path.exists(leftover):
                os.unlink(leftover)
        raise
    finally:
        if bar is not None:
            bar.close()
    return EncodeStats(input_bytes=input_bytes, tokens=tokens, seconds=seconds, dtype=dtype.name, workers=workers)
