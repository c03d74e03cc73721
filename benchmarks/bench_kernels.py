"""How close do the fused kernels get to memory bandwidth, and how much faster are they
than the same math done with unfused torch ops?

    python benchmarks/bench_kernels.py --device cpu --json benchmarks/results/kernels_cpu.json
    python benchmarks/bench_kernels.py --device cuda --sizes 1000000 16000000

For each size and op: median wall time over repeats (after warm-up), bytes moved, GB/s,
the fraction of a copy's bandwidth measured in the same run (the practical ceiling of a
streaming kernel), and the speedup over the "torch-unfused" baseline.

Inputs and bytes moved come from the op-case table ``elra_fused.ops.cases.OP_CASES``
(the one the op tests use). Bytes moved are the op's compulsory traffic, counted once per
element of every vector read and every vector written (element size of the storage
dtype; coefficients and the 16-byte result are negligible):

    copy                    read src, write dst                      2 N
    dots                    read G, G_prev                           2 N
    dots_recover            read x_prev, x, G                        3 N
    update_ (accept)        read x, G; write x, G_prev               4 N
    update_ (retrace)       read x, G_prev; write x                  3 N
    update_recover_ (acc.)  read x, G; write x, x_prev               4 N
    update_recover_ (retr.) read x, x_prev; write x                  3 N
    update_swap_ (accept)   read x, G; write x                       3 N

Compact state rows (dtype "float32+bf16state"): G_prev stored as bfloat16 next to
float32 x and G, for the two standard-mode ops that touch it. Bytes are counted per
vector at its own element size (4 bytes for x and G, 2 for G_prev):

    dots                    read G (4), G_prev (2)                   6 N
    update_ (accept)        read x, G; write x (4 each), G_prev (2)  14 N
    update_ (retrace)       read x (4), G_prev (2); write x (4)      10 N

List rows (``dots_list``, ``update_list_``, ``update_swap_list_``: the per-parameter
layout, the CPU default) take the same N elements split over the parameter shapes of a
small transformer (``transformer_shapes``: 4 blocks of width d, about 50 tensors from d
to 4 d^2 elements, the embedding table holding the rest); same bytes as their
single-tensor op. Their unfused baseline is torch's ``_foreach_*`` ops (what Adam's
foreach mode uses) and a per-tensor ``dot``.

The torch-unfused baseline does the same math with separate torch ops, so it actually
moves more bytes (several passes, temporaries); it is scored with the same byte count,
i.e. its GB/s is an *effective* bandwidth and the ratio is a plain time ratio.
Triton is benchmarked on CUDA only: on CPU it runs in the numpy interpreter, which is a
correctness tool, not a performance path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import groupby

import _harness as harness  # also puts the repo root on sys.path
import torch

from elra_fused import ops
from elra_fused.ops.cases import (
    ALPHA_PREV,
    BACK,
    DECAY,
    OP_CASES,
    STEP,
    list_shapes,
    update_coeffs,
)

DEFAULT_SIZES = (1 << 20, 16 << 20, 64 << 20)
DTYPE = torch.float32
#: Compact storage of G_prev (elra_fused.ops.STATE_DTYPE_COMPACT) and its row label.
STATE_DTYPE = torch.bfloat16
FLOAT_LABEL = str(DTYPE).removeprefix("torch.")
MIXED_LABEL = "float32+bf16state"
UNFUSED = "torch-unfused"
#: Transformer blocks the list rows split N over (see ``transformer_shapes``).
LIST_BLOCKS = 4


@dataclass(frozen=True)
class Row:
    """One op row of the table: ``label`` in the table and the JSON, the op of
    ``OP_CASES`` it times, the update branch, and whether it also runs with a bf16
    G_prev."""

    label: str
    op: str
    accept: bool = True
    bf16_state: bool = False


#: Rows of the same op stand together: they share one set of inputs.
ROWS = (
    Row("dots", "dots", bf16_state=True),
    Row("dots_recover", "dots_recover"),
    Row("update_accept", "update_", bf16_state=True),
    Row("update_retrace", "update_", accept=False, bf16_state=True),
    Row("update_recover_accept", "update_recover_"),
    Row("update_recover_retrace", "update_recover_", accept=False),
    # Swap mode: G_prev is not written (the optimizer swaps the buffers' roles instead).
    Row("update_swap_accept", "update_swap_"),
    Row("dots_list", "dots_list"),
    Row("update_list_accept", "update_list_"),
    Row("update_list_retrace", "update_list_", accept=False),
    Row("update_swap_list_accept", "update_swap_list_"),
)


def transformer_shapes(n: int, blocks: int = LIST_BLOCKS) -> list[tuple[int, ...]]:
    """Parameter shapes of a small transformer holding exactly ``n`` elements.

    ``blocks`` blocks of width d (a power of two, about sqrt(n / (16 blocks)), so the
    blocks hold about 3/4 of n): attention qkv and output projection, MLP up and down,
    their biases and two LayerNorms (weight, bias) each; the embedding table (rows of
    d) takes the rest, a vector whatever is left below one row. Too small an ``n`` for
    one block falls back to the op tests' ``list_shapes``.
    """
    d = 2 ** max(3, round(math.log2(math.sqrt(n / (16 * blocks)))))
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    block += [(d,)] * 4  # two LayerNorms: weight and bias
    rest = n - blocks * sum(math.prod(s) for s in block)
    if rest < d:
        return list(list_shapes(n))
    shapes = block * blocks + [(rest // d, d)]
    if rest % d:
        shapes.append((rest % d,))
    return shapes


def make_args(
    op: str,
    n: int,
    state_dtype: torch.dtype | None,
    device: torch.device,
    generator: torch.Generator,
) -> tuple:
    """The op's arguments from the case table (list ops: split over
    ``transformer_shapes``)."""
    case = OP_CASES[op]
    shapes = transformer_shapes(n) if case.is_list else None
    return case.make_inputs(n, DTYPE, device, generator, state_dtype=state_dtype, shapes=shapes)


def with_branch(op: str, args: tuple, accept: bool) -> tuple:
    """``args`` with the coefficients of the accept or the retrace branch (reductions,
    the ops that return their result, have no branch: their ``args`` come back as they
    are)."""
    case = OP_CASES[op]
    if case.returns_tensor:
        return args
    names = case.arg_names
    device = args[names.index("coeffs")].device
    return tuple(
        update_coeffs(accept, device) if name == "coeffs" else a
        for name, a in zip(names, args, strict=True)
    )


def unfused_baseline(label: str, named: Mapping[str, object]) -> Callable[[], object]:
    """The same math as the fused op with plain torch calls (host-side scalars, which is
    the most favourable form for the baseline). With a bf16 G_prev the casts happen
    inside ``to``, ``copy_`` and ``add_``."""
    x, g, gp, xp = (named.get(k) for k in ("x", "grad", "grad_prev", "x_prev"))
    inv_alpha = 1.0 / ALPHA_PREV

    def dots_of_lists() -> torch.Tensor:
        flat_g = [t.reshape(-1) for t in g]
        gg = sum(torch.dot(t, t) for t in flat_g)
        gpg = sum(torch.dot(p.reshape(-1), t) for p, t in zip(gp, flat_g, strict=True))
        return torch.stack([gg, gpg])

    def update_lists(copy_state: bool) -> None:
        if copy_state:
            torch._foreach_copy_(gp, g)
        torch._foreach_mul_(x, DECAY)
        torch._foreach_add_(x, g, alpha=-STEP)

    baselines: dict[str, Callable[[], object]] = {
        "dots": lambda: torch.stack([torch.dot(g, g), torch.dot(gp.to(g.dtype), g)]),
        "dots_recover": lambda: torch.stack(
            [torch.dot(g, g), torch.dot((xp * DECAY - x).mul_(inv_alpha), g)]
        ),
        "update_accept": lambda: (gp.copy_(g), x.mul_(DECAY).add_(g, alpha=-STEP)),
        "update_retrace": lambda: x.add_(gp, alpha=BACK),
        "update_recover_accept": lambda: (xp.copy_(x), x.mul_(DECAY).add_(g, alpha=-STEP)),
        "update_recover_retrace": lambda: x.add_(xp * DECAY - x, alpha=BACK),
        "update_swap_accept": lambda: x.mul_(DECAY).add_(g, alpha=-STEP),
        "dots_list": dots_of_lists,
        "update_list_accept": lambda: update_lists(copy_state=True),
        "update_list_retrace": lambda: torch._foreach_add_(x, gp, alpha=BACK),
        "update_swap_list_accept": lambda: update_lists(copy_state=False),
    }
    return baselines[label]


#: (row label, backend, dtype label) -> (timing, bytes moved)
Timings = dict[tuple[str, str, str], tuple[harness.Timing, int]]
Timer = Callable[[Callable[[], object]], harness.Timing]


def copy_row(
    n: int, device: torch.device, generator: torch.Generator, timed: Timer
) -> tuple[harness.Timing, int]:
    """A torch ``copy_`` of ``n`` elements: the practical ceiling of a streaming pass."""
    src = torch.randn(n, dtype=DTYPE, device=device, generator=generator)
    dst = torch.empty_like(src)
    return timed(lambda: dst.copy_(src)), 2 * n * src.element_size()


def measure_size(
    n: int,
    kernel_sets: Mapping[str, ops.KernelSet],
    device: torch.device,
    generator: torch.Generator,
    timed: Timer,
) -> Timings:
    """Every row at ``n`` elements: the copy, then per op the unfused baseline and each
    backend on one set of inputs (freed before the next op's)."""
    timings: Timings = {("copy", "torch", FLOAT_LABEL): copy_row(n, device, generator, timed)}
    for op, op_rows in groupby(ROWS, key=lambda r: r.op):
        case = OP_CASES[op]
        op_rows = list(op_rows)
        for dtype_label, state_dtype in ((FLOAT_LABEL, None), (MIXED_LABEL, STATE_DTYPE)):
            rows = [r for r in op_rows if state_dtype is None or r.bf16_state]
            if not rows:
                continue
            args = make_args(op, n, state_dtype, device, generator)
            for row in rows:
                branch_args = with_branch(op, args, row.accept)
                named = dict(zip(case.arg_names, branch_args, strict=True))
                nbytes = case.bytes_moved(n, DTYPE, state_dtype, accept=row.accept)
                baseline = unfused_baseline(row.label, named)
                timings[(row.label, UNFUSED, dtype_label)] = (timed(baseline), nbytes)
                for backend, kernels in kernel_sets.items():
                    kernel = getattr(kernels, op)
                    fused = timed(lambda k=kernel, a=branch_args: k(*a))
                    timings[(row.label, backend, dtype_label)] = (fused, nbytes)
            del args
    return timings


def records(n: int, timings: Timings, backends: list[str]) -> list[dict[str, object]]:
    """The JSON records of one size, in table order: copy, the baseline, then each
    backend; float32 rows before the compact-state rows."""
    copy_time, copy_bytes = timings[("copy", "torch", FLOAT_LABEL)]
    copy_gbps = copy_bytes / copy_time.median_s / 1e9
    out: list[dict[str, object]] = []
    for backend in ["torch", UNFUSED, *backends]:
        for dtype_label in (FLOAT_LABEL, MIXED_LABEL):
            for label in ["copy", *(r.label for r in ROWS)]:
                if (label, backend, dtype_label) not in timings:
                    continue
                timing, nbytes = timings[(label, backend, dtype_label)]
                gbps = nbytes / timing.median_s / 1e9
                out.append(
                    {
                        "op": label,
                        "backend": backend,
                        "n": n,
                        "dtype": dtype_label,
                        "median_s": timing.median_s,
                        "bytes": nbytes,
                        "gbps": gbps,
                        "frac_of_copy": gbps / copy_gbps,
                        "min_s": timing.min_s,
                    }
                )
    return out


def bench(
    device: torch.device, sizes: list[int], warmup: int, repeats: int | None
) -> list[dict[str, object]]:
    backends = [b for b in ops.available_backends(device) if b != "reference"]
    if device.type == "cpu":
        backends = [b for b in backends if b != "triton"]  # interpreter: not a perf path
    kernel_sets = {b: ops.get_kernels(b, device) for b in backends}
    generator = torch.Generator(device=device).manual_seed(0)

    def timed(fn: Callable[[], object]) -> harness.Timing:
        return harness.time_repeated(fn, device, warmup=warmup, repeats=repeats)

    rows: list[dict[str, object]] = []
    for n in sizes:
        rows += records(n, measure_size(n, kernel_sets, device, generator, timed), backends)
    return rows


def print_results(rows: list[dict[str, object]]) -> None:
    base = {(r["op"], r["n"], r["dtype"]): r["median_s"] for r in rows if r["backend"] == UNFUSED}
    columns = ["op", "backend", "dtype", "n", "median ms", "min ms", "GB/s", "frac_copy"]
    lines = []
    for r in rows:
        ref_s = base.get((r["op"], r["n"], r["dtype"]))
        lines.append(
            [
                r["op"],
                r["backend"],
                r["dtype"],
                r["n"],
                harness.cell(r["median_s"], ".3f", scale=1e3),
                harness.cell(r["min_s"], ".3f", scale=1e3),
                f"{r['gbps']:.2f}",
                f"{r['frac_of_copy']:.2f}",
                "-" if ref_s is None else f"{ref_s / r['median_s']:.2f}x",
            ]
        )
    harness.print_table([*columns, "vs unfused"], lines, left_aligned=3)


def main() -> None:
    parser = harness.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="elements per vector"
    )
    harness.add_timing_flags(parser, repeats=None, warmup=2)
    args = parser.parse_args()
    device = harness.resolve_device(args.device)
    print(ops.cpp_extension_status())
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    splits = ", ".join(
        f"{n}: {len(shapes)} tensors, width {shapes[0][-1]}"
        for n, shapes in ((n, transformer_shapes(n)) for n in args.sizes)
    )
    print(f"list ops: n split over the shapes of a {LIST_BLOCKS}-block transformer ({splits})")
    rows = bench(device, args.sizes, args.warmup, args.repeats)
    print_results(rows)
    harness.write_json(args.json, rows)


if __name__ == "__main__":
    main()
