"""Every single-tensor op of every fused backend against the float64 reference
(elra_fused/reference_ops.py), with the state dtype as a parameter (``None``: the dtype
of x; bfloat16: the compact ``grad_prev`` of dots / update_), plus the bit-level
contracts: what a pass may write, that a retrace never reads G, and the rounding of the
bf16 state and of the fp16 conversions.
"""

from __future__ import annotations

import pytest
import torch
from _backends import DEVICES, FUSED_BACKENDS, kernels_or_skip
from _ops_common import (
    ACCEPT,
    ACCEPT_IDS,
    BACK,
    BF16_EPS,
    DECAY,
    DTYPES,
    MIXED_BACKENDS,
    RETRACE,
    STATE,
    assert_close_elementwise,
    assert_dots_agree,
    assert_same_bf16,
    bits,
    coeffs,
    dots_recover_tol,
    dots_tol,
    dtype_name,
    gen_for,
    nan_like,
    numeric_cases,
    poison_allocator,
    prepare,
    update_coeffs,
    update_envelope,
)

from elra_fused.ops.cases import OP_CASES, clone_args, rand

NUMERIC_ARGS = ("backend", "device", "dtype", "state", "n")
DTYPE_IDS = {"ids": dtype_name}


# =========================================================================================
# dots / dots_recover
# =========================================================================================
@pytest.mark.parametrize(NUMERIC_ARGS, numeric_cases(compact_state=True))
def test_dots(backend: str, device: str, dtype: torch.dtype, state, n: int) -> None:
    k = kernels_or_skip(backend, device)
    case = OP_CASES["dots"]
    g, gp_full = case.make_inputs(n, dtype, device, gen_for("dots", backend, dtype, state, n))
    gp = gp_full if state is None else gp_full.to(state)  # compact: the state rounded once
    poison_allocator(device)
    out = k.dots(g, gp)
    assert out.dtype == torch.float64 and out.shape == (2,) and out.device == g.device
    # The kernel reads a bf16 state exactly: float64 summation error only (dots_tol).
    expected = case.reference(g, gp)
    assert_dots_agree(out, expected, dots_tol(g, gp))
    if state is not None:
        # Against the uncompacted state: each G_prev_i carries at most eps_bf16 / 2
        # relative rounding, so <G_prev, G> moves by at most eps_bf16 / 2 sum |G_prev_i G_i|.
        gd, fulld = g.double(), gp_full.double()
        full = torch.dot(fulld, gd)
        bound = BF16_EPS / 2 * (fulld * gd).abs().sum() + dots_tol(g, gp_full)[1]
        assert abs(out[1].item() - full.item()) <= bound.item()
        assert_dots_agree(out[:1], torch.dot(gd, gd).view(1), dots_tol(g, g)[:1])


@pytest.mark.parametrize(NUMERIC_ARGS, numeric_cases())
def test_dots_recover(backend: str, device: str, dtype: torch.dtype, state, n: int) -> None:
    # x = decay * x_prev - ALPHA_PREV * G_prev (rounded to dtype), coeffs [decay, 1/alpha].
    k, case, (x_prev, x, g, c) = prepare("dots_recover", backend, device, dtype, state, n)
    poison_allocator(device)
    out = k.dots_recover(x_prev, x, g, c)
    assert out.dtype == torch.float64 and out.shape == (2,)
    # G_prev_i is recovered in float64 by every backend, as by the reference.
    expected = case.reference(x_prev, x, g, c)
    assert_dots_agree(out, expected, dots_recover_tol(x_prev, x, g, c))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_recover_beats_naive_two_dot_formula(backend: str, device: str) -> None:
    """|x| ~ 1 and alpha * |G_prev| ~ 1e-4: x_prev and x nearly equal. The per-element
    recovery stays accurate; (decay <x_prev, G> - <x, G>) / alpha in fp32 cancels."""
    k = kernels_or_skip(backend, device)
    n = 65537
    alpha, rtol = 1e-4, 1e-4
    gen = torch.Generator().manual_seed(1234)
    x_prev = (1 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)).float()
    gprev = torch.randn(n, generator=gen, dtype=torch.float64)
    x = (DECAY * x_prev.double() - alpha * gprev).float()
    # G correlated with G_prev but with a mean: <x, G> ~ n while <G_prev, G> ~ 0.3 n.
    g = (1 + 0.3 * gprev + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)).float()
    x_prev, x, g = x_prev.to(device), x.to(device), g.to(device)
    c = coeffs([DECAY, 1.0 / alpha], device)
    exact = OP_CASES["dots_recover"].reference(x_prev, x, g, c)[1]
    fused = k.dots_recover(x_prev, x, g, c)[1]
    decay32 = torch.tensor(DECAY, dtype=torch.float32, device=device)
    inv_alpha32 = torch.tensor(1.0 / alpha, dtype=torch.float32, device=device)
    naive = (decay32 * torch.dot(x_prev, g) - torch.dot(x, g)) * inv_alpha32
    fused_err = ((fused - exact) / exact).abs().item()
    naive_err = ((naive.double() - exact) / exact).abs().item()
    assert fused_err < rtol
    assert naive_err > rtol, "the construction no longer shows the cancellation"
    assert naive_err > 100 * fused_err


# =========================================================================================
# update_ / update_recover_
# =========================================================================================
@pytest.mark.parametrize("accept", **ACCEPT_IDS)
@pytest.mark.parametrize(NUMERIC_ARGS, numeric_cases(compact_state=True))
def test_update(backend: str, device: str, dtype: torch.dtype, state, n: int, accept: bool) -> None:
    k, case, (x, g, gp, c) = prepare("update_", backend, device, dtype, state, n, accept)
    # Two oracles: float64 math rounded once to the storage dtypes (in place on copies),
    # and float64 math kept in float64 (it reads the bf16 state exactly).
    x_ref, _, gp_ref, _ = expected = clone_args((x, g, gp, c))
    case.reference(*expected)
    x_exact = x.double()
    case.reference(x_exact, g.double(), gp.double(), c)
    envelope = update_envelope(accept, x, g, gp)
    if accept:
        gp = nan_like(gp)  # write-only on accept: must be fully overwritten
    g_before = g.clone()
    k.update_(x, g, gp, c)
    assert x.dtype == dtype and gp.dtype == (state or dtype)
    assert_close_elementwise(x, x_ref, envelope, dtype)
    assert_close_elementwise(x, x_exact, envelope, dtype)
    # On accept the state is G rounded to its dtype (ties to even, like torch's .to()).
    assert torch.equal(bits(gp), bits(gp_ref)), "grad_prev must be grad.to(state) / unchanged"
    assert torch.equal(g, g_before), "grad is read-only"


@pytest.mark.parametrize("accept", **ACCEPT_IDS)
@pytest.mark.parametrize(NUMERIC_ARGS, numeric_cases())
def test_update_recover(
    backend: str, device: str, dtype: torch.dtype, state, n: int, accept: bool
) -> None:
    # x_prev = x + 1e-3 randn: the points of two consecutive steps.
    k, case, args = prepare("update_recover_", backend, device, dtype, state, n, accept)
    x, g, x_prev, c = args
    x_ref, _, xp_ref, _ = expected = clone_args((x, g, x_prev, c))
    case.reference(*expected)
    xd, xpd = x.double(), x_prev.double()
    envelope = update_envelope(accept, x, g, (xpd - xd).abs() + abs(DECAY - 1) * xpd.abs())
    if accept:
        x_prev = nan_like(x_prev)  # write-only on accept
    k.update_recover_(x, g, x_prev, c)
    assert_close_elementwise(x, x_ref, envelope, dtype)
    assert torch.equal(x_prev, xp_ref), "x_prev must be a bit copy of x / unchanged"


def _retrace_cases() -> list:
    """(op, state dtype, backend): the full-state updates on the fused backends, and the
    compact bf16 state on the fused backends and the reference."""
    full = [(op, None, b) for op in ("update_", "update_recover_") for b in FUSED_BACKENDS]
    compact = [("update_", STATE, b) for b in MIXED_BACKENDS]
    return [
        pytest.param(op, state, b, id=f"{op}-{b}" + ("-bf16state" if state else ""))
        for op, state, b in full + compact
    ]


@pytest.mark.parametrize(("op", "state", "backend"), _retrace_cases())
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_retrace_never_reads_grad(backend: str, device: str, op: str, state, bad: float) -> None:
    k = kernels_or_skip(backend, device)
    case = OP_CASES[op]
    n = 4097
    gen = gen_for("retrace", backend, op, state)
    x, _, other, c = case.make_inputs(
        n, torch.float32, device, gen, state_dtype=state, accept=RETRACE
    )
    g = torch.full((n,), bad, device=device)
    x_ref, _, other_ref, _ = expected = clone_args((x, g, other, c))
    case.reference(*expected)
    x_exact = x.double()
    case.reference(x_exact, g.double(), other.double(), c)
    # sum |terms| of x + back * d, d = G_prev or (decay x_prev - x) (an upper bound of it).
    xd, od = x.double(), other.double()
    direction = od if op == "update_" else (od - xd).abs() + abs(DECAY - 1) * od.abs()
    envelope = update_envelope(RETRACE, x, g, direction)
    other_before = other.clone()
    getattr(k, op)(x, g, other, c)
    assert bool(torch.isfinite(x).all()), "a non-finite gradient leaked into x on a retrace"
    assert torch.allclose(x, x_ref, rtol=1e-6, atol=1e-6)
    assert_close_elementwise(x, x_exact, envelope, torch.float32)
    assert torch.equal(bits(other), bits(other_before)) and torch.equal(other, other_ref)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_state_rounding_is_torchs(backend: str, device: str, x_dtype: torch.dtype) -> None:
    """Accept stores exactly grad.to(torch.bfloat16): ties to even, overflow to inf,
    subnormals, signed zeros; NaN stays NaN."""
    k = kernels_or_skip(backend, device)
    gen = gen_for("bf16_rounding", backend, x_dtype)
    n = 4097
    g = rounding_stress(n, x_dtype, device, gen)
    x = rand(n, x_dtype, device, gen)
    gp = torch.zeros(n, dtype=STATE, device=device)
    k.update_(x, g, gp, update_coeffs(ACCEPT, device))
    assert_same_bf16(gp, g.to(STATE))


def rounding_stress(n: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """Values that exercise fp32 -> bf16 rounding: specials first (NaN, +-inf, +-0,
    overflow to inf, subnormals, exact ties to even), then exact ties and a wide dynamic
    range, then plain randn."""
    f32max = torch.finfo(torch.float32).max
    specials = [
        float("nan"),
        -float("nan"),
        float("inf"),
        -float("inf"),
        0.0,
        -0.0,
        f32max,  # rounds up to +inf in bf16
        -f32max,
        1e-45,  # smallest fp32 subnormal
        -1e-45,
        2.0**-126,  # smallest fp32 normal
        1 + 2**-8,  # tie, even below: rounds down to 1
        1 + 3 * 2**-8,  # tie, odd below: rounds up
        1 + 2**-8 + 2**-23,  # just above a tie
        -(1 + 3 * 2**-8),
        3.3895313892515355e38,  # largest finite bf16
        3.3895313892515355e38 * (1 + 2**-9),  # its half-ulp tie: rounds to even (inf)
    ]
    t = torch.randn(n, generator=gen, dtype=torch.float64).float()
    m = n // 3
    # Exact ties: a random bf16 pattern in the top half, 0x8000 below it.
    hi = torch.randint(0, 1 << 16, (m,), generator=gen, dtype=torch.int32)
    ties = ((hi << 16) | 0x8000).view(torch.float32)
    ties = torch.where(torch.isfinite(ties), ties, 1.5)
    t[:m] = ties
    # Wide dynamic range, down to fp32 subnormals.
    mag = torch.exp2(torch.empty(m).uniform_(-140, 120, generator=gen))
    t[m : 2 * m] = mag * torch.randn(m, generator=gen)
    k = min(n, len(specials))
    t[:k] = torch.tensor(specials[:k], dtype=torch.float32)
    return t.to(dtype).to(device)


# =========================================================================================
# update_swap_ (swap mode: the caller swaps the roles of grad and grad_prev)
# =========================================================================================
@pytest.mark.parametrize("accept", **ACCEPT_IDS)
@pytest.mark.parametrize(NUMERIC_ARGS, numeric_cases(reference=True))
def test_update_swap(
    backend: str, device: str, dtype: torch.dtype, state, n: int, accept: bool
) -> None:
    k, case, (x, g, gp, c) = prepare("update_swap_", backend, device, dtype, state, n, accept)
    # The float64 oracle on float64 copies, rounded to dtype once at the end.
    x_exp, g_exp, gp_exp = x.double(), g.double(), gp.double()
    case.reference(x_exp, g_exp, gp_exp, c)
    g_before, gp_before = g.clone(), gp.clone()
    envelope = update_envelope(accept, x, g, gp)
    if not accept:
        g = nan_like(g)  # write-only on a retrace: fully overwritten, never read into x
    k.update_swap_(x, g, gp, c)
    assert_close_elementwise(x, x_exp, envelope, dtype)
    assert torch.equal(gp, gp_before), "grad_prev is read-only"
    if accept:
        assert torch.equal(g, g_before), "accept must not write grad"
    else:
        assert torch.equal(g.view(-1), gp_before), "retrace: grad must be a bit copy of grad_prev"


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
def test_update_swap_accept_writes_only_x(backend: str, device: str, dtype: torch.dtype) -> None:
    """Bit-level: accept leaves grad and grad_prev untouched, NaN / inf patterns included."""
    k = kernels_or_skip(backend, device)
    gen = gen_for("swap_bits", backend, dtype)
    x, g, gp, c = OP_CASES["update_swap_"].make_inputs(4097, dtype, device, gen, accept=ACCEPT)
    g[:3] = torch.tensor([float("inf"), -0.0, 1e-30]).to(dtype)
    gp[:3] = torch.tensor([float("nan"), -float("inf"), -0.0]).to(dtype)
    g_bits, gp_bits = g.clone(), gp.clone()
    k.update_swap_(x, g, gp, c)
    assert torch.equal(bits(g), bits(g_bits))
    assert torch.equal(bits(gp), bits(gp_bits))


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
def test_update_swap_retrace_never_reads_grad(
    backend: str, device: str, bad: float, dtype: torch.dtype
) -> None:
    k = kernels_or_skip(backend, device)
    n = 4097
    gen = gen_for("swap_retrace", backend, dtype)
    x, _, gp, c = OP_CASES["update_swap_"].make_inputs(n, dtype, device, gen, accept=RETRACE)
    # A NaN payload that is not the canonical one: the copy must be bitwise, not a re-store.
    gp[0] = float("nan")
    x[0] = 1.0
    g = torch.full((n,), bad, dtype=dtype, device=device)
    gp_before = gp.clone()
    x_exp = x.double() + BACK * gp.double()
    k.update_swap_(x, g, gp, c)
    assert bool(torch.isfinite(x[1:]).all()), "a non-finite gradient leaked into x on a retrace"
    assert_close_elementwise(x[1:], x_exp[1:], x_exp[1:].abs(), dtype)
    # The reference copies through float64 (torch.where), which keeps NaN but not its
    # payload; the fused kernels copy the stored bits.
    first = 1 if backend == "reference" else 0
    assert bool(torch.isnan(g[0]))
    assert torch.equal(bits(g[first:]), bits(gp_before[first:])), "grad <- grad_prev"
    assert torch.equal(bits(gp), bits(gp_before))


# =========================================================================================
# float16 conversions of the C++ CPU kernels (branch-free, vectorized): bit-exact
# =========================================================================================
@pytest.mark.parametrize("device", DEVICES)
def test_cpp_float16_conversions_bit_exact(device: str) -> None:
    """Every fp16 bit pattern survives load -> fp32 -> store (NaN stays NaN), and fp32
    results round to fp16 exactly as torch's .half() (ties to even, overflow to inf,
    subnormals)."""
    k = kernels_or_skip("cpp", device)
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    halves = every.view(torch.float16).to(device)
    x = halves.clone()
    zeros = torch.zeros_like(x)
    k.update_(x, zeros, zeros.clone(), coeffs([ACCEPT, 1.0, 0.0, 0.0], device))  # 1*x - 0*0
    nan = torch.isnan(halves)
    assert torch.equal(torch.isnan(x), nan)
    assert torch.equal(bits(x)[~nan], bits(halves)[~nan])
    # x + s * g in fp32 for random fp16 patterns (all magnitudes), rounded to fp16.
    gen = gen_for("fp16_store")
    n = 1 << 16
    a, b = (
        torch.randint(-(1 << 15), 1 << 15, (n,), generator=gen, dtype=torch.int32)
        .to(torch.int16)
        .view(torch.float16)
        .to(device)
        for _ in range(2)
    )
    for s in (1.0, 0.5, 3.0, 2.0**-10, 1.0000001):
        out = a.clone()
        k.update_(out, b, torch.empty_like(b), coeffs([ACCEPT, 1.0, -s, 0.0], device))
        s32 = torch.tensor(s, dtype=torch.float32, device=device)
        expected = (a.float() + s32 * b.float()).half()
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(out), nan)
        assert torch.equal(bits(out)[~nan], bits(expected)[~nan]), s


@pytest.mark.parametrize("decay", [1.0, DECAY], ids=["no-decay", "decay"])
@pytest.mark.parametrize("dtype", DTYPES, **DTYPE_IDS)
@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_recover_full_return_is_exact(
    backend: str, device: str, dtype: torch.dtype, decay: float
) -> None:
    """An accept along a gradient with one huge entry, then a full retrace (back = 1, the
    restart): x returns to decay * x_prev -- x_prev's own bits without decay -- although
    x + (x_prev - x) would round at the huge entry (issue 12, item 3)."""
    k = kernels_or_skip(backend, device)
    n = 4099
    gen = torch.Generator().manual_seed(77)
    x_prev = (0.05 * torch.randn(n, generator=gen)).to(device, dtype)
    g = torch.randn(n, generator=gen).mul_(1e-3)
    g[17] = torch.finfo(dtype).max / 4  # the bad batch's entry
    g = g.to(device, dtype)
    x = x_prev.clone()
    k.update_recover_(x, g, torch.empty_like(x), coeffs([ACCEPT, decay, 1e-3, 0.0], device))
    saved = x_prev.clone()
    x_prev = x_prev.clone()
    k.update_recover_(x, g, x_prev, coeffs([RETRACE, decay, 1e-3, 1.0], device))
    assert torch.equal(x_prev, saved), "a retrace leaves x_prev as it is"
    expected = (decay * saved.double()).to(dtype)
    if decay == 1.0:
        assert torch.equal(bits(x), bits(saved))
    else:  # decay * x_prev, rounded once in the kernel's fp32 math
        assert_close_elementwise(x, expected, saved.double().abs(), dtype)
