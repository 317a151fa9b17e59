"""BPE encoding throughput on shakespeare.txt with the GPT-2 vocabulary: ours vs tiktoken.

Run: ``pytest bench/bench_encode.py -m bench --benchmark-json out.json``.

``test_encode_single_thread``: ``Tokenizer.encode`` (with a warm and with an emptied pre-token
cache) against tiktoken's ``encode_ordinary``
(no special tokens) and ``encode(..., allowed_special={"<|endoftext|>"})`` (shakespeare.txt
contains that string), both returning a list of ints from an in-memory ``str``.

``test_encode_file``: file to token file, reading and writing included. Ours is
``encode_file(..., workers=2)`` (worker processes); tiktoken's is ``encode_ordinary_batch`` /
``encode_batch`` with ``num_threads=2`` over the same chunks (``iter_chunks``), concatenated into
a ``uint16`` array and written.

``test_encode_lines``: one call per line (40,000 lines), ours vs ``encode_ordinary``: the fixed
cost of a call. ``test_encode_stages``: the parts of one ``encode`` of the whole text.

``extra_info`` holds MB/s (input bytes per second at the fastest round) and
``speedup_vs_tiktoken`` (tiktoken's fastest time / ours, same session, same inputs).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cs336.tokenizer import Tokenizer
from cs336.tokenizer.encode_file import encode_file, iter_chunks
from cs336.tokenizer.encode_numba import clear_cache
from cs336.tokenizer.tokenizer import pretoken_bounds

pytestmark = pytest.mark.bench

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHAKESPEARE = SHARED / "corpora" / "shakespeare.txt"
EOT = "<|endoftext|>"
WORKERS = 2
ROUNDS = 5


@pytest.fixture(scope="module")
def text() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (it exists only beside the development checkout)")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory, text):
    tiktoken = pytest.importorskip("tiktoken")
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    tool = SHARED / "tools" / "make_tiktoken_gpt2_cache.py"
    subprocess.run([sys.executable, str(tool), str(SHARED / "fixtures"), str(cache)], check=True, capture_output=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        yield tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def tokenizers(text) -> dict[str, Tokenizer]:
    files = (SHARED / "fixtures" / "gpt2_vocab.json", SHARED / "fixtures" / "gpt2_merges.txt")
    toks = {"ordinary": Tokenizer.from_files(*files), "eot": Tokenizer.from_files(*files, special_tokens=[EOT])}
    for tok in toks.values():
        tok.encode(text[:10_000])  # warm-up: loads the compiled numba code
    return toks


def _fastest(fn, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _single_thread(mode, provider, tokenizers, enc):
    if provider.startswith("ours"):
        tok = tokenizers[mode]
        return tok.encode
    if mode == "ordinary":
        return enc.encode_ordinary
    return lambda t: enc.encode(t, allowed_special={EOT})


@pytest.mark.parametrize("mode", ["ordinary", "eot"])
@pytest.mark.parametrize("provider", ["ours", "ours-cold", "tiktoken"])
def test_encode_single_thread(benchmark, provider, mode, text, tokenizers, tiktoken_gpt2):
    """``ours``: the pre-token cache holds the text's pre-tokens from earlier rounds (a process
    encoding more of the same kind of text); ``ours-cold``: the cache is emptied before each
    round (the first encode of a text)."""
    fn = _single_thread(mode, provider, tokenizers, tiktoken_gpt2)
    baseline = _single_thread(mode, "tiktoken", tokenizers, tiktoken_gpt2)
    assert fn(text) == baseline(text)
    tiktoken_s = _fastest(lambda: baseline(text))
    tok = tokenizers[mode]

    def setup():
        if provider == "ours-cold":
            clear_cache(tok._cache)
        return (text,), {}

    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    best = benchmark.stats.stats.min
    n_bytes = len(text.encode("utf-8"))
    benchmark.extra_info.update(
        provider=provider,
        mode=mode,
        input_bytes=n_bytes,
        mb_per_s=n_bytes / 1e6 / best,
        tiktoken_mb_per_s=n_bytes / 1e6 / tiktoken_s,
        speedup_vs_tiktoken=tiktoken_s / best,
    )


def _tiktoken_file(enc, tok: Tokenizer, mode: str, src: Path, dst: Path) -> None:
    chunks = list(iter_chunks(src, tok, 1 << 18))
    if mode == "ordinary":
        batches = enc.encode_ordinary_batch(chunks, num_threads=WORKERS)
    else:
        batches = enc.encode_batch(chunks, num_threads=WORKERS, allowed_special={EOT})
    ids = np.fromiter((i for batch in batches for i in batch), dtype=np.uint16)
    ids.tofile(dst)


@pytest.mark.parametrize("mode", ["ordinary", "eot"])
@pytest.mark.parametrize("provider", ["ours", "tiktoken"])
def test_encode_file(benchmark, provider, mode, tmp_path, tokenizers, tiktoken_gpt2):
    tok = tokenizers[mode]
    ours_out, tik_out = tmp_path / "ours.bin", tmp_path / "tiktoken.bin"

    def ours() -> None:
        encode_file(SHAKESPEARE, ours_out, tok, workers=WORKERS)

    def theirs() -> None:
        _tiktoken_file(tiktoken_gpt2, tok, mode, SHAKESPEARE, tik_out)

    ours()
    theirs()
    assert ours_out.read_bytes() == tik_out.read_bytes()
    tiktoken_s = _fastest(theirs)
    benchmark.pedantic(ours if provider == "ours" else theirs, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    best = benchmark.stats.stats.min
    n_bytes = SHAKESPEARE.stat().st_size
    benchmark.extra_info.update(
        provider=f"{provider} ({WORKERS} {'processes' if provider == 'ours' else 'threads'})",
        mode=mode,
        input_bytes=n_bytes,
        mb_per_s=n_bytes / 1e6 / best,
        tiktoken_mb_per_s=n_bytes / 1e6 / tiktoken_s,
        speedup_vs_tiktoken=tiktoken_s / best,
    )


@pytest.mark.parametrize("provider", ["ours", "tiktoken"])
def test_encode_lines(benchmark, provider, text, tokenizers, tiktoken_gpt2):
    """Many short calls (the first 40,000 lines, one call each): the fixed cost per call."""
    lines = text.splitlines(keepends=True)[:40_000]
    ours = tokenizers["ordinary"].encode
    theirs = tiktoken_gpt2.encode_ordinary
    fn = ours if provider == "ours" else theirs
    tiktoken_s = _fastest(lambda: [theirs(line) for line in lines])
    benchmark.pedantic(lambda: [fn(line) for line in lines], rounds=ROUNDS, iterations=1, warmup_rounds=1)
    best = benchmark.stats.stats.min
    n_bytes = sum(len(line.encode("utf-8")) for line in lines)
    benchmark.extra_info.update(
        provider=provider,
        lines=len(lines),
        input_bytes=n_bytes,
        mb_per_s=n_bytes / 1e6 / best,
        us_per_call=best / len(lines) * 1e6,
        speedup_vs_tiktoken=tiktoken_s / best,
    )


@pytest.mark.parametrize("stage", ["pretokenize", "merge", "to_list"])
def test_encode_stages(benchmark, stage, text, tokenizers):
    """Where ``encode`` spends its time: pre-token bounds (numba scanner), the numba merge call
    (with its in-call cache), and converting the int32 array to a list."""
    tok = tokenizers["ordinary"]
    data, bounds = pretoken_bounds(text)
    out, _ = tok._encode_bounds(data, bounds)
    fns = {
        "pretokenize": lambda: pretoken_bounds(text),
        "merge": lambda: tok._encode_bounds(data, bounds),
        "to_list": out.tolist,
    }
    benchmark.pedantic(fns[stage], rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(stage=stage, pretokens=len(bounds) - 1, seconds=benchmark.stats.stats.min)
