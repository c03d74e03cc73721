"""Which backends and devices a test runs on, and what happens when one is missing: the
policy in one place.

* CPU is always tested; CUDA cases carry the ``cuda`` mark and skip without a GPU.
* A backend that cannot run here skips the test, except that in CI (``CI=true``) the C++
  CPU kernels must be there: CI has to prove the extension built, so a missing one fails.
* ``ELRA_REQUIRE_CUDA=1`` (set by ``benchmarks/gpu_check.sh``): every fused backend must
  run on CUDA. The CUDA tests are parametrized over all of them and a missing one (``_C``
  built without its CUDA kernels, triton unusable) fails instead of skipping; the script
  also fails on any skipped CUDA test (``benchmarks/gpu_preflight.py``).

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
#: The GPU run (benchmarks/gpu_check.sh): a CUDA backend that cannot run fails.
REQUIRE_CUDA = os.environ.get("ELRA_REQUIRE_CUDA", "0") not in ("", "0")
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
    """True where a missing backend fails instead of skipping (the CI policy; on CUDA
    under ``ELRA_REQUIRE_CUDA``)."""
    kind = torch.device(device).type
    if REQUIRE_CUDA and kind == "cuda" and backend in FUSED_BACKENDS:
        return True
    return IN_CI and backend == "cpp" and kind == "cpu"


def kernels_or_skip(backend: str, device: str | torch.device) -> ops.KernelSet:
    """The backend's KernelSet for ``device``, or skip the test (fail in CI for the C++
    CPU kernels, and on CUDA under ``ELRA_REQUIRE_CUDA``)."""
    try:
        return ops.get_kernels(backend, torch.device(device))
    except RuntimeError as exc:
        if must_have(backend, device):
            who = "ELRA_REQUIRE_CUDA" if torch.device(device).type == "cuda" else "CI"
            pytest.fail(f"{who}: the {backend} kernels must run on {device}: {exc}")
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
    """Fused backends to try on CUDA: both without a GPU (their tests skip) or under
    ``ELRA_REQUIRE_CUDA`` (a missing one fails), else the usable ones."""
    if not HAS_CUDA or REQUIRE_CUDA:
        return list(FUSED_BACKENDS)
    return [b for b in FUSED_BACKENDS if b in ops.available_backends("cuda")]
