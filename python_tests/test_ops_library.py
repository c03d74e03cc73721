"""torch.library integration: opcheck of every op (schemas, fakes, autograd / functionalize
registration), tracing through torch.compile, the fake (meta) implementations."""

from __future__ import annotations

import pytest
import torch
from _backends import FUSED_BACKENDS, kernels_or_skip
from _ops_common import ACCEPT, RETRACE, STATE, gen_for

from elra_fused import ops
from elra_fused.ops.cases import OP_CASES

STATE_DTYPE_MSG = r"grad_prev has dtype .* must have (grad|x)'s dtype or bfloat16"


def _opcheck_cases() -> list:
    """Every op with the dtype of x as state, plus the compact bf16 state of dots and
    update_ (the two ops whose schema takes it)."""
    full = [pytest.param(name, None, id=name) for name in ops.OP_NAMES]
    compact = [pytest.param(name, STATE, id=f"{name}-bf16state") for name in ("dots", "update_")]
    return full + compact


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize(("op_name", "state"), _opcheck_cases())
def test_opcheck(backend: str, op_name: str, state) -> None:
    kernels_or_skip(backend, "cpu")  # skip (or fail in CI) when unavailable
    prefix = ops.TRITON_PREFIX if backend == "triton" else ""
    op = getattr(torch.ops.elra_fused, prefix + op_name).default
    case = OP_CASES[op_name]
    gen = gen_for("opcheck", op_name, state)
    # List ops: one element per "parameter", of any shape.
    shapes = ((1031,), (3, 5)) if case.is_list else None
    n = 1031 + 15 if case.is_list else 1031
    for accept in (ACCEPT,) if case.returns_tensor else (ACCEPT, RETRACE):
        args = case.make_inputs(
            n, torch.float32, "cpu", gen, state_dtype=state, accept=accept, shapes=shapes
        )
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_cpp(compile_backend: str) -> None:
    """The ops trace through torch.compile (fake impls + functionalized mutation)."""
    k = kernels_or_skip("cpp", "cpu")
    gen = gen_for("compile")
    x, g, gp, c = OP_CASES["update_"].make_inputs(4097, torch.float32, "cpu", gen)

    def step(x: torch.Tensor, g: torch.Tensor, gp: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        d = k.dots(g, gp)
        k.update_(x, g, gp, c)
        return d

    x_e, gp_e = x.clone(), gp.clone()
    d_eager = step(x_e, g, gp_e, c)
    compiled = torch.compile(step, backend=compile_backend, fullgraph=True)
    d_comp = compiled(x, g, gp, c)
    assert torch.equal(d_comp, d_eager)
    assert torch.equal(x, x_e) and torch.equal(gp, gp_e)


def test_update_swap_torch_compile_retrace() -> None:
    """The (b!) mutation of grad is functionalized: a compiled retrace writes grad."""
    k = kernels_or_skip("cpp", "cpu")
    gen = gen_for("swap_compile")
    x, g, gp, c = OP_CASES["update_swap_"].make_inputs(
        4097, torch.float32, "cpu", gen, accept=RETRACE
    )

    def step(x: torch.Tensor, g: torch.Tensor, gp: torch.Tensor, c: torch.Tensor) -> None:
        k.update_swap_(x, g, gp, c)

    x_e, g_e = x.clone(), g.clone()
    step(x_e, g_e, gp, c)
    torch.compile(step, backend="aot_eager", fullgraph=True)(x, g, gp, c)
    assert torch.equal(x, x_e) and torch.equal(g, g_e) and torch.equal(g, gp)


def test_update_swap_fake_impl() -> None:
    m = torch.empty(10, device="meta")
    c = torch.empty(4, dtype=torch.float64, device="meta")
    torch.ops.elra_fused.update_swap_(m, m.clone(), m.clone(), c)
    with pytest.raises(TypeError, match="grad_prev has dtype"):
        torch.ops.elra_fused.update_swap_(m, m.clone(), m.to(torch.bfloat16), c)


def test_fake_impl_accepts_bf16_state() -> None:
    """Meta tensors go through the fake impls: shapes unchanged, mixed dtypes accepted."""
    g = torch.empty(10, device="meta")
    gp = torch.empty(10, device="meta", dtype=STATE)
    out = torch.ops.elra_fused.dots(g, gp)
    assert out.shape == (2,) and out.dtype == torch.float64 and out.device.type == "meta"
    c = torch.empty(4, dtype=torch.float64, device="meta")
    torch.ops.elra_fused.update_(torch.empty(10, device="meta"), g, gp, c)
    with pytest.raises(TypeError, match=STATE_DTYPE_MSG):
        torch.ops.elra_fused.dots(g, torch.empty(10, device="meta", dtype=torch.float16))


def test_device_mismatch_is_reported() -> None:
    """Meta tensors reach the fake implementation, which runs the same validation."""
    g = torch.randn(10)
    with pytest.raises(ValueError, match="grad_prev is on meta"):
        ops.validate_dots(g, torch.empty(10, device="meta"))
    with pytest.raises(ValueError, match="coeffs is on meta"):
        ops.validate_dots_recover(g, g, g, torch.empty(2, dtype=torch.float64, device="meta"))
