"""Argument validation of every op, shared by the fake, reference and triton
implementations: one validator per op (:data:`VALIDATORS`) and one wrapper factory
(:func:`validated`) that puts it in front of an implementation.

The C++ kernels raise the same messages from ``csrc/common.h``; keep both in step
(the tests match on the text).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from elra_fused import reference_ops as ref

from .lists import each_element, flat_lists
from .schemas import (
    LIST_OPS,
    OP_NAMES,
    STATE_DTYPE_COMPACT,
    SUPPORTED_DTYPES,
    tensor_list_arguments,
)

Dtypes = tuple[torch.dtype, ...]


def _check_tensor(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"elra_fused.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(
            f"elra_fused.{op}: {name} must be a dense (strided) tensor, got layout {t.layout}"
        )


def _check_first(op: str, name: str, t: torch.Tensor, dtypes: Dtypes) -> None:
    """The argument the others are compared with: a supported dtype, flat, contiguous."""
    _check_tensor(op, name, t)
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
    _check_tensor(op, name, t)
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
    """In-place kernels need distinct buffers; only called with real (non-fake) tensors,
    since fake tensors have no storage to compare."""
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


# --------------------------------------------------------------------------------------
# Per-op validators. All take the op's arguments followed by the keywords ``dtypes`` (the
# accepted dtypes of the first vector) and ``check_overlap`` (reject aliasing buffers;
# meaningless for the read-only reductions, accepted so that every validator has one
# signature).
# --------------------------------------------------------------------------------------
def validate_dots(
    grad: torch.Tensor,
    grad_prev: torch.Tensor,
    dtypes: Dtypes = SUPPORTED_DTYPES,
    check_overlap: bool = False,
) -> None:
    _check_first("dots", "grad", grad, dtypes)
    _check_like("dots", "grad_prev", grad_prev, "grad", grad, state=True)


def validate_dots_recover(
    x_prev: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    coeffs: torch.Tensor,
    dtypes: Dtypes = SUPPORTED_DTYPES,
    check_overlap: bool = False,
) -> None:
    _check_first("dots_recover", "x", x, dtypes)
    _check_like("dots_recover", "x_prev", x_prev, "x", x)
    _check_like("dots_recover", "grad", grad, "x", x)
    _check_coeffs("dots_recover", coeffs, ref.RECOVER_COEFFS_LEN, x)


def validate_update(
    op: str,
    other_name: str,
    x: torch.Tensor,
    grad: torch.Tensor,
    other: torch.Tensor,
    coeffs: torch.Tensor,
    dtypes: Dtypes = SUPPORTED_DTYPES,
    check_overlap: bool = False,
) -> None:
    """The three update ops; ``other`` is grad_prev (update_, update_swap_) or x_prev."""
    _check_first(op, "x", x, dtypes)
    _check_like(op, "grad", grad, "x", x)
    # grad_prev of update_ may be the compact bf16 state; x_prev is a point, like x; the
    # grad_prev of update_swap_ trades roles with grad, so it has x's dtype too.
    _check_like(op, other_name, other, "x", x, state=op == "update_")
    _check_coeffs(op, coeffs, ref.UPDATE_COEFFS_LEN, x)
    if check_overlap:
        _check_no_overlap(op, [("x", x), ("grad", grad), (other_name, other)])


def _list_validator(op: str, single: Callable[..., None]) -> Callable[..., None]:
    """Every element is validated as the single-tensor op validates it (the error names
    the element), all before the first one is computed or written. The ``Tensor[]``
    arguments come first; the rest (coefficients) is shared by every element."""
    list_names = tensor_list_arguments(op)

    def validate(
        *args: object, dtypes: Dtypes = SUPPORTED_DTYPES, check_overlap: bool = False
    ) -> None:
        lists, shared = args[: len(list_names)], args[len(list_names) :]
        rows = flat_lists(op, list(zip(list_names, lists, strict=True)))
        each_element(
            rows, lambda *row: single(*row, *shared, dtypes=dtypes, check_overlap=check_overlap)
        )

    return validate


_SINGLE_VALIDATORS: dict[str, Callable[..., None]] = {
    "dots": validate_dots,
    "dots_recover": validate_dots_recover,
    "update_": functools.partial(validate_update, "update_", "grad_prev"),
    "update_recover_": functools.partial(validate_update, "update_recover_", "x_prev"),
    "update_swap_": functools.partial(validate_update, "update_swap_", "grad_prev"),
}
#: One validator per op; signature: the op's arguments, then ``dtypes``, ``check_overlap``.
VALIDATORS: dict[str, Callable[..., None]] = {
    **_SINGLE_VALIDATORS,
    **{op: _list_validator(op, _SINGLE_VALIDATORS[single]) for op, single in LIST_OPS.items()},
}
if tuple(VALIDATORS) != OP_NAMES:  # a new schema row needs its validator
    raise RuntimeError(f"validators {tuple(VALIDATORS)} do not match the schemas {OP_NAMES}")


def validated(
    name: str,
    impl: Callable[..., torch.Tensor | None],
    dtypes: Dtypes = SUPPORTED_DTYPES,
    check_overlap: bool = False,
) -> Callable[..., torch.Tensor | None]:
    """Op ``name``: :data:`VALIDATORS` ``[name]`` on the arguments, then ``impl``."""
    validate = VALIDATORS[name]

    def op(*args: object) -> torch.Tensor | None:
        validate(*args, dtypes=dtypes, check_overlap=check_overlap)
        return impl(*args)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"elra_fused.{name}: validation, then {getattr(impl, '__qualname__', impl)}"
    return op
