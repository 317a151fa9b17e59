"""Parity seeds: fixed per test by default (reproducible CI), random or pinned on request."""

import importlib.util
from pathlib import Path

import pytest

# tests/conftest.py and this folder's conftest.py share a module name, so load this one by path.
_spec = importlib.util.spec_from_file_location("parity_conftest", Path(__file__).with_name("conftest.py"))
_parity_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_parity_conftest)
seed_for = _parity_conftest.seed_for


def test_default_seed_is_fixed_per_test_and_differs_between_tests():
    a = "tests/parity/test_rms_norm.py::test_forward[float32]"
    b = "tests/parity/test_rms_norm.py::test_forward[bfloat16]"
    assert seed_for(a, None) == seed_for(a, "") == seed_for(a, None)
    assert seed_for(a, None) != seed_for(b, None)


def test_seed_on_request():
    assert seed_for("x", "1234") == seed_for("y", "1234") == 1234
    draws = {seed_for("x", "random") for _ in range(4)}
    assert len(draws) > 1
    with pytest.raises(pytest.UsageError, match="use an integer seed or 'random'"):
        seed_for("x", "fresh")
