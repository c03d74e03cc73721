"""The reductions (dots, dots_recover, dots_list) over the whole finite range of their
input dtypes, on every backend: they must agree with the float64 reference where a
float32 product or sum would overflow (|G| ~ 1e19 and up) or underflow (|G| ~ 1e-23 and
down, subnormals included), and propagate +-inf / NaN as the reference does. The
tolerance is dots_tol / dots_recover_tol (_ops_common): the products are exact in
float64, so only the float64 summation errs, by at most ~n u sum|terms| per side.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _backends import DEVICES, kernels_or_skip
from _ops_common import (
    MIXED_BACKENDS,
    STATE,
    assert_dots_agree,
    dots_recover_tol,
    dots_tol,
    dtype_name,
    gen_for,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from elra_fused.ops.cases import OP_CASES, recover_coeffs

#: Past one CPU sub-block / Triton tile (1024) and with a vector tail: 64 fp32 squares of
#: 3e18 per lane already overflowed the old fp32 lane sums.
N = 4097
#: Value kinds: (lo, hi) bounds of log2|v|, None = the dtype's own limit (its smallest
#: subnormal, or just under its largest finite value).
KINDS = {
    "huge": (115.0, None),  # ~4e34 .. 2e38: every square overflows fp32
    "lane_sum_overflow": (61.3, 62.4),  # 3e18 .. 6e18: squares finite, sums of 64 are not
    "overflow_edge": (63.0, 64.5),  # ~1e19 .. 2.6e19: squares around fp32's max
    "tiny": (-110.0, -75.0),  # 8e-34 .. 3e-23: every square underflows fp32 to zero
    "subnormal": (None, -127.0),  # 1e-45 .. 6e-39 (fp32); bf16 / fp16: their own
    "mixed": (None, None),  # the dtype's whole range
}
#: Kinds whose range fits each dtype (fp16 tops out at 65504: nothing fp32 can overflow).
DTYPE_KINDS = {
    torch.float32: tuple(KINDS),
    torch.bfloat16: tuple(KINDS),
    torch.float16: ("huge", "tiny", "subnormal", "mixed"),
}
#: fp16's own versions (its normal range is 2**-14 .. 65504).
FP16_KINDS = {"huge": (10.0, None), "tiny": (-14.0, -8.0), "subnormal": (None, -14.0)}


def extreme(kind: str, n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``n`` values of ``kind``: random signs, log2|v| uniform in the kind's range,
    rounded once to ``dtype`` (finite)."""
    lo, hi = FP16_KINDS.get(kind, KINDS[kind]) if dtype == torch.float16 else KINDS[kind]
    fi = torch.finfo(dtype)
    lo = math.log2(fi.smallest_normal * fi.eps) if lo is None else lo
    hi = math.log2(fi.max) - 0.01 if hi is None else hi
    e = torch.empty(n, dtype=torch.float64).uniform_(lo, hi, generator=gen)
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return (sign * torch.exp2(e)).to(dtype)


def range_cases() -> list:
    """(backend, dtype, state, kind): every backend, dtype and kind, the compact bf16
    state with float32 / float16 gradients."""
    out = []
    for backend in MIXED_BACKENDS:
        for dtype, kinds in DTYPE_KINDS.items():
            states = (None, STATE) if dtype != torch.bfloat16 else (None,)
            for state in states:
                for kind in kinds:
                    label = dtype_name(dtype) + ("+bf16state" if state else "")
                    case_id = f"{backend}-{label}-{kind}"
                    out.append(pytest.param(backend, dtype, state, kind, id=case_id))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("backend", "dtype", "state", "kind"), range_cases())
def test_dots_whole_range(backend: str, device: str, dtype, state, kind: str) -> None:
    k = kernels_or_skip(backend, device)
    gen = gen_for("range", backend, dtype, state, kind)
    g = extreme(kind, N, dtype, gen)
    # G_prev of the same kind, and of a "mixed" one: products of very different sizes.
    for other in (kind, "mixed"):
        gp = extreme(other, N, dtype, gen).to(state or dtype)
        g_d, gp_d = g.to(device), gp.to(device)
        expected = OP_CASES["dots"].reference(g, gp)
        assert torch.isfinite(expected).all(), "the reference itself left float64's range"
        assert_dots_agree(k.dots(g_d, gp_d), expected, dots_tol(g, gp))
        # The same vectors as a list of parameter-like tensors.
        cut = [0, 33 * 17, 33 * 17 + 7, 33 * 17 + 8, N]
        gs = [g_d[a:b] for a, b in zip(cut, cut[1:], strict=False)]
        gps = [gp_d[a:b] for a, b in zip(cut, cut[1:], strict=False)]
        gs[2], gps[2] = gs[2].view(()), gps[2].view(())
        assert_dots_agree(k.dots_list(gs, gps), expected, dots_tol(g, gp))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("backend", "dtype", "kind"),
    [
        pytest.param(b, d, kind, id=f"{b}-{dtype_name(d)}-{kind}")
        for b in MIXED_BACKENDS
        for d, kinds in DTYPE_KINDS.items()
        for kind in kinds
    ],
)
def test_dots_recover_whole_range(backend: str, device: str, dtype, kind: str) -> None:
    """x_prev, x and G of one kind (so x_prev - x and the recovered G_prev span it too),
    coefficients [decay, 1 / alpha_prev] of a real step."""
    k = kernels_or_skip(backend, device)
    gen = gen_for("range_recover", backend, dtype, kind)
    x_prev, x, g = (extreme(kind, N, dtype, gen) for _ in range(3))
    c = recover_coeffs("cpu")
    expected = OP_CASES["dots_recover"].reference(x_prev, x, g, c)
    assert torch.isfinite(expected).all()
    out = k.dots_recover(*(t.to(device) for t in (x_prev, x, g, c)))
    assert_dots_agree(out, expected, dots_recover_tol(x_prev, x, g, c))


INF, NAN = float("inf"), float("nan")
#: The Triton interpreter computes in numpy, which warns about inf - inf and inf * 0.
QUIET_NUMPY = pytest.mark.filterwarnings("ignore:(invalid|overflow) value:RuntimeWarning")
#: (where, index, value): non-finite entries put into G or G_prev (or x_prev / x).
NONFINITE = {
    "g_inf": [("g", 5, INF)],  # <G, G> = inf, <G_prev, G> = +-inf
    "g_minus_inf": [("g", 5, -INF)],
    "g_nan": [("g", 5, NAN)],  # both NaN
    "gp_inf": [("gp", 7, -INF)],  # <G, G> finite, <G_prev, G> = -+inf
    "gp_nan": [("gp", 7, NAN)],
    "inf_times_zero": [("g", 3, INF), ("gp", 3, 0.0)],  # <G_prev, G> = NaN
    "inf_minus_inf": [("gp", 7, INF), ("g", 7, 1.0), ("gp", 9, -INF), ("g", 9, 1.0)],
    "huge_and_inf": [("g", 11, 3e38), ("gp", 12, INF)],  # finite huge + inf stays inf
}


@QUIET_NUMPY
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(NONFINITE))
@pytest.mark.parametrize(
    ("backend", "dtype", "state"),
    [
        pytest.param(b, d, s, id=f"{b}-{dtype_name(d)}" + ("+bf16state" if s else ""))
        for b in MIXED_BACKENDS
        for d, s in (
            (torch.float32, None),
            (torch.bfloat16, None),
            (torch.float16, None),
            (torch.float32, STATE),
        )
    ],
)
def test_dots_nonfinite_propagate(backend: str, device: str, dtype, state, case: str) -> None:
    k = kernels_or_skip(backend, device)
    gen = gen_for("nonfinite", backend, dtype, state, case)
    g, gp = OP_CASES["dots"].make_inputs(N, torch.float32, "cpu", gen)
    for name, i, v in NONFINITE[case]:
        if dtype == torch.float16 and math.isfinite(v) and abs(v) > 65504:
            v = 6e4
        (g if name == "g" else gp)[i] = v
    g, gp = g.to(dtype), gp.to(state or dtype)
    expected = OP_CASES["dots"].reference(g, gp)
    assert not torch.isfinite(expected).all(), "the case must produce a non-finite result"
    tol = dots_tol(g, gp).nan_to_num(posinf=0.0)
    assert_dots_agree(k.dots(g.to(device), gp.to(device)), expected, tol)
    assert_dots_agree(k.dots_list([g.to(device)], [gp.to(device)]), expected, tol)


@QUIET_NUMPY
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize(
    "entries",
    [
        [("x_prev", INF)],  # G_prev = +inf (decay * inf - x): as the reference, not NaN
        [("x", -INF)],  # G_prev = +inf
        [("x_prev", INF), ("x", INF)],  # inf - inf: NaN
        [("x_prev", NAN)],
        [("g", -INF)],
    ],
    ids=["xprev_inf", "x_minus_inf", "both_inf", "xprev_nan", "g_minus_inf"],
)
def test_dots_recover_nonfinite_propagate(backend: str, device: str, entries: list) -> None:
    k = kernels_or_skip(backend, device)
    gen = gen_for("nonfinite_recover", backend, repr(entries))
    x_prev, x, g, c = OP_CASES["dots_recover"].make_inputs(N, torch.float32, "cpu", gen)
    args = {"x_prev": x_prev, "x": x, "g": g}
    for name, v in entries:
        args[name][9] = v
    expected = OP_CASES["dots_recover"].reference(x_prev, x, g, c)
    assert not torch.isfinite(expected).all()
    out = k.dots_recover(*(t.to(device) for t in (x_prev, x, g, c)))
    assert_dots_agree(out, expected, dots_recover_tol(x_prev, x, g, c).nan_to_num(posinf=0.0))


# =========================================================================================
# Property: random vectors from the whole finite float32 range
# =========================================================================================
FINITE_F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def f32_vectors(draw: st.DrawFn, count: int) -> list[torch.Tensor]:
    """``count`` float32 vectors of one length (1 .. 2100: past a CPU sub-block and a
    Triton tile), elements anywhere in the finite float32 range, subnormals included."""
    n = draw(st.integers(1, 2100))
    arrays = hnp.arrays(np.float32, n, elements=FINITE_F32)
    return [torch.from_numpy(draw(arrays).copy()) for _ in range(count)]


@QUIET_NUMPY
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@settings(max_examples=50, deadline=None)
@given(vectors=f32_vectors(2), compact=st.booleans())
def test_property_dots_whole_f32_range(backend: str, vectors, compact: bool) -> None:
    k = kernels_or_skip(backend, "cpu")
    g, gp = vectors
    if compact:  # bf16 state: values past bf16's largest round to inf (then must match)
        gp = gp.to(STATE)
    expected = OP_CASES["dots"].reference(g, gp)
    assert_dots_agree(k.dots(g, gp), expected, dots_tol(g, gp).nan_to_num(posinf=0.0))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@settings(max_examples=50, deadline=None)
@given(
    vectors=f32_vectors(3),
    decay=st.floats(0.5, 1.0),
    inv_alpha=st.floats(2.0**-20, 2.0**20),
)
def test_property_dots_recover_whole_f32_range(
    backend: str, vectors, decay: float, inv_alpha: float
) -> None:
    k = kernels_or_skip(backend, "cpu")
    x_prev, x, g = vectors
    c = torch.tensor([decay, inv_alpha], dtype=torch.float64)
    expected = OP_CASES["dots_recover"].reference(x_prev, x, g, c)
    assert torch.isfinite(expected).all()
    assert_dots_agree(k.dots_recover(x_prev, x, g, c), expected, dots_recover_tol(x_prev, x, g, c))
