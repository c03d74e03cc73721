"""Triton kernel internals that the op tests cannot reach at their sizes: the 64-bit safe
tile count of the reductions (an i32 ``n`` near 2**31, checked with a symbolic ``n`` on
meta tensors: nothing is allocated) and the per-tile fp64 fold of the reductions when each
program visits many tiles (few programs, under the interpreter on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _backends import DEVICES, kernels_or_skip
from _ops_common import assert_dots_agree, dots_recover_tol, dots_tol

from elra_fused import reference_ops

tk = pytest.importorskip("elra_fused.triton_kernels")

BLOCK = tk.BLOCK_SIZE
I32_MAX = 2**31 - 1


@pytest.mark.parametrize(
    "n",
    [0, 1, BLOCK, BLOCK + 1, 2**31 - BLOCK, 2**31 - BLOCK + 1, I32_MAX, 2**31, 2**33 + 5],
)
def test_dots_grid_is_64_bit_safe(n: int) -> None:
    """The tile count for n in (2**31 - BLOCK, 2**31 - 1] is where an in-kernel
    tl.cdiv(n, BLOCK) on the i32 ``n`` wraps negative (the dots came out 0): the host
    computes it in Python ints instead."""
    programs, tiles = tk._dots_grid(n)
    assert tiles == (n + BLOCK - 1) // BLOCK and tiles * BLOCK >= n > (tiles - 1) * BLOCK - 1
    assert programs == max(1, min(tiles, tk.MAX_REDUCE_PROGRAMS))
    assert type(tiles) is int and type(programs) is int


class _Recorder:
    """Stands in for the jitted kernel: records ``kernel[grid](*args, **meta)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, tuple, dict]] = []

    def __getitem__(self, grid: tuple):
        def launch(*args, **meta) -> None:
            self.calls.append((grid, args, meta))

        return launch


@pytest.mark.parametrize("recover", [False, True], ids=["dots", "dots_recover"])
@pytest.mark.parametrize("n", [2**31 - BLOCK + 1, I32_MAX, 2**31 + 3])
def test_dots_launch_passes_the_host_tile_count(
    n: int, recover: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A symbolic n (meta tensors: no memory): the kernel gets the tile count from the
    host, positive and covering n, with as many programs as the fixed slot buffer."""
    recorder, finish = _Recorder(), _Recorder()
    monkeypatch.setattr(tk, "_dots_partial_kernel", recorder)
    monkeypatch.setattr(tk, "_dots_finish_kernel", finish)
    monkeypatch.setattr(tk, "_device_guard", lambda t: tk._NullGuard())
    g = torch.empty(n, dtype=torch.bfloat16, device="meta")
    coeffs = torch.empty(2, dtype=torch.float64, device="meta")
    out = tk._launch_dots(g, g, g, coeffs, recover=recover)
    assert out.shape == (2,) and out.dtype == torch.float64
    ((grid, args, meta),) = recorder.calls
    partials, n_arg, tiles = args[4:7]
    assert n_arg == n and tiles == -(-n // BLOCK) and tiles * BLOCK >= n > 0
    assert grid == (tk.MAX_REDUCE_PROGRAMS,) == (partials.shape[0],)
    assert meta["RECOVER"] is recover and meta["BLOCK"] == BLOCK
    # Stage 2: one program over every slot, into the returned tensor.
    ((grid, args, meta),) = finish.calls
    assert grid == (1,) and args[0] is partials and args[1] is out
    assert args[2] == tk.MAX_REDUCE_PROGRAMS <= 2 ** meta["LOG2_SLOTS"] < 2 * args[2]


@pytest.mark.parametrize("programs", [1, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_dots_fold_every_tile_into_fp64(
    device: str, programs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Few programs, 64 tiles: each lane adds 1 and then 63 terms of 2**-24. In fp32 a
    lane's sum would stay 1 (1 + 2**-24 rounds to 1); the fp64 fold keeps every term, and
    every sum here is exact, so the result equals the float64 reference bit for bit."""
    k = kernels_or_skip("triton", device)
    monkeypatch.setattr(tk, "MAX_REDUCE_PROGRAMS", programs)
    tiles = 64
    g = torch.full((tiles * BLOCK,), 2.0**-12, device=device)
    g[:BLOCK] = 1.0
    exact = BLOCK * (1.0 + (tiles - 1) * 2.0**-24)
    out = k.dots(g, g)
    expected = reference_ops.dots(g, g)
    assert expected.tolist() == [exact, exact]
    assert torch.equal(out.cpu(), expected.cpu())
    assert tk._dots_grid(g.numel())[0] == programs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_dots_with_many_tiles_per_program_match_the_reference(
    device: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random data, 2 programs over 41 tiles (a masked tail): dots and dots_recover within
    fp64 rounding of the float64 reference (the op tests' bounds), the same bits again."""
    k = kernels_or_skip("triton", device)
    monkeypatch.setattr(tk, "MAX_REDUCE_PROGRAMS", 2)
    gen = torch.Generator().manual_seed(7)
    n = 40 * BLOCK + 333

    def rand() -> torch.Tensor:
        return (torch.randn(n, generator=gen) * 3).to(dtype).to(device)

    g, gp, x_prev, x = rand(), rand(), rand(), rand()
    coeffs = torch.tensor([0.999, 1 / 0.03], dtype=torch.float64, device=device)
    for op, args, tol in (
        ("dots", (g, gp), dots_tol(g, gp)),
        ("dots_recover", (x_prev, x, g, coeffs), dots_recover_tol(x_prev, x, g, coeffs)),
    ):
        out = getattr(k, op)(*args)
        assert_dots_agree(out, getattr(reference_ops, op)(*args), tol)
        assert torch.equal(getattr(k, op)(*args), out)  # deterministic


# A compile for sm_90 (no GPU needed), in a process without TRITON_INTERPRET: the PTX of
# the single and the list update kernels, with the options their launches pass (one line
# per kernel: "has an fp32 FMA", "has an fp32 multiply").
_PTX_OF_UPDATES = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import elra_fused.triton_kernels as tk
import elra_fused.triton_lists as tls

options = {"num_warps": tk.NUM_WARPS, "enable_fp_fusion": tk.UPDATE_FP_FUSION}
single = ASTSource(
    fn=tk._update_kernel,
    signature={"x_ptr": "*fp32", "g_ptr": "*fp32", "o_ptr": "*fp32", "coeffs_ptr": "*fp64",
               "n": "i32", "RECOVER": "constexpr", "SWAP": "constexpr",
               "STATE_CONVERT": "constexpr", "BF16_BITS": "constexpr", "BLOCK": "constexpr"},
    constexprs={"RECOVER": False, "SWAP": False, "STATE_CONVERT": False, "BF16_BITS": False,
                "BLOCK": tk.BLOCK_SIZE},
)
listed = ASTSource(
    fn=tls._update_list_kernel,
    signature={"meta_ptr": "*i64", "owner_ptr": "*i32", "coeffs_ptr": "*fp64",
               "first_program": "i64", "X_TY": "constexpr", "S_TY": "constexpr",
               "SWAP": "constexpr", "STATE_CONVERT": "constexpr", "ALIGNED": "constexpr",
               "BF16_BITS": "constexpr", "BLOCK": "constexpr", "TILES_PER_PROGRAM": "constexpr"},
    constexprs={"X_TY": triton.language.float32, "S_TY": triton.language.float32,
                "SWAP": True, "STATE_CONVERT": False, "ALIGNED": True, "BF16_BITS": False,
                "BLOCK": tk.BLOCK_SIZE, "TILES_PER_PROGRAM": tls.UPDATE_TILES_PER_PROGRAM},
)
target = GPUTarget("cuda", 90, 32)
for source in (single, listed):
    ptx = triton.compile(source, target=target, options=options).asm["ptx"]
    print("fma.rn.f32" in ptx, "mul.rn.f32" in ptx)
"""


def test_compiled_updates_round_each_product() -> None:
    """On a GPU the Triton updates round decay * x and step * g before subtracting (no
    FMA), as the C++ kernels and the interpreter do: checked in the sm_90 PTX."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _PTX_OF_UPDATES], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"triton cannot compile for sm_90 here: {result.stderr[-300:]}")
    assert result.stdout.split() == ["False", "True"] * 2, result.stdout
