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
# Large elements, placed mid-list: many virtual blocks in one launch (CUDA: 69 and 1024
# reduction blocks, 9 to 1056 update blocks), the largest past the single op's grid cap.
LONG_LIST_LARGE = ((70001,), (1_100_003,), (2_200_001,))
LIST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: One list element: shape, dtype of x / grad, dtype of grad_prev, and the element
#: offsets of x, grad and grad_prev into larger buffers (odd: unaligned; 4: aligned for a
#: compact state's 8-byte packs but not for a float32 tensor's 16-byte ones).
Element = tuple[tuple[int, ...], torch.dtype, torch.dtype, tuple[int, int, int]]


def make_list(
    elements: list[Element], device: str, gen: torch.Generator
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """x, grad, grad_prev lists of the given elements (contiguous views into buffers)."""
    xs, grads, prevs = [], [], []
    for shape, dtype, state, offsets in elements:
        n = torch.Size(shape).numel()
        for out, scale, kind, offset in zip(
            (xs, grads, prevs), (0.1, 1.0, 1.0), (dtype, dtype, state), offsets, strict=True
        ):
            buf = (scale * torch.randn(n + offset, generator=gen)).to(device, kind)
            out.append(buf[offset:].view(shape))
    return xs, grads, prevs


def long_mixed_list(swap: bool, length: int, large: tuple) -> list[Element]:
    """``length`` mixed elements plus ``large`` ones: dtypes cycle over float32 / bfloat16
    / float16; every fourth float32 element keeps a compact bfloat16 grad_prev (not in
    swap mode, where grad_prev must be like x); every seventh element is unaligned."""
    shapes = [LONG_LIST_SHAPES[i % len(LONG_LIST_SHAPES)] for i in range(length)]
    for j, shape in enumerate(large):
        shapes.insert((j + 1) * length // (len(large) + 1), shape)
    out = []
    for i, shape in enumerate(shapes):
        dtype = LIST_DTYPES[i % len(LIST_DTYPES)]
        state = STATE if not swap and dtype == torch.float32 and i % 4 == 0 else dtype
        offset = 1 if i % 7 == 3 else 0
        out.append((shape, dtype, state, (offset,) * 3))
    return out


def assert_list_ops_are_the_single_ops(
    k, elements: list[Element], device: str, gen: torch.Generator, accept: bool, swap: bool
) -> None:
    """dots_list is the single dots added in list order, and the update list op the single
    update per element, bit for bit."""
    xs, grads, prevs = make_list(elements, device, gen)
    expected = k.dots(grads[0].reshape(-1), prevs[0].reshape(-1))
    for g, gp in zip(grads[1:], prevs[1:], strict=True):
        expected = expected + k.dots(g.reshape(-1), gp.reshape(-1))
    assert torch.equal(k.dots_list(grads, prevs), expected)

    c = update_coeffs(accept, device)
    op, single = ("update_swap_list_", k.update_swap_) if swap else ("update_list_", k.update_)
    x_l, g_l, s_l = ([t.clone() for t in ts] for ts in (xs, grads, prevs))
    getattr(k, op)(x_l, g_l, s_l, c)
    for i, row in enumerate(zip(xs, grads, prevs, strict=True)):
        x_e, g_e, s_e = (t.clone().view(-1) for t in row)
        single(x_e, g_e, s_e, c)
        for got, want in zip((x_l[i], g_l[i], s_l[i]), (x_e, g_e, s_e), strict=True):
            assert torch.equal(got.view(-1), want), (op, i)


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("accept", [ACCEPT, RETRACE])
@pytest.mark.parametrize("swap", [False, True], ids=["copy", "swap"])
def test_long_mixed_lists_are_the_single_ops_in_list_order(
    backend: str, device: str, accept: bool, swap: bool
) -> None:
    """Hundreds of elements of mixed dtypes, shapes, alignments and sizes (several launch
    tables, several finishing launches): still bit-identical to the single op per
    element, the sums added in list order."""
    k = kernels_or_skip(backend, device)
    interpreted = backend == "triton" and device == "cpu"  # the numpy interpreter: small
    length, large = (40, ()) if interpreted else (LONG_LIST_LEN, LONG_LIST_LARGE)
    gen = gen_for("long lists", backend, device, accept, swap)
    elements = long_mixed_list(swap, length, large)
    assert_list_ops_are_the_single_ops(k, elements, device, gen, accept, swap)


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
#: Lists at the kernels' edges: one element; 256 and 257 (one finishing launch and one
#: more) with an empty first element; sizes at the CUDA grids' steps (131072 float32
#: elements fill 128 reduction blocks, 1048576 the update cap of 1024-block grids) in
#: float32 and bfloat16, a float16 x with a compact state, and compact states offset by 4
#: elements (8-byte aligned: their own packs) next to unaligned x or grad.
EDGE_LISTS = {
    "one": [((3, 5), F32, F32, (0, 0, 0))],
    "256": [((0,), F32, F32, (0, 0, 0))] + [((i % 9,), F32, F32, (0, 0, 0)) for i in range(255)],
    "257": [((0,), BF16, BF16, (0, 0, 0))]
    + [((i % 9 + 1,), F16, F16, (0, 0, 0)) for i in range(256)],
    "grid steps": [
        ((n,), dtype, dtype, (0, 0, 0))
        for n in (131072, 131073, 1048576, 1048577)
        for dtype in (F32, BF16)
    ],
    "compact": [
        ((1048577,), F32, BF16, (0, 0, 4)),
        ((70001,), F16, BF16, (0, 0, 0)),
        ((4097,), F32, BF16, (1, 0, 4)),
        ((4097,), F32, BF16, (0, 3, 4)),
        ((33, 17), F32, BF16, (0, 0, 4)),
    ],
}


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(EDGE_LISTS))
def test_lists_at_the_kernels_edges_are_the_single_ops(
    backend: str, device: str, case: str
) -> None:
    """Edge lengths, grid-step sizes and compact-state alignments: the single ops still."""
    k = kernels_or_skip(backend, device)
    elements = EDGE_LISTS[case]
    if backend == "triton" and device == "cpu":  # the numpy interpreter: small elements
        elements = [e for e in elements if torch.Size(e[0]).numel() <= 70001][:40]
        if not elements:
            pytest.skip("only elements too large for the triton interpreter")
    swaps = [False] if any(state != dtype for _, dtype, state, _ in elements) else [False, True]
    for swap in swaps:
        for accept in (ACCEPT, RETRACE):
            gen = gen_for("edge lists", backend, device, case, swap, accept)
            assert_list_ops_are_the_single_ops(k, elements, device, gen, accept, swap)
