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
the host). The updates are fp32 math. The reductions are fp64 math on every backend
(each element widened, products and sums in fp64, fixed summation order), so they agree
with the float64 reference over the whole finite range of the input dtypes.

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
list. The elements must not overlap one another (as for torch's ``_foreach`` ops): the
CPU and CUDA kernels process them concurrently. On CUDA and in Triton the list ops are
multi-tensor kernels (one launch per dtype group and table of tensors, each block running
the single op's body as one block of that tensor's grid), which keeps each element's
``dots`` bits.

Backends (:data:`BACKENDS`): ``reference`` (plain torch, the oracle), ``triton``
(GPU, or CPU under ``TRITON_INTERPRET=1`` for tests) and ``cpp`` (``elra_fused._C``:
OpenMP CPU kernels + CUDA kernels). :func:`get_kernels` returns a :class:`KernelSet`.

The package, one concern per module:

* :mod:`.schemas`: op names, schemas, dtypes (data only)
* :mod:`.validation`: one validator per op and the validating wrapper factory
* :mod:`.lists`: tensor-list plumbing (rows of 1-D views, per-element adapters)
* :mod:`.library`: ``torch.library`` definitions, fakes, implementation registration
* :mod:`.backends`: the C++ extension, triton, the reference; :func:`get_kernels`
* :mod:`.cases`: the op-case table shared by tests and benchmarks (imported on demand)

Importing this package never fails when the extension or triton is missing; the error is
raised (with the fix) by :func:`get_kernels`.
"""

from __future__ import annotations

from . import library  # noqa: F401  (defines the ops and their fakes on import)
from .backends import (
    _C,  # noqa: F401  (read-only alias; tests patch elra_fused.ops.backends._C)
    BUILD_HINT,
    KernelSet,
    available_backends,
    cpp_extension_status,
    get_kernels,
    resolve_backend,
)
from .lists import flat_lists
from .schemas import (
    BACKENDS,
    LIST_OPS,
    NAMESPACE,
    OP_NAMES,
    REFERENCE_DTYPES,
    SCHEMAS,
    STATE_DTYPE_COMPACT,
    SUPPORTED_DTYPES,
    TRITON_PREFIX,
)
from .validation import (
    VALIDATORS,
    validate_dots,
    validate_dots_recover,
    validate_update,
    validated,
)

__all__ = [
    "BACKENDS",
    "BUILD_HINT",
    "KernelSet",
    "LIST_OPS",
    "NAMESPACE",
    "OP_NAMES",
    "REFERENCE_DTYPES",
    "SCHEMAS",
    "STATE_DTYPE_COMPACT",
    "SUPPORTED_DTYPES",
    "TRITON_PREFIX",
    "VALIDATORS",
    "available_backends",
    "cpp_extension_status",
    "flat_lists",
    "get_kernels",
    "resolve_backend",
    "validate_dots",
    "validate_dots_recover",
    "validate_update",
    "validated",
]
