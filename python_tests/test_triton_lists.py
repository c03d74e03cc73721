"""Triton tensor-list ops (``elra_fused.triton_lists``): one launch per dtype group over a
table of the list, bit-identical to the single-tensor triton ops applied per element (and
summed in list order), within the reference's tolerance, validated all-or-nothing, and
the table cached so that a repeated call builds nothing.

On the CPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), so
the lists are long (to span groups, odd sizes, empty and 0-d elements) but small.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch
from _backends import CUDA_MARKS, DEVICES, kernels_or_skip
from _ops_common import (
    ACCEPT,
    ACCEPT_IDS,
    RETRACE,
    STATE,
    assert_close_elementwise,
    assert_dots_agree,
    dots_tol,
    gen_for,
    update_coeffs,
    update_envelope,
)

from elra_fused.ops.cases import rand

tls = pytest.importorskip("elra_fused.triton_lists")
tk = pytest.importorskip("elra_fused.triton_kernels")

BLOCK = tk.BLOCK_SIZE
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Parameter-like shapes with odd sizes: 0-d, empty, under / at / over a tile, a matrix,
# and one of 6 tiles (two update programs, 6 reduction programs).
SHAPES = (
    (),
    (0,),
    (1,),
    (7,),
    (33, 17),
    (BLOCK - 1,),
    (BLOCK + 1,),
    (3, 0),
    (2 * BLOCK + 5,),
    (5 * BLOCK + 2,),
)
#: Elements per test list (several per group, every shape with every dtype).
COUNT = 61


def _tensor(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
    misaligned: bool,
) -> torch.Tensor:
    """Fresh values of ``shape``; ``misaligned``: a view starting one element into its
    buffer (not 16-byte aligned: a group of its own)."""
    n = torch.Size(shape).numel()
    values = rand(n, dtype, device, gen)
    if not misaligned:
        return values.view(shape)
    buf = torch.zeros(n + 1, dtype=dtype, device=device)
    buf[1:] = values
    return buf[1:].view(shape)


def _lists(
    count: int, device: str, gen: torch.Generator, compact: bool, shapes=SHAPES
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """x, grad, grad_prev lists of ``count`` elements cycling over shapes and dtypes;
    every 7th element misaligned; ``compact``: every other grad_prev is bf16."""
    xs, grads, prevs = [], [], []
    cycle = itertools.cycle(itertools.product(shapes, DTYPES))
    for i in range(count):
        shape, dtype = next(cycle)
        odd = i % 7 == 3
        state = STATE if compact and i % 2 == 0 else dtype
        xs.append(_tensor(shape, dtype, device, gen, odd))
        grads.append(_tensor(shape, dtype, device, gen, odd))
        prevs.append(_tensor(shape, state, device, gen, odd))
    return xs, grads, prevs


def _clone(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies at the same offset into a fresh buffer: a misaligned view stays misaligned."""
    out = []
    for t in ts:
        offset = t.storage_offset()
        buf = torch.empty(offset + t.numel(), dtype=t.dtype, device=t.device)
        out.append(buf[offset:].view(t.shape).copy_(t))
    return out


def _single_dots(k, grads: list[torch.Tensor], prevs: list[torch.Tensor]) -> torch.Tensor:
    """The per-element path: the single op per element, added in list order."""
    total = k.dots(grads[0].view(-1), prevs[0].view(-1))
    for g, gp in zip(grads[1:], prevs[1:], strict=True):
        total = total + k.dots(g.view(-1), gp.view(-1))
    return total


def _flat_double(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in ts])


class _CountLaunches:
    """Wraps a jitted kernel: counts ``kernel[grid](...)`` launches, then runs them."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.grids: list[tuple] = []

    def __getitem__(self, grid: tuple):
        self.grids.append(grid)
        return self.kernel[grid]


def _groups(rows) -> set:
    return {
        (x.dtype, gp.dtype, all(t.data_ptr() % 16 == 0 for t in (x, g, gp)))
        for x, g, gp in rows
        if x.numel() > 0
    }


@pytest.mark.parametrize("device", DEVICES)
def test_dots_list_is_the_single_op_in_list_order(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mixed dtypes, compact and full grad_prev, 0-d / empty / misaligned elements: the
    per-element single-op results added in list order, bit for bit; one partial launch
    per (dtype, state dtype, alignment) group; within the reference's tolerance."""
    k = kernels_or_skip("triton", device)
    _, grads, prevs = _lists(COUNT, device, gen_for("dots_list", device), compact=True)
    partial = _CountLaunches(tls._dots_list_partial_kernel)
    monkeypatch.setattr(tls, "_dots_list_partial_kernel", partial)
    out = k.dots_list(grads, prevs)
    expected = _single_dots(k, grads, prevs)
    assert torch.equal(out, expected), (out, expected)
    groups = {
        (g.dtype, gp.dtype, g.data_ptr() % 16 == 0 and gp.data_ptr() % 16 == 0)
        for g, gp in zip(grads, prevs, strict=True)
    }
    assert len(partial.grids) == len(groups) > 4
    ref = kernels_or_skip("reference", device).dots_list(grads, prevs)
    assert_dots_agree(out, ref, dots_tol(_flat_double(grads), _flat_double(prevs)))


@pytest.mark.parametrize("device", DEVICES)
def test_dots_list_many_tiles_per_program(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cap of 3 programs per element: each list program visits several tiles
    (grid-stride, masked tail) and the finish reduces 3 slots in a block of 4, as the
    single op does; the same bits again."""
    k = kernels_or_skip("triton", device)
    monkeypatch.setattr(tk, "MAX_REDUCE_PROGRAMS", 3)
    gen = gen_for("dots_list tiles", device)
    shapes = ((7 * BLOCK + 3,), (2 * BLOCK,), (), (5, BLOCK + 1), (0,))
    _, grads, prevs = _lists(len(shapes) * 3, device, gen, compact=True, shapes=shapes)
    assert tk._dots_grid(grads[0].numel())[0] == 3
    out = k.dots_list(grads, prevs)
    assert torch.equal(out, _single_dots(k, grads, prevs))
    ref = kernels_or_skip("reference", device).dots_list(grads, prevs)
    assert_dots_agree(out, ref, dots_tol(_flat_double(grads), _flat_double(prevs)))


@pytest.mark.parametrize("accept", **ACCEPT_IDS)
@pytest.mark.parametrize(
    ("op", "single", "compact"),
    [("update_list_", "update_", True), ("update_swap_list_", "update_swap_", False)],
    ids=["update_list_", "update_swap_list_"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_update_lists_are_the_single_op_per_element(
    device: str, op: str, single: str, compact: bool, accept: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every written tensor equals the single op's result per element, bit for bit (the
    accept and the retrace branch; compact bf16 state in update_list_); one launch per
    group; within the reference's tolerance."""
    k = kernels_or_skip("triton", device)
    xs, grads, prevs = _lists(COUNT, device, gen_for(op, device, accept), compact=compact)
    c = update_coeffs(accept, device)
    launches = _CountLaunches(tls._update_list_kernel)
    monkeypatch.setattr(tls, "_update_list_kernel", launches)

    got = [_clone(ts) for ts in (xs, grads, prevs)]
    getattr(k, op)(*got, c)
    want = [_clone(ts) for ts in (xs, grads, prevs)]
    for row in zip(*want, strict=True):
        getattr(k, single)(*(t.view(-1) for t in row), c)
    for name, g_list, w_list in zip(("x", "grad", "grad_prev"), got, want, strict=True):
        for i, (a, b) in enumerate(zip(g_list, w_list, strict=True)):
            assert torch.equal(a, b), f"{op}: {name}[{i}] differs from the single op"
    assert len(launches.grids) == len(_groups(zip(*got, strict=True))) > 4
    assert sum(grid[0] for grid in launches.grids) > sum(1 for x in xs if x.numel())

    ref = [_clone(ts) for ts in (xs, grads, prevs)]
    getattr(kernels_or_skip("reference", device), op)(*ref, c)
    for x0, g0, gp0, x_out, x_ref in zip(xs, grads, prevs, got[0], ref[0], strict=True):
        envelope = update_envelope(accept, x0, g0, gp0)
        assert_close_elementwise(x_out, x_ref, envelope, x0.dtype)
    # Written state: grad_prev <- grad (accept, standard), grad <- grad_prev (swap retrace):
    # copies, rounded to the state's dtype at most once, as torch rounds.
    for out_list, ref_list in ((got[1], ref[1]), (got[2], ref[2])):
        for a, b in zip(out_list, ref_list, strict=True):
            assert torch.equal(a, b)


def test_shared_memory_between_elements_takes_the_per_element_path() -> None:
    """The same x twice in a list: one launch would race, so the elements are updated
    one after the other, exactly as the per-element path does (the second sees the
    first's result)."""
    k = kernels_or_skip("triton", "cpu")
    gen = gen_for("shared", "cpu")
    x = rand(BLOCK + 9, torch.float32, "cpu", gen)
    grads = [rand(BLOCK + 9, torch.float32, "cpu", gen) for _ in range(2)]
    prevs = [rand(BLOCK + 9, torch.float32, "cpu", gen) for _ in range(2)]
    c = update_coeffs(ACCEPT, "cpu")
    expected, p_exp = x.clone(), _clone(prevs)
    for g, gp in zip(grads, p_exp, strict=True):
        k.update_(expected, g, gp, c)
    p_got = _clone(prevs)
    k.update_list_([x, x], grads, p_got, c)
    assert torch.equal(x, expected)
    assert all(torch.equal(a, b) for a, b in zip(p_got, p_exp, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_small_lists(device: str) -> None:
    """One element; only empty elements (no update program at all); a 0-d element."""
    k = kernels_or_skip("triton", device)
    gen = gen_for("small lists", device)
    c = update_coeffs(ACCEPT, device)
    for shapes in (((5,),), ((0,), (2, 0)), ((),)):
        xs, grads, prevs = _lists(len(shapes), device, gen, compact=False, shapes=shapes)
        assert torch.equal(k.dots_list(grads, prevs), _single_dots(k, grads, prevs))
        got, want = _clone(xs), _clone(xs)
        k.update_list_(got, grads, _clone(prevs), c)
        for x, g, gp in zip(want, grads, _clone(prevs), strict=True):
            k.update_(x.view(-1), g.view(-1), gp.view(-1), c)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_bad_last_element_leaves_every_element_untouched() -> None:
    """Validation runs over the whole list before the first launch."""
    k = kernels_or_skip("triton", "cpu")
    gen = gen_for("bad last", "cpu")
    c = update_coeffs(ACCEPT, "cpu")
    for bad, error, match in (
        (lambda g: torch.zeros(g.numel() + 1, dtype=g.dtype), ValueError, "elements"),
        (lambda g: torch.zeros(g.shape, dtype=torch.float64), TypeError, "dtype"),
    ):
        xs, grads, prevs = _lists(45, "cpu", gen, compact=False)
        grads[-1] = bad(grads[-1])
        match = f"{match}.*list element 44"
        before = [t.clone() for t in (*xs, *grads, *prevs)]
        for op in ("update_list_", "update_swap_list_"):
            with pytest.raises(error, match=match):
                getattr(k, op)(xs, grads, prevs, c)
        with pytest.raises(error, match=match):
            k.dots_list(grads, prevs)
        after = (*xs, *grads, *prevs)
        assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_a_repeated_call_reuses_the_cached_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same lists again (the steady-state step): no table is built, so nothing is
    copied to the device; new buffers (another address) build a new one."""
    k = kernels_or_skip("triton", "cpu")
    tls.clear_table_cache()
    builds: list[int] = []
    build = tls.build_table

    def counting(*args, **kwargs):
        builds.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(tls, "build_table", counting)
    xs, grads, prevs = _lists(12, "cpu", gen_for("cache", "cpu"), compact=True)
    c = update_coeffs(RETRACE, "cpu")  # writes x only: the dots stay the same
    first = k.dots_list(grads, prevs)
    k.update_list_(xs, grads, prevs, c)
    assert len(builds) == 2
    info = tls.table_cache_info()
    assert (info.hits, info.misses, info.size) == (0, 2, 2)

    assert torch.equal(k.dots_list(grads, prevs), first)
    k.update_list_(xs, grads, prevs, c)
    assert len(builds) == 2
    assert tls.table_cache_info().hits == 2

    k.dots_list(_clone(grads), prevs)  # new addresses: a new table
    assert len(builds) == 3
    for _ in range(2 * tls.TABLE_CACHE_SIZE):  # bounded
        k.dots_list(_clone(grads[:2]), prevs[:2])
    assert tls.table_cache_info().size == tls.TABLE_CACHE_SIZE


def test_the_table_cache_is_shared_safely_between_threads() -> None:
    """Optimizers stepped from several threads share the cache: a table asked for by
    several threads at once is built once, and concurrent lookups and evictions keep the
    LRU bounded and its counters exact."""
    cache = tls._TableCache(maxsize=3)
    builds: list[int] = []
    start = threading.Barrier(4)

    def build(key: int) -> tls.Table:
        builds.append(key)
        time.sleep(0.01)  # a slow build: every thread arrives while it runs
        return tls.Table(None, None, (), key)

    def ask(key: int) -> None:
        start.wait()
        assert cache.get(key, lambda: build(key)).programs == key

    threads = [threading.Thread(target=ask, args=(7,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == [7]
    assert (cache.hits, cache.misses) == (3, 1)

    errors: list[BaseException] = []

    def churn(offset: int) -> None:
        try:
            for i in range(300):
                key = offset + i % 5
                cache.get(key, lambda k=key: tls.Table(None, None, (), k))
        except BaseException as exc:  # reported below, from the main thread
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(100 * n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(cache._tables) == 3
    assert cache.hits + cache.misses == 4 + 4 * 300


@pytest.mark.parametrize("accept", **ACCEPT_IDS)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_MARKS, id="cuda")])
def test_cuda_two_hundred_parameters(device: str, accept: bool) -> None:
    """The FSDP2 / per-parameter case on a GPU: ~200 tensors of transformer-like shapes,
    mixed dtypes and compact state. Bit-identical to the single ops per element (the
    reduction trees make this hold compiled too), the reference's tolerance, and a second
    call served from the cache."""
    k = kernels_or_skip("triton", device)
    gen = gen_for("cuda 200", accept)
    shapes = ((256, 256), (256,), (1024, 256), (256, 1024), (1024,), (), (13, 257), (0,))
    xs, grads, prevs = _lists(203, device, gen, compact=True, shapes=shapes)
    c = update_coeffs(accept, device)

    out = k.dots_list(grads, prevs)
    torch.cuda.synchronize()
    assert torch.equal(out, _single_dots(k, grads, prevs))
    ref = kernels_or_skip("reference", device).dots_list(grads, prevs)
    assert_dots_agree(out, ref, dots_tol(_flat_double(grads), _flat_double(prevs)))
    hits = tls.table_cache_info().hits
    assert torch.equal(k.dots_list(grads, prevs), out)
    assert tls.table_cache_info().hits == hits + 1

    for op, single, state in (
        ("update_list_", "update_", prevs),
        (
            "update_swap_list_",
            "update_swap_",
            [p.to(x.dtype) for p, x in zip(prevs, xs, strict=True)],
        ),
    ):
        got = [_clone(ts) for ts in (xs, grads, state)]
        getattr(k, op)(*got, c)
        want = [_clone(ts) for ts in (xs, grads, state)]
        for row in zip(*want, strict=True):
            getattr(k, single)(*(t.view(-1) for t in row), c)
        for a, b in zip(itertools.chain(*got), itertools.chain(*want), strict=True):
            assert torch.equal(a, b), op


def test_the_interpreted_tree_adds_as_the_compiled_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reduction trees have two forms of the same additions (tl.split under the
    interpreter, tl.sum over an axis of 2 when compiled): both give the same bits, so the
    interpreted tests check the order the compiled kernels add in."""
    k = kernels_or_skip("triton", "cpu")
    monkeypatch.setattr(tk, "MAX_REDUCE_PROGRAMS", 3)
    gen = gen_for("tree forms")
    shapes = ((5 * BLOCK + 3,), (BLOCK - 1,), ())
    _, grads, prevs = _lists(len(shapes) * 3, "cpu", gen, compact=True, shapes=shapes)
    results = {}
    for by_split in (True, False):
        monkeypatch.setattr(tk, "TREE_BY_SPLIT", by_split)
        results[by_split] = (
            k.dots(grads[0].view(-1), prevs[0].view(-1)),
            k.dots_list(grads, prevs),
        )
    for a, b in zip(results[True], results[False], strict=True):
        assert torch.equal(a, b)
