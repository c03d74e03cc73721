"""Shared setup of the op tests (``test_ops_*.py``): sizes, tolerances, seeded inputs and
the element-wise comparisons. Inputs, coefficients and oracles come from the op-case
table :mod:`elra_fused.ops.cases`; backend / device policy from :mod:`_backends`.

Triton runs in its interpreter on CPU (TRITON_INTERPRET=1 is set by conftest.py before
triton is imported), so its sizes stay modest.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from _backends import CUDA_MARKS, FUSED_BACKENDS, kernels_or_skip

from elra_fused import ops
from elra_fused.ops.cases import BACK, DECAY, OP_CASES, STEP, OpCase, update_coeffs

__all__ = ["BACK", "DECAY", "STEP", "update_coeffs"]  # re-exported for the test files

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The compact state dtype (elra_fused.ops.STATE_DTYPE_COMPACT).
STATE = torch.bfloat16
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7: rounding to bf16 errs <= eps / 2
ACCEPT, RETRACE = True, False
ACCEPT_IDS = {"argvalues": [ACCEPT, RETRACE], "ids": ["accept", "retrace"]}

# Odd sizes hit the vector tails; 278011 spans several CPU chunks and reduction blocks.
# The numpy interpreter is slow, so triton-on-CPU stops at ~65k.
SIZES = {
    ("cpp", "cpu"): (1, 7, 4097, 278011, 3_000_017),
    ("triton", "cpu"): (1, 7, 4097, 65537),
    ("cpp", "cuda"): (1, 7, 4097, 278011, 3_000_017),
    ("triton", "cuda"): (1, 7, 4097, 278011, 3_000_017),
}
#: Sizes of the reference backend where it is tested like a fused one.
REFERENCE_SIZES = (1, 7, 4097, 278011)
# Compact (bf16) state: the triton interpreter stays at the modest sizes.
MIXED_SIZES = {
    ("cpp", "cpu"): (1, 7, 4097, 278011),
    ("triton", "cpu"): (1, 7, 4097),
    ("reference", "cpu"): REFERENCE_SIZES,
    ("cpp", "cuda"): (1, 7, 4097, 278011),
    ("triton", "cuda"): (1, 7, 4097, 278011),
    ("reference", "cuda"): REFERENCE_SIZES,
}
MIXED_BACKENDS = (*FUSED_BACKENDS, "reference")
# float32 parameters are the use case; float16 + bf16 state is the other mixed combination.
MIXED_X_SIZES = {torch.float32: None, torch.float16: (7, 4097)}

#: Parameter-like shapes: a matrix, a vector, a scalar and one spanning several CPU chunks.
LIST_SHAPES = ((33, 17), (7,), (), (278011,))
LIST_N = sum(torch.Size(s).numel() for s in LIST_SHAPES)

# --- tolerances -------------------------------------------------------------------------
# Dot products (dots, dots_recover, dots_list) on every backend: each product of two
# float32 / bfloat16 / float16 values is exact in float64 (24 + 24 significand bits <= 53;
# products of magnitude 2**-298 .. 2**256, far inside float64's normal range), and the
# terms are summed in float64. Any order of summing n terms errs by at most
# (n - 1) u sum|terms| (u = 2**-53, first order; Higham, "Accuracy and Stability of
# Numerical Algorithms", sec. 4.2), the fused kernel and the reference each, whatever their
# orders: dots_tol / dots_recover_tol. For n = 4097 that is ~1e-12 of sum|terms| (the old
# fp32 lanes needed 1e-5).
U64 = 2.0**-53
# Updates: fp32 math then one rounding to the storage dtype, against float64 math then
# one rounding. The difference is at most ~1 ulp of the result plus fp32 rounding of the
# terms; eps(dtype) * (|result| + sum|terms|) bounds both (ulp(v) <= eps * |v|).
UPDATE_EPS = {
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
    torch.float64: torch.finfo(torch.float64).eps,  # the reference's own dtype
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _param(backend: str, device: str, dtype: torch.dtype, state, n: int, label: str):
    marks = CUDA_MARKS if device == "cuda" else ()
    test_id = f"{backend}-{device}-{label}-{n}"
    return pytest.param(backend, device, dtype, state, n, marks=marks, id=test_id)


def numeric_cases(reference: bool = False, compact_state: bool = False) -> list:
    """``(backend, device, dtype, state_dtype, n)`` parameters: every fused backend and
    device over :data:`DTYPES` and its :data:`SIZES` (state_dtype ``None``: the dtype of
    x); with ``reference`` the reference backend too (float64 included, at
    :data:`REFERENCE_SIZES`); with ``compact_state`` the bf16-state cases as well
    (:data:`MIXED_SIZES`, fused backends and reference)."""
    out = []
    for device in ("cpu", "cuda"):
        for backend in (*FUSED_BACKENDS, "reference") if reference else FUSED_BACKENDS:
            if backend == "reference":
                dtypes, sizes = (*DTYPES, torch.float64), REFERENCE_SIZES
            else:
                dtypes, sizes = DTYPES, SIZES[(backend, device)]
            for dtype in dtypes:
                out += [_param(backend, device, dtype, None, n, dtype_name(dtype)) for n in sizes]
    if compact_state:
        for device in ("cpu", "cuda"):
            for backend in MIXED_BACKENDS:
                for dtype, only in MIXED_X_SIZES.items():
                    label = f"{dtype_name(dtype)}+bf16state"
                    out += [
                        _param(backend, device, dtype, STATE, n, label)
                        for n in MIXED_SIZES[(backend, device)]
                        if only is None or n in only
                    ]
    return out


def gen_for(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh data per case, reproducible
    across runs (crc32, unlike hash(), does not depend on PYTHONHASHSEED)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def prepare(
    op: str,
    backend: str,
    device: str,
    dtype: torch.dtype,
    state: torch.dtype | None,
    n: int,
    accept: bool = ACCEPT,
) -> tuple[ops.KernelSet, OpCase, tuple]:
    """The backend's kernels (or skip), the op's case and its fresh arguments, seeded from
    all of these parameters."""
    k = kernels_or_skip(backend, device)
    case = OP_CASES[op]
    gen = gen_for(op, backend, dtype, state, n, accept)
    return k, case, case.make_inputs(n, dtype, device, gen, state_dtype=state, accept=accept)


def coeffs(values: list[float], device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def poison_allocator(device: str) -> None:
    """Leave NaNs in the CUDA caching allocator so a fresh output that is not fully
    written shows up as NaN (CPU allocations are not cached, nothing to do)."""
    if device == "cuda":
        junk = torch.full((1 << 22,), float("nan"), device=device)
        del junk


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bit patterns (an integer view of the same width)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def dots_tol(grad: torch.Tensor, grad_prev: torch.Tensor) -> torch.Tensor:
    """Bound on |fused - reference| of ``dots(grad, grad_prev)`` (either result), for any
    summation orders: each side errs by at most (n - 1) u sum|terms|, the products being
    exact (see U64); 2 n u sum|terms| covers both (dots_list: a term also passes through
    at most n - 1 additions, the per-tensor ones and the list-order ones together)."""
    g, gp = grad.double().reshape(-1), grad_prev.double().reshape(-1)
    return 2 * max(g.numel(), 1) * U64 * torch.stack([(g * g).sum(), (gp * g).abs().sum()])


def dots_recover_tol(
    x_prev: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """Bound on |fused - reference| of ``dots_recover``. Both recover G_prev_i =
    (decay x_prev_i - x_i) inv_alpha in float64 -- three roundings, or two with an FMA,
    each within u (|decay x_prev_i| + |x_i|) |inv_alpha| =: u E_i -- and round the product
    with G_i once more; the sum adds (n - 1) u sum|terms| per side, as in dots_tol. So
    the second result differs by at most (2 n + 8) u sum |G_i| E_i."""
    xp, xd, g = (t.double().reshape(-1) for t in (x_prev, x, grad))
    env = (c[0].double() * xp).abs() + xd.abs()
    env = g.abs() * env * c[1].double().abs()
    n = max(g.numel(), 1)
    return U64 * torch.stack([2 * n * (g * g).sum(), (2 * n + 8) * env.sum()])


def assert_dots_agree(out: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor) -> None:
    """``out`` within ``tol`` of the float64 reference where that is finite; NaN where it
    is NaN, the same infinity where it is infinite."""
    assert out.dtype == torch.float64 and out.shape == expected.shape, (out, expected)
    out, expected, tol = out.cpu(), expected.cpu(), tol.cpu()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isnan(out), torch.isnan(expected)), (out, expected)
    assert torch.equal(out[torch.isinf(expected)], expected[torch.isinf(expected)]), (
        out,
        expected,
    )
    err = (out - expected).abs()
    assert bool((err[finite] <= tol[finite]).all()), (out, expected, err, tol)


def assert_close_elementwise(
    out: torch.Tensor, expected: torch.Tensor, envelope: torch.Tensor, dtype: torch.dtype
) -> None:
    """|out - expected| <= eps(dtype) * (|expected| + envelope) + tiny, elementwise."""
    err = (out.double() - expected.double()).abs()
    tol = UPDATE_EPS[dtype] * (expected.double().abs() + envelope) + torch.finfo(dtype).tiny
    bad = ~(err <= tol)  # also catches NaN
    assert not bool(bad.any()), (
        f"{int(bad.sum())} elements out of tolerance; worst err {err.max().item():.3e}"
    )


def update_envelope(
    accept: bool, x: torch.Tensor, g: torch.Tensor, direction: torch.Tensor
) -> torch.Tensor:
    """sum |terms| of x's new value: decay |x| + step |G| on accept, |x| + back |d| on a
    retrace along the direction ``d`` (G_prev, or its recover-mode envelope)."""
    if accept:
        return DECAY * x.double().abs() + STEP * g.double().abs()
    return x.double().abs() + BACK * direction.double().abs()


def assert_same_bf16(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical bf16, except that a NaN only has to stay a NaN: torch's own NaN bits
    depend on the CPU's vector path (0xFFFF with AVX2/AVX512, 0x7FC0 scalar / CUDA-style
    canonical 0x7FFF on GPUs), so payloads are not part of the contract."""
    assert out.dtype == expected.dtype == torch.bfloat16
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan), "NaN positions differ"
    same = bits(out) == bits(expected)
    bad = ~(same | nan)
    assert not bool(bad.any()), (
        f"{int(bad.sum())} bf16 states differ from torch's .to(torch.bfloat16), first at "
        f"{int(bad.nonzero()[0])}"
    )


def assert_untouched(flat: torch.Tensor, before: torch.Tensor, owned: list[slice]) -> None:
    """Nothing of ``flat`` outside the ``owned`` slices changed."""
    untouched = torch.ones_like(flat, dtype=torch.bool)
    for s in owned:
        untouched[s] = False
    assert torch.equal(flat[untouched], before[untouched]), "wrote outside the views"
