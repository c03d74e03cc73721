"""Shared pytest setup for python_tests/.

Triton decides at decoration time (when ``elra_fused.triton_kernels`` is imported)
whether kernels compile or run in its numpy interpreter, so ``TRITON_INTERPRET`` must be
in the environment before any test module imports triton. Without a GPU we turn the
interpreter on here, the earliest hook pytest offers; with a GPU the real compiler runs.

Which backends / devices a test runs on and when a missing one skips or fails (CI) is
decided in ``_backends.py`` (``kernels_or_skip``, ``fused_backends``, ``DEVICES``, ...);
the op tests share their sizes and tolerances through ``_ops_common.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    # Registered here so the markers are known whatever pyproject.toml lists.
    for name in ("cuda", "gpu"):
        config.addinivalue_line("markers", f"{name}: needs a CUDA device (skipped without one)")
