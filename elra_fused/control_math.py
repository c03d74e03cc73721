"""The two number systems the control law (:mod:`elra_fused.control`) is written over.

The law is one function of an ``xp`` namespace; it runs, with the same bits, on

* :data:`TENSOR_MATH`: 0-d float64 tensors on the parameters' device. It never reads a
  value back to the host and can be captured in a CUDA graph (or compiled);
* :data:`FLOAT_MATH`: Python floats with torch's IEEE semantics (NaN propagation,
  division by zero gives +-inf / NaN), for parameters on the CPU, where a 0-d tensor op
  costs ~1 us of dispatch and the law's ~200 of them cost more than the law in floats.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch


class TensorMath:
    """The law's operations on 0-d float64 tensors: sync-free, graph-capturable."""

    where = staticmethod(torch.where)
    minimum = staticmethod(torch.minimum)
    maximum = staticmethod(torch.maximum)
    sqrt = staticmethod(torch.sqrt)

    @staticmethod
    def clamp(x: torch.Tensor, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
        return torch.clamp(x, min=lo, max=hi)

    @staticmethod
    def div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a / b

    @staticmethod
    def logical_not(c: torch.Tensor) -> torch.Tensor:
        return ~c

    @staticmethod
    def as_float(c: torch.Tensor) -> torch.Tensor:
        return c.to(torch.float64)

    @staticmethod
    def unpack(state: torch.Tensor) -> Sequence[torch.Tensor]:
        return state.unbind()  # one op instead of one select per entry read

    @staticmethod
    def pack(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values)


class FloatMath:
    """The same operations on Python floats, with torch's results for NaN and infinities
    (``min``/``max`` would drop a NaN; ``/`` would raise on a zero divisor)."""

    @staticmethod
    def where(cond: bool, a: float, b: float) -> float:
        return a if cond else b

    @staticmethod
    def minimum(a: float, b: float) -> float:
        return a if (a != a or a < b) else b  # a != a: a is NaN

    @staticmethod
    def maximum(a: float, b: float) -> float:
        return a if (a != a or a > b) else b

    @staticmethod
    def sqrt(x: float) -> float:
        return _torch_cpu_sqrt(x) if x >= 0.0 else math.nan  # NaN (and a negative) -> NaN

    @staticmethod
    def clamp(x: float, lo: float | None = None, hi: float | None = None) -> float:
        if lo is not None and x < lo:  # NaN compares False and stays NaN
            x = lo
        if hi is not None and x > hi:
            x = hi
        return x

    @staticmethod
    def div(a: float, b: float) -> float:
        try:
            return a / b
        except ZeroDivisionError:  # IEEE: +-inf, or NaN for 0/0 and NaN/0
            if a != a or a == 0.0:
                return math.nan
            return math.copysign(math.inf, a) * math.copysign(1.0, b)

    @staticmethod
    def logical_not(c: bool) -> bool:
        return not c

    @staticmethod
    def as_float(c: bool) -> float:
        return 1.0 if c else 0.0

    @staticmethod
    def unpack(state: Sequence[float]) -> Sequence[float]:
        return state

    @staticmethod
    def pack(values: list[float]) -> list[float]:
        return values


#: The two number systems the law runs in (see the module docstring).
TENSOR_MATH = TensorMath()
FLOAT_MATH = FloatMath()
Math = TensorMath | FloatMath


def all_finite(*values: Any) -> Any:
    """Bool: are all ``values`` finite?

    ``v * 0`` is 0 for a finite v and NaN for +-inf or NaN, and a sum of zeros stays 0 (it
    cannot overflow), so one comparison tests them all: a handful of tiny ops instead of
    four per ``torch.isfinite`` -- the law runs every step and tiny ops are its cost. The
    same expression works on tensors and on floats.
    """
    zeros = values[0] * 0.0
    for value in values[1:]:
        zeros = zeros + value * 0.0
    return zeros == 0.0


@functools.lru_cache(maxsize=8)
def _torch_cpu_sqrt(x: float) -> float:
    """sqrt(x) rounded as torch rounds it on the CPU.

    torch's CPU sqrt of a float64 is not always correctly rounded: it is 1 ulp away from
    ``math.sqrt`` for about 1 argument in 200 (measured). The host law must give the
    tensor law's bits, so it takes torch's result (a few us; the law asks for at most
    two distinct square roots per step, hence the small cache).
    """
    return torch.sqrt(torch.tensor(x, dtype=torch.float64)).item()
