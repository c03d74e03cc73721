"""Triton kernels for the ELRA vector passes (semantics: ``reference_ops.py``).

Literate layout in the style of the Triton tutorials: each kernel is followed by its
launcher. The launchers assume validated inputs (``elra_fused.ops`` validates and then
calls them through the ``elra_fused::triton_*`` custom ops); use those ops, or
``ops.get_kernels("triton", device)``, rather than calling this module directly.

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it on a
machine without a GPU). The variable must be set before this module is imported: it
decides, at decoration time, whether ``@triton.jit`` compiles or interprets.

Design:

* Updates: fp32 math whatever the storage dtype; int64 offsets (buffers may exceed 2**31
  elements); masked tails.
* Index math is 64-bit safe: an ``n`` below 2**31 reaches a kernel as i32, so no kernel
  computes from it anything that could pass 2**31 - 1 (``tl.cdiv(n, BLOCK)`` wraps to a
  negative tile count for n in (2**31 - BLOCK, 2**31 - 1]). Tile counts and grids are
  computed on the host in Python ints (:func:`_dots_grid`); offsets start from an int64
  program id; ``n`` is only compared with them.
* Reductions: fp64 math (``tl.float64``), as the float64 reference. Each element is
  widened to fp64, so the products are exact (24 + 24 significand bits <= 53) and nothing
  overflows or underflows over the whole finite fp32 range; only the fp64 additions round.
  They are two-stage and deterministic: each program folds every tile it visits
  (grid-stride) into per-lane fp64 accumulators, as the CUDA kernel's per-thread fp64
  sums do (no fp32 partial sum grows with n), sums its lanes and writes the pair into
  its own slot of a ``[programs, 2]`` float64 buffer; a second kernel sums the slots. The
  number of programs depends on ``n`` only. No atomics. Both sums are pairwise halving
  trees (:func:`_tree_sum`), whose order is fixed by the code alone: not by the layout
  the compiler picks (which follows the pointers' alignment), nor by the interpreter. So
  the same values give the same bits here, under TRITON_INTERPRET, and in the tensor-list
  kernels of :mod:`elra_fused.triton_lists`, which run the same program (:func:`_dots_program`)
  and finish (:func:`_fold_slots`) for each tensor of a list.
* Shared math: the per-program reduction (:func:`_dots_program`, :func:`_fold_slots`)
  and the per-element update (:func:`_update_block`) are ``@triton.jit`` helpers that the
  single-tensor kernels here and the list kernels of :mod:`elra_fused.triton_lists` call,
  so there is one implementation of each rule.
* Coefficients are loaded inside the kernels from the float64 ``coeffs`` tensor: no host
  read, no synchronisation.
* One update kernel for ``update_``, ``update_recover_`` and ``update_swap_``: the mode is
  a pair of ``tl.constexpr`` flags (``RECOVER``, ``SWAP``), so each mode compiles to its
  own specialised kernel with no runtime branch on it (as the C++ / CUDA templates do).
* No autotuning: the update kernels write in place, and re-running them to time configs
  would apply the update several times (Triton's ``restore_value`` would be needed).
* Compact state: in standard mode ``grad_prev`` may be bfloat16 while ``x`` / ``grad`` are
  not. Loads follow each pointer's dtype; the accept store rounds ``grad`` to bf16
  (round to nearest even, NaN kept) through :func:`_to_storage`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: True when kernels run in Triton's numpy interpreter (CPU tensors allowed).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Elements per program per loop iteration (a power of two, as tl.arange requires).
BLOCK_SIZE = 1024
#: Cap on reduction programs. A function of n only (never of the GPU), so the partial
#: slots and their summation order, and hence the bits of the result, are reproducible.
MAX_REDUCE_PROGRAMS = 1024
#: 4 warps x 32 threads x 8 elements = 1024: each thread handles two 16-byte fp32 vectors.
NUM_WARPS = 4
#: Form the reduction trees' levels with tl.split (see _tree_sum): the interpreter's
#: tl.sum is a jitted call that costs ~1 ms each; compiled, a sum over an axis of 2 is free
#: (register relabelling), a split may move data.
TREE_BY_SPLIT = tl.constexpr(INTERPRETED)
#: Round fp32 -> bf16 with integer ops instead of ``.to(tl.bfloat16)``. The interpreter's
#: float conversion truncates (and its RTNE mode rounds ties away from even), so under
#: TRITON_INTERPRET the bits would not match torch's ``.to(torch.bfloat16)``; compiled
#: Triton emits the hardware's round-to-nearest-even conversion (cvt.rn.bf16.f32), which
#: is what torch's CUDA kernels use too, so it keeps the native cast. The reductions also
#: widen bf16 loads by bits under the interpreter (see :func:`_widen`).
BF16_BY_BITS = INTERPRETED

#: Whether the compiler may fuse the updates' multiply-adds into FMAs: no. Then
#: decay * x - step * g rounds both products before the subtraction, as the C++ kernels
#: (-ffp-contract=off, nvcc --fmad=false), torch's own ops and the interpreter do, so a
#: Triton update on a GPU has the bits of the cpp backend's and of its interpreted run
#: (and the single and the list kernels cannot round differently). The reductions keep
#: fusion: their fp64 products of stored values are exact, so an FMA changes no bit (the
#: G_{t-1} that dots_recover forms from two points may round once less: its tolerance
#: allows for that).
UPDATE_FP_FUSION = False

# Coefficient indices (reference_ops.COEF_* / RCOEF_*), as kernel-visible constants.
COEF_ACCEPT = tl.constexpr(0)
COEF_DECAY = tl.constexpr(1)
COEF_STEP = tl.constexpr(2)
COEF_BACK = tl.constexpr(3)
RCOEF_DECAY = tl.constexpr(0)
RCOEF_INV_ALPHA_PREV = tl.constexpr(1)


# ======================================================================================
# Storage conversion
# ======================================================================================
@triton.jit
def _to_storage(
    v,  # fp32 block
    DST: tl.constexpr,  # storage dtype of the destination pointer
    BY_BITS: tl.constexpr,  # bf16 destination: round with integer ops (BF16_BY_BITS)
):
    """fp32 -> DST, round to nearest even (NaN stays NaN; overflow gives +-inf)."""
    if BY_BITS and DST == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        # Adding 0x7FFF plus the lowest kept bit, then dropping 16 bits, rounds to
        # nearest with ties to even; a carry out of the mantissa correctly bumps the
        # exponent (up to inf). NaN would round to inf or wrap: replaced by the quiet NaN
        # 0x7FC0 that torch's CPU conversion writes.
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(DST)
    return out


@triton.jit
def _widen(
    v,  # block loaded from a pointer to SRC
    SRC: tl.constexpr,  # its storage dtype
    BY_BITS: tl.constexpr,  # bf16 source: widen with integer ops (BF16_BY_BITS)
):
    """SRC -> fp64, exactly (through fp32, which holds every SRC value)."""
    if BY_BITS and SRC == tl.bfloat16:
        # The interpreter's bf16 -> fp32 cast gets subnormals wrong (it normalises them and
        # then clamps the exponent: 9.2e-41 -> 0, 1e-39 -> 4.4e-39); the bf16 bits are the
        # top half of the fp32 bits.
        u = v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        out = u.to(tl.float32, bitcast=True).to(tl.float64)
    else:
        out = v.to(tl.float32).to(tl.float64)
    return out


# ======================================================================================
# Reduction: [<G, G>, <G_prev, G>]
# ======================================================================================
@triton.jit
def _tree_sum(
    pairs,  # fp64 block [2**LOG2_LEN, 2]: column 0 and column 1 are summed separately
    LOG2_LEN: tl.constexpr,
):
    """Sums of the two columns of ``pairs`` by pairwise halving: ``v[j] + v[j + len / 2]``,
    level after level (both columns in one tree: half the operations).

    Every addition has exactly two operands (and a + b == b + a in IEEE arithmetic), so the
    result is a function of the values alone. A plain ``tl.sum`` first adds each thread's
    registers in sequence; which values share a thread is the layout the compiler picks,
    and that follows the pointers' alignment (16-byte aligned fp32 loads give 4 elements
    per thread, unaligned ones 1), so two kernels reducing the same values could round
    differently. The halving order is also the same compiled and interpreted.

    :data:`TREE_BY_SPLIT` forms each level as ``lo + hi`` of the two halves instead of a
    sum over an axis of 2 (the same additions, the same bits): the interpreter runs it
    several times faster, since ``tl.sum`` is a jitted function and each call re-patches
    the language.
    """
    v = pairs
    for _ in tl.static_range(LOG2_LEN):
        halves = tl.reshape(v, (2, v.shape[0] // 2, 2))
        if TREE_BY_SPLIT:
            lo, hi = tl.split(tl.permute(halves, (1, 2, 0)))
            v = lo + hi
        else:
            v = tl.sum(halves, axis=0)
    return tl.split(tl.reshape(v, (2,)))


@triton.jit
def _dots_terms(
    g_ptr,  # *T: G_t
    a_ptr,  # *S: standard: G_{t-1}; recover: x_{t-1}
    b_ptr,  # *T: recover: x_t
    offs,  # int64 offsets of one tile
    mask,  # offs < n (all true for a tile known to be full)
    decay,  # fp64 (recover mode)
    inv_alpha,  # fp64 (recover mode)
    RECOVER: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """fp64 (G, G_prev) of one tile; 0 where masked off."""
    g = _widen(tl.load(g_ptr + offs, mask=mask, other=0.0), g_ptr.dtype.element_ty, BF16_BITS)
    if RECOVER:
        xp = _widen(tl.load(a_ptr + offs, mask=mask, other=0.0), a_ptr.dtype.element_ty, BF16_BITS)
        x = _widen(tl.load(b_ptr + offs, mask=mask, other=0.0), g_ptr.dtype.element_ty, BF16_BITS)
        # G_prev = (decay * x_prev - x) / alpha_prev, the reference's expression: in
        # fp64 the difference of close points keeps ~1e-16 * |x| (the fp32 update
        # kernel needs the (x_prev - x) + (decay - 1) * x_prev form, this does not).
        gp = (decay * xp - x) * inv_alpha
    else:
        gp = _widen(tl.load(a_ptr + offs, mask=mask, other=0.0), a_ptr.dtype.element_ty, BF16_BITS)
    return g, gp


@triton.jit
def _dots_program(
    g_ptr,  # *T: the gradient G_t, n elements
    a_ptr,  # *S: standard mode: G_{t-1} (S = T or bf16); recover mode: x_{t-1} (S = T)
    b_ptr,  # *T: recover mode: x_t (standard mode: ignored, pass g_ptr)
    coeffs_ptr,  # *fp64 [decay, inv_alpha_prev] (recover mode; ignored otherwise)
    n,  # number of elements in every vector (only compared, never summed)
    num_tiles,  # cdiv(n, BLOCK), from the host (_dots_grid): in-kernel it could wrap in i32
    first_tile,  # int64: this program's first tile (its index among the tensor's programs)
    stride,  # the tensor's number of programs: the grid-stride between its tiles
    RECOVER: tl.constexpr,  # recover G_{t-1} per element from (x_{t-1}, x_t)
    FULL_TILES_CONST_MASK: tl.constexpr,  # load full tiles under a constant mask (see below)
    BF16_BITS: tl.constexpr,  # widen bf16 loads with integer ops (BF16_BY_BITS)
    BLOCK: tl.constexpr,  # elements per tile
    LOG2_BLOCK: tl.constexpr,
):
    """``(<G, G>, <G_prev, G>)`` over tiles first_tile, first_tile + stride, ... < num_tiles:
    the partial of one program of the reduction, whichever kernel runs it (the
    single-tensor kernel, or the list kernel for one tensor of a list: same bits).

    ``FULL_TILES_CONST_MASK``: a tile that ends inside the tensor is loaded under a constant
    all-true mask. The values, and so the bits, are those of the ``offs < n`` load; it
    only lets the compiler vectorise loads whose ``n`` it cannot see (the list kernels
    read ``n`` from a table).
    """
    if RECOVER:
        decay = tl.load(coeffs_ptr + RCOEF_DECAY)  # fp64
        inv_alpha = tl.load(coeffs_ptr + RCOEF_INV_ALPHA_PREV)
    else:
        decay = 0.0
        inv_alpha = 0.0
    # Per-lane fp64 accumulators: each tile's exact fp64 products are added into them,
    # each lane sees num_tiles / stride elements (fp64 rounding only).
    acc_gg = tl.zeros((BLOCK,), dtype=tl.float64)
    acc_gpg = tl.zeros((BLOCK,), dtype=tl.float64)
    # An int64 start makes the induction variable (and so the offsets) int64 when compiled;
    # the interpreter iterates Python ints, which cannot overflow.
    for tile in range(first_tile, num_tiles, stride):
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if FULL_TILES_CONST_MASK:
            if (tile + 1) * BLOCK <= n:
                full = tl.full((BLOCK,), 1, tl.int1)  # a constant mask: vectorisable
                g, gp = _dots_terms(
                    g_ptr, a_ptr, b_ptr, offs, full, decay, inv_alpha, RECOVER, BF16_BITS
                )
            else:
                g, gp = _dots_terms(
                    g_ptr, a_ptr, b_ptr, offs, mask, decay, inv_alpha, RECOVER, BF16_BITS
                )
        else:
            g, gp = _dots_terms(
                g_ptr, a_ptr, b_ptr, offs, mask, decay, inv_alpha, RECOVER, BF16_BITS
            )
        acc_gg += g * g
        acc_gpg += gp * g
    return _tree_sum(tl.join(acc_gg, acc_gpg), LOG2_BLOCK)


@triton.jit
def _dots_partial_kernel(
    g_ptr,  # *T: the gradient G_t, n elements
    a_ptr,  # *S: standard mode: G_{t-1} (S = T or bf16); recover mode: x_{t-1} (S = T)
    b_ptr,  # *T: recover mode: x_t (standard mode: ignored, pass g_ptr)
    coeffs_ptr,  # *fp64 [decay, inv_alpha_prev] (recover mode; ignored otherwise)
    partials_ptr,  # *fp64 [num_programs, 2]: this program writes row program_id
    n,  # number of elements in every vector (i32 when < 2**31: only compared, never summed)
    num_tiles,  # cdiv(n, BLOCK), from the host (_dots_grid): in-kernel it could wrap in i32
    RECOVER: tl.constexpr,  # recover G_{t-1} per element from (x_{t-1}, x_t)
    BF16_BITS: tl.constexpr,  # widen bf16 loads with integer ops (BF16_BY_BITS)
    BLOCK: tl.constexpr,  # elements per tile
    LOG2_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    gg, gpg = _dots_program(
        g_ptr,
        a_ptr,
        b_ptr,
        coeffs_ptr,
        n,
        num_tiles,
        pid.to(tl.int64),
        tl.num_programs(0),
        RECOVER,
        False,  # the launch specialises on n (n % 16 == 0 vectorises the masked loads)
        BF16_BITS,
        BLOCK,
        LOG2_BLOCK,
    )
    tl.store(partials_ptr + 2 * pid, gg)
    tl.store(partials_ptr + 2 * pid + 1, gpg)


@triton.jit
def _fold_slots(
    partials_ptr,  # *fp64 [slots, 2]
    first,  # the tensor's first slot
    count,  # its number of slots (<= 2**LOG2_SLOTS)
    LOG2_SLOTS: tl.constexpr,
):
    """Stage 2: ``(sum of <G, G>, sum of <G_prev, G>)`` over slots ``[first, first +
    count)`` by :func:`_tree_sum` over a block of 2**LOG2_SLOTS, zeros past ``count``.

    Any block that holds the slots gives the same bits, so a list kernel may use the
    largest block its list needs: doubling the block only adds a first level that pairs
    every slot with a zero, and x + 0 == x for every x but -0, which no slot holds (the
    lane accumulators start at +0, and an IEEE sum is -0 only when both terms are).
    """
    idx = tl.arange(0, 2**LOG2_SLOTS)[:, None]  # slot
    col = tl.arange(0, 2)[None, :]  # <G, G> or <G_prev, G>
    pairs = tl.load(partials_ptr + 2 * (first + idx) + col, mask=idx < count, other=0.0)
    return _tree_sum(pairs, LOG2_SLOTS)


@triton.jit(do_not_specialize=["count"])
def _dots_finish_kernel(
    partials_ptr,  # *fp64 [count, 2] from _dots_partial_kernel
    out_ptr,  # *fp64 [2]
    count,  # number of slots
    LOG2_SLOTS: tl.constexpr,
):
    gg, gpg = _fold_slots(partials_ptr, 0, count, LOG2_SLOTS)
    tl.store(out_ptr, gg)
    tl.store(out_ptr + 1, gpg)


def _log2(v: int) -> int:
    """log2 of a power of two."""
    if v < 1 or v & (v - 1):
        raise ValueError(f"{v} is not a power of two")
    return v.bit_length() - 1


def _slots_log2(count: int) -> int:
    """log2 of the stage-2 block for ``count`` slots: the smallest power of two >= count."""
    return (max(1, count) - 1).bit_length()


def _dots_grid(n: int) -> tuple[int, int]:
    """(programs, tiles) of the dots kernel for ``n`` elements, in Python ints: the tile
    count cdiv(n, BLOCK_SIZE) is computed here, not in the kernel, where ``n`` < 2**31 is
    an i32 and ``n + BLOCK_SIZE - 1`` would wrap for n > 2**31 - BLOCK_SIZE."""
    tiles = -(-int(n) // BLOCK_SIZE)
    return max(1, min(tiles, MAX_REDUCE_PROGRAMS)), tiles


def _launch_dots(
    g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor, recover: bool
) -> torch.Tensor:
    n = g.numel()
    programs, tiles = _dots_grid(n)
    partials = torch.empty((programs, 2), dtype=torch.float64, device=g.device)
    out = torch.empty(2, dtype=torch.float64, device=g.device)
    with _device_guard(g):
        _dots_partial_kernel[(programs,)](
            g,
            a,
            b,
            coeffs,
            partials,
            n,
            tiles,
            RECOVER=recover,
            BF16_BITS=BF16_BY_BITS,
            BLOCK=BLOCK_SIZE,
            LOG2_BLOCK=_log2(BLOCK_SIZE),
            num_warps=NUM_WARPS,
        )
        # Stage 2: a tree over the slots in a fixed order (deterministic; the list
        # kernels finish each tensor's slots with the same code).
        _dots_finish_kernel[(1,)](
            partials, out, programs, LOG2_SLOTS=_slots_log2(programs), num_warps=NUM_WARPS
        )
    return out


def dots(grad: torch.Tensor, grad_prev: torch.Tensor) -> torch.Tensor:
    """float64 ``[<G, G>, <G_prev, G>]``."""
    # coeffs is unused in standard mode; any float64 pointer will do.
    return _launch_dots(grad, grad_prev, grad, _dummy_coeffs(grad.device), recover=False)


def dots_recover(
    x_prev: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
) -> torch.Tensor:
    """float64 ``[<G, G>, <G_prev, G>]`` with G_prev recovered from the two points."""
    return _launch_dots(grad, x_prev, x, coeffs, recover=True)


# ======================================================================================
# In-place update (accept step or retrace): update_, update_recover_ (RECOVER) and
# update_swap_ (SWAP) are one kernel with compile-time flags
# ======================================================================================
@triton.jit
def _update_block(
    x_ptr,  # *T: parameters x_t, overwritten with x_{t+1}
    g_ptr,  # *T: gradient G_t; read only when accepting; SWAP: <- G_{t-1} on a retrace
    o_ptr,  # *S: standard: G_{t-1} (<- G_t on accept; S = T or bf16); recover: x_{t-1}
    # (<- x_t); SWAP: G_{t-1} (S = T), read on a retrace only, never written
    coeffs_ptr,  # *fp64 [accept, decay, step, back]
    offs,  # int64 offsets of the block
    mask,  # offs < n, or None for a block known to be inside the vectors
    RECOVER: tl.constexpr,  # o_ptr holds x_{t-1} instead of G_{t-1}
    SWAP: tl.constexpr,  # swap mode: the caller swaps the roles of grad and grad_prev
    STATE_CONVERT: tl.constexpr,  # S != T: G_t is rounded to S on accept (not bit-copied)
    BF16_BITS: tl.constexpr,  # round bf16 stores with integer ops (BF16_BY_BITS)
):
    """The update of the elements ``offs``: the per-element math of every update kernel
    (single tensor and list), so they agree bit for bit."""
    accept = tl.load(coeffs_ptr + COEF_ACCEPT)
    decay64 = tl.load(coeffs_ptr + COEF_DECAY)
    x_raw = tl.load(x_ptr + offs, mask=mask)
    x = x_raw.to(tl.float32)
    # `accept` is uniform over the grid. NaN != 0 is true, as in the reference.
    if accept != 0.0:
        step = tl.load(coeffs_ptr + COEF_STEP).to(tl.float32)
        g_raw = tl.load(g_ptr + offs, mask=mask)
        new_x = decay64.to(tl.float32) * x - step * g_raw.to(tl.float32)
        if SWAP:
            # No state store: 12 bytes per fp32 element (the caller swaps the buffers).
            pass
        elif RECOVER:
            tl.store(o_ptr + offs, x_raw, mask=mask)  # x_prev <- x (bit copy)
        elif STATE_CONVERT:  # grad_prev <- grad rounded to the compact state dtype
            gp_new = _to_storage(g_raw.to(tl.float32), o_ptr.dtype.element_ty, BF16_BITS)
            tl.store(o_ptr + offs, gp_new, mask=mask)
        else:
            tl.store(o_ptr + offs, g_raw, mask=mask)  # grad_prev <- grad (bit copy)
    else:
        # Retrace: the gradient is never loaded (SWAP only overwrites it), so a
        # non-finite G_t cannot reach x.
        back64 = tl.load(coeffs_ptr + COEF_BACK)
        other_raw = tl.load(o_ptr + offs, mask=mask)
        if SWAP:
            tl.store(g_ptr + offs, other_raw, mask=mask)  # grad <- grad_prev (bit copy)
        other = other_raw.to(tl.float32)
        if RECOVER:
            # x + back dir, formed from the nearer end (see retrace_range in
            # csrc/cpu/kernels.h): from x_prev, decay x_prev - (1 - back) dir, for
            # back >= 1/2, so that a full return (back = 1) is exact.
            decay_m1 = (decay64 - 1.0).to(tl.float32)
            direction = (other - x) + decay_m1 * other
            if back64 < 0.5:
                new_x = x + back64.to(tl.float32) * direction
            else:
                remain = (1.0 - back64).to(tl.float32)
                new_x = (other + decay_m1 * other) - remain * direction
        else:
            new_x = x + back64.to(tl.float32) * other
    tl.store(x_ptr + offs, _to_storage(new_x, x_ptr.dtype.element_ty, BF16_BITS), mask=mask)


@triton.jit
def _update_kernel(
    x_ptr,  # *T: parameters x_t, overwritten with x_{t+1}
    g_ptr,  # *T: gradient G_t (see _update_block)
    o_ptr,  # *S: G_{t-1} or x_{t-1} (see _update_block)
    coeffs_ptr,  # *fp64 [accept, decay, step, back]
    n,  # number of elements in every vector
    RECOVER: tl.constexpr,  # o_ptr holds x_{t-1} instead of G_{t-1}
    SWAP: tl.constexpr,  # swap mode: the caller swaps the roles of grad and grad_prev
    STATE_CONVERT: tl.constexpr,  # S != T: G_t is rounded to S on accept (not bit-copied)
    BF16_BITS: tl.constexpr,  # round bf16 stores with integer ops (BF16_BY_BITS)
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _update_block(
        x_ptr, g_ptr, o_ptr, coeffs_ptr, offs, offs < n, RECOVER, SWAP, STATE_CONVERT, BF16_BITS
    )


def _launch_update(
    x: torch.Tensor, g: torch.Tensor, other: torch.Tensor, coeffs: torch.Tensor, mode: str
) -> None:
    """``mode``: "standard" (update_), "recover" (update_recover_) or "swap" (update_swap_)."""
    n = x.numel()
    if n == 0:
        return
    with _device_guard(x):
        _update_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
            x,
            g,
            other,
            coeffs,
            n,
            RECOVER=mode == "recover",
            SWAP=mode == "swap",
            STATE_CONVERT=other.dtype != x.dtype,
            BF16_BITS=BF16_BY_BITS,
            BLOCK=BLOCK_SIZE,
            num_warps=NUM_WARPS,
            enable_fp_fusion=UPDATE_FP_FUSION,
        )


def update_(
    x: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    """Standard mode update in place (see reference_ops.update_)."""
    _launch_update(x, grad, grad_prev, coeffs, "standard")


def update_recover_(
    x: torch.Tensor, grad: torch.Tensor, x_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    """Recover mode update in place (see reference_ops.update_recover_)."""
    _launch_update(x, grad, x_prev, coeffs, "recover")


def update_swap_(
    x: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor, coeffs: torch.Tensor
) -> None:
    """Swap mode update in place (see reference_ops.update_swap_): the caller swaps the
    roles of ``grad`` and ``grad_prev`` afterwards."""
    _launch_update(x, grad, grad_prev, coeffs, "swap")


# ======================================================================================
# Helpers
# ======================================================================================
_DUMMY_COEFFS: dict[torch.device, torch.Tensor] = {}


def _dummy_coeffs(device: torch.device) -> torch.Tensor:
    """A float64 buffer for the unused ``coeffs_ptr`` of standard-mode dots (cached)."""
    t = _DUMMY_COEFFS.get(device)
    if t is None:
        t = _DUMMY_COEFFS[device] = torch.zeros(2, dtype=torch.float64, device=device)
    return t


class _NullGuard:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _device_guard(t: torch.Tensor) -> torch.cuda.device | _NullGuard:
    """Launch on the tensor's GPU (Triton uses the current device), or check CPU mode."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    if not INTERPRETED:
        raise RuntimeError(
            "elra_fused triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "elra_fused.triton_kernels (and triton) is imported to run on CPU"
        )
    return _NullGuard()
