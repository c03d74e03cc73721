"""The optimizer passes views into flat buffers: odd storage offsets (not 16-byte
aligned, the CUDA scalar path) must give the same results and must not touch the
neighbouring elements."""

from __future__ import annotations

import pytest
import torch
from _backends import DEVICES, FUSED_BACKENDS, kernels_or_skip, needs_cuda
from _ops_common import (
    ACCEPT,
    ACCEPT_IDS,
    BACK,
    DECAY,
    STATE,
    STEP,
    UPDATE_EPS,
    assert_close_elementwise,
    assert_dots_agree,
    assert_untouched,
    bits,
    dots_tol,
    gen_for,
    update_coeffs,
)

from elra_fused import reference_ops as ref
from elra_fused.ops.cases import rand


def three_views(flat: torch.Tensor, n: int, offset: int) -> tuple[list[torch.Tensor], list[slice]]:
    """x, grad, grad_prev: ``n`` elements each, ``offset`` elements into consecutive
    thirds of ``flat`` (and the slices they occupy)."""
    spans = [slice(i * (n + offset) + offset, (i + 1) * (n + offset)) for i in range(3)]
    return [flat[s] for s in spans], spans


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_views_into_one_flat_buffer(backend: str, device: str) -> None:
    k = kernels_or_skip(backend, device)
    gen = gen_for("views", backend)
    n, offset = 4097, 3
    flat = rand(3 * (n + offset) + 1, torch.float32, device, gen)
    before = flat.clone()
    (x, g, gp), spans = three_views(flat, n, offset)
    assert_dots_agree(k.dots(g, gp), ref.dots(g, gp), dots_tol(g, gp))
    c = update_coeffs(ACCEPT, device)
    x_ref, gp_ref = x.clone(), gp.clone()
    ref.update_(x_ref, g, gp_ref, c)
    k.update_(x, g, gp, c)
    assert torch.allclose(x, x_ref, rtol=4 * UPDATE_EPS[torch.float32], atol=1e-7)
    assert torch.equal(gp, gp_ref)
    assert_untouched(flat, before, [spans[0], spans[2]])  # x and grad_prev were written


@pytest.mark.parametrize("accept", **ACCEPT_IDS)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_update_swap_views_into_one_flat_buffer(backend: str, device: str, accept: bool) -> None:
    """Swap mode writes only the views it owns: x always, grad on a retrace only,
    grad_prev never."""
    k = kernels_or_skip(backend, device)
    gen = gen_for("swap_views", backend, accept)
    n, offset = 4097, 3
    flat = rand(3 * (n + offset) + 1, torch.float32, device, gen)
    before = flat.clone()
    (x, g, gp), spans = three_views(flat, n, offset)
    c = update_coeffs(accept, device)
    x_exp, g_exp, gp_exp = x.double(), g.double(), gp.double()
    ref.update_swap_(x_exp, g_exp, gp_exp, c)
    gp_before = gp.clone()
    k.update_swap_(x, g, gp, c)
    envelope = x_exp.abs() + STEP * g_exp.abs() + BACK * gp_exp.abs()
    assert_close_elementwise(x, x_exp, envelope, torch.float32)
    if not accept:
        assert torch.equal(g, gp_before)
    assert_untouched(flat, before, spans[:1] if accept else spans[:2])


@pytest.mark.parametrize(
    ("x_off", "gp_off"), [(0, 0), (0, 4), (4, 1), (3, 3)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_state_views_any_alignment(backend: str, device: str, x_off: int, gp_off: int) -> None:
    """Views into flat buffers at element offsets: fp32 at 16-byte / 4-byte alignment,
    the bf16 state at 8-byte (a whole 4-element bf16 pack) or 2-byte alignment. Each
    tensor's alignment is judged on its own (CUDA vector path vs scalar path)."""
    k = kernels_or_skip(backend, device)
    gen = gen_for("bf16_views", backend, x_off, gp_off)
    n = 4097
    flat = rand(2 * (n + x_off) + 1, torch.float32, device, gen)
    flat_gp = rand(n + gp_off + 1, STATE, device, gen)
    before, before_gp = flat.clone(), flat_gp.clone()
    x = flat[x_off : x_off + n]
    g = flat[n + 2 * x_off : 2 * (n + x_off)]
    gp = flat_gp[gp_off : gp_off + n]
    assert_dots_agree(k.dots(g, gp), ref.dots(g, gp), dots_tol(g, gp))
    x_exp = DECAY * x.double() - STEP * g.double()
    envelope = DECAY * x.double().abs() + STEP * g.double().abs()
    k.update_(x, g, gp, update_coeffs(ACCEPT, device))
    assert_close_elementwise(x, x_exp, envelope, torch.float32)
    assert torch.equal(bits(gp), bits(g.to(STATE)))
    assert_untouched(flat, before, [slice(x_off, x_off + n)])
    assert_untouched(flat_gp, before_gp, [slice(gp_off, gp_off + n)])


@needs_cuda
def test_cuda_unaligned_views_use_scalar_path() -> None:
    """Offset views are not 16-byte aligned: the kernels must fall back correctly."""
    k = kernels_or_skip("cpp", "cuda")
    gen = gen_for("unaligned")
    n = 100_003
    base = [rand(n + 1, torch.float32, "cuda", gen) for _ in range(3)]
    g, gp, x = (b[1:] for b in base)
    assert_dots_agree(k.dots(g, gp), ref.dots(g, gp), dots_tol(g, gp))
    c = update_coeffs(ACCEPT, "cuda")
    x_ref, gp_ref = x.clone(), gp.clone()
    ref.update_(x_ref, g, gp_ref, c)
    k.update_(x, g, gp, c)
    torch.testing.assert_close(x, x_ref)
    assert torch.equal(gp, gp_ref)
