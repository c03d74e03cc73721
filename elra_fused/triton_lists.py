"""Tensor-list ops of the triton backend (``dots_list``, ``update_list_``,
``update_swap_list_``): one kernel launch per dtype group and pass, over a table of the
list's tensors, in the manner of torch's ``multi_tensor_apply``.

Why a table: the per-parameter layout (FSDP2, one tensor per parameter) passes lists of
~200 tensors, many small. Applying the single-tensor kernel per element
(:mod:`elra_fused.ops.lists`) costs one launch per tensor per pass, and the step becomes
launch-bound. Here the tensors reach one kernel through a device table of their data
pointers; each program reads its row and casts the addresses to typed pointers
(``tl.load(row + col).to(tl.pointer_type(DTYPE))``).

Table layout (built on the host, copied once, cached; see :class:`Table`):

* ``meta``: int64 ``[len(list), 7]``, one row per list element, in list order:
  ``[ptr0, ptr1, ptr2, n, tiles, first, programs]``. The pointers are (grad, grad_prev,
  grad) for ``dots_list`` and (x, grad, grad_prev) for the updates; ``tiles`` is
  cdiv(n, BLOCK_SIZE) (host Python ints: 64-bit safe as in :mod:`.triton_kernels`);
  ``programs`` the element's number of programs and ``first`` the index of its first one.
* ``owner``: int32 ``[programs]``, the ``meta`` row (list element) of every program.
  Programs are numbered group after group, and within a group in list order; element i
  owns the programs ``first_i, ..., first_i + programs_i - 1``.
* Groups: the elements sharing (dtype of x / grad, dtype of grad_prev, 16-byte alignment
  of all their pointers); a kernel is compiled per dtype pair, so each group is one
  launch over its range of programs. The alignment flag only lets the compiler vectorise
  (``tl.multiple_of``); it changes no result.

``dots_list`` is bit-identical to the single-tensor op applied per element and summed in
list order, ``((r_0 + r_1) + r_2) + ...``: program ``first_i + p`` computes exactly what
program ``p`` of the single-tensor reduction computes for element i (same grid-stride
tiles, same per-lane fp64 fold and lane tree:
:func:`~elra_fused.triton_kernels._dots_program`), and writes it to slot ``first_i + p``
of one ``[programs, 2]`` float64 buffer; so each element owns a contiguous slot range of
the same length as the single op's slot buffer. A finishing kernel (one program per
element) reduces each range with the single op's stage 2
(:func:`~elra_fused.triton_kernels._fold_slots`, over a block as wide as the list's
widest element needs: the same bits as the single op's own width), and a last
one-program kernel adds the per-element results in list order. Both reduction stages are
halving trees whose order does not depend on the compiler's layouts, so "same program"
means "same bits" on CUDA as well as in the interpreter. (That is why the single op
finishes with a Triton tree rather than ``partials.sum(dim=0)``: torch's summation order
-- CPU vector width, CUDA block shape -- cannot be reproduced for many tensors in one
launch, nor could a plain ``tl.sum`` of the lanes be trusted to add in the same order in
two kernels whose pointers the compiler sees with different alignment.) Launches: one
per group, plus two.

The updates are elementwise: any split of the work gives the single op's bits, as long as
each element goes through the same math (:func:`~elra_fused.triton_kernels._update_block`).
A program updates :data:`UPDATE_TILES_PER_PROGRAM` tiles of its element (a smaller owner
table than one program per tile). One launch per group.

Host cost: on CUDA the table is built on the host and copied without blocking (pinned
memory); tables are cached by the lists' (data_ptr, numel, dtype) tuples
(:data:`TABLE_CACHE_SIZE` most recent, :func:`table_cache_info`), so a steady-state
optimizer step (the same buffers every step; swap mode alternates two orders) copies
nothing to the device. A table is a function of its key alone, so a key that comes back
after its buffers were freed and reallocated at the same addresses still fits.

Per-element path (the single op per element, :mod:`elra_fused.ops.lists`) where one launch
could not be equivalent or safe: ``dots_list`` over elements on several devices (adding
their results then fails as it always has; the update ops' validation already puts every
element on the coefficients' device), update lists whose elements share memory across
elements (the per-element order then matters; one launch would race), CUDA graph capture
and the interpreter on GPU tensors (see :func:`_table_unusable`). Each element is
validated by the op wrapper before anything runs, whichever path follows.

Inputs are validated by the op wrappers (``elra_fused::triton_*_list*``,
:func:`elra_fused.ops.validation.validated`): every element, all before the first write.
Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1``, where the interpreter turns the
int64 addresses into pointers by a bit cast (``create_int_to_ptr``) and reads CPU memory
through them directly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import triton_kernels as tk
from .ops.lists import dots_list_of, update_list_of
from .triton_kernels import _dots_program, _fold_slots, _update_block

#: Most recent tables kept (per op kind together): a step uses one dots and one update
#: table per segment (wd group and device); swap mode alternates the roles of grad and
#: grad_prev, so two of each. 64 covers 16 segments (a table of ~200 elements: ~10 KB).
TABLE_CACHE_SIZE = 64
#: Tiles of BLOCK_SIZE elements one update program handles (the owner table has one
#: int32 per program: 1 byte per 1024 parameters).
UPDATE_TILES_PER_PROGRAM = 4
#: Per-element results the list-order fold loads per loop iteration (independent loads
#: issued together; the additions stay sequential, so the bits do not depend on it). The
#: interpreter pays per operation, and 1 spends none on the masked-off tail.
FOLD_UNROLL = 1 if tk.INTERPRETED else 16
#: Bytes of alignment the vectorising hint (tl.multiple_of) asserts of a group's pointers.
_ALIGNMENT = tl.constexpr(16)
ALIGNMENT = _ALIGNMENT.value

# Columns of the meta table (kernel-visible constants).
META_COLS = tl.constexpr(7)
COL_PTR0 = tl.constexpr(0)
COL_PTR1 = tl.constexpr(1)
COL_PTR2 = tl.constexpr(2)
COL_N = tl.constexpr(3)
COL_TILES = tl.constexpr(4)
COL_FIRST = tl.constexpr(5)
COL_PROGRAMS = tl.constexpr(6)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

Tensors = Sequence[torch.Tensor]


# ======================================================================================
# Kernels
# ======================================================================================
@triton.jit
def _table_pointer(
    row_ptr,  # *i64: one meta row
    COL: tl.constexpr,  # column holding the address
    TY: tl.constexpr,  # element dtype of the tensor
    ALIGNED: tl.constexpr,  # the host checked the address is a multiple of _ALIGNMENT
):
    """The typed pointer of one tensor of the row."""
    ptr = tl.load(row_ptr + COL).to(tl.pointer_type(TY))
    if ALIGNED:
        # Compiled kernels know nothing of an address read from memory; the host checked
        # it, and 16-byte loads need it. (A no-op in the interpreter.)
        ptr = tl.multiple_of(ptr, _ALIGNMENT)
    return ptr


@triton.jit(do_not_specialize=["first_program"])
def _dots_list_partial_kernel(
    meta_ptr,  # *i64 [elements, META_COLS]
    owner_ptr,  # *i32 [programs]: meta row of each program
    partials_ptr,  # *fp64 [programs, 2]: program s writes slot s
    first_program,  # the group's first program
    G_TY: tl.constexpr,  # dtype of grad
    S_TY: tl.constexpr,  # dtype of grad_prev (G_TY or bf16)
    ALIGNED: tl.constexpr,  # every pointer of the group is 16-byte aligned
    BF16_BITS: tl.constexpr,  # widen bf16 loads with integer ops (BF16_BY_BITS)
    BLOCK: tl.constexpr,  # elements per tile (BLOCK_SIZE, as the single kernel)
    LOG2_BLOCK: tl.constexpr,
):
    slot = first_program + tl.program_id(0).to(tl.int64)
    row = meta_ptr + tl.load(owner_ptr + slot).to(tl.int64) * META_COLS
    g_ptr = _table_pointer(row, COL_PTR0, G_TY, ALIGNED)
    a_ptr = _table_pointer(row, COL_PTR1, S_TY, ALIGNED)
    # Program p = slot - first of this element: the single kernel's program p.
    gg, gpg = _dots_program(
        g_ptr,
        a_ptr,
        g_ptr,
        None,  # no coefficients in standard mode
        tl.load(row + COL_N),
        tl.load(row + COL_TILES),
        slot - tl.load(row + COL_FIRST),
        tl.load(row + COL_PROGRAMS),
        False,  # RECOVER
        True,  # FULL_TILES_CONST_MASK: n is read from the table, unknown to the compiler
        BF16_BITS,
        BLOCK,
        LOG2_BLOCK,
    )
    tl.store(partials_ptr + 2 * slot, gg)
    tl.store(partials_ptr + 2 * slot + 1, gpg)


@triton.jit
def _dots_list_finish_kernel(
    meta_ptr,  # *i64 [elements, META_COLS]
    partials_ptr,  # *fp64 [programs, 2]
    results_ptr,  # *fp64 [elements, 2]: program i writes element i's [<G, G>, <G_prev, G>]
    LOG2_SLOTS: tl.constexpr,  # a block holding every element's slots (see _fold_slots)
):
    i = tl.program_id(0).to(tl.int64)
    row = meta_ptr + i * META_COLS
    first = tl.load(row + COL_FIRST)
    gg, gpg = _fold_slots(partials_ptr, first, tl.load(row + COL_PROGRAMS), LOG2_SLOTS)
    tl.store(results_ptr + 2 * i, gg)
    tl.store(results_ptr + 2 * i + 1, gpg)


@triton.jit(do_not_specialize=["count"])
def _dots_list_fold_kernel(
    results_ptr,  # *fp64 [count, 2]
    out_ptr,  # *fp64 [2]
    count,  # number of elements (>= 1)
    UNROLL: tl.constexpr,
):
    """``out = ((r_0 + r_1) + r_2) + ...``: the list order of the per-element path."""
    gg = tl.load(results_ptr)
    gpg = tl.load(results_ptr + 1)
    for base in range(1, count, UNROLL):
        for k in tl.static_range(UNROLL):
            i = base + k
            inside = i < count
            r_gg = tl.load(results_ptr + 2 * i, mask=inside, other=0.0)
            r_gpg = tl.load(results_ptr + 2 * i + 1, mask=inside, other=0.0)
            # A select, not "+ 0.0": past the end the sum is left exactly as it is.
            gg = tl.where(inside, gg + r_gg, gg)
            gpg = tl.where(inside, gpg + r_gpg, gpg)
    tl.store(out_ptr, gg)
    tl.store(out_ptr + 1, gpg)


@triton.jit(do_not_specialize=["first_program"])
def _update_list_kernel(
    meta_ptr,  # *i64 [elements, META_COLS]: pointers (x, grad, grad_prev)
    owner_ptr,  # *i32 [programs]: meta row of each program
    coeffs_ptr,  # *fp64 [accept, decay, step, back], shared by the list
    first_program,  # the group's first program
    X_TY: tl.constexpr,  # dtype of x and grad
    S_TY: tl.constexpr,  # dtype of grad_prev (X_TY, or bf16 for update_list_)
    SWAP: tl.constexpr,  # update_swap_list_
    STATE_CONVERT: tl.constexpr,  # S_TY != X_TY
    ALIGNED: tl.constexpr,  # every pointer of the group is 16-byte aligned
    BF16_BITS: tl.constexpr,  # round bf16 stores with integer ops (BF16_BY_BITS)
    BLOCK: tl.constexpr,  # elements per tile
    TILES_PER_PROGRAM: tl.constexpr,
):
    prog = first_program + tl.program_id(0).to(tl.int64)
    row = meta_ptr + tl.load(owner_ptr + prog).to(tl.int64) * META_COLS
    x_ptr = _table_pointer(row, COL_PTR0, X_TY, ALIGNED)
    g_ptr = _table_pointer(row, COL_PTR1, X_TY, ALIGNED)
    o_ptr = _table_pointer(row, COL_PTR2, S_TY, ALIGNED)
    n = tl.load(row + COL_N)
    first_tile = (prog - tl.load(row + COL_FIRST)) * TILES_PER_PROGRAM
    end_tile = tl.minimum(first_tile + TILES_PER_PROGRAM, tl.load(row + COL_TILES))
    for tile in range(first_tile, end_tile):
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        # Full tiles without a mask: n comes from the table, so a mask would keep the
        # compiler from vectorising (the elements and their bits are the same).
        if (tile + 1) * BLOCK <= n:
            _update_block(
                x_ptr, g_ptr, o_ptr, coeffs_ptr, offs, None, False, SWAP, STATE_CONVERT, BF16_BITS
            )
        else:
            _update_block(
                x_ptr,
                g_ptr,
                o_ptr,
                coeffs_ptr,
                offs,
                offs < n,
                False,
                SWAP,
                STATE_CONVERT,
                BF16_BITS,
            )


# ======================================================================================
# Tables
# ======================================================================================
#: One list element as the table sees it: (ptr0, ptr1, ptr2, numel, dtype, state dtype).
Row = tuple[int, int, int, int, torch.dtype, torch.dtype]


@dataclass(frozen=True)
class Group:
    """One launch: programs ``[first, first + programs)``, whose elements share the
    dtypes and the alignment flag."""

    dtype: torch.dtype  # of x / grad
    state_dtype: torch.dtype  # of grad_prev
    aligned: bool
    first: int
    programs: int


@dataclass(frozen=True)
class Table:
    """The device tables of one list (see the module docstring for the layout);
    ``per_element`` (and no tensors) where the list takes the per-element path."""

    meta: torch.Tensor | None
    owner: torch.Tensor | None
    groups: tuple[Group, ...]
    programs: int
    max_programs: int = 0  # of one element
    per_element: bool = False
    # CUDA: the stream the copy was issued on, and an event recorded after it.
    stream: torch.cuda.Stream | None = None
    ready: torch.cuda.Event | None = None


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int
    maxsize: int


class _TableCache:
    """A small LRU cache of :class:`Table` by key (the lists' (data_ptr, numel, dtype)
    tuples and what else decides the table).

    One cache serves every optimizer in the process, and threads may step theirs at the
    same time (one model per thread, a trainer's background thread): a lock keeps the
    LRU order and the eviction consistent (an ``OrderedDict`` reordered by two threads at
    once can raise or lose entries). Builds run under it too, so two threads asking for
    the same new table build it once."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._tables: OrderedDict[Hashable, Table] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable, build: Callable[[], Table]) -> Table:
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self.hits += 1
                self._tables.move_to_end(key)
                return table
            self.misses += 1
            table = self._tables[key] = build()
            while len(self._tables) > self.maxsize:
                self._tables.popitem(last=False)
            return table

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()
            self.hits = self.misses = 0


_CACHE = _TableCache(TABLE_CACHE_SIZE)


def table_cache_info() -> CacheInfo:
    """Hits, misses (= tables built) and size of the table cache."""
    return CacheInfo(_CACHE.hits, _CACHE.misses, len(_CACHE._tables), _CACHE.maxsize)


def clear_table_cache() -> None:
    """Drop every cached table (and reset the counters)."""
    _CACHE.clear()


def _update_programs(n: int) -> tuple[int, int]:
    """(programs, tiles) of an update element; an empty one has no program."""
    tiles = -(-n // tk.BLOCK_SIZE)
    return -(-tiles // UPDATE_TILES_PER_PROGRAM), tiles


def _share_memory(rows: Sequence[Row]) -> bool:
    """Do the byte ranges of two non-empty tensors overlap? (Within one element the
    validation rejected it already, so an overlap is between elements.)"""
    spans = []
    for p0, p1, p2, n, dtype, state_dtype in rows:
        if n == 0:
            continue
        size, state_size = n * dtype.itemsize, n * state_dtype.itemsize
        spans += [(p0, p0 + size), (p1, p1 + size), (p2, p2 + state_size)]
    spans.sort()
    end = None
    for start, stop in spans:
        if end is not None and start < end:
            return True
        end = stop if end is None else max(end, stop)
    return False


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CUDA: pinned memory and a non-blocking copy (the host does not wait). Pinning
    needs a GPU (``pin_memory`` raises without one), hence only on CUDA."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def build_table(
    rows: Sequence[Row], device: torch.device, programs_of: Callable[[int], tuple[int, int]]
) -> Table:
    """The :class:`Table` of ``rows`` (in list order); ``programs_of(n)`` gives an
    element's (programs, tiles)."""
    groups: dict[tuple[torch.dtype, torch.dtype, bool], list[int]] = {}
    for i, (p0, p1, p2, _, dtype, state_dtype) in enumerate(rows):
        aligned = (p0 | p1 | p2) % ALIGNMENT == 0
        groups.setdefault((dtype, state_dtype, aligned), []).append(i)
    meta = [[0] * 7 for _ in rows]
    owner_rows: list[int] = []
    owner_counts: list[int] = []
    launches = []
    first = 0
    for (dtype, state_dtype, aligned), members in groups.items():
        group_first = first
        for i in members:
            p0, p1, p2, n, _, _ = rows[i]
            programs, tiles = programs_of(n)
            meta[i] = [p0, p1, p2, n, tiles, first, programs]
            owner_rows.append(i)
            owner_counts.append(programs)
            first += programs
        if first > group_first:
            launches.append(Group(dtype, state_dtype, aligned, group_first, first - group_first))
    owner = torch.repeat_interleave(
        torch.tensor(owner_rows, dtype=torch.int32), torch.tensor(owner_counts, dtype=torch.int64)
    )
    meta_t = torch.tensor(meta, dtype=torch.int64)
    widest = max(owner_counts, default=0)
    if device.type != "cuda":
        return Table(meta_t.to(device), owner.to(device), tuple(launches), first, widest)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        meta_d, owner_d = _to_device(meta_t, device), _to_device(owner, device)
        ready = torch.cuda.Event()
        ready.record(stream)
    return Table(meta_d, owner_d, tuple(launches), first, widest, stream=stream, ready=ready)


def _on_current_stream(table: Table, device: torch.device) -> None:
    """A cached table used on another CUDA stream than the one its copy was issued on:
    that stream waits for the copy (on the device, not the host), and the allocator keeps
    the tables for it."""
    if table.stream is None or table.ready is None:
        return
    current = torch.cuda.current_stream(device)
    if current != table.stream:
        current.wait_event(table.ready)
        for t in (table.meta, table.owner):
            if t is not None:
                t.record_stream(current)


def _table_unusable(device: torch.device) -> bool:
    """Must the list take the per-element path on ``device``?

    * The interpreter on a GPU tensor: it copies a kernel's tensor arguments to the host,
      but not the tensors behind a table, whose device addresses the host cannot read.
    * CUDA graph capture: a graph replays its launches without the per-launch cost anyway,
      and it would bake in the addresses of cached tables that the cache may later free
      (and a table built during capture would be copied from a pinned buffer at every
      replay).
    """
    if device.type == "cpu":
        return False
    if tk.INTERPRETED:
        return True
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):  # the capture state of that device's current stream
        return torch.cuda.is_current_stream_capturing()


# ======================================================================================
# Ops
# ======================================================================================
_dots_per_element = dots_list_of(tk.dots)
_update_per_element = update_list_of("update_list_", tk.update_)
_update_swap_per_element = update_list_of("update_swap_list_", tk.update_swap_)


def dots_list(grad: Tensors, grad_prev: Tensors) -> torch.Tensor:
    """float64 ``[<G, G>, <G_prev, G>]`` summed over the list, in list order."""
    device = grad[0].device
    if _table_unusable(device) or any(g.device != device for g in grad):
        return _dots_per_element(grad, grad_prev)
    rows = tuple(
        (g.data_ptr(), gp.data_ptr(), g.data_ptr(), g.numel(), g.dtype, gp.dtype)
        for g, gp in zip(grad, grad_prev, strict=True)
    )
    key = ("dots", device, tk.BLOCK_SIZE, tk.MAX_REDUCE_PROGRAMS, rows)
    table = _CACHE.get(key, lambda: build_table(rows, device, tk._dots_grid))
    _on_current_stream(table, device)
    partials = torch.empty((table.programs, 2), dtype=torch.float64, device=device)
    results = torch.empty((len(rows), 2), dtype=torch.float64, device=device)
    out = torch.empty(2, dtype=torch.float64, device=device)
    with tk._device_guard(grad[0]):
        for group in table.groups:
            _dots_list_partial_kernel[(group.programs,)](
                table.meta,
                table.owner,
                partials,
                group.first,
                G_TY=_TL_DTYPES[group.dtype],
                S_TY=_TL_DTYPES[group.state_dtype],
                ALIGNED=group.aligned,
                BF16_BITS=tk.BF16_BY_BITS,
                BLOCK=tk.BLOCK_SIZE,
                LOG2_BLOCK=tk._log2(tk.BLOCK_SIZE),
                num_warps=tk.NUM_WARPS,
            )
        _dots_list_finish_kernel[(len(rows),)](
            table.meta,
            partials,
            results,
            LOG2_SLOTS=tk._slots_log2(table.max_programs),
            num_warps=tk.NUM_WARPS,
        )
        _dots_list_fold_kernel[(1,)](results, out, len(rows), UNROLL=FOLD_UNROLL, num_warps=1)
    return out


def _update_list(
    x: Tensors,
    grad: Tensors,
    grad_prev: Tensors,
    coeffs: torch.Tensor,
    swap: bool,
    per_element: Callable[..., None],
) -> None:
    # The validation put every element on coeffs' device.
    device = coeffs.device
    if _table_unusable(device):
        per_element(x, grad, grad_prev, coeffs)
        return
    rows = tuple(
        (t.data_ptr(), g.data_ptr(), gp.data_ptr(), t.numel(), t.dtype, gp.dtype)
        for t, g, gp in zip(x, grad, grad_prev, strict=True)
    )
    key = ("update", device, tk.BLOCK_SIZE, UPDATE_TILES_PER_PROGRAM, rows)

    def build() -> Table:
        if _share_memory(rows):
            return Table(None, None, (), 0, per_element=True)
        return build_table(rows, device, _update_programs)

    table = _CACHE.get(key, build)
    if table.per_element:
        per_element(x, grad, grad_prev, coeffs)
        return
    _on_current_stream(table, device)
    with tk._device_guard(coeffs):
        for group in table.groups:
            _update_list_kernel[(group.programs,)](
                table.meta,
                table.owner,
                coeffs,
                group.first,
                X_TY=_TL_DTYPES[group.dtype],
                S_TY=_TL_DTYPES[group.state_dtype],
                SWAP=swap,
                STATE_CONVERT=group.state_dtype != group.dtype,
                ALIGNED=group.aligned,
                BF16_BITS=tk.BF16_BY_BITS,
                BLOCK=tk.BLOCK_SIZE,
                TILES_PER_PROGRAM=UPDATE_TILES_PER_PROGRAM,
                num_warps=tk.NUM_WARPS,
                enable_fp_fusion=tk.UPDATE_FP_FUSION,
            )


def update_list_(x: Tensors, grad: Tensors, grad_prev: Tensors, coeffs: torch.Tensor) -> None:
    """Standard-mode update of every element in place (see ``triton_kernels.update_``);
    ``grad_prev`` elements may be the compact bf16 state."""
    _update_list(x, grad, grad_prev, coeffs, False, _update_per_element)


def update_swap_list_(x: Tensors, grad: Tensors, grad_prev: Tensors, coeffs: torch.Tensor) -> None:
    """Swap-mode update of every element in place (see ``triton_kernels.update_swap_``)."""
    _update_list(x, grad, grad_prev, coeffs, True, _update_swap_per_element)
