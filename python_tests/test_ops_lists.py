"""Tensor-list ops (per-parameter layout): the single-tensor op per element, sums added in
list order, every element validated before the first one is written."""

from __future__ import annotations

import pytest
import torch
from _backends import DEVICES, kernels_or_skip
from _ops_common import (
    ACCEPT,
    LIST_N,
    LIST_SHAPES,
    MIXED_BACKENDS,
    RETRACE,
    STATE,
    gen_for,
    update_coeffs,
)

from elra_fused.ops.cases import OP_CASES


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("accept", [ACCEPT, RETRACE])
def test_list_ops_are_the_single_ops_in_list_order(backend: str, device: str, accept: bool) -> None:
    """Bit-identical to the single-tensor op applied per element, sums added in order."""
    k = kernels_or_skip(backend, device)
    gen = gen_for("lists", backend, device, accept)
    xs, grads, prevs, c = OP_CASES["update_list_"].make_inputs(
        LIST_N, torch.float32, device, gen, accept=accept, shapes=LIST_SHAPES
    )
    compact = [p.to(STATE) for p in prevs]

    def flat(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.clone().view(-1) for t in ts]

    expected = k.dots(grads[0].view(-1), prevs[0].view(-1))
    for g, gp in zip(grads[1:], prevs[1:], strict=True):
        expected = expected + k.dots(g.view(-1), gp.view(-1))
    assert torch.equal(k.dots_list(grads, prevs), expected)
    assert k.dots_list(grads, compact).dtype == torch.float64

    for op, single, state in (
        ("update_list_", k.update_, compact),
        ("update_swap_list_", k.update_swap_, prevs),
    ):
        x_l, g_l, s_l = ([t.clone() for t in ts] for ts in (xs, grads, state))
        getattr(k, op)(x_l, g_l, s_l, c)
        x_e, g_e, s_e = flat(xs), flat(grads), flat(state)
        for row in zip(x_e, g_e, s_e, strict=True):
            single(*row, c)
        for got, want in zip([*x_l, *g_l, *s_l], [*x_e, *g_e, *s_e], strict=True):
            assert torch.equal(got.view(-1), want), op


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
def test_list_ops_check_every_element_before_writing(backend: str) -> None:
    """A bad last element raises naming it, and no element was written."""
    k = kernels_or_skip(backend, "cpu")
    gen = gen_for("bad lists", backend)
    c = update_coeffs(ACCEPT, "cpu")
    for bad, error, match in (
        (lambda: torch.zeros(3, dtype=torch.float16), TypeError, "dtype"),
        (lambda: torch.zeros(4), ValueError, "elements"),
        (lambda: torch.zeros(3, 2).t(), ValueError, "contiguous"),
    ):
        xs, grads, prevs, _ = OP_CASES["update_list_"].make_inputs(
            8, torch.float32, "cpu", gen, shapes=((5,), (3,))
        )
        if match == "contiguous":
            xs[1] = torch.zeros(2, 3).t()  # 6 elements, non-contiguous
            grads[1], prevs[1] = torch.zeros(2, 3), torch.zeros(2, 3)
        else:
            grads[1] = bad()
        before = [t.clone() for t in (*xs, *grads, *prevs)]
        for op in ("update_list_", "update_swap_list_"):
            with pytest.raises(error, match=match):
                getattr(k, op)(xs, grads, prevs, c)
        after = (*xs, *grads, *prevs)
        assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    with pytest.raises(ValueError, match="has 2 tensors but grad_prev has 1"):
        k.dots_list(grads, prevs[:1])
