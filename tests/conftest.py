"""Shared test set-up.

Triton kernels run on the CPU only under TRITON_INTERPRET=1, which triton reads when a kernel is
defined, so it is set here, before any test module imports ``kernels``, whenever no CUDA device
is visible. ``bpe_fixtures`` are the tokenizer fixtures shipped in tests/fixtures (every clone has
them); ``shared_dir`` and ``cs336_fixtures`` are ../shared, which only the development checkout
has, and the tests using them skip elsewhere.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BPE_FIXTURES = Path(__file__).resolve().parent / "fixtures"


@dataclass(frozen=True)
class BPEFixtures:
    """tests/fixtures: corpus.txt, its reference BPE in GPT-2 files, and its ids per case."""

    corpus: Path
    vocab_json: Path
    merges_txt: Path
    text: str  # corpus.txt exactly as stored (its CR kept)
    cases: dict  # name -> {"special_tokens": [...], "ids": [...]}
    vocab_size: int = 500  # tests/fixtures/make_fixtures.py: VOCAB_SIZE
    train_specials: tuple = ("<|endoftext|>",)


@pytest.fixture(scope="session")
def bpe_fixtures() -> BPEFixtures:
    with open(BPE_FIXTURES / "corpus.txt", encoding="utf-8", newline="") as f:
        text = f.read()
    cases = json.loads((BPE_FIXTURES / "ids.json").read_text(encoding="utf-8"))
    return BPEFixtures(BPE_FIXTURES / "corpus.txt", BPE_FIXTURES / "vocab.json", BPE_FIXTURES / "merges.txt",
                       text, cases)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (CS336 fixtures and corpora); tests using it skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: this cross-check against the CS336 and GPT-2 files runs only beside "
                    "the development checkout (tests/fixtures holds the exactness tests every clone runs)")
    return SHARED


@pytest.fixture(scope="session")
def cs336_fixtures(shared_dir: Path) -> Path:
    """../shared/fixtures: the CS336 handout's fixtures (reference merges, GPT-2 files, texts)."""
    path = shared_dir / "fixtures"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
    """A finished 8-step run (checkpoints at 4 and 8) that tests copy and damage."""
    from cs336.train import run
    from run_helpers import cfg

    out = tmp_path_factory.mktemp("base") / "run"
    run(cfg(out))
    return out


@pytest.fixture
def run_copy(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


@pytest.fixture(scope="session")
def texts(tmp_path_factory):
    """A training text whose BPE training takes several seconds, and a small valid text."""
    root = tmp_path_factory.mktemp("texts")
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrst"), size=rng.integers(3, 12))) for _ in range(30000)]
    (root / "train.txt").write_text(" ".join(rng.choice(words, size=300_000)), encoding="utf-8")
    (root / "valid.txt").write_text(" ".join(rng.choice(words, size=5_000)), encoding="utf-8")
    return root
