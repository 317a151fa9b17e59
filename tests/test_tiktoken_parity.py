"""Our Tokenizer on the GPT-2 vocabulary gives the ids of ``tiktoken.get_encoding("gpt2")``.

tiktoken runs offline: ../shared/tools/make_tiktoken_gpt2_cache.py writes the GPT-2 files into a
temporary ``TIKTOKEN_CACHE_DIR`` (tiktoken verifies their SHA-256). tiktoken's gpt2 ranks equal
GPT-2's vocab ids, so the id lists compare directly.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tiktoken

from cs336.tokenizer import Tokenizer
from cs336.tokenizer.gpt2_files import load_vocab_merges, save_vocab_merges

EOT = "<|endoftext|>"
FIXTURE_TEXTS = [
    "address.txt",
    "german.txt",
    "tinystories_sample.txt",
    "corpus.en",
    "special_token_double_newlines_non_whitespace.txt",
    "special_token_trailing_newlines.txt",
]


@pytest.fixture(scope="session")
def gpt2_tiktoken(shared_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    tool = shared_dir / "tools" / "make_tiktoken_gpt2_cache.py"
    subprocess.run([sys.executable, str(tool), str(shared_dir / "fixtures"), str(cache)], check=True,
                   capture_output=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        yield tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def gpt2_files(fixtures_dir):
    return fixtures_dir / "gpt2_vocab.json", fixtures_dir / "gpt2_merges.txt"


@pytest.fixture(scope="session")
def gpt2(gpt2_files):
    return Tokenizer.from_files(*gpt2_files)


@pytest.fixture(scope="session")
def gpt2_eot(gpt2_files):
    return Tokenizer.from_files(*gpt2_files, special_tokens=[EOT])


def test_hello_world_exact_ids(gpt2, gpt2_tiktoken):
    # "Hello" = 15496, "," = 11, " world" = 995, "!" = 0 in GPT-2's vocab.
    assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2_tiktoken.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2.decode([15496, 11, 995, 0]) == "Hello, world!"


@pytest.mark.parametrize("name", FIXTURE_TEXTS)
def test_fixture_texts_match_tiktoken(gpt2, gpt2_eot, gpt2_tiktoken, fixtures_dir, name):
    text = (fixtures_dir / name).read_text(encoding="utf-8")
    plain = gpt2.encode(text)
    assert plain == gpt2_tiktoken.encode_ordinary(text)
    with_eot = gpt2_eot.encode(text)
    assert with_eot == gpt2_tiktoken.encode(text, allowed_special={EOT})
    assert gpt2.decode(plain) == text and gpt2_eot.decode(with_eot) == text
    if EOT in text:
        assert with_eot.count(50256) == text.count(EOT) and plain != with_eot


def test_shakespeare_matches_tiktoken(gpt2, gpt2_eot, gpt2_tiktoken, shared_dir):
    text = (shared_dir / "corpora" / "shakespeare.txt").read_text(encoding="utf-8")
    assert gpt2.encode(text) == gpt2_tiktoken.encode_ordinary(text)
    expected = gpt2_tiktoken.encode(text, allowed_special={EOT})
    assert gpt2_eot.encode(text) == expected
    with open(shared_dir / "corpora" / "shakespeare.txt", encoding="utf-8", newline="") as f:
        assert list(gpt2_eot.encode_iterable(f)) == expected


def test_resaved_gpt2_files_load_in_tiktoken_data_gym(gpt2_files, gpt2_tiktoken, tmp_path):
    # Our writer reproduces GPT-2's files well enough for tiktoken's own GPT-2 reader, which
    # cross-checks vocab.json against merges.txt; the ranks equal the gpt2 encoding's.
    import tiktoken.load

    vocab, merges = load_vocab_merges(*gpt2_files)
    save_vocab_merges(vocab, merges, tmp_path / "vocab.json", tmp_path / "merges.txt")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(tmp_path / "merges.txt"), str(tmp_path / "vocab.json")
    )
    assert ranks == gpt2_tiktoken._mergeable_ranks
    assert os.path.getsize(tmp_path / "merges.txt") == os.path.getsize(gpt2_files[1]) + len("#version: 0.2\n")
