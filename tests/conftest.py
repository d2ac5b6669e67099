"""Shared pytest fixtures for minglm's tests.

- ``xp``: the array module a test runs on. Every test that takes it runs once on NumPy and, marked ``gpu``, once
  more on CuPy. The CuPy run is skipped (not failed) when ``minglm.backend.gpu_available()`` is False, so a CPU
  machine collects it and reports it as skipped.
- ``rng``: a freshly seeded ``numpy.random.Generator`` (the only source of randomness a test should use).
- Any test marked ``@pytest.mark.gpu`` is skipped on a machine without a usable GPU.

Left out on purpose: a GPU-only run mode; set ``MINGLM_BACKEND`` instead if a whole run should default to CuPy.
"""

from __future__ import annotations

import numpy as np
import pytest

from minglm.backend import cupy_module, gpu_available

NO_GPU_REASON = "needs CuPy and a usable CUDA GPU (minglm.backend.gpu_available() is False)"


def pytest_collection_modifyitems(config, items):
    """Skip every test marked ``gpu`` when there is no GPU, with one clear reason."""
    if gpu_available():
        return
    skip = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# Session scope: the fixture only hands out a module, and hypothesis refuses function-scoped fixtures in @given tests.
@pytest.fixture(
    scope="session",
    params=[pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)],
)
def xp(request):
    """The array module under test: numpy, then cupy (only where a GPU is present)."""
    if request.param == "numpy":
        return np
    return cupy_module()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
