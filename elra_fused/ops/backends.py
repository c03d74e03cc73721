"""The three backends behind one interface: :class:`KernelSet`, :func:`get_kernels`,
:func:`available_backends`.

* ``reference``: :mod:`elra_fused.reference_ops` (plain torch, float64 math) behind the
  same validation as the fused backends; also accepts float64 tensors.
* ``triton``: :mod:`elra_fused.triton_kernels` (and :mod:`elra_fused.triton_lists` for
  the list ops), registered here as the ``elra_fused::triton_*`` ops for CPU
  (interpreter, ``TRITON_INTERPRET=1``) and CUDA; triton itself is imported on the first
  call only.
* ``cpp``: ``elra_fused._C`` (OpenMP CPU kernels + CUDA kernels), which registers its
  implementations for the ``elra_fused::*`` ops when it is loaded.

Importing this module never fails when the extension or triton is missing; the error is
raised (saying how to fix it) by :func:`get_kernels`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import types
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from elra_fused import reference_ops as ref

from . import library
from .lists import with_list_ops
from .schemas import (
    BACKENDS,
    LIST_OPS,
    NAMESPACE,
    OP_NAMES,
    REFERENCE_DTYPES,
    SUPPORTED_DTYPES,
    TRITON_PREFIX,
)
from .validation import validated

BUILD_HINT = (
    "run `make env` or `CUDA_HOME=/usr/local/cuda python setup.py build_ext --inplace` "
    "from the repository root"
)

Tensor = torch.Tensor


class KernelSet(NamedTuple):
    """The ops of one backend, one field per op of :data:`~elra_fused.ops.OP_NAMES`;
    signatures as in :mod:`elra_fused.reference_ops`. Build it by name
    (:meth:`from_ops`), never by position."""

    name: str
    dots: Callable[[Tensor, Tensor], Tensor]
    dots_recover: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    update_: Callable[[Tensor, Tensor, Tensor, Tensor], None]
    update_recover_: Callable[[Tensor, Tensor, Tensor, Tensor], None]
    update_swap_: Callable[[Tensor, Tensor, Tensor, Tensor], None]
    # Tensor-list forms (per-parameter layout); same argument order with lists.
    dots_list: Callable[..., Tensor]
    update_list_: Callable[..., None]
    update_swap_list_: Callable[..., None]

    @classmethod
    def from_ops(cls, name: str, ops: Mapping[str, Callable[..., object]]) -> KernelSet:
        """The KernelSet ``name`` from a mapping op name -> function covering every op."""
        if set(ops) != set(OP_NAMES):
            missing, extra = set(OP_NAMES) - set(ops), set(ops) - set(OP_NAMES)
            raise ValueError(f"KernelSet {name!r}: missing ops {missing}, unknown ops {extra}")
        return cls(name=name, **ops)


if KernelSet._fields[1:] != OP_NAMES:  # a new schema row needs its KernelSet field
    raise RuntimeError(f"KernelSet fields {KernelSet._fields[1:]} != schemas {OP_NAMES}")


# --------------------------------------------------------------------------------------
# C++ extension
# --------------------------------------------------------------------------------------
_C: types.ModuleType | None
_C_ERROR: str | None
try:
    _C = importlib.import_module("elra_fused._C")
    _C_ERROR = None
except (ImportError, OSError) as _exc:  # not built, or built against another torch
    _C = None
    _C_ERROR = f"{type(_exc).__name__}: {_exc}"


def cpp_extension_status() -> str:
    """One human-readable line: is ``elra_fused._C`` loaded, were CUDA kernels compiled."""
    if _C is None:
        return f"elra_fused._C: NOT BUILT ({_C_ERROR}); {BUILD_HINT}"
    cuda = "yes" if _C.cuda_compiled() else "no (ELRA_SKIP_CUDA_BUILD was set or nvcc missing)"
    # An extension built before the CPU loops reported their ISA has no cpu_vector_isa.
    isa = _C.cpu_vector_isa() if hasattr(_C, "cpu_vector_isa") else "unknown (older build)"
    return (
        f"elra_fused._C: loaded from {_C.__file__}; CUDA kernels compiled: {cuda}; "
        f"CPU threads: {torch.get_num_threads()}; CPU loops: {isa}"
    )


def _cpp_unavailable_reason(device: torch.device) -> str | None:
    if _C is None:
        return f"elra_fused._C is not built ({_C_ERROR}): {BUILD_HINT}"
    if device.type == "cuda" and not _C.cuda_compiled():
        return (
            "CUDA kernels were not compiled into elra_fused._C (ELRA_SKIP_CUDA_BUILD was set "
            f"or nvcc was missing at build time): {BUILD_HINT} with nvcc available"
        )
    if device.type not in ("cpu", "cuda"):
        return f"the cpp backend supports cpu and cuda devices, not {device.type}"
    return None


# --------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------
def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_unavailable_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: pip install 'triton>=3.2'"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _triton_interpret():
        return None
    return (
        f"triton needs a CUDA device or TRITON_INTERPRET=1 (set before triton is imported) "
        f"to run on {device.type}"
    )


def _triton_module(module: str = "triton_kernels") -> types.ModuleType:
    try:
        return importlib.import_module(f"elra_fused.{module}")
    except ImportError as exc:
        raise RuntimeError(f"triton backend unavailable: {exc}; pip install triton") from exc


def _triton_kernel(name: str, module: str = "triton_kernels") -> Callable[..., object]:
    """``elra_fused.<module>.<name>``, looked up on each call so that importing this
    module does not import triton."""

    def call(*args: object) -> object:
        return getattr(_triton_module(module), name)(*args)

    call.__name__ = call.__qualname__ = f"{module}.{name}"
    return call


# The single-tensor ops from triton_kernels; the list ops from triton_lists (one launch
# per dtype group over a table of the list, not one per element).
_TRITON_RAW = {
    **{name: _triton_kernel(name) for name in OP_NAMES if name not in LIST_OPS},
    **{name: _triton_kernel(name, "triton_lists") for name in LIST_OPS},
}
# The triton kernels write through raw pointers: aliasing buffers are rejected up front.
library.register_impls(
    TRITON_PREFIX,
    {name: validated(name, fn, check_overlap=True) for name, fn in _TRITON_RAW.items()},
    ("CPU", "CUDA"),
)


# --------------------------------------------------------------------------------------
# Reference: reference_ops behind the same validation, float64 accepted as well.
# --------------------------------------------------------------------------------------
_REFERENCE = KernelSet.from_ops(
    "reference",
    {
        name: validated(name, fn, REFERENCE_DTYPES)
        for name, fn in with_list_ops(
            {name: getattr(ref, name) for name in OP_NAMES if name not in LIST_OPS}
        ).items()
    },
)


def _dispatcher_kernel_set(backend: str, prefix: str) -> KernelSet:
    """The registered ops ``elra_fused::{prefix}{name}`` (dispatch picks CPU / CUDA)."""
    namespace = getattr(torch.ops, NAMESPACE)
    return KernelSet.from_ops(
        backend, {name: getattr(namespace, prefix + name).default for name in OP_NAMES}
    )


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend == "reference":
        return None
    if backend == "cpp":
        return _cpp_unavailable_reason(device)
    if backend == "triton":
        return _triton_unavailable_reason(device)
    raise ValueError(f"unknown elra_fused backend {backend!r}; choose one of {BACKENDS}")


def get_kernels(backend: str, device: torch.device | str) -> KernelSet:
    """Return the :class:`KernelSet` of ``backend`` for tensors on ``device``.

    Raises ``ValueError`` for an unknown backend name and ``RuntimeError`` (saying how to
    fix it) when the backend cannot run on that device in this environment.
    """
    device = torch.device(device)
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"elra_fused backend {backend!r} unavailable on {device}: {reason}")
    if backend == "reference":
        return _REFERENCE
    return _dispatcher_kernel_set(backend, TRITON_PREFIX if backend == "triton" else "")


def available_backends(device: torch.device | str) -> list[str]:
    """Backends usable on ``device``, fastest first; ``"reference"`` is always last.

    On CPU, ``triton`` appears only under ``TRITON_INTERPRET=1`` (a test mode: the
    interpreter is far slower than the reference, but it is still ranked before it).
    """
    device = torch.device(device)
    order = ("cpp", "triton")
    found = [b for b in order if _unavailable_reason(b, device) is None]
    return [*found, "reference"]


def resolve_backend(backend: str, params: list[torch.Tensor], device: torch.device) -> str:
    """backend="auto": the fastest usable for the parameters' device and dtypes (cpp, then
    triton on CUDA; cpp on CPU; else reference). Parameters on several devices need the
    reference backend."""
    devices = {p.device for p in params}
    if len(devices) > 1 and backend != "reference":
        if backend != "auto":
            raise ValueError(
                f"ELRA: backend {backend!r} needs all parameters on one device, got "
                f"{sorted(str(d) for d in devices)}; use backend='reference'"
            )
        return "reference"
    if backend != "auto":
        return backend  # unsupported dtypes are rejected when the layout takes the groups
    if not all(p.dtype in SUPPORTED_DTYPES for p in params):
        return "reference"
    order = ("cpp", "triton") if device.type == "cuda" else ("cpp",)
    usable = available_backends(device)
    return next((b for b in order if b in usable), "reference")
