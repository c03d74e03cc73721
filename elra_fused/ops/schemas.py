"""The op contract as data: names, schemas, dtypes. No side effects on import.

Every schema is written down HERE, once; :mod:`elra_fused.ops.library` defines them with
``torch.library`` and the C++ extension only registers implementations
(``TORCH_LIBRARY_IMPL`` for CPU and CUDA). Why Python and not C++: the fake (meta)
implementations that torch.compile needs live in Python anyway, the ops must exist (and
fail with an actionable message) even when the extension is not built, and the Triton
variants share the same table.

Adding an op: one row in :data:`SCHEMAS`, one validator in
:data:`elra_fused.ops.validation.VALIDATORS` (the fake is derived from it), one function in
:mod:`elra_fused.reference_ops`, one implementation per fused backend, one row in
:data:`elra_fused.ops.cases.OP_CASES`.
"""

from __future__ import annotations

import torch

#: Backend names accepted by :func:`elra_fused.ops.get_kernels`.
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

# ``(a!)``/``(b!)`` mark the mutated arguments so torch.compile functionalizes the in-place
# ops correctly.
SCHEMAS: dict[str, str] = {
    "dots": "(Tensor grad, Tensor grad_prev) -> Tensor",
    "dots_recover": "(Tensor x_prev, Tensor x, Tensor grad, Tensor coeffs) -> Tensor",
    "update_": "(Tensor(a!) x, Tensor grad, Tensor(b!) grad_prev, Tensor coeffs) -> ()",
    "update_recover_": "(Tensor(a!) x, Tensor grad, Tensor(b!) x_prev, Tensor coeffs) -> ()",
    # Swap mode: grad (not grad_prev) is the mutated buffer (written on a retrace only).
    "update_swap_": "(Tensor(a!) x, Tensor(b!) grad, Tensor grad_prev, Tensor coeffs) -> ()",
    # Tensor lists (per-parameter layout): element i is one parameter's tensor; see
    # "Tensor lists" in the elra_fused.ops docstring.
    "dots_list": "(Tensor[] grad, Tensor[] grad_prev) -> Tensor",
    "update_list_": (
        "(Tensor(a!)[] x, Tensor[] grad, Tensor(b!)[] grad_prev, Tensor coeffs) -> ()"
    ),
    "update_swap_list_": (
        "(Tensor(a!)[] x, Tensor(b!)[] grad, Tensor[] grad_prev, Tensor coeffs) -> ()"
    ),
}
#: Every op, in schema order (the field order of :class:`elra_fused.ops.KernelSet`).
OP_NAMES = tuple(SCHEMAS)
#: The tensor-list ops and the single-tensor op each applies per element.
LIST_OPS: dict[str, str] = {
    "dots_list": "dots",
    "update_list_": "update_",
    "update_swap_list_": "update_swap_",
}
#: Ops that return the float64 ``[<G, G>, <G_prev, G>]`` pair (the others return nothing).
REDUCTIONS = ("dots", "dots_recover", "dots_list")


def parse(name: str) -> torch._C.FunctionSchema:
    """The parsed schema of op ``name``: argument names, types and mutation marks."""
    return torch._C.parse_schema(f"{NAMESPACE}::{name}{SCHEMAS[name]}")


def tensor_list_arguments(name: str) -> tuple[str, ...]:
    """The ``Tensor[]`` arguments of op ``name``, in order (empty for single-tensor ops)."""
    return tuple(a.name for a in parse(name).arguments if str(a.type) == "List[Tensor]")
