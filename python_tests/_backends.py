"""Which backends and devices a test runs on, and what happens when one is missing: the
policy in one place.

* CPU is always tested; CUDA cases carry the ``cuda`` mark and skip without a GPU.
* A backend that cannot run here skips the test, except that in CI (``CI=true``) the C++
  CPU kernels must be there: CI has to prove the extension built, so a missing one fails.

Use :func:`kernels_or_skip` inside a test, :data:`DEVICES` / :func:`device_params` to
parametrize over devices and :func:`fused_backends` / :func:`cuda_backends` to
parametrize the optimizer tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from elra_fused import ops

IN_CI = os.environ.get("CI", "").lower() == "true"
HAS_CUDA = torch.cuda.is_available()
#: The backends with kernels of their own (``reference`` is the oracle).
FUSED_BACKENDS = ("cpp", "triton")

#: Marks of a test that needs a CUDA device.
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))


def needs_cuda(test: Callable) -> Callable:
    """Decorator: the test needs a CUDA device (``cuda`` mark; skipped without one)."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


def must_have(backend: str, device: str | torch.device) -> bool:
    """True where a missing backend fails instead of skipping (the CI policy)."""
    return IN_CI and backend == "cpp" and torch.device(device).type == "cpu"


def kernels_or_skip(backend: str, device: str | torch.device) -> ops.KernelSet:
    """The backend's KernelSet for ``device``, or skip the test (fail in CI for the C++
    CPU kernels)."""
    try:
        return ops.get_kernels(backend, torch.device(device))
    except RuntimeError as exc:
        if must_have(backend, device):
            pytest.fail(f"CI must build the C++ extension: {exc}")
        pytest.skip(str(exc))


def device_params(devices: tuple[str, ...] = ("cpu", "cuda")) -> list:
    """``devices`` as parameters; ``cuda`` carries :data:`CUDA_MARKS`."""
    return [pytest.param(d, marks=CUDA_MARKS if d == "cuda" else (), id=d) for d in devices]


#: ``cpu`` and ``cuda`` (marked) for ``@pytest.mark.parametrize("device", DEVICES)``.
DEVICES = device_params()


def fused_backends(device: str = "cpu") -> list[str]:
    """The fused backends usable on ``device`` plus ``reference`` (last). Called at
    collection time; in CI a CPU list without ``cpp`` fails there (see :func:`must_have`)."""
    found = [b for b in FUSED_BACKENDS if b in ops.available_backends(device)]
    if must_have("cpp", device):
        assert "cpp" in found, ops.cpp_extension_status()
    return [*found, "reference"]


def cuda_backends() -> list[str]:
    """Fused backends to try on CUDA: both without a GPU (their tests skip), else the
    usable ones."""
    if not HAS_CUDA:
        return list(FUSED_BACKENDS)
    return [b for b in FUSED_BACKENDS if b in ops.available_backends("cuda")]
