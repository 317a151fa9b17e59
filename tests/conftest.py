"""Shared test set-up.

Triton kernels run on the CPU only under TRITON_INTERPRET=1, which triton reads when a kernel is
defined, so it is set here, before any test module imports ``kernels``, whenever no CUDA device
is visible.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (CS336 fixtures and corpora); tests using it skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it exists only beside the development checkout)")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    path = shared_dir / "fixtures"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path
