"""How close do the fused kernels get to memory bandwidth, and how much faster are they
than the same math done with unfused torch ops?

    python benchmarks/bench_kernels.py --device cpu --json benchmarks/results/kernels_cpu.json
    python benchmarks/bench_kernels.py --device cuda --sizes 1000000 16000000

For each size and op: median wall time over repeats (after warm-up; the contenders of an
op timed in turns, one call each per round), bytes moved, GB/s,
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

Each row is also held against the torch kernel that does a streaming pass of the same kind
on the same buffers, timed in turns with it (issue: every pass as fast as torch's own
streaming kernels): the reductions against ``torch.dot`` (two vectors read, 8 N; for
``dots_list`` on the list's elements concatenated), the single-tensor updates against
``x.add_(grad, alpha=...)`` (read x and G, write x: 12 N), the list updates against
``torch._foreach_add_`` on the same lists. ``vs torch`` is the ratio of GB/s (each pass
scored with its own bytes moved), so 1.0 means streaming at torch's rate. For a
compact-state ``dots`` row torch.dot reads G and a float32 copy of G_{t-1} (it takes one
dtype): 8 N against the fused kernel's 6 N.

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
#: Backend label of the torch-kernel rows (see ``torch_kernel``).
TORCH_KERNEL = "torch-kernel"
#: The ``alpha`` of the ``add_`` / ``_foreach_add_`` comparison (tiny: the timed calls
#: leave x practically unchanged for the fused kernels that follow).
ADD_ALPHA = 1e-30
Timer = Callable[[list[Callable[[], object]]], list[harness.Timing]]


def torch_kernel(label: str, named: Mapping[str, object]) -> tuple[str, Callable[[], object], int]:
    """The torch kernel row ``label`` is held against, on the row's own buffers: its
    name, the call, and the bytes it moves (two vectors read for ``dot``; x and G read
    and x written for ``add_``)."""
    x, grad = named.get("x"), named["grad"]
    if label.startswith("dots"):
        if isinstance(grad, list):  # dots_list: one dot over the same elements
            first = torch.cat([t.reshape(-1) for t in grad])
            second = torch.cat([t.reshape(-1) for t in named["grad_prev"]])
        else:  # a compact G_{t-1} as a float32 copy: torch.dot takes one dtype
            first, second = grad, (named["grad_prev"] if x is None else x).to(grad.dtype)
        return "dot", lambda: torch.dot(first, second), 2 * first.numel() * first.element_size()
    if isinstance(x, list):
        nbytes = 3 * sum(t.numel() * t.element_size() for t in x)
        return "_foreach_add_", lambda: torch._foreach_add_(x, grad, alpha=ADD_ALPHA), nbytes
    return "add_", lambda: x.add_(grad, alpha=ADD_ALPHA), 3 * x.numel() * x.element_size()


def copy_row(
    n: int, device: torch.device, generator: torch.Generator, timed: Timer
) -> tuple[harness.Timing, int]:
    """A torch ``copy_`` of ``n`` elements: the practical ceiling of a streaming pass."""
    src = torch.randn(n, dtype=DTYPE, device=device, generator=generator)
    dst = torch.empty_like(src)
    return timed([lambda: dst.copy_(src)])[0], 2 * n * src.element_size()


def measure_size(
    n: int,
    kernel_sets: Mapping[str, ops.KernelSet],
    device: torch.device,
    generator: torch.Generator,
    timed: Timer,
) -> Timings:
    """Every row at ``n`` elements: the copy, then per op its torch kernel, the unfused
    baseline and each backend on one set of inputs (freed before the next op's)."""
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
                # In turns: the torch kernel, the unfused baseline and
                # each backend, so the ratios between them survive bandwidth drift.
                contenders = {
                    (row.label, UNFUSED, dtype_label): (unfused_baseline(row.label, named), nbytes)
                }
                name, call, kernel_bytes = torch_kernel(row.label, named)
                contenders[(row.label, f"{TORCH_KERNEL}:{name}", dtype_label)] = (
                    call,
                    kernel_bytes,
                )
                for backend, kernels in kernel_sets.items():
                    kernel = getattr(kernels, op)
                    contenders[(row.label, backend, dtype_label)] = (
                        lambda k=kernel, a=branch_args: k(*a),
                        nbytes,
                    )
                measured = timed([fn for fn, _ in contenders.values()])
                for key, (_, moved), timing in zip(
                    contenders, contenders.values(), measured, strict=True
                ):
                    timings[key] = (timing, moved)
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
                kernel = next(
                    (
                        (k[1].removeprefix(f"{TORCH_KERNEL}:"), v)
                        for k, v in timings.items()
                        if k[0] == label and k[2] == dtype_label and k[1].startswith(TORCH_KERNEL)
                    ),
                    None,
                )
                kernel_fields = {}
                if kernel is not None:
                    kernel_gbps = kernel[1][1] / kernel[1][0].median_s / 1e9
                    kernel_fields = {
                        "torch_kernel": kernel[0],
                        "torch_kernel_gbps": kernel_gbps,
                        "vs_torch_kernel": gbps / kernel_gbps,
                    }
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
                        **kernel_fields,
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

    def timed(fns: list[Callable[[], object]]) -> list[harness.Timing]:
        return harness.time_interleaved(fns, device, warmup=warmup, repeats=repeats)

    rows: list[dict[str, object]] = []
    for n in sizes:
        rows += records(n, measure_size(n, kernel_sets, device, generator, timed), backends)
    return rows


def print_results(rows: list[dict[str, object]]) -> None:
    base = {(r["op"], r["n"], r["dtype"]): r["median_s"] for r in rows if r["backend"] == UNFUSED}
    columns = ["op", "backend", "dtype", "n", "median ms", "min ms", "GB/s", "frac_copy"]
    columns += ["torch kernel", "its GB/s", "vs torch"]
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
                r.get("torch_kernel", "-"),
                harness.cell(r.get("torch_kernel_gbps"), ".2f"),
                harness.cell(r.get("vs_torch_kernel"), ".2f"),
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
