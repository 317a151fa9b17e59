"""GPT-2 pre-tokenization throughput on shakespeare.txt: ``regex.findall`` vs the numba scanner.

Run: ``pytest bench/bench_pretokenize.py --benchmark-json out.json``.

Providers: ``regex`` (``pretokenize_regex``, the definition), ``numba`` (``pretokenize``: the
scanner plus building the list of ``str``), ``numba-bounds`` (``utf8_bounds``: the scanner alone,
the form a byte-level encoder consumes). ``extra_info`` holds MB/s (UTF-8 bytes of input per
second, at the fastest round) and ``speedup_vs_regex``, against a regex timing taken in the same
session. The counting benchmark compares ``Counter(regex.findall(...))`` with ``pretoken_counts``
(what a BPE trainer needs).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from cs336.tokenizer import pretok_numba
from cs336.tokenizer.pretokenize import pretokenize, pretokenize_regex

pytestmark = pytest.mark.bench

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "shakespeare.txt"

PROVIDERS = {
    "regex": pretokenize_regex,
    "numba": pretokenize,
    "numba-bounds": pretok_numba.utf8_bounds,
}


@pytest.fixture(scope="module")
def text() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (it exists only beside the development checkout)")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def regex_seconds(text: str) -> float:
    """Fastest of three ``regex.findall`` runs: the baseline for speedup_vs_regex."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        pretokenize_regex(text)
        best = min(best, time.perf_counter() - start)
    return best


def _time_and_record(benchmark, provider: str, fn, text: str, **baseline_seconds: float) -> None:
    """Time ``fn(text)`` (5 rounds) and record MB/s plus, per ``name=seconds`` baseline, the
    speedup of the best round against it."""
    benchmark.pedantic(fn, args=(text,), rounds=5, iterations=1)
    n_bytes = len(text.encode("utf-8"))
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(provider=provider, input_bytes=n_bytes, mb_per_s=n_bytes / best / 1e6,
                                **{name: seconds / best for name, seconds in baseline_seconds.items()})


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_pretokenize_shakespeare(benchmark, provider, text, regex_seconds):
    fn = PROVIDERS[provider]
    fn(text)  # warm-up: loads the kind table and the compiled scanner
    _time_and_record(benchmark, provider, fn, text, speedup_vs_regex=regex_seconds)


COUNTERS = {
    "regex-counter": lambda text: Counter(pretokenize_regex(text)),
    "numba-counts": pretok_numba.pretoken_counts,
}


@pytest.mark.parametrize("provider", list(COUNTERS))
def test_count_pretokens_shakespeare(benchmark, provider, text):
    fn = COUNTERS[provider]
    fn(text)  # warm-up
    start = time.perf_counter()
    COUNTERS["regex-counter"](text)
    baseline = time.perf_counter() - start
    _time_and_record(benchmark, provider, fn, text, speedup_vs_regex_counter=baseline)
