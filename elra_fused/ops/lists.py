"""Tensor-list plumbing for the per-parameter layout (one tensor per parameter).

A list op applies its single-tensor op to element i of every list; each element must be
contiguous, of any shape, and is flattened without a copy. ``dots_list`` adds the
per-tensor results in list order, one float64 addition after another, on every backend,
so its sum does not depend on the backend's scheduling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .schemas import LIST_OPS, REDUCTIONS

Row = tuple[torch.Tensor, ...]


def flat_lists(op: str, named: list[tuple[str, Sequence[torch.Tensor]]]) -> list[Row]:
    """Row i: element i of each (equal-length, non-empty) list as a 1-D view (no copy).

    Everything else about the elements is checked by the validator of the single-tensor
    op they go to (:func:`each_element`).
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


def each_element(rows: list[Row], check: Callable[..., None]) -> None:
    """Validate every row before any is computed (a bad last element must not leave the
    first ones written); the error names the list element."""
    for i, row in enumerate(rows):
        try:
            check(*row)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} (in list element {i})") from None


def dots_list_of(
    single: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]:
    """``dots_list`` from a single-tensor ``dots``: per-tensor results added in list
    order. It does not validate the elements; the caller validates the lists first
    (:func:`elra_fused.ops.validation.validated`)."""

    def dots_list(grad: Sequence[torch.Tensor], grad_prev: Sequence[torch.Tensor]) -> torch.Tensor:
        rows = flat_lists("dots_list", [("grad", grad), ("grad_prev", grad_prev)])
        total = single(*rows[0])
        for row in rows[1:]:
            total.add_(single(*row))
        return total

    return dots_list


def update_list_of(
    op: str, single: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
) -> Callable[..., None]:
    """``update_list_`` / ``update_swap_list_`` (``op``) from the single-tensor op. It does
    not validate; the caller validates every element before the first one is written."""

    def update_list(
        x: Sequence[torch.Tensor],
        grad: Sequence[torch.Tensor],
        grad_prev: Sequence[torch.Tensor],
        coeffs: torch.Tensor,
    ) -> None:
        for row in flat_lists(op, [("x", x), ("grad", grad), ("grad_prev", grad_prev)]):
            single(*row, coeffs)

    return update_list


def with_list_ops(singles: Mapping[str, Callable[..., object]]) -> dict[str, Callable[..., object]]:
    """The single-tensor ops of one backend plus the list ops built from them."""
    out = dict(singles)
    for list_op, single in LIST_OPS.items():
        if single in REDUCTIONS:
            out[list_op] = dots_list_of(singles[single])
        else:
            out[list_op] = update_list_of(list_op, singles[single])
    return out
