"""Tests for elra_fused/ops.py: every op of every fused backend against the float64
reference (elra_fused/reference_ops.py), plus validation, determinism, opcheck and
backend selection.

Triton runs in its interpreter on CPU (TRITON_INTERPRET=1 is set by conftest.py before
triton is imported), so its sizes stay modest. In CI (CI=true) a missing C++ extension
fails instead of skipping: CI must prove the extension built.
"""

from __future__ import annotations

import os
import shutil
import types
import zlib
from collections.abc import Callable

import pytest
import torch

from elra_fused import ops
from elra_fused import reference_ops as ref

IN_CI = os.environ.get("CI", "").lower() == "true"
HAS_CUDA = torch.cuda.is_available()

FUSED_BACKENDS = ("cpp", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Odd sizes hit the vector tails; 278011 spans several CPU chunks and reduction blocks.
# The numpy interpreter is slow, so triton-on-CPU stops at ~65k.
SIZES = {
    ("cpp", "cpu"): (1, 7, 4097, 278011, 3_000_017),
    ("triton", "cpu"): (1, 7, 4097, 65537),
    ("cpp", "cuda"): (1, 7, 4097, 278011, 3_000_017),
    ("triton", "cuda"): (1, 7, 4097, 278011, 3_000_017),
}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),
        ],
    ),
]

# --- tolerances -------------------------------------------------------------------------
# Dot products: inputs are exact in fp32, each product is rounded once and the fused
# kernels add at most ~64 fp32 terms per accumulator before folding into fp64, so the
# worst-case error is about 64 * eps32 of sum|terms|; 1e-5 (~84 eps32) bounds it.
DOT_RTOL = 1e-5
# Updates: fp32 math then one rounding to the storage dtype, against float64 math then
# one rounding. The difference is at most ~1 ulp of the result plus fp32 rounding of the
# terms; eps(dtype) * (|result| + sum|terms|) bounds both (ulp(v) <= eps * |v|).
UPDATE_EPS = {
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
    torch.float64: torch.finfo(torch.float64).eps,  # the reference's own dtype
}

DECAY = 0.9997  # the paper's multiplicative weight decay
STEP = 1e-3  # alpha_t
BACK = 5e-4  # alpha_{t-1} - alpha_t on a retrace
ACCEPT, RETRACE = 1.0, 0.0


def kernels(backend: str, device: str) -> ops.KernelSet:
    """The backend's KernelSet, or skip (fail in CI for the C++ CPU kernels)."""
    try:
        return ops.get_kernels(backend, torch.device(device))
    except RuntimeError as exc:
        if IN_CI and backend == "cpp" and device == "cpu":
            pytest.fail(f"CI must build the C++ extension: {exc}")
        pytest.skip(str(exc))


def sizes_for(backend: str, device: str) -> tuple[int, ...]:
    return SIZES[(backend, device)]


def _cases() -> list[tuple[str, str, torch.dtype, int]]:
    out = []
    for dev in DEVICES:
        dev_name = dev if isinstance(dev, str) else dev.values[0]
        for backend in FUSED_BACKENDS:
            for dtype in DTYPES:
                for n in sizes_for(backend, dev_name):
                    out.append(
                        pytest.param(
                            backend,
                            dev_name,
                            dtype,
                            n,
                            marks=() if isinstance(dev, str) else dev.marks,
                            id=f"{backend}-{dev_name}-{str(dtype).removeprefix('torch.')}-{n}",
                        )
                    )
    return out


CASES = _cases()


def rand(
    n: int,
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
    scale: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """Fresh random values, exactly representable in ``dtype``."""
    t = torch.randn(n, generator=gen, dtype=torch.float64) * scale + shift
    return t.to(dtype).to(device)


def gen_for(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh data per case, reproducible
    across runs (crc32, unlike hash(), does not depend on PYTHONHASHSEED)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


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


# =========================================================================================
# dots / dots_recover
# =========================================================================================
@pytest.mark.parametrize(("backend", "device", "dtype", "n"), CASES)
def test_dots(backend: str, device: str, dtype: torch.dtype, n: int) -> None:
    k = kernels(backend, device)
    gen = gen_for("dots", backend, dtype, n)
    g, gp = rand(n, dtype, device, gen), rand(n, dtype, device, gen)
    poison_allocator(device)
    out = k.dots(g, gp)
    assert out.dtype == torch.float64 and out.shape == (2,) and out.device == g.device
    expected = ref.dots(g, gp)
    gd, gpd = g.double(), gp.double()
    tol = DOT_RTOL * torch.stack([(gd * gd).sum(), (gd * gpd).abs().sum()])
    assert bool(((out - expected).abs() <= tol).all()), (out, expected, tol)


@pytest.mark.parametrize(("backend", "device", "dtype", "n"), CASES)
def test_dots_recover(backend: str, device: str, dtype: torch.dtype, n: int) -> None:
    k = kernels(backend, device)
    gen = gen_for("dots_recover", backend, dtype, n)
    alpha_prev = 1e-2
    x_prev = rand(n, dtype, device, gen)
    # x_t = decay * x_{t-1} - alpha_{t-1} * G_{t-1} (rounded to dtype)
    gprev_true = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    x = (DECAY * x_prev.double() - alpha_prev * gprev_true).to(dtype)
    g = rand(n, dtype, device, gen)
    c = coeffs([DECAY, 1.0 / alpha_prev], device)
    poison_allocator(device)
    out = k.dots_recover(x_prev, x, g, c)
    assert out.dtype == torch.float64 and out.shape == (2,)
    expected = ref.dots_recover(x_prev, x, g, c)
    # Envelope of the fp32 recovery of each G_prev_i (see recover_diff in csrc): rounding of
    # x_prev - x, of (decay - 1) * x_prev and of the product with 1 / alpha.
    xpd, xd, gd = x_prev.double(), x.double(), g.double()
    gp_env = ((xpd - xd).abs() + abs(DECAY - 1.0) * xpd.abs()) / alpha_prev
    gp_ref = (DECAY * xpd - xd) / alpha_prev
    tol = DOT_RTOL * torch.stack([(gd * gd).sum(), (gd.abs() * (gp_ref.abs() + gp_env)).sum()])
    assert bool(((out - expected).abs() <= tol).all()), (out, expected, tol)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_dots_empty(backend: str, device: str) -> None:
    k = kernels(backend, device)
    e = torch.empty(0, device=device)
    assert k.dots(e, e.clone()).tolist() == [0.0, 0.0]
    assert k.dots_recover(e, e.clone(), e.clone(), coeffs([1.0, 1.0], device)).tolist() == [0, 0]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_recover_beats_naive_two_dot_formula(backend: str, device: str) -> None:
    """|x| ~ 1 and alpha * |G_prev| ~ 1e-4: x_prev and x nearly equal. The per-element
    recovery stays accurate; (decay <x_prev, G> - <x, G>) / alpha in fp32 cancels."""
    k = kernels(backend, device)
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
    exact = ref.dots_recover(x_prev, x, g, c)[1]
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
@pytest.mark.parametrize("accept", [ACCEPT, RETRACE], ids=["accept", "retrace"])
@pytest.mark.parametrize(("backend", "device", "dtype", "n"), CASES)
def test_update(backend: str, device: str, dtype: torch.dtype, n: int, accept: float) -> None:
    k = kernels(backend, device)
    gen = gen_for("update", backend, dtype, n, accept)
    x, g, gp = (rand(n, dtype, device, gen) for _ in range(3))
    c = coeffs([accept, DECAY, STEP, BACK], device)
    x_ref, gp_ref = x.clone(), gp.clone()
    ref.update_(x_ref, g, gp_ref, c)
    if accept:
        gp = nan_like(gp)  # write-only on accept: must be fully overwritten
        envelope = DECAY * x.double().abs() + STEP * g.double().abs()
    else:
        envelope = x.double().abs() + BACK * gp.double().abs()
    g_before = g.clone()
    k.update_(x, g, gp, c)
    assert_close_elementwise(x, x_ref, envelope, dtype)
    assert torch.equal(gp, gp_ref), "grad_prev must be a bit copy of grad / unchanged"
    assert torch.equal(g, g_before), "grad is read-only"


@pytest.mark.parametrize("accept", [ACCEPT, RETRACE], ids=["accept", "retrace"])
@pytest.mark.parametrize(("backend", "device", "dtype", "n"), CASES)
def test_update_recover(
    backend: str, device: str, dtype: torch.dtype, n: int, accept: float
) -> None:
    k = kernels(backend, device)
    gen = gen_for("update_recover", backend, dtype, n, accept)
    x, g = rand(n, dtype, device, gen), rand(n, dtype, device, gen)
    x_prev = (x.double() + 1e-3 * rand(n, torch.float64, device, gen)).to(dtype)
    c = coeffs([accept, DECAY, STEP, BACK], device)
    x_ref, xp_ref = x.clone(), x_prev.clone()
    ref.update_recover_(x_ref, g, xp_ref, c)
    if accept:
        x_prev = nan_like(x_prev)  # write-only on accept
        envelope = DECAY * x.double().abs() + STEP * g.double().abs()
    else:
        xd, xpd = x.double(), x_prev.double()
        envelope = xd.abs() + BACK * ((xpd - xd).abs() + abs(DECAY - 1) * xpd.abs())
    k.update_recover_(x, g, x_prev, c)
    assert_close_elementwise(x, x_ref, envelope, dtype)
    assert torch.equal(x_prev, xp_ref), "x_prev must be a bit copy of x / unchanged"


@pytest.mark.parametrize("op", ["update_", "update_recover_"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_retrace_never_reads_grad(backend: str, device: str, op: str, bad: float) -> None:
    k = kernels(backend, device)
    n = 4097
    gen = gen_for("retrace", backend, op)
    x, other = rand(n, torch.float32, device, gen), rand(n, torch.float32, device, gen)
    g = torch.full((n,), bad, device=device)
    c = coeffs([RETRACE, DECAY, STEP, BACK], device)
    x_ref, other_ref = x.clone(), other.clone()
    getattr(ref, op)(x_ref, g, other_ref, c)
    getattr(k, op)(x, g, other, c)
    assert bool(torch.isfinite(x).all()), "a non-finite gradient leaked into x on a retrace"
    assert torch.allclose(x, x_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(other, other_ref)


# =========================================================================================
# update_swap_ (swap mode: the caller swaps the roles of grad and grad_prev)
# =========================================================================================
SWAP_BACKENDS = (*FUSED_BACKENDS, "reference")


def _swap_cases() -> list:
    out = []
    for dev in DEVICES:
        dev_name = dev if isinstance(dev, str) else dev.values[0]
        marks = () if isinstance(dev, str) else dev.marks
        for backend in SWAP_BACKENDS:
            if backend == "reference":
                dtypes, sizes = (*DTYPES, torch.float64), (1, 7, 4097, 278011)
            else:
                dtypes, sizes = DTYPES, sizes_for(backend, dev_name)
            for dtype in dtypes:
                for n in sizes:
                    name = str(dtype).removeprefix("torch.")
                    out.append(
                        pytest.param(
                            backend,
                            dev_name,
                            dtype,
                            n,
                            marks=marks,
                            id=f"{backend}-{dev_name}-{name}-{n}",
                        )
                    )
    return out


SWAP_CASES = _swap_cases()


@pytest.mark.parametrize("accept", [ACCEPT, RETRACE], ids=["accept", "retrace"])
@pytest.mark.parametrize(("backend", "device", "dtype", "n"), SWAP_CASES)
def test_update_swap(backend: str, device: str, dtype: torch.dtype, n: int, accept: float) -> None:
    k = kernels(backend, device)
    gen = gen_for("update_swap", backend, dtype, n, accept)
    x, g, gp = (rand(n, dtype, device, gen) for _ in range(3))
    c = coeffs([accept, DECAY, STEP, BACK], device)
    # The float64 oracle on float64 copies, rounded to dtype once at the end.
    x_exp, g_exp, gp_exp = x.double(), g.double(), gp.double()
    ref.update_swap_(x_exp, g_exp, gp_exp, c)
    g_before, gp_before = g.clone(), gp.clone()
    if accept:
        envelope = DECAY * x.double().abs() + STEP * g.double().abs()
    else:
        envelope = x.double().abs() + BACK * gp.double().abs()
        g = nan_like(g)  # write-only on a retrace: fully overwritten, never read into x
    k.update_swap_(x, g, gp, c)
    assert_close_elementwise(x, x_exp, envelope, dtype)
    assert torch.equal(gp, gp_before), "grad_prev is read-only"
    if accept:
        assert torch.equal(g, g_before), "accept must not write grad"
    else:
        assert torch.equal(g.view(-1), gp_before), "retrace: grad must be a bit copy of grad_prev"


@pytest.mark.parametrize("backend", SWAP_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_update_swap_accept_writes_only_x(backend: str, device: str, dtype: torch.dtype) -> None:
    """Bit-level: accept leaves grad and grad_prev untouched, NaN / inf patterns included."""
    k = kernels(backend, device)
    gen = gen_for("swap_bits", backend, dtype)
    n = 4097
    x, g, gp = (rand(n, dtype, device, gen) for _ in range(3))
    g[:3] = torch.tensor([float("inf"), -0.0, 1e-30]).to(dtype)
    gp[:3] = torch.tensor([float("nan"), -float("inf"), -0.0]).to(dtype)
    g_bits, gp_bits = g.clone(), gp.clone()
    k.update_swap_(x, g, gp, coeffs([ACCEPT, DECAY, STEP, BACK], device))
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(g.view(bits), g_bits.view(bits))
    assert torch.equal(gp.view(bits), gp_bits.view(bits))


@pytest.mark.parametrize("backend", SWAP_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_update_swap_retrace_never_reads_grad(
    backend: str, device: str, bad: float, dtype: torch.dtype
) -> None:
    k = kernels(backend, device)
    n = 4097
    gen = gen_for("swap_retrace", backend, dtype)
    x, gp = rand(n, dtype, device, gen), rand(n, dtype, device, gen)
    # A NaN payload that is not the canonical one: the copy must be bitwise, not a re-store.
    gp[0] = float("nan")
    x[0] = 1.0
    g = torch.full((n,), bad, dtype=dtype, device=device)
    gp_before = gp.clone()
    x_exp = x.double() + BACK * gp.double()
    k.update_swap_(x, g, gp, coeffs([RETRACE, DECAY, STEP, BACK], device))
    assert bool(torch.isfinite(x[1:]).all()), "a non-finite gradient leaked into x on a retrace"
    assert_close_elementwise(x[1:], x_exp[1:], x_exp[1:].abs(), dtype)
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    # The reference copies through float64 (torch.where), which keeps NaN but not its
    # payload; the fused kernels copy the stored bits.
    first = 1 if backend == "reference" else 0
    assert bool(torch.isnan(g[0]))
    assert torch.equal(g[first:].view(bits), gp_before[first:].view(bits)), "grad <- grad_prev"
    assert torch.equal(gp.view(bits), gp_before.view(bits))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_update_swap_bit_identical_runs(backend: str, device: str) -> None:
    k = kernels(backend, device)
    n = max(sizes_for(backend, device))
    gen = gen_for("swap_determinism", backend)
    x, g, gp = (rand(n, torch.float32, device, gen) for _ in range(3))
    for accept in (ACCEPT, RETRACE):
        c = coeffs([accept, DECAY, STEP, BACK], device)
        runs = []
        for _ in range(2):
            xr, gr = x.clone(), g.clone()
            k.update_swap_(xr, gr, gp, c)
            runs.append((xr, gr))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs >= 2 CPU threads")
def test_cpp_cpu_update_swap_independent_of_thread_count() -> None:
    k = kernels("cpp", "cpu")
    gen = gen_for("swap_threads")
    n = 3_000_017
    x, g, gp = (rand(n, torch.float32, "cpu", gen) for _ in range(3))
    c = coeffs([ACCEPT, DECAY, STEP, BACK], "cpu")
    threads = torch.get_num_threads()
    many, one = x.clone(), x.clone()
    try:
        k.update_swap_(many, g, gp, c)
        torch.set_num_threads(1)
        k.update_swap_(one, g, gp, c)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(many, one)


@pytest.mark.parametrize("accept", [ACCEPT, RETRACE], ids=["accept", "retrace"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_update_swap_views_into_one_flat_buffer(backend: str, device: str, accept: float) -> None:
    """Odd storage offsets (the CUDA scalar path) work and write nothing outside the views
    they own: x always, grad on a retrace only, grad_prev never."""
    k = kernels(backend, device)
    gen = gen_for("swap_views", backend, accept)
    n, offset = 4097, 3
    flat = rand(3 * (n + offset) + 1, torch.float32, device, gen)
    before = flat.clone()
    x, g, gp = (flat[i * (n + offset) + offset : (i + 1) * (n + offset)] for i in range(3))
    c = coeffs([accept, DECAY, STEP, BACK], device)
    x_exp, g_exp, gp_exp = x.double(), g.double(), gp.double()
    ref.update_swap_(x_exp, g_exp, gp_exp, c)
    gp_before = gp.clone()
    k.update_swap_(x, g, gp, c)
    envelope = x_exp.abs() + STEP * g_exp.abs() + BACK * gp_exp.abs()
    assert_close_elementwise(x, x_exp, envelope, torch.float32)
    if not accept:
        assert torch.equal(g, gp_before)
    untouched = torch.ones_like(flat, dtype=torch.bool)
    for i in (0,) if accept else (0, 1):
        untouched[i * (n + offset) + offset : (i + 1) * (n + offset)] = False
    assert torch.equal(flat[untouched], before[untouched]), "wrote outside the views"


def _bad_swap_cases() -> list[tuple[str, Callable[[], tuple], str]]:
    """update_swap_-specific dtype rules: grad and grad_prev trade roles, so no compact
    bf16 state; everything must share x's dtype. Every case raises TypeError."""
    n = 32

    def v(dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(n).to(dtype)

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    c = coeffs([ACCEPT, DECAY, STEP, BACK], "cpu")
    share = "all vector arguments must share one dtype"
    return [
        ("bf16_grad_prev", lambda: (v(f32), v(f32), v(bf16), c), "grad_prev has dtype .*" + share),
        ("fp16_x_bf16_grad_prev", lambda: (v(f16), v(f16), v(bf16), c), "grad_prev"),
        ("bf16_grad", lambda: (v(f32), v(bf16), v(f32), c), "grad has dtype .*" + share),
        ("fp32_grad_prev_fp16_x", lambda: (v(f16), v(f16), v(f32), c), "grad_prev"),
    ]


@pytest.mark.parametrize("backend", SWAP_BACKENDS)
@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _bad_swap_cases()])
@pytest.mark.parametrize("accept", [ACCEPT, RETRACE], ids=["accept", "retrace"])
def test_bad_update_swap_dtype_raises(backend: str, case: int, accept: float) -> None:
    k = kernels(backend, "cpu")
    _, make, match = _bad_swap_cases()[case]
    x, g, gp, _ = make()
    args = (x, g, gp, coeffs([accept, DECAY, STEP, BACK], "cpu"))
    before = [a.clone() for a in args]
    with pytest.raises(TypeError, match=match):
        k.update_swap_(*args)
    for a, b in zip(args, before, strict=True):
        assert torch.equal(a, b), "a rejected call must not modify its arguments"


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_update_swap_empty(backend: str) -> None:
    k = kernels(backend, "cpu")
    e = torch.empty(0)
    for accept in (ACCEPT, RETRACE):
        k.update_swap_(e, e.clone(), e.clone(), coeffs([accept, DECAY, STEP, BACK], "cpu"))


def test_update_swap_fake_impl() -> None:
    m = torch.empty(10, device="meta")
    c = torch.empty(4, dtype=torch.float64, device="meta")
    torch.ops.elra_fused.update_swap_(m, m.clone(), m.clone(), c)
    with pytest.raises(TypeError, match="grad_prev has dtype"):
        torch.ops.elra_fused.update_swap_(m, m.clone(), m.to(torch.bfloat16), c)


def test_update_swap_torch_compile_retrace() -> None:
    """The (b!) mutation of grad is functionalized: a compiled retrace writes grad."""
    k = kernels("cpp", "cpu")
    gen = gen_for("swap_compile")
    x, g, gp = (rand(4097, torch.float32, "cpu", gen) for _ in range(3))
    c = coeffs([RETRACE, DECAY, STEP, BACK], "cpu")

    def step(x: torch.Tensor, g: torch.Tensor, gp: torch.Tensor, c: torch.Tensor) -> None:
        k.update_swap_(x, g, gp, c)

    x_e, g_e = x.clone(), g.clone()
    step(x_e, g_e, gp, c)
    torch.compile(step, backend="aot_eager", fullgraph=True)(x, g, gp, c)
    assert torch.equal(x, x_e) and torch.equal(g, g_e) and torch.equal(g, gp)


def test_kernel_set_positional_construction_keeps_working() -> None:
    """update_swap_ was appended last with a default: five-field construction still works."""
    r = ops.get_kernels("reference", "cpu")
    old = ops.KernelSet(r.name, r.dots, r.dots_recover, r.update_, r.update_recover_)
    assert old.update_swap_ is None and old.dots_list is None
    assert r.update_swap_ is not None
    for backend in ops.available_backends("cpu"):
        assert all(f is not None for f in ops.get_kernels(backend, "cpu"))


# =========================================================================================
# Tensor lists (per-parameter layout)
# =========================================================================================
#: Parameter-like shapes: a matrix, a vector, a scalar and one spanning several CPU chunks.
LIST_SHAPES = ((33, 17), (7,), (), (278011,))


def _shaped(shapes, dtype: torch.dtype, device: str, gen: torch.Generator) -> list[torch.Tensor]:
    return [rand(max(1, int(torch.Size(s).numel())), dtype, device, gen).view(s) for s in shapes]


LIST_BACKENDS = [*FUSED_BACKENDS, "reference"]


@pytest.mark.parametrize("backend", LIST_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("accept", [ACCEPT, RETRACE])
def test_list_ops_are_the_single_ops_in_list_order(
    backend: str, device: str, accept: float
) -> None:
    """Bit-identical to the single-tensor op applied per element, sums added in order."""
    k = kernels(backend, device)
    gen = gen_for("lists", backend, device, accept)
    grads = _shaped(LIST_SHAPES, torch.float32, device, gen)
    prevs = _shaped(LIST_SHAPES, torch.float32, device, gen)
    compact = [p.to(torch.bfloat16) for p in prevs]
    xs = _shaped(LIST_SHAPES, torch.float32, device, gen)
    c = coeffs([accept, DECAY, STEP, BACK], device)

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


@pytest.mark.parametrize("backend", LIST_BACKENDS)
def test_list_ops_check_every_element_before_writing(backend: str) -> None:
    """A bad last element raises naming it, and no element was written."""
    k = kernels(backend, "cpu")
    gen = gen_for("bad lists", backend)
    c = coeffs([ACCEPT, DECAY, STEP, BACK], "cpu")
    for bad, error, match in (
        (lambda: torch.zeros(3, dtype=torch.float16), TypeError, "dtype"),
        (lambda: torch.zeros(4), ValueError, "elements"),
        (lambda: torch.zeros(3, 2).t(), ValueError, "contiguous"),
    ):
        xs = _shaped(((5,), (3,)), torch.float32, "cpu", gen)
        grads = _shaped(((5,), (3,)), torch.float32, "cpu", gen)
        prevs = _shaped(((5,), (3,)), torch.float32, "cpu", gen)
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


# =========================================================================================
# Determinism
# =========================================================================================
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_reductions_bit_identical(backend: str, device: str) -> None:
    k = kernels(backend, device)
    n = max(sizes_for(backend, device))
    gen = gen_for("determinism", backend)
    xp, x, g = (rand(n, torch.float32, device, gen) for _ in range(3))
    c = coeffs([DECAY, 100.0], device)
    assert torch.equal(k.dots(g, xp), k.dots(g, xp))
    assert torch.equal(k.dots_recover(xp, x, g, c), k.dots_recover(xp, x, g, c))


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs >= 2 CPU threads")
def test_cpp_cpu_reductions_independent_of_thread_count() -> None:
    k = kernels("cpp", "cpu")
    gen = gen_for("threads")
    n = 3_000_017
    xp, x, g = (rand(n, torch.float32, "cpu", gen) for _ in range(3))
    c = coeffs([DECAY, 100.0], "cpu")
    grads = _shaped(LIST_SHAPES, torch.float32, "cpu", gen)
    prevs = _shaped(LIST_SHAPES, torch.float32, "cpu", gen)

    def reductions() -> tuple[torch.Tensor, ...]:
        return k.dots(g, xp), k.dots_recover(xp, x, g, c), k.dots_list(grads, prevs)

    threads = torch.get_num_threads()
    try:
        many = reductions()
        torch.set_num_threads(1)
        one = reductions()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(many, one, strict=True))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_views_into_one_flat_buffer(backend: str, device: str) -> None:
    """The optimizer passes views into one flat buffer: odd storage offsets (not 16-byte
    aligned) must work and must not touch the neighbouring elements."""
    k = kernels(backend, device)
    gen = gen_for("views", backend)
    n, offset = 4097, 3
    flat = rand(3 * (n + offset) + 1, torch.float32, device, gen)
    before = flat.clone()
    x, g, gp = (flat[i * (n + offset) + offset : (i + 1) * (n + offset)] for i in range(3))
    expected = ref.dots(g, gp)
    assert torch.allclose(k.dots(g, gp), expected, rtol=DOT_RTOL, atol=0)
    c = coeffs([ACCEPT, DECAY, STEP, BACK], device)
    x_ref, gp_ref = x.clone(), gp.clone()
    ref.update_(x_ref, g, gp_ref, c)
    k.update_(x, g, gp, c)
    assert torch.allclose(x, x_ref, rtol=4 * UPDATE_EPS[torch.float32], atol=1e-7)
    assert torch.equal(gp, gp_ref)
    untouched = torch.ones_like(flat, dtype=torch.bool)
    for i in (0, 2):  # x and grad_prev were written
        untouched[i * (n + offset) + offset : (i + 1) * (n + offset)] = False
    assert torch.equal(flat[untouched], before[untouched]), "wrote outside the views"


# =========================================================================================
# torch.library integration
# =========================================================================================
def _opcheck_args(device: str) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    gen = gen_for("opcheck")
    n = 1031

    def r() -> torch.Tensor:
        return rand(n, torch.float32, device, gen)

    def shaped() -> list[torch.Tensor]:  # one list element per "parameter", any shape
        return [r().view(1031), rand(3 * 5, torch.float32, device, gen).view(3, 5)]

    upd = [coeffs([a, DECAY, STEP, BACK], device) for a in (ACCEPT, RETRACE)]
    return {
        "dots_list": [(shaped(), shaped())],
        "update_list_": [(shaped(), shaped(), shaped(), c) for c in upd],
        "update_swap_list_": [(shaped(), shaped(), shaped(), c) for c in upd],
        "dots": [(r(), r())],
        "dots_recover": [(r(), r(), r(), coeffs([DECAY, 10.0], device))],
        "update_": [(r(), r(), r(), c) for c in upd],
        "update_recover_": [(r(), r(), r(), c) for c in upd],
        "update_swap_": [(r(), r(), r(), c) for c in upd],
    }


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op_name", ops.OP_NAMES)
def test_opcheck(backend: str, op_name: str) -> None:
    kernels(backend, "cpu")  # skip (or fail in CI) when unavailable
    prefix = ops.TRITON_PREFIX if backend == "triton" else ""
    op = getattr(torch.ops.elra_fused, prefix + op_name).default
    for args in _opcheck_args("cpu")[op_name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_cpp(compile_backend: str) -> None:
    """The ops trace through torch.compile (fake impls + functionalized mutation)."""
    k = kernels("cpp", "cpu")
    gen = gen_for("compile")
    n = 4097
    x, g, gp = (rand(n, torch.float32, "cpu", gen) for _ in range(3))
    c = coeffs([ACCEPT, DECAY, STEP, BACK], "cpu")

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


# =========================================================================================
# Validation: clear errors, nothing mutated
# =========================================================================================
def _bad_update_cases(device: str) -> list[tuple[str, Callable[[], tuple], type, str]]:
    n = 64

    def v(dtype: torch.dtype = torch.float32, size: int = n) -> torch.Tensor:
        return torch.randn(size, device=device).to(dtype)

    c = coeffs([ACCEPT, DECAY, STEP, BACK], device)
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
    k = kernels(backend, "cpu")
    _, make, exc_type, match = _bad_update_cases("cpu")[case]
    args = make()
    if op == "update_recover_":
        match = match.replace("grad_prev", "x_prev")
    before = [a.clone() for a in args]
    with pytest.raises(exc_type, match=match):
        getattr(k, op)(*args)
    for a, b in zip(args, before, strict=True):
        assert torch.equal(a, b), "a rejected call must not modify its arguments"


@pytest.mark.parametrize("backend", (*FUSED_BACKENDS, "reference"))
def test_bad_dots_inputs(backend: str) -> None:
    k = kernels(backend, "cpu")
    g = torch.randn(10)
    with pytest.raises(TypeError, match="grad_prev has dtype"):
        k.dots(g, g.half())
    with pytest.raises(ValueError, match="grad_prev must be 1-D with 10 elements"):
        k.dots(g, torch.randn(11))
    with pytest.raises(ValueError, match="coeffs must have shape"):
        k.dots_recover(g, g.clone(), g.clone(), coeffs([1.0], "cpu"))
    with pytest.raises(TypeError, match="coeffs must be a dense float64"):
        k.dots_recover(g, g.clone(), g.clone(), torch.ones(2))


def test_device_mismatch_is_reported() -> None:
    """Meta tensors reach the fake implementation, which runs the same validation."""
    g = torch.randn(10)
    with pytest.raises(ValueError, match="grad_prev is on meta"):
        ops.validate_dots(g, torch.empty(10, device="meta"))
    with pytest.raises(ValueError, match="coeffs is on meta"):
        ops.validate_dots_recover(g, g, g, torch.empty(2, dtype=torch.float64, device="meta"))


# =========================================================================================
# Compact state: grad_prev stored as bfloat16 next to float32 (or float16) x / grad
# =========================================================================================
STATE = torch.bfloat16
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7: rounding to bf16 errs <= eps / 2
MIXED_BACKENDS = ("cpp", "triton", "reference")
# The triton interpreter stays at the modest sizes.
MIXED_SIZES = {
    ("cpp", "cpu"): (1, 7, 4097, 278011),
    ("triton", "cpu"): (1, 7, 4097),
    ("reference", "cpu"): (1, 7, 4097, 278011),
    ("cpp", "cuda"): (1, 7, 4097, 278011),
    ("triton", "cuda"): (1, 7, 4097, 278011),
    ("reference", "cuda"): (1, 7, 4097, 278011),
}
# float32 parameters are the use case; float16 + bf16 state is the other mixed combination.
MIXED_X_SIZES = {torch.float32: None, torch.float16: (7, 4097)}


def _mixed_cases() -> list:
    out = []
    for dev in DEVICES:
        dev_name = dev if isinstance(dev, str) else dev.values[0]
        marks = () if isinstance(dev, str) else dev.marks
        for backend in MIXED_BACKENDS:
            for x_dtype, only in MIXED_X_SIZES.items():
                for n in MIXED_SIZES[(backend, dev_name)]:
                    if only is not None and n not in only:
                        continue
                    name = str(x_dtype).removeprefix("torch.")
                    out.append(
                        pytest.param(
                            backend,
                            dev_name,
                            x_dtype,
                            n,
                            marks=marks,
                            id=f"{backend}-{dev_name}-{name}+bf16state-{n}",
                        )
                    )
    return out


MIXED_CASES = _mixed_cases()


def bf16_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def assert_same_bf16(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical bf16, except that a NaN only has to stay a NaN: torch's own NaN bits
    depend on the CPU's vector path (0xFFFF with AVX2/AVX512, 0x7FC0 scalar / CUDA-style
    canonical 0x7FFF on GPUs), so payloads are not part of the contract."""
    assert out.dtype == expected.dtype == torch.bfloat16
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan), "NaN positions differ"
    same = bf16_bits(out) == bf16_bits(expected)
    bad = ~(same | nan)
    assert not bool(bad.any()), (
        f"{int(bad.sum())} bf16 states differ from torch's .to(torch.bfloat16), first at "
        f"{int(bad.nonzero()[0])}"
    )


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


@pytest.mark.parametrize(("backend", "device", "x_dtype", "n"), MIXED_CASES)
def test_dots_bf16_state(backend: str, device: str, x_dtype: torch.dtype, n: int) -> None:
    k = kernels(backend, device)
    gen = gen_for("dots_bf16_state", backend, x_dtype, n)
    g = rand(n, x_dtype, device, gen)
    gp_full = rand(n, x_dtype, device, gen)  # the state before compaction
    gp = gp_full.to(STATE)
    poison_allocator(device)
    out = k.dots(g, gp)
    assert out.dtype == torch.float64 and out.shape == (2,) and out.device == g.device
    gd, gpd, fulld = g.double(), gp.double(), gp_full.double()
    # The kernel reads the bf16 state exactly (bf16 -> fp32 is exact): fp32 math error only.
    expected = ref.dots(g, gp)
    tol = DOT_RTOL * torch.stack([(gd * gd).sum(), (gd * gpd).abs().sum()])
    assert bool(((out - expected).abs() <= tol).all()), (out, expected, tol)
    # Against the uncompacted state: each G_prev_i carries at most eps_bf16 / 2 relative
    # rounding, so <G_prev, G> moves by at most eps_bf16 / 2 * sum |G_prev_i G_i|.
    full = torch.dot(fulld, gd)
    bound = (BF16_EPS / 2 + DOT_RTOL) * (fulld * gd).abs().sum()
    assert abs(out[1].item() - full.item()) <= bound.item()
    assert out[0].item() == pytest.approx(torch.dot(gd, gd).item(), rel=DOT_RTOL, abs=0)


@pytest.mark.parametrize("accept", [ACCEPT, RETRACE], ids=["accept", "retrace"])
@pytest.mark.parametrize(("backend", "device", "x_dtype", "n"), MIXED_CASES)
def test_update_bf16_state(
    backend: str, device: str, x_dtype: torch.dtype, n: int, accept: float
) -> None:
    k = kernels(backend, device)
    gen = gen_for("update_bf16_state", backend, x_dtype, n, accept)
    x, g = rand(n, x_dtype, device, gen), rand(n, x_dtype, device, gen)
    gp = rand(n, STATE, device, gen)
    c = coeffs([accept, DECAY, STEP, BACK], device)
    # float64 oracle: reads the bf16 state exactly, x math in float64.
    xd, gd, gpd = x.double(), g.double(), gp.double()
    if accept:
        x_exp = DECAY * xd - STEP * gd
        envelope = DECAY * xd.abs() + STEP * gd.abs()
        gp_exp = g.to(STATE)  # round to nearest even, like torch
        gp = nan_like(gp)  # write-only on accept: must be fully overwritten
    else:
        x_exp = xd + BACK * gpd
        envelope = xd.abs() + BACK * gpd.abs()
        gp_exp = gp.clone()
    g_before = g.clone()
    k.update_(x, g, gp, c)
    assert x.dtype == x_dtype and gp.dtype == STATE
    assert_close_elementwise(x, x_exp, envelope, x_dtype)
    assert torch.equal(bf16_bits(gp), bf16_bits(gp_exp)), "state != grad.to(bf16) / changed"
    assert torch.equal(g, g_before), "grad is read-only"


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_state_rounding_is_torchs(backend: str, device: str, x_dtype: torch.dtype) -> None:
    """Accept stores exactly grad.to(torch.bfloat16): ties to even, overflow to inf,
    subnormals, signed zeros; NaN stays NaN."""
    k = kernels(backend, device)
    gen = gen_for("bf16_rounding", backend, x_dtype)
    n = 4097
    g = rounding_stress(n, x_dtype, device, gen)
    x = rand(n, x_dtype, device, gen)
    gp = torch.zeros(n, dtype=STATE, device=device)
    k.update_(x, g, gp, coeffs([ACCEPT, DECAY, STEP, BACK], device))
    assert_same_bf16(gp, g.to(STATE))


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_bf16_state_retrace_never_reads_grad(backend: str, device: str, bad: float) -> None:
    k = kernels(backend, device)
    n = 4097
    gen = gen_for("bf16_retrace", backend)
    x, gp = rand(n, torch.float32, device, gen), rand(n, STATE, device, gen)
    g = torch.full((n,), bad, device=device)
    x_exp = x.double() + BACK * gp.double()
    gp_before = gp.clone()
    k.update_(x, g, gp, coeffs([RETRACE, DECAY, STEP, BACK], device))
    assert bool(torch.isfinite(x).all()), "a non-finite gradient leaked into x on a retrace"
    assert_close_elementwise(x, x_exp, x_exp.abs(), torch.float32)
    assert torch.equal(bf16_bits(gp), bf16_bits(gp_before))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_state_bit_identical_runs(backend: str, device: str) -> None:
    k = kernels(backend, device)
    n = max(MIXED_SIZES[(backend, device)])
    gen = gen_for("bf16_determinism", backend)
    x, g = rand(n, torch.float32, device, gen), rand(n, torch.float32, device, gen)
    gp = rand(n, STATE, device, gen)
    assert torch.equal(k.dots(g, gp), k.dots(g, gp))
    for accept in (ACCEPT, RETRACE):
        c = coeffs([accept, DECAY, STEP, BACK], device)
        runs = []
        for _ in range(2):
            xr, gpr = x.clone(), gp.clone()
            k.update_(xr, g, gpr, c)
            runs.append((xr, gpr))
        assert torch.equal(runs[0][0], runs[1][0])
        assert torch.equal(bf16_bits(runs[0][1]), bf16_bits(runs[1][1]))


@pytest.mark.parametrize(
    ("x_off", "gp_off"), [(0, 0), (0, 4), (4, 1), (3, 3)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_state_views_any_alignment(backend: str, device: str, x_off: int, gp_off: int) -> None:
    """Views into flat buffers at element offsets: fp32 at 16-byte / 4-byte alignment,
    the bf16 state at 8-byte (a whole 4-element bf16 pack) or 2-byte alignment. Each
    tensor's alignment is judged on its own (CUDA vector path vs scalar path)."""
    k = kernels(backend, device)
    gen = gen_for("bf16_views", backend, x_off, gp_off)
    n = 4097
    flat = rand(2 * (n + x_off) + 1, torch.float32, device, gen)
    flat_gp = rand(n + gp_off + 1, STATE, device, gen)
    before, before_gp = flat.clone(), flat_gp.clone()
    x = flat[x_off : x_off + n]
    g = flat[n + 2 * x_off : 2 * (n + x_off)]
    gp = flat_gp[gp_off : gp_off + n]
    torch.testing.assert_close(k.dots(g, gp), ref.dots(g, gp), rtol=DOT_RTOL, atol=0)
    x_exp = DECAY * x.double() - STEP * g.double()
    envelope = DECAY * x.double().abs() + STEP * g.double().abs()
    k.update_(x, g, gp, coeffs([ACCEPT, DECAY, STEP, BACK], device))
    assert_close_elementwise(x, x_exp, envelope, torch.float32)
    assert torch.equal(bf16_bits(gp), bf16_bits(g.to(STATE)))
    untouched = torch.ones_like(flat, dtype=torch.bool)
    untouched[x_off : x_off + n] = False
    assert torch.equal(flat[untouched], before[untouched]), "wrote outside x"
    assert torch.equal(flat_gp[:gp_off], before_gp[:gp_off])
    assert torch.equal(flat_gp[gp_off + n :], before_gp[gp_off + n :]), "wrote outside grad_prev"


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op_name", ["dots", "update_"])
def test_opcheck_bf16_state(backend: str, op_name: str) -> None:
    kernels(backend, "cpu")
    prefix = ops.TRITON_PREFIX if backend == "triton" else ""
    op = getattr(torch.ops.elra_fused, prefix + op_name).default
    gen = gen_for("opcheck_bf16_state")
    n = 1031
    g, gp = rand(n, torch.float32, "cpu", gen), rand(n, STATE, "cpu", gen)
    if op_name == "dots":
        torch.library.opcheck(op, (g, gp))
        return
    for accept in (ACCEPT, RETRACE):
        c = coeffs([accept, DECAY, STEP, BACK], "cpu")
        torch.library.opcheck(op, (rand(n, torch.float32, "cpu", gen), g, gp.clone(), c))


STATE_DTYPE_MSG = r"grad_prev has dtype .* must have (grad|x)'s dtype or bfloat16"


def _bad_state_cases() -> list[tuple[str, str, Callable[[], tuple], str]]:
    """(id, op, args factory, message regex); every case must raise TypeError."""
    n = 32

    def v(dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(n).to(dtype)

    f32, f16, f64, bf16 = torch.float32, torch.float16, torch.float64, torch.bfloat16
    c = coeffs([ACCEPT, DECAY, STEP, BACK], "cpu")
    cr = coeffs([DECAY, 10.0], "cpu")
    return [
        ("dots_fp16_state", "dots", lambda: (v(f32), v(f16)), STATE_DTYPE_MSG),
        ("update_fp16_state", "update_", lambda: (v(f32), v(f32), v(f16), c), STATE_DTYPE_MSG),
        ("dots_fp64_state", "dots", lambda: (v(f32), v(f64)), STATE_DTYPE_MSG),
        ("update_fp64_state", "update_", lambda: (v(f32), v(f32), v(f64), c), STATE_DTYPE_MSG),
        ("update_fp32_state_fp16_x", "update_", lambda: (v(f16), v(f16), v(f32), c), "grad_prev"),
        # x_prev is a point: it must have x's dtype, bf16 included.
        (
            "dots_recover_bf16",
            "dots_recover",
            lambda: (v(bf16), v(f32), v(f32), cr),
            "all vector arguments must share one dtype",
        ),
        (
            "update_recover_bf16",
            "update_recover_",
            lambda: (v(f32), v(f32), v(bf16), c),
            "all vector arguments must share one dtype",
        ),
    ]


@pytest.mark.parametrize("backend", MIXED_BACKENDS)
@pytest.mark.parametrize("case", range(7), ids=[c[0] for c in _bad_state_cases()])
def test_bad_state_dtype_raises(backend: str, case: int) -> None:
    k = kernels(backend, "cpu")
    _, op, make, match = _bad_state_cases()[case]
    args = make()
    before = [a.clone() for a in args]
    with pytest.raises(TypeError, match=match):
        getattr(k, op)(*args)
    for a, b in zip(args, before, strict=True):
        assert torch.equal(a, b), "a rejected call must not modify its arguments"


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_reject_float64_with_bf16_state(backend: str) -> None:
    """float64 parameters are the reference's only; a bf16 state does not change that."""
    k = kernels(backend, "cpu")
    x, g = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    gp = torch.randn(16).to(STATE)
    with pytest.raises(TypeError, match="grad has dtype torch.float64|grad has dtype Double"):
        k.dots(g, gp)
    with pytest.raises(TypeError, match="x has dtype torch.float64|x has dtype Double"):
        k.update_(x, g, gp, coeffs([ACCEPT, DECAY, STEP, BACK], "cpu"))


def test_reference_accepts_float64_with_bf16_state() -> None:
    k = ops.get_kernels("reference", "cpu")
    gen = gen_for("ref_f64_bf16")
    g, gp = rand(9, torch.float64, "cpu", gen), rand(9, STATE, "cpu", gen)
    assert torch.equal(k.dots(g, gp), ref.dots(g, gp.double()))


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


# =========================================================================================
# float16 conversions of the C++ CPU kernels (branch-free, vectorized): bit-exact
# =========================================================================================
@pytest.mark.parametrize("device", DEVICES)
def test_cpp_float16_conversions_bit_exact(device: str) -> None:
    """Every fp16 bit pattern survives load -> fp32 -> store (NaN stays NaN), and fp32
    results round to fp16 exactly as torch's .half() (ties to even, overflow to inf,
    subnormals)."""
    k = kernels("cpp", device)
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    halves = every.view(torch.float16).to(device)
    x = halves.clone()
    zeros = torch.zeros_like(x)
    k.update_(x, zeros, zeros.clone(), coeffs([ACCEPT, 1.0, 0.0, 0.0], device))  # 1*x - 0*0
    nan = torch.isnan(halves)
    assert torch.equal(torch.isnan(x), nan)
    assert torch.equal(x.view(torch.int16)[~nan], halves.view(torch.int16)[~nan])
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
        assert torch.equal(out.view(torch.int16)[~nan], expected.view(torch.int16)[~nan]), s


# =========================================================================================
# Backend selection and status
# =========================================================================================
def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown elra_fused backend"):
        ops.get_kernels("cuda-graphs", torch.device("cpu"))


def test_available_backends_reference_last() -> None:
    got = ops.available_backends(torch.device("cpu"))
    assert got[-1] == "reference" and got.count("reference") == 1
    assert set(got) <= set(ops.BACKENDS)
    if ops._C is not None:
        assert got[0] == "cpp"


def test_reference_kernel_set_accepts_float64() -> None:
    k = ops.get_kernels("reference", "cpu")
    assert k.name == "reference"
    g = torch.randn(5, dtype=torch.float64)
    assert torch.equal(k.dots(g, g), ref.dots(g, g))


def test_cpp_missing_extension_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_C_ERROR", "ImportError: test")
    with pytest.raises(RuntimeError, match=r"setup\.py build_ext --inplace"):
        ops.get_kernels("cpp", torch.device("cpu"))
    assert "NOT BUILT" in ops.cpp_extension_status()
    assert "cpp" not in ops.available_backends("cpu")


def test_cpp_cuda_not_compiled_message(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(cuda_compiled=lambda: False, __file__="_C.so")
    monkeypatch.setattr(ops, "_C", fake)
    with pytest.raises(RuntimeError, match="CUDA kernels were not compiled"):
        ops.get_kernels("cpp", torch.device("cuda"))
    assert "CUDA kernels compiled: no" in ops.cpp_extension_status()


def test_triton_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.get_kernels("triton", torch.device("cpu"))


def test_extension_status_line() -> None:
    status = ops.cpp_extension_status()
    assert status.startswith("elra_fused._C:")
    print(status)  # visible with -s / in CI logs


@pytest.mark.skipif(not IN_CI, reason="CI-only: proves the CI build produced the extension")
def test_ci_built_extension() -> None:
    assert ops._C is not None, ops.cpp_extension_status()
    nvcc = shutil.which("nvcc") or (
        os.environ.get("CUDA_HOME")
        and os.path.exists(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    )
    if torch.version.cuda and nvcc and os.environ.get("ELRA_SKIP_CUDA_BUILD", "0") in ("", "0"):
        assert ops._C.cuda_compiled(), ops.cpp_extension_status()


# =========================================================================================
# GPU only
# =========================================================================================
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cuda_ops_never_sync(backend: str) -> None:
    k = kernels(backend, "cuda")
    gen = gen_for("sync")
    n = 1 << 20
    x, g, gp = (rand(n, torch.float32, "cuda", gen) for _ in range(3))
    cu = coeffs([ACCEPT, DECAY, STEP, BACK], "cuda")
    cr = coeffs([DECAY, 10.0], "cuda")
    k.dots(g, gp)  # warm-up: first launch may compile / load modules
    k.dots_recover(gp, x, g, cr)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        k.dots(g, gp)
        k.dots_recover(gp, x, g, cr)
        k.update_(x, g, gp, cu)
        k.update_recover_(x, g, gp, cu)
        k.update_swap_(x, g, gp, cu)
        k.update_swap_(x, g, gp, coeffs([RETRACE, DECAY, STEP, BACK], "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_unaligned_views_use_scalar_path() -> None:
    """Offset views are not 16-byte aligned: the kernels must fall back correctly."""
    k = kernels("cpp", "cuda")
    gen = gen_for("unaligned")
    n = 100_003
    base = [rand(n + 1, torch.float32, "cuda", gen) for _ in range(3)]
    g, gp, x = (b[1:] for b in base)
    torch.testing.assert_close(k.dots(g, gp), ref.dots(g, gp), rtol=DOT_RTOL, atol=0)
    c = coeffs([ACCEPT, DECAY, STEP, BACK], "cuda")
    x_ref, gp_ref = x.clone(), gp.clone()
    ref.update_(x_ref, g, gp_ref, c)
    k.update_(x, g, gp, c)
    torch.testing.assert_close(x, x_ref)
    assert torch.equal(gp, gp_ref)
