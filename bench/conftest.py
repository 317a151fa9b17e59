"""pytest fixtures of the benchmark suite (``pytest bench --benchmark-json out.json``).

Every benchmark test gets ``extra_info`` filled with the device name and the torch/triton
versions (autouse fixture), so the JSON says what it was measured on; ``bench`` wraps
pytest-benchmark's fixture in ``_harness.Bench``; ``peak`` is the device's roof. The helpers the
bench modules import live in ``_harness.py``.
"""

from __future__ import annotations

import pytest

from _harness import DEVICE, Bench
from cs336 import hardware


@pytest.fixture(scope="session")
def device_info() -> dict:
    return {"device": hardware.device_name(DEVICE), "device_type": DEVICE.type, **hardware.versions()}


@pytest.fixture(scope="session")
def peak() -> hardware.Peak:
    return hardware.peak_for(DEVICE)


@pytest.fixture(autouse=True)
def _fill_extra_info(request, device_info):
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info.update(device_info)


@pytest.fixture
def bench(benchmark) -> Bench:
    return Bench(benchmark)
