"""Shared test setup: devices, dtypes, the `cuda` marker.

- ``device`` fixture: "cpu" always, "cuda" only when torch sees a GPU *and* diffkern was
  built with CUDA kernels (a CPU-only wheel on a GPU box must not fail the GPU tests).
  Its cuda parameter carries the ``cuda`` mark, so ``pytest -m cuda`` selects exactly the
  GPU runs.
- ``dtype`` fixture: torch.float32 and torch.float64.
- Tests marked ``cuda`` are skipped automatically when no usable GPU is present.
- "No tests collected" (pytest exit code 5) counts as success, so the one documented test
  command works on every machine, e.g. ``-m cuda`` on a CPU-only box.
"""
from __future__ import annotations

import os

import pytest
import torch

# Hypothesis profiles for tests/test_properties.py: "ci" (the default) is bounded (the file
# runs in about a minute on two cores) and derandomized, so a CI failure reproduces
# exactly; HYPOTHESIS_PROFILE=long explores far more examples with fresh randomness.
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", max_examples=300, deadline=None, derandomize=True, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much])
    settings.register_profile(
        "long", max_examples=3000, deadline=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test extra; only test_properties.py needs it
    pass


def _cuda_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import diffkern

        return bool(diffkern.build_info()["cuda"])
    except Exception:  # import errors surface in the tests themselves, with a traceback
        return False


CUDA_USABLE = _cuda_usable()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]
DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float64, id="float64"),
]


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated so the suite works from any rootdir.
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (auto-skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config, items):
    if CUDA_USABLE:
        return
    why = ("no CUDA GPU visible to torch" if not torch.cuda.is_available()
           else "diffkern was built without CUDA kernels")
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    # pytest.ExitCode.NO_TESTS_COLLECTED == 5: nothing to run here is not a failure.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def cuda_device() -> str:
    """For tests that only make sense on a GPU (streams, graphs); mark them ``cuda``."""
    if not CUDA_USABLE:
        pytest.skip("no usable CUDA GPU")
    return "cuda"
