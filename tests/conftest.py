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

import pytest
import torch


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
