"""The law's two number systems (elra_fused.control_math): FloatMath gives torch's
results, special values included."""

from __future__ import annotations

import math

import pytest
import torch

from elra_fused import control

F64 = torch.float64
SPECIAL = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 1e300)


def t(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


@pytest.mark.parametrize(
    "values",
    [
        (0.0, -0.0, 1e308, -1e308, 5e-324),  # extremes whose sum would overflow
        (float("inf"),),
        (1.0, float("-inf")),
        (float("inf"), float("-inf")),
        (2.0, float("nan"), 3.0),
    ],
)
def test_all_finite_is_isfinite_of_every_value(values: tuple[float, ...]) -> None:
    tensors = [torch.tensor(v, dtype=torch.float64) for v in values]
    expected = all(math.isfinite(v) for v in values)
    assert bool(control.all_finite(*tensors)) is expected


def test_float_math_matches_torch_on_special_values() -> None:
    fm, values = control.FLOAT_MATH, SPECIAL + (1.0, -2.5)
    for a in values:
        for b in values:
            ta, tb = t(a), t(b)
            for got, want in (
                (fm.minimum(a, b), torch.minimum(ta, tb)),
                (fm.maximum(a, b), torch.maximum(ta, tb)),
                (fm.div(a, b), ta / tb),
                (fm.clamp(a, 1e-8, 1e6), torch.clamp(ta, 1e-8, 1e6)),
            ):
                assert torch.equal(t(got), want) or (math.isnan(got) and want.isnan()), (a, b)
        assert torch.equal(t(fm.sqrt(a)), torch.sqrt(t(a))) or math.isnan(fm.sqrt(a))


def test_float_sqrt_gives_torchs_bits() -> None:
    """torch's CPU sqrt is 1 ulp off math.sqrt for some arguments; the host law's sqrt
    (step crop, warm-up floor, retrace floor) must still give the tensor law's bits."""
    gen = torch.Generator().manual_seed(0)
    values = (10 ** (torch.rand(3000, generator=gen, dtype=F64) * 60 - 20)).tolist()
    for value in values:
        assert torch.equal(t(control.FLOAT_MATH.sqrt(value)), torch.sqrt(t(value))), value
