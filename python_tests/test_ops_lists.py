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


# Shapes of a long list: scalars, empty and tiny tensors, odd vectors and matrices (the
# multi-tensor CUDA / Triton kernels pack many per launch), cycled to LONG_LIST_LEN
# elements -- more than one launch table holds, and more than one finishing table.
LONG_LIST_SHAPES = ((), (0,), (1,), (5,), (17, 3), (1000,), (4097,), (64, 33))
LONG_LIST_LEN = 300
# Large elements that take the single kernel's own launch inside a list (CUDA: more than
# 128 reduction blocks, more than 1M fp32 update elements), placed mid-list.
LONG_LIST_LARGE = ((70001,), (1_100_003,), (2_200_001,))
LIST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def long_mixed_list(
    device: str, gen: torch.Generator, swap: bool, length: int, large: tuple
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """x, grad, grad_prev lists of ``length`` mixed elements plus ``large`` ones: dtypes
    cycle over float32 / bfloat16 / float16; every fourth float32 element keeps a compact
    bfloat16 grad_prev (not in swap mode, where grad_prev must be like x); every seventh
    element is a contiguous view at an odd offset into a larger buffer (unaligned: the
    kernels' scalar path)."""
    shapes = [LONG_LIST_SHAPES[i % len(LONG_LIST_SHAPES)] for i in range(length)]
    for j, shape in enumerate(large):
        shapes.insert((j + 1) * length // (len(large) + 1), shape)
    xs, grads, prevs = [], [], []
    for i, shape in enumerate(shapes):
        dtype = LIST_DTYPES[i % len(LIST_DTYPES)]
        state = STATE if not swap and dtype == torch.float32 and i % 4 == 0 else dtype
        row = []
        for scale, kind in ((0.1, dtype), (1.0, dtype), (1.0, state)):
            n = torch.Size(shape).numel()
            offset = 1 if i % 7 == 3 else 0
            buf = (scale * torch.randn(n + offset, generator=gen)).to(device, kind)
            row.append(buf[offset:].view(shape))
        for out, t in zip((xs, grads, prevs), row, strict=True):
            out.append(t)
    return xs, grads, prevs


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("accept", [ACCEPT, RETRACE])
def test_long_mixed_lists_are_the_single_ops_in_list_order(
    backend: str, device: str, accept: bool
) -> None:
    """Hundreds of elements of mixed dtypes, shapes, alignments and sizes (several launch
    tables, large elements launched on their own): still bit-identical to the single op
    per element, the sums added in list order."""
    k = kernels_or_skip(backend, device)
    interpreted = backend == "triton" and device == "cpu"  # the numpy interpreter: small
    length, large = (40, ()) if interpreted else (LONG_LIST_LEN, LONG_LIST_LARGE)
    c = update_coeffs(accept, device)
    for op, single, swap in (
        ("update_list_", k.update_, False),
        ("update_swap_list_", k.update_swap_, True),
    ):
        gen = gen_for("long lists", backend, device, accept, op)
        xs, grads, prevs = long_mixed_list(device, gen, swap, length, large)
        expected = k.dots(grads[0].reshape(-1), prevs[0].reshape(-1))
        for g, gp in zip(grads[1:], prevs[1:], strict=True):
            expected = expected + k.dots(g.reshape(-1), gp.reshape(-1))
        assert torch.equal(k.dots_list(grads, prevs), expected), op

        x_l, g_l, s_l = ([t.clone() for t in ts] for ts in (xs, grads, prevs))
        getattr(k, op)(x_l, g_l, s_l, c)
        for i, row in enumerate(zip(xs, grads, prevs, strict=True)):
            x_e, g_e, s_e = (t.clone().view(-1) for t in row)
            single(x_e, g_e, s_e, c)
            for got, want in zip((x_l[i], g_l[i], s_l[i]), (x_e, g_e, s_e), strict=True):
                assert torch.equal(got.view(-1), want), (op, i)
