"""The ELRA kernel ops: schemas, fake implementations, backend selection.

The optimizer's per-step work is vector ops over flat buffers, defined exactly (in
float64) by :mod:`elra_fused.reference_ops`:

* ``dots(grad, grad_prev) -> float64 [2]``  = ``[<G, G>, <G_prev, G>]``
* ``dots_recover(x_prev, x, grad, coeffs) -> float64 [2]`` with ``G_prev`` recovered per
  element from ``coeffs = [decay, inv_alpha_prev]``
* ``update_(x, grad, grad_prev, coeffs)``  in place, ``coeffs = [accept, decay, step, back]``
* ``update_recover_(x, grad, x_prev, coeffs)``  in place, same coefficients
* ``update_swap_(x, grad, grad_prev, coeffs)``  in place, same coefficients, swap mode: the
  accept pass writes only ``x`` (12 instead of 16 bytes per fp32 element) and the caller
  swaps the roles of ``grad`` and ``grad_prev``; a retrace copies ``grad_prev`` into ``grad``

Inputs are 1-D contiguous tensors of one dtype (float32, bfloat16 or float16) on one
device; coefficients are float64 tensors on that device, read by the kernels (never by
the host). Math is fp32, reductions accumulate their partial sums in fp64.

Compact state: the ``grad_prev`` argument of ``dots`` and ``update_`` (the standard-mode
state G_{t-1}) may instead be bfloat16 whatever the dtype of ``grad`` / ``x``
(:data:`STATE_DTYPE_COMPACT`; e.g. float32 parameters with a 2-byte state). It is read
as bf16 and upcast exactly to fp32; on accept ``grad_prev <- grad`` rounds to bf16 (round
to nearest even, NaN kept: bit-identical to ``grad.to(torch.bfloat16)`` on that device).
``dots_recover`` / ``update_recover_`` stay single-dtype: ``x_prev`` is a point. So does
``update_swap_``: its ``grad`` and ``grad_prev`` trade roles every step.

Tensor lists (the per-parameter layout, one tensor per parameter instead of one flat
buffer): ``dots_list(grad[], grad_prev[])``, ``update_list_(x[], grad[], grad_prev[],
coeffs)`` and ``update_swap_list_(x[], grad[], grad_prev[], coeffs)`` apply the
single-tensor op to element i of every list (each element contiguous, of any shape: it is
flattened without a copy). ``dots_list`` adds the per-tensor results in list order, one
fp64 addition after another, on every backend. One coefficient tensor serves the whole
list.

Backends (:data:`BACKENDS`): ``reference`` (plain torch, the oracle), ``triton``
(GPU, or CPU under ``TRITON_INTERPRET=1`` for tests) and ``cpp`` (``elra_fused._C``:
OpenMP CPU kernels + CUDA kernels). :func:`get_kernels` returns a :class:`KernelSet`.

Schema placement: every schema is defined HERE, once, with ``torch.library`` (the
``_SCHEMAS`` table below). The C++ library only registers implementations
(``TORCH_LIBRARY_IMPL`` for CPU and CUDA). Why Python and not C++: the fake (meta)
implementations that torch.compile needs live in Python anyway, the ops must exist (and
fail with an actionable message) even when the extension is not built, and the Triton
variants share the same table. The dispatcher accepts the C++ implementations before or
after the schema appears, so import order does not matter.

Importing this module never fails when the extension or triton is missing; the error is
raised (with the fix) by :func:`get_kernels`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import types
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from elra_fused import reference_ops as ref

__all__ = [
    "BACKENDS",
    "KernelSet",
    "available_backends",
    "cpp_extension_status",
    "get_kernels",
    "STATE_DTYPE_COMPACT",
    "SUPPORTED_DTYPES",
]

#: Backend names accepted by :func:`get_kernels`.
BACKENDS = ("reference", "triton", "cpp")
#: Storage dtypes of the fused kernels (math is fp32 for all of them).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The reference additionally accepts float64 (it is the float64 oracle).
REFERENCE_DTYPES = (*SUPPORTED_DTYPES, torch.float64)
#: The one dtype ``grad_prev`` (dots, update_) may have besides the dtype of grad / x.
STATE_DTYPE_COMPACT = torch.bfloat16

NAMESPACE = "elra_fused"
#: Triton variants are separate ops with this prefix (``elra_fused::triton_dots``), so
#: both backends can be registered for the same dispatch key (CPU under the interpreter).
TRITON_PREFIX = "triton_"

BUILD_HINT = (
    "run `make env` or `CUDA_HOME=/usr/local/cuda python setup.py build_ext --inplace` "
    "from the repository root"
)

# --------------------------------------------------------------------------------------
# Schemas: the single place they are written down. ``(a!)``/``(b!)`` mark the mutated
# arguments so torch.compile functionalizes the in-place ops correctly.
# --------------------------------------------------------------------------------------
_SCHEMAS: dict[str, str] = {
    "dots": "(Tensor grad, Tensor grad_prev) -> Tensor",
    "dots_recover": "(Tensor x_prev, Tensor x, Tensor grad, Tensor coeffs) -> Tensor",
    "update_": "(Tensor(a!) x, Tensor grad, Tensor(b!) grad_prev, Tensor coeffs) -> ()",
    "update_recover_": "(Tensor(a!) x, Tensor grad, Tensor(b!) x_prev, Tensor coeffs) -> ()",
    # Swap mode: grad (not grad_prev) is the mutated buffer (written on a retrace only).
    "update_swap_": "(Tensor(a!) x, Tensor(b!) grad, Tensor grad_prev, Tensor coeffs) -> ()",
    # Tensor lists (per-parameter layout): element i is one parameter's tensor; see
    # "Tensor lists" in the module docstring.
    "dots_list": "(Tensor[] grad, Tensor[] grad_prev) -> Tensor",
    "update_list_": (
        "(Tensor(a!)[] x, Tensor[] grad, Tensor(b!)[] grad_prev, Tensor coeffs) -> ()"
    ),
    "update_swap_list_": (
        "(Tensor(a!)[] x, Tensor(b!)[] grad, Tensor[] grad_prev, Tensor coeffs) -> ()"
    ),
}
OP_NAMES = tuple(_SCHEMAS)

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


def _define_all() -> None:
    for name, signature in _SCHEMAS.items():
        for op_name in (name, TRITON_PREFIX + name):
            try:
                _lib.define(op_name + signature)
            except RuntimeError as exc:  # module re-imported (importlib.reload): keep first
                if "already" not in str(exc) and "multiple times" not in str(exc):
                    raise


_define_all()


# --------------------------------------------------------------------------------------
# Validation (shared by the fake, reference and triton implementations; the C++ kernels
# raise the same messages from csrc/elra_common.h).
# --------------------------------------------------------------------------------------
def _check_first(op: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"elra_fused.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(
            f"elra_fused.{op}: {name} must be a dense (strided) tensor, got layout {t.layout}"
        )
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(
            f"elra_fused.{op}: {name} has dtype {t.dtype}; supported dtypes are {names}"
        )
    if t.dim() != 1:
        raise ValueError(
            f"elra_fused.{op}: {name} must be a 1-D flat tensor, got shape {tuple(t.shape)}"
        )
    if not t.is_contiguous():
        raise ValueError(f"elra_fused.{op}: {name} must be contiguous")


def _check_like(
    op: str, name: str, t: torch.Tensor, ref_name: str, r: torch.Tensor, state: bool = False
) -> None:
    """``t`` must match ``r`` in dtype, device and length. ``state=True``: ``t`` is the
    standard-mode ``grad_prev``, which may also be :data:`STATE_DTYPE_COMPACT`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"elra_fused.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(
            f"elra_fused.{op}: {name} must be a dense (strided) tensor, got layout {t.layout}"
        )
    if state:
        if t.dtype not in (r.dtype, STATE_DTYPE_COMPACT):
            raise TypeError(
                f"elra_fused.{op}: {name} has dtype {t.dtype} but {ref_name} has dtype "
                f"{r.dtype}; {name} must have {ref_name}'s dtype or bfloat16 (compact state)"
            )
    elif t.dtype != r.dtype:
        raise TypeError(
            f"elra_fused.{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {r.dtype}; "
            "all vector arguments must share one dtype"
        )
    if t.device != r.device:
        raise ValueError(
            f"elra_fused.{op}: {name} is on {t.device} but {ref_name} is on {r.device}"
        )
    if t.dim() != 1 or t.numel() != r.numel():
        raise ValueError(
            f"elra_fused.{op}: {name} must be 1-D with {r.numel()} elements (like {ref_name}), "
            f"got shape {tuple(t.shape)}"
        )
    if not t.is_contiguous():
        raise ValueError(f"elra_fused.{op}: {name} must be contiguous")


def _check_coeffs(op: str, c: torch.Tensor, length: int, r: torch.Tensor) -> None:
    if not isinstance(c, torch.Tensor) or c.layout != torch.strided or c.dtype != torch.float64:
        got = c.dtype if isinstance(c, torch.Tensor) else type(c).__name__
        raise TypeError(f"elra_fused.{op}: coeffs must be a dense float64 tensor, got dtype {got}")
    if c.dim() != 1 or c.numel() != length:
        raise ValueError(f"elra_fused.{op}: coeffs must have shape [{length}], got {list(c.shape)}")
    if c.device != r.device:
        raise ValueError(
            f"elra_fused.{op}: coeffs is on {c.device} but x is on {r.device} "
            "(coefficients are read on the device, never copied to the host)"
        )
    if not c.is_contiguous():
        raise ValueError(f"elra_fused.{op}: coeffs must be contiguous")


def _check_no_overlap(op: str, named: list[tuple[str, torch.Tensor]]) -> None:
    """In-place kernels need distinct buffers; only called with real (non-fake) tensors."""
    spans = []
    for name, t in named:
        if t.numel() == 0:
            return
        start = t.data_ptr()
        spans.append((name, start, start + t.numel() * t.element_size()))
    for i, (na, sa, ea) in enumerate(spans):
        for nb, sb, eb in spans[i + 1 :]:
            if sa < eb and sb < ea:
                raise ValueError(
                    f"elra_fused.{op}: {na} and {nb} share memory; they must be distinct buffers"
                )


def validate_dots(
    grad: torch.Tensor, grad_prev: torch.Tensor, dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES
) -> None:
    _check_first("dots", "grad", grad, dtypes)
    _check_like("dots", "grad_prev", grad_prev, "grad", grad, state=True)


def validate_dots_recover(
    x_prev: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    coeffs: torch.Tensor,
    dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES,
) -> None:
    _check_first("dots_recover", "x", x, dtypes)
    _check_like("dots_recover", "x_prev", x_prev, "x", x)
    _check_like("dots_recover", "grad", grad, "x", x)
    _check_coeffs("dots_recover", coeffs, ref.RECOVER_COEFFS_LEN, x)


def validate_update(
    op: str,
    x: torch.Tensor,
    grad: torch.Tensor,
    other: torch.Tensor,
    other_name: str,
    coeffs: torch.Tensor,
    dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES,
    check_overlap: bool = False,
) -> None:
    _check_first(op, "x", x, dtypes)
    _check_like(op, "grad", grad, "x", x)
    # grad_prev of update_ may be the compact bf16 state; x_prev is a point, like x; the
    # grad_prev of update_swap_ trades roles with grad, so it has x's dtype too.
    _check_like(op, other_name, other, "x", x, state=op == "update_")
    _check_coeffs(op, coeffs, ref.UPDATE_COEFFS_LEN, x)
    if check_overlap:
        _check_no_overlap(op, [("x", x), ("grad", grad), (other_name, other)])


def flat_lists(
    op: str, named: list[tuple[str, Sequence[torch.Tensor]]]
) -> list[tuple[torch.Tensor, ...]]:
    """Row i: element i of each (equal-length, non-empty) list as a 1-D view (no copy).

    Everything else about the elements is checked by the single-tensor op they go to.
    """
    (first_name, first), *rest = named
    if len(first) == 0:
        raise ValueError(f"elra_fused.{op}: {first_name} is empty; pass at least one tensor")
    for name, tensors in rest:
        if len(tensors) != len(first):
            raise ValueError(
                f"elra_fused.{op}: {first_name} has {len(first)} tensors but {name} has "
                f"{len(tensors)}"
            )
    rows = []
    for i, row in enumerate(zip(*(tensors for _, tensors in named), strict=True)):
        flat = []
        for (name, _), t in zip(named, row, strict=True):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"elra_fused.{op}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}"
                )
            if not t.is_contiguous():
                raise ValueError(f"elra_fused.{op}: {name}[{i}] must be contiguous")
            flat.append(t.view(-1))
        rows.append(tuple(flat))
    return rows


def _each_element(rows: list[tuple[torch.Tensor, ...]], check: Callable[..., None]) -> None:
    """Validate every row before any is computed; name the list element in the error."""
    for i, row in enumerate(rows):
        try:
            check(*row)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} (in list element {i})") from None


def dots_list_with(
    single: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    validate: Callable[[torch.Tensor, torch.Tensor], None] = lambda g, gp: validate_dots(g, gp),
) -> Callable:
    """``dots_list`` from a single-tensor ``dots``: per-tensor results added in list order."""

    def dots_list(grad: Sequence[torch.Tensor], grad_prev: Sequence[torch.Tensor]) -> torch.Tensor:
        rows = flat_lists("dots_list", [("grad", grad), ("grad_prev", grad_prev)])
        _each_element(rows, validate)
        total = single(*rows[0])
        for row in rows[1:]:
            total.add_(single(*row))
        return total

    return dots_list


def update_list_with(
    op: str,
    single: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None],
    dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES,
    check_overlap: bool = False,
) -> Callable:
    """``update_list_`` / ``update_swap_list_`` from the single-tensor op: every element is
    validated as the single op validates it before the first one is written."""
    single_op = op.replace("_list_", "_")

    def update_list(
        x: Sequence[torch.Tensor],
        grad: Sequence[torch.Tensor],
        grad_prev: Sequence[torch.Tensor],
        coeffs: torch.Tensor,
    ) -> None:
        rows = flat_lists(op, [("x", x), ("grad", grad), ("grad_prev", grad_prev)])
        _each_element(
            rows,
            lambda xi, gi, gpi: validate_update(
                single_op, xi, gi, gpi, "grad_prev", coeffs, dtypes, check_overlap
            ),
        )
        for row in rows:
            single(*row, coeffs)

    return update_list


# --------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes only, so torch.compile / FakeTensor can trace.
# --------------------------------------------------------------------------------------
def _fake_dots(grad: torch.Tensor, grad_prev: torch.Tensor) -> torch.Tensor:
    validate_dots(grad, grad_prev)
    return grad.new_empty((2,), dtype=torch.float64)


def _fake_dots_recover(
    x_prev: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
) -> torch.Tensor:
    validate_dots_recover(x_prev, x, grad, coeffs)
    return grad.new_empty((2,), dtype=torch.float64)


def _fake_update(
    x: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    validate_update("update_", x, grad, grad_prev, "grad_prev", coeffs)


def _fake_update_recover(
    x: torch.Tensor, grad: torch.Tensor, x_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    validate_update("update_recover_", x, grad, x_prev, "x_prev", coeffs)


def _fake_update_swap(
    x: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    validate_update("update_swap_", x, grad, grad_prev, "grad_prev", coeffs)


def _fake_dots_list(
    grad: Sequence[torch.Tensor], grad_prev: Sequence[torch.Tensor]
) -> torch.Tensor:
    rows = flat_lists("dots_list", [("grad", grad), ("grad_prev", grad_prev)])
    _each_element(rows, validate_dots)
    return grad[0].new_empty((2,), dtype=torch.float64)


_FAKES: dict[str, Callable[..., torch.Tensor | None]] = {
    "dots": _fake_dots,
    "dots_recover": _fake_dots_recover,
    "update_": _fake_update,
    "update_recover_": _fake_update_recover,
    "update_swap_": _fake_update_swap,
    "dots_list": _fake_dots_list,
    "update_list_": update_list_with("update_list_", _fake_update),
    "update_swap_list_": update_list_with("update_swap_list_", _fake_update_swap),
}


def _register_fakes() -> None:
    for name, fn in _FAKES.items():
        for op_name in (name, TRITON_PREFIX + name):
            try:
                torch.library.register_fake(f"{NAMESPACE}::{op_name}", fn, lib=_lib)
            except RuntimeError as exc:  # re-import: already registered
                if "already" not in str(exc):
                    raise


_register_fakes()


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
    return (
        f"elra_fused._C: loaded from {_C.__file__}; CUDA kernels compiled: {cuda}; "
        f"CPU threads: {torch.get_num_threads()}"
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
# Triton: implementations are registered for CPU (interpreter) and CUDA; the kernels
# module (and triton itself) is imported on first call only.
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


def _triton_module() -> types.ModuleType:
    try:
        return importlib.import_module("elra_fused.triton_kernels")
    except ImportError as exc:
        raise RuntimeError(f"triton backend unavailable: {exc}; pip install triton") from exc


def _triton_dots(grad: torch.Tensor, grad_prev: torch.Tensor) -> torch.Tensor:
    validate_dots(grad, grad_prev)
    return _triton_module().dots(grad, grad_prev)


def _triton_dots_recover(
    x_prev: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
) -> torch.Tensor:
    validate_dots_recover(x_prev, x, grad, coeffs)
    return _triton_module().dots_recover(x_prev, x, grad, coeffs)


def _triton_update(
    x: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    validate_update("update_", x, grad, grad_prev, "grad_prev", coeffs, check_overlap=True)
    _triton_module().update_(x, grad, grad_prev, coeffs)


def _triton_update_recover(
    x: torch.Tensor, grad: torch.Tensor, x_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    validate_update("update_recover_", x, grad, x_prev, "x_prev", coeffs, check_overlap=True)
    _triton_module().update_recover_(x, grad, x_prev, coeffs)


def _triton_update_swap(
    x: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    validate_update("update_swap_", x, grad, grad_prev, "grad_prev", coeffs, check_overlap=True)
    _triton_module().update_swap_(x, grad, grad_prev, coeffs)


_TRITON_IMPLS: dict[str, Callable[..., torch.Tensor | None]] = {
    "dots": _triton_dots,
    "dots_recover": _triton_dots_recover,
    "update_": _triton_update,
    "update_recover_": _triton_update_recover,
    "update_swap_": _triton_update_swap,
    "dots_list": dots_list_with(_triton_dots),
    "update_list_": update_list_with("update_list_", _triton_update, check_overlap=True),
    "update_swap_list_": update_list_with(
        "update_swap_list_", _triton_update_swap, check_overlap=True
    ),
}


def _register_triton() -> None:
    for name, fn in _TRITON_IMPLS.items():
        for key in ("CPU", "CUDA"):
            try:
                _lib.impl(TRITON_PREFIX + name, fn, key)
            except RuntimeError as exc:  # re-import: already registered
                if "already" not in str(exc):
                    raise


_register_triton()


# --------------------------------------------------------------------------------------
# Reference backend: reference_ops behind the same validation as the fused backends.
# --------------------------------------------------------------------------------------
def _ref_dots(grad: torch.Tensor, grad_prev: torch.Tensor) -> torch.Tensor:
    validate_dots(grad, grad_prev, REFERENCE_DTYPES)
    return ref.dots(grad, grad_prev)


def _ref_dots_recover(
    x_prev: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
) -> torch.Tensor:
    validate_dots_recover(x_prev, x, grad, coeffs, REFERENCE_DTYPES)
    return ref.dots_recover(x_prev, x, grad, coeffs)


def _ref_update(
    x: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    validate_update("update_", x, grad, grad_prev, "grad_prev", coeffs, REFERENCE_DTYPES)
    ref.update_(x, grad, grad_prev, coeffs)


def _ref_update_recover(
    x: torch.Tensor, grad: torch.Tensor, x_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    validate_update("update_recover_", x, grad, x_prev, "x_prev", coeffs, REFERENCE_DTYPES)
    ref.update_recover_(x, grad, x_prev, coeffs)


def _ref_update_swap(
    x: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    validate_update("update_swap_", x, grad, grad_prev, "grad_prev", coeffs, REFERENCE_DTYPES)
    ref.update_swap_(x, grad, grad_prev, coeffs)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
class KernelSet(NamedTuple):
    """The ops of one backend; signatures as in :mod:`elra_fused.reference_ops`.

    The fields after ``update_recover_`` default to ``None`` so that the positional
    five-argument construction of earlier versions keeps working; every KernelSet made by
    :func:`get_kernels` fills them all.
    """

    name: str
    dots: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    dots_recover: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    update_: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    update_recover_: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    update_swap_: (
        Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None] | None
    ) = None
    # Tensor-list forms (per-parameter layout); same argument order with lists.
    dots_list: Callable[..., torch.Tensor] | None = None
    update_list_: Callable[..., None] | None = None
    update_swap_list_: Callable[..., None] | None = None


def _op_kernel_set(backend: str, prefix: str) -> KernelSet:
    ns = getattr(torch.ops, NAMESPACE)
    return KernelSet(backend, *(getattr(ns, prefix + name).default for name in OP_NAMES))


_REFERENCE = KernelSet(
    "reference",
    _ref_dots,
    _ref_dots_recover,
    _ref_update,
    _ref_update_recover,
    _ref_update_swap,
    dots_list_with(_ref_dots, lambda g, gp: validate_dots(g, gp, REFERENCE_DTYPES)),
    update_list_with("update_list_", _ref_update, REFERENCE_DTYPES),
    update_list_with("update_swap_list_", _ref_update_swap, REFERENCE_DTYPES),
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
    return _op_kernel_set(backend, TRITON_PREFIX if backend == "triton" else "")


def available_backends(device: torch.device | str) -> list[str]:
    """Backends usable on ``device``, fastest first; ``"reference"`` is always last.

    On CPU, ``triton`` appears only under ``TRITON_INTERPRET=1`` (a test mode: the
    interpreter is far slower than the reference, but it is still ranked before it).
    """
    device = torch.device(device)
    order = ("cpp", "triton")
    found = [b for b in order if _unavailable_reason(b, device) is None]
    return [*found, "reference"]
