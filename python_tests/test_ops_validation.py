"""Argument validation: clear errors naming the argument, nothing mutated by a rejected
call, the same messages on every backend (the C++ kernels raise them from
csrc/common.h); empty tensors are valid."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _backends import DEVICES, FUSED_BACKENDS, kernels_or_skip
from _ops_common import ACCEPT, MIXED_BACKENDS, RETRACE, STATE, coeffs, gen_for

from elra_fused import ops
from elra_fused import reference_ops as ref
from elra_fused.ops.cases import rand, recover_coeffs, update_coeffs

STATE_DTYPE_MSG = r"grad_prev has dtype .* must have (grad|x)'s dtype or bfloat16"
SHARE_DTYPE_MSG = "all vector arguments must share one dtype"


def vec(dtype: torch.dtype = torch.float32, size: int = 32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(size, device=device).to(dtype)


def assert_rejected(
    call: Callable[..., object], args: tuple, error: type[Exception], match: str
) -> None:
    """``call(*args)`` raises ``error`` matching ``match`` and leaves ``args`` unchanged."""
    before = [a.clone() for a in args]
    with pytest.raises(error, match=match):
        call(*args)
    for a, b in zip(args, before, strict=True):
        assert torch.equal(a, b), "a rejected call must not modify its arguments"


def _bad_update_cases(device: str) -> list[tuple[str, Callable[[], tuple], type, str]]:
    n = 64

    def v(dtype: torch.dtype = torch.float32, size: int = n) -> torch.Tensor:
        return vec(dtype, size, device)

    c = update_coeffs(ACCEPT, device)
    return [
        ("dtype_mismatch", lambda: (v(), v(torch.float16), v(), c), TypeError, "grad"),
        (
            "unsupported_dtype",
            lambda: (v(torch.float64), v(torch.float64), v(torch.float64), c),
            TypeError,
            "x has dtype",
        ),
        ("non_contiguous", lambda: (v(), v(size=2 * n)[::2], v(), c), ValueError, "contiguous"),
        ("wrong_length", lambda: (v(), v(), v(size=n + 1), c), ValueError, "elements"),
        ("not_flat", lambda: (v().view(8, 8), v(), v(), c), ValueError, "1-D"),
        ("coeffs_dtype", lambda: (v(), v(), v(), c.float()), TypeError, "coeffs"),
        ("coeffs_shape", lambda: (v(), v(), v(), c[:2]), ValueError, "coeffs"),
        ("aliasing", lambda: (lambda t: (t, v(), t, c))(v()), ValueError, "share memory"),
    ]


@pytest.mark.parametrize("op", ["update_", "update_recover_", "update_swap_"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", range(8), ids=[c[0] for c in _bad_update_cases("cpu")])
def test_bad_update_inputs_raise_and_leave_x_unchanged(backend: str, op: str, case: int) -> None:
    k = kernels_or_skip(backend, "cpu")
    _, make, exc_type, match = _bad_update_cases("cpu")[case]
    if op == "update_recover_":
        match = match.replace("grad_prev", "x_prev")
    assert_rejected(getattr(k, op), make(), exc_type, match)


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
def test_bad_dots_inputs(backend: str) -> None:
    k = kernels_or_skip(backend, "cpu")
    g = torch.randn(10)
    with pytest.raises(TypeError, match="grad_prev has dtype"):
        k.dots(g, g.half())
    with pytest.raises(ValueError, match="grad_prev must be 1-D with 10 elements"):
        k.dots(g, torch.randn(11))
    with pytest.raises(ValueError, match="coeffs must have shape"):
        k.dots_recover(g, g.clone(), g.clone(), coeffs([1.0], "cpu"))
    with pytest.raises(TypeError, match="coeffs must be a dense float64"):
        k.dots_recover(g, g.clone(), g.clone(), torch.ones(2))


# =========================================================================================
# Compact state: which dtype combinations are rejected
# =========================================================================================
def vecs(*dtypes: torch.dtype, coeffs: torch.Tensor | None = None) -> Callable[[], tuple]:
    """A factory of fresh arguments: one 32-element vector per dtype, then ``coeffs``."""
    tail = () if coeffs is None else (coeffs,)
    return lambda: (*(vec(d) for d in dtypes), *tail)


F32, F16, F64, BF16 = torch.float32, torch.float16, torch.float64, torch.bfloat16


def _bad_state_cases() -> list[tuple[str, str, Callable[[], tuple], str]]:
    """(id, op, args factory, message regex); every case must raise TypeError."""
    c = update_coeffs(ACCEPT, "cpu")
    cr = recover_coeffs("cpu", alpha_prev=0.1)
    return [
        ("dots_fp16_state", "dots", vecs(F32, F16), STATE_DTYPE_MSG),
        ("update_fp16_state", "update_", vecs(F32, F32, F16, coeffs=c), STATE_DTYPE_MSG),
        ("dots_fp64_state", "dots", vecs(F32, F64), STATE_DTYPE_MSG),
        ("update_fp64_state", "update_", vecs(F32, F32, F64, coeffs=c), STATE_DTYPE_MSG),
        ("update_fp32_state_fp16_x", "update_", vecs(F16, F16, F32, coeffs=c), "grad_prev"),
        # x_prev is a point: it must have x's dtype, bf16 included.
        ("dots_recover_bf16", "dots_recover", vecs(BF16, F32, F32, coeffs=cr), SHARE_DTYPE_MSG),
        ("update_recover_bf16", "update_recover_", vecs(F32, F32, BF16, coeffs=c), SHARE_DTYPE_MSG),
    ]


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("case", range(7), ids=[c[0] for c in _bad_state_cases()])
def test_bad_state_dtype_raises(backend: str, case: int) -> None:
    k = kernels_or_skip(backend, "cpu")
    _, op, make, match = _bad_state_cases()[case]
    assert_rejected(getattr(k, op), make(), TypeError, match)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_reject_float64_with_bf16_state(backend: str) -> None:
    """float64 parameters are the reference's only; a bf16 state does not change that."""
    k = kernels_or_skip(backend, "cpu")
    x, g = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    gp = torch.randn(16).to(STATE)
    with pytest.raises(TypeError, match="grad has dtype torch.float64|grad has dtype Double"):
        k.dots(g, gp)
    with pytest.raises(TypeError, match="x has dtype torch.float64|x has dtype Double"):
        k.update_(x, g, gp, update_coeffs(ACCEPT, "cpu"))


def test_reference_accepts_float64_with_bf16_state() -> None:
    k = ops.get_kernels("reference", "cpu")
    gen = gen_for("ref_f64_bf16")
    g, gp = rand(9, torch.float64, "cpu", gen), rand(9, STATE, "cpu", gen)
    assert torch.equal(k.dots(g, gp), ref.dots(g, gp.double()))


# =========================================================================================
# update_swap_: grad and grad_prev trade roles, so no compact state
# =========================================================================================
def _bad_swap_cases() -> list[tuple[str, Callable[[], tuple], str]]:
    """update_swap_-specific dtype rules: everything must share x's dtype. Every case
    raises TypeError."""
    return [
        ("bf16_grad_prev", vecs(F32, F32, BF16), "grad_prev has dtype .*" + SHARE_DTYPE_MSG),
        ("fp16_x_bf16_grad_prev", vecs(F16, F16, BF16), "grad_prev"),
        ("bf16_grad", vecs(F32, BF16, F32), "grad has dtype .*" + SHARE_DTYPE_MSG),
        ("fp32_grad_prev_fp16_x", vecs(F16, F16, F32), "grad_prev"),
    ]


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _bad_swap_cases()])
@pytest.mark.parametrize("accept", [ACCEPT, RETRACE], ids=["accept", "retrace"])
def test_bad_update_swap_dtype_raises(backend: str, case: int, accept: bool) -> None:
    k = kernels_or_skip(backend, "cpu")
    _, make, match = _bad_swap_cases()[case]
    assert_rejected(k.update_swap_, (*make(), update_coeffs(accept, "cpu")), TypeError, match)


# =========================================================================================
# Empty tensors are valid
# =========================================================================================
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_dots_empty(backend: str, device: str) -> None:
    k = kernels_or_skip(backend, device)
    e = torch.empty(0, device=device)
    assert k.dots(e, e.clone()).tolist() == [0.0, 0.0]
    assert k.dots_recover(e, e.clone(), e.clone(), coeffs([1.0, 1.0], device)).tolist() == [0, 0]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_update_swap_empty(backend: str) -> None:
    k = kernels_or_skip(backend, "cpu")
    e = torch.empty(0)
    for accept in (ACCEPT, RETRACE):
        k.update_swap_(e, e.clone(), e.clone(), update_coeffs(accept, "cpu"))
