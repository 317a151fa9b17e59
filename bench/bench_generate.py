"""Decoding speed: KV-cache decoding against the recompute reference (``cs336.generate``).

A 4-layer d_model-256 model (8 heads, SwiGLU d_ff 688, vocab 10,000) at context 512 decodes 400
greedy tokens after a 16-token prompt (416 positions, so the window never slides). The KV-cache
path is timed by pytest-benchmark; the recompute path (one full forward over the growing
sequence per token, logits of every position included) is timed once with ``perf_counter`` in the
same process, and ``extra_info`` records both times, tokens/s and their ratio. Both paths must
give the same ids. Work per token: with the cache one position through the model, O(T) attention;
recomputing, all T positions, O(T^2) attention, so the ratio grows with the sequence length.

On the CPU both paths run on one torch thread: a decoding step is a few hundred small ops, and on
a machine shared with other jobs two OpenMP threads wait on each other at every op (measured on
the loaded 2-core development machine: 15.5 ms per cached token with 2 threads against 2.5 ms
with 1), which would time the contention, not the decoding.
"""

import time

import pytest
import torch

from _harness import DEVICE, cuda_sync
from cs336.generate import generate_ids
from cs336.model import TransformerLM

pytestmark = pytest.mark.bench

NEW_TOKENS = 400
PROMPT_TOKENS = 16
CONFIG = dict(vocab_size=10_000, context_length=512, d_model=256, num_layers=4, num_heads=8,
              d_ff=688, rope_theta=10_000.0, kernels="auto")


@pytest.fixture
def one_cpu_thread():
    if DEVICE.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_generate_kv_cache_vs_recompute(benchmark, one_cpu_thread):
    torch.manual_seed(0)
    model = TransformerLM(**CONFIG, device=DEVICE).eval()
    prompt = torch.randint(0, CONFIG["vocab_size"], (PROMPT_TOKENS,),
                           generator=torch.Generator().manual_seed(1)).tolist()

    def decode(kv_cache):
        ids = generate_ids(model, prompt, NEW_TOKENS, temperature=0.0, kv_cache=kv_cache)
        cuda_sync()
        return ids

    cached = benchmark.pedantic(decode, args=(True,), rounds=3, warmup_rounds=1, iterations=1)
    start = time.perf_counter()
    reference = decode(False)
    recompute_s = time.perf_counter() - start
    assert cached == reference
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    kv_s = stats.stats.median
    benchmark.extra_info.update(
        new_tokens=NEW_TOKENS, prompt_tokens=PROMPT_TOKENS, **CONFIG, threads=torch.get_num_threads(),
        kv_cache_s=kv_s, recompute_s=recompute_s, kv_cache_tokens_per_s=NEW_TOKENS / kv_s,
        recompute_tokens_per_s=NEW_TOKENS / recompute_s, speedup=recompute_s / kv_s)
    print(f"\nKV cache {kv_s:.2f} s, recompute {recompute_s:.2f} s: {recompute_s / kv_s:.1f}x")
    assert recompute_s / kv_s >= 5, f"the KV cache is only {recompute_s / kv_s:.1f}x faster than recompute"
